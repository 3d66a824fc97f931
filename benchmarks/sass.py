"""Offline sm_90 compiles of Triton kernels on a machine without a GPU, read back with the ptxas, cuobjdump
and nvdisasm that ship in the triton wheel (so the code is that of the installed Triton, which may differ from
the GPU machine's). Shared by benchmarks/linear_cross_entropy_sass.py and benchmarks/hstu_attention_sass.py."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclasses.dataclass
class Compiled:
    registers: int
    stack_bytes: int
    sass: str
    ttgir: str

    def instructions(self) -> List[str]:
        """The SASS instruction lines (labels and directives dropped)."""
        return [line for line in self.sass.splitlines() if re.match(r"^\s*/\*[0-9a-f]+\*/", line)]


def compile_sm90(kernel, signature: Dict[str, str], constexprs: Dict[str, object], aligned: Iterable[str],
                 warps: int, stages: int) -> Compiled:
    """kernel compiled for sm_90: `signature` types the runtime arguments, `aligned` names those marked divisible
    by 16 (as the JIT marks pointers and strides at aligned shapes)."""
    names = kernel.arg_names
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([TOOLS / "nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
    return Compiled(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                    stack_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)), sass=sass,
                    ttgir=compiled.asm["ttgir"])
