"""Fused Triton HSTU attention (ops/triton/hstu_attention.py) against the PyTorch formula.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (numpy, slow):
tiny shapes and few hypothesis examples keep this file well under a minute on 2
cores. With CUDA the same properties run on larger shapes (lengths up to ~2,000,
head dims 25/50/64/128, bf16).

Tolerances, as max |kernel - reference| / max |reference| per tensor:
* fp32: 1e-4. Both sides accumulate in fp32 (tl.dot with input_precision="ieee",
  fp32 atomics for the rab gradients); only summation order differs, which costs
  ~1e-6 relative here. 1e-4 leaves room for sums over ~2,000 keys.
* bf16: 2e-2. The reference upcasts the bf16 inputs and runs in fp32; the kernel
  rounds the attention weights and dS to bf16 before the second matmul and the
  outputs to bf16 (2^-8 = 0.4% per rounding, partly averaging out over keys).
Time buckets: kernel and reference both take an fp32 log but not the same one,
so a delta whose ln(|d|)/0.301 lies within fp32 rounding of an integer may land
in adjacent buckets (with N^2 deltas per sequence some always do). The attention
tests therefore run the reference with the kernel's bucket function
(`kernel_time_buckets`), and test_time_buckets_match_reference checks that
function against the reference's on 600,000 deltas: differences only within
5e-5 of a boundary, and by one bucket.
"""

from __future__ import annotations

import contextlib
import math
import os
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

triton = pytest.importorskip("triton")

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ops.hstu_attention as hstu_module  # noqa: E402
from ops.hstu_attention import BUCKET_INCREMENT, hstu_attention, hstu_attention_reference, time_buckets  # noqa: E402
import ops.triton.hstu_attention as triton_module  # noqa: E402
from ops.triton.hstu_attention import _hstu_attention, kernel_time_buckets, triton_hstu_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
NUM_BUCKETS = 128

if CUDA:
    # Every (dims, dtype, bias) combination is one compilation of both kernels (~10 s), so the
    # random test draws from a short menu; the fixed tests below add fp32, d = 128 and no-bias.
    MAX_LEN, MAX_BATCH, MAX_HEADS, EXAMPLES = 2000, 6, 4, 10
    DIMS = [(25, 25), (50, 50)]
    DTYPES = [torch.bfloat16]
    BIAS = [True]
else:
    MAX_LEN, MAX_BATCH, MAX_HEADS, EXAMPLES = 40, 5, 3, 15
    DIMS = [(8, 8), (16, 16), (25, 12), (12, 25)]
    DTYPES = [torch.float32]
    BIAS = [True, False]


def _timestamps(batch: int, max_seq_len: int, gen: torch.Generator, ordered: bool, scale: int, ties: bool = False):
    if ordered:  # histories are time-ordered in real data: few bucket changes per row
        gaps = torch.exp(torch.randn(batch, max_seq_len, generator=gen) * 2 + math.log(scale))
        if ties:  # events logged in the same second: runs of equal timestamps (delta 0, bucket 0)
            gaps[torch.rand(batch, max_seq_len, generator=gen) < 0.5] = 0.0
        return torch.cumsum(gaps.long(), dim=1) + 1_000_000_000
    # arbitrary order: a bucket change at almost every element (worst case for d ts_w); with ties, few values
    high = max(2, max_seq_len // 4) if ties else scale * max_seq_len
    return torch.randint(0, high, (batch, max_seq_len), generator=gen)


def _make_inputs(lengths, heads, dqk, dv, dtype, seed, bias, ordered=True, scale=1000, max_seq_len=None,
                 weight_dtype=None, ties=False):
    gen = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    n = max_seq_len or max(max(lengths, default=1), 1)
    offsets = torch.nn.functional.pad(torch.cumsum(lengths_t, 0), (1, 0))
    total = int(offsets[-1])
    # q, k scaled so that q.k is O(1) whatever the head dim (SiLU then sees both signs).
    qk_scale = dqk ** -0.25

    def leaf(shape, scale_=1.0):
        x = torch.randn(shape, generator=gen) * scale_
        return x.to(DEVICE, dtype).requires_grad_()

    q = leaf((total, heads, dqk), qk_scale)
    k = leaf((total, heads, dqk), qk_scale)
    v = leaf((total, heads, dv))
    extra = (None, None, None)
    if bias:
        ts = _timestamps(len(lengths), n, gen, ordered, scale, ties).to(DEVICE)
        wdtype = weight_dtype or torch.float32
        ts_w = (torch.randn(NUM_BUCKETS + 1, generator=gen) * 0.5).to(DEVICE, wdtype).requires_grad_()
        pos_w = (torch.randn(2 * n - 1, generator=gen) * 0.5).to(DEVICE, wdtype).requires_grad_()
        extra = (ts, ts_w, pos_w)
    return q, k, v, offsets.to(DEVICE), n, extra


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.float().abs().max().item() if b.numel() else 0.0
    return (a.float() - b.float()).abs().max().item() / max(scale, 1e-6) if a.numel() else 0.0


def _reference(*args):
    # The kernel's bucket function stands in for the reference's (see the module docstring;
    # test_time_buckets_match_reference checks the two against each other).
    with mock.patch.object(hstu_module, "time_buckets", kernel_time_buckets):
        return hstu_attention_reference(*args)


def _check(q, k, v, offsets, n, extra, dtype, fwd_config=None, bwd_config=None, grad=True, rab_config=None):
    out = _hstu_attention(q, k, v, offsets, n, *extra, fwd_config=fwd_config, bwd_config=bwd_config,
                          rab_config=rab_config)
    ref = _reference(q, k, v, offsets, n, *extra)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = TOL[dtype]
    assert _rel_err(out, ref) <= tol, ("out", _rel_err(out, ref))
    if not grad or out.numel() == 0:
        return
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    params = [q, k, v] + [w for w in extra[1:] if w is not None]
    names = ["dq", "dk", "dv", "d_ts_w", "d_pos_w"]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel_err(a, b) <= tol, (name, _rel_err(a, b))


lengths_st = st.lists(st.integers(0, MAX_LEN), min_size=1, max_size=MAX_BATCH)
# The backward's three paths: the dQ walk with the per-head rab gradients; the rab-gradient pass beside the two
# walks; the pass beside one fused walk (dQ by atomics).
PATHS = {"walk": (False, False), "pass": (True, False), "fused": (True, True)}


def _backward_path(path: str) -> contextlib.ExitStack:
    rab_pass, fused = PATHS[path]
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(triton_module, "RAB_PASS", rab_pass))
    stack.enter_context(mock.patch.object(triton_module, "FUSED_DQ", fused))
    return stack


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    lengths=lengths_st,
    heads=st.integers(1, MAX_HEADS),
    dims=st.sampled_from(DIMS),
    dtype=st.sampled_from(DTYPES),
    bias=st.sampled_from(BIAS),
    ordered=st.booleans(),
    ties=st.booleans(),
    path=st.sampled_from(sorted(PATHS)),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(lengths, heads, dims, dtype, bias, ordered, ties, path, seed):
    """Output and dq, dk, dv, d ts_w, d pos_w on ragged batches (empty and length-1 sequences too),
    time-ordered or not, with or without equal timestamps, on each of the backward's paths: the rab
    gradients from their own pass (heads summed in-program) or from the dQ walk (per head), and dQ from
    its own walk or by atomics from the dK/dV walk."""
    assume(sum(lengths) > 0)
    q, k, v, offsets, n, extra = _make_inputs(lengths, heads, *dims, dtype, seed, bias, ordered, ties=ties)
    with _backward_path(path):
        _check(q, k, v, offsets, n, extra, dtype)


def test_time_buckets_match_reference():
    """Kernel buckets == reference buckets for every |d| <= 2e5 and random d up to 2^40,
    except where ln(|d|)/0.301 is within fp32 rounding of an integer: both sides' fp32 log,
    scaling and final rounding each err by < 1e-5 at |d| ~ 2^40 (ln/0.301 ~ 92), so 5e-5."""
    gen = torch.Generator().manual_seed(0)
    small = torch.arange(-200_000, 200_001)
    sign = torch.randint(0, 2, (200_000,), generator=gen) * 2 - 1
    large = torch.randint(1, 2**40, (200_000,), generator=gen) * sign
    delta = torch.cat([small, large]).to(DEVICE)
    got = kernel_time_buckets(delta, NUM_BUCKETS).cpu()
    want = time_buckets(delta, NUM_BUCKETS).cpu()
    x = torch.log(delta.cpu().abs().clamp(min=1).double()) / BUCKET_INCREMENT
    near = (x - x.round()).abs() < 5e-5
    differ = got != want
    assert not (differ & ~near).any(), delta.cpu()[differ & ~near][:10]
    assert ((got - want).abs() <= 1).all()
    assert differ.float().mean().item() < 1e-4


def test_time_buckets_on_every_boundary():
    """At each bucket boundary b_k = e^(0.301 k) (k = 1 .. 128) and one either side, of either sign: the
    kernel's bucket is floor(ln|d| / 0.301) computed exactly (fp64 here), or one off only where that ratio
    lies within fp32 rounding of the integer k (the documented difference); buckets never decrease with |d|
    and stop at 128. int64 deltas reach e^43.7, so buckets 129+ exist only as the clamp."""
    k = torch.arange(1, NUM_BUCKETS + 1, dtype=torch.float64)
    edges = torch.exp(k * BUCKET_INCREMENT).round().long()
    around = (edges[:, None] + torch.tensor([-1, 0, 1])).flatten()
    delta = torch.cat([around, -around, torch.tensor([0, 1, -1, 2**62])])
    got = kernel_time_buckets(delta.to(DEVICE), NUM_BUCKETS).cpu()
    x = torch.log(delta.abs().clamp(min=1).double()) / BUCKET_INCREMENT
    exact = x.floor().long().clamp(0, NUM_BUCKETS)
    near = (x - x.round()).abs() < 5e-5
    assert ((got == exact) | (near & ((got - exact).abs() == 1))).all(), delta[got != exact]
    order = delta.abs().argsort()
    assert (got[order].diff() >= 0).all()
    assert got[-1] == NUM_BUCKETS


def test_large_absolute_timestamps():
    """Millisecond timestamps (~1.7e12, beyond fp32's 2^24) with gaps from 1 ms: buckets of small deltas stay
    exact (a kernel that kept the times themselves in fp32 would lose them)."""
    q, k, v, offsets, n, extra = _make_inputs([19, 30, 7], 2, 16, 16, torch.float32, 5, True, scale=3)
    ts = extra[0] - extra[0].min() + 1_700_000_000_000
    _check(q, k, v, offsets, n, (ts, *extra[1:]), torch.float32)
    assert (kernel_time_buckets(ts[:, 1:] - ts[:, :-1]) < 12).any()  # small deltas are in the test


def test_equal_timestamps():
    """Runs of equal timestamps, and a sequence whose timestamps are all equal (every delta 0: bucket 0)."""
    q, k, v, offsets, n, extra = _make_inputs([23, 9, 17], 2, 16, 16, torch.float32, 4, True, ties=True)
    ts = extra[0].clone()
    ts[1] = ts[1, 0]
    _check(q, k, v, offsets, n, (ts, *extra[1:]), torch.float32)


def test_empty_and_single_sequences():
    """An empty sequence between others, length-1 sequences, padded length > every length."""
    q, k, v, offsets, n, extra = _make_inputs([3, 0, 1, 7, 0], 2, 16, 8, torch.float32, 0, True,
                                              max_seq_len=12)
    _check(q, k, v, offsets, n, extra, torch.float32)


@pytest.mark.skipif(CUDA, reason="interpreter only: GPU block tables are checked by the benchmark's --tune")
@pytest.mark.parametrize(
    "fwd_config,bwd_config,rab_config,path",
    [((32, 16, 4, 2), (32, 16, 16, 4, 2), (32, 16, 4, 2), "pass"), ((16, 16, 4, 2), (32, 32, 16, 4, 2), None, "walk"),
     ((32, 32, 4, 2), (32, 16, 32, 4, 2), (32, 32, 4, 2), "pass"), ((16, 16, 4, 2), (32, 16, 16, 4, 2), None, "fused")],
)
def test_block_shapes(fwd_config, bwd_config, rab_config, path):
    """Query/key blocks of unequal sizes (diagonal tiles, pos_w skew with wrap-around), in the
    rab-gradient pass, the dQ walk and the fused walk."""
    q, k, v, offsets, n, extra = _make_inputs([37, 5, 20], 2, 16, 16, torch.float32, 3, True,
                                              ordered=False, scale=10**6, max_seq_len=40)
    with _backward_path(path):
        _check(q, k, v, offsets, n, extra, torch.float32, fwd_config, bwd_config, rab_config=rab_config)


@pytest.mark.parametrize("dtype,heads,batch,n,expected", [
    (torch.bfloat16, 2, 8, 4096, True), (torch.bfloat16, 2, 8, 2048, True), (torch.bfloat16, 2, 32, 512, True),
    (torch.bfloat16, 2, 8, 1024, False), (torch.bfloat16, 1, 8, 4096, False), (torch.float32, 8, 128, 211, False)])
def test_rab_pass_rule_follows_the_h100_measurements(dtype, heads, batch, n, expected):
    """The pass where it was faster on an H100 (132 SMs, 64-row pass blocks); the dQ walk where it was slower, and
    with one head (slower by 6.6x in fp32; not timed in bf16)."""
    programs = batch * -(-n // 64)
    assert triton_module.rab_pass_wins(dtype, heads, programs, 132) is expected


@pytest.mark.parametrize("bias,heads,batch,n,expected", [
    (True, 2, 8, 4096, True), (True, 2, 8, 8192, True), (True, 8, 128, 211, True), (True, 4, 128, 211, True),
    (True, 2, 128, 211, True), (True, 1, 128, 211, False), (False, 2, 8, 4096, False), (True, 2, 8, 1024, False)])
def test_fused_dq_rule_follows_the_h100_measurements(bias, heads, batch, n, expected):
    """The fused walk where it was faster on an H100 (with the bias, two or more heads: bf16 N = 4096 / 8192 and
    the fp32 trainer shapes); the two walks with one head, without the bias, and where the pass's grid (64-row
    blocks) does not fill the 132 SMs (not shown to win)."""
    programs = batch * -(-n // 64)
    assert triton_module.fused_dq_wins(bias, heads, programs, 132) is expected


def test_partial_weight_grads_and_views():
    """Only ts_w requires grad; q, k, v are strided views into one projection (as in the model)."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([9, 4, 13])
    offsets = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(DEVICE)
    n, heads, d = 16, 2, 8
    total = int(lengths.sum())
    proj = (torch.randn(total, 3 * heads * d, generator=gen) * 0.5).to(DEVICE).requires_grad_()
    q, k, v = (x.view(total, heads, d) for x in proj.split(heads * d, dim=1))
    ts = _timestamps(3, n, gen, True, 1000).to(DEVICE)
    ts_w = (torch.randn(NUM_BUCKETS + 1, generator=gen) * 0.5).to(DEVICE).requires_grad_()
    pos_w = (torch.randn(2 * n - 1, generator=gen) * 0.5).to(DEVICE)  # frozen
    out = triton_hstu_attention(q, k, v, offsets, n, ts, ts_w, pos_w)
    ref = _reference(q, k, v, offsets, n, ts, ts_w, pos_w)
    assert _rel_err(out, ref) <= 1e-4
    got = torch.autograd.grad(out.sum(), [proj, ts_w])  # sum(): an expanded (stride 0) dO
    want = torch.autograd.grad(ref.sum(), [proj, ts_w])
    for a, b in zip(got, want):
        assert _rel_err(a, b) <= 1e-4


def test_degenerate_batches():
    """No sequences, or only empty ones: zero-row outputs like the reference."""
    for lengths in ([], [0, 0]):
        offsets = torch.nn.functional.pad(torch.tensor(lengths, dtype=torch.int64).cumsum(0), (1, 0))
        q = torch.zeros(0, 2, 8, device=DEVICE)
        out = triton_hstu_attention(q, q, q, offsets.to(DEVICE), 4)
        assert out.shape == (0, 2, 8)


def test_dispatcher_uses_kernel():
    q, k, v, offsets, n, extra = _make_inputs([6, 3], 1, 8, 8, torch.float32, 2, True)
    out = hstu_attention(q, k, v, offsets, n, *extra, kernel="triton")
    ref = _reference(q, k, v, offsets, n, *extra)
    assert _rel_err(out, ref) <= 1e-4


def test_fuxi_channels_on_the_kernel_match_the_formula():
    """FuXi-alpha's three channels (no bias; zero q, k with one bias table) through the kernel, values and grads."""
    from generative_recommenders.modeling.fuxi import FuXiLayer

    gen = torch.Generator().manual_seed(8)
    lengths = torch.tensor([7, 0, 12])
    offsets = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(DEVICE)
    n, dim = 16, 8
    ts = _timestamps(3, n, gen, True, 1000).to(DEVICE)
    x = torch.randn(int(lengths.sum()), dim, generator=gen).to(DEVICE)
    torch.manual_seed(0)
    layers = {kernel: FuXiLayer(dim, 2, 4, 4, 8, n, 0.0, attention_kernel=kernel).to(DEVICE)
              for kernel in ("triton", "torch")}
    layers["torch"].load_state_dict(layers["triton"].state_dict())
    with torch.no_grad():
        for layer in layers.values():
            layer.ts_w.copy_(torch.linspace(-2, 2, NUM_BUCKETS + 1))
            layer.pos_w.copy_(torch.linspace(1, -1, 2 * n - 1))
    with mock.patch.object(hstu_module, "time_buckets", kernel_time_buckets):
        outs = {kernel: layer.channels(x, offsets, ts) for kernel, layer in layers.items()}
    for got, want in zip(outs["triton"], outs["torch"]):
        assert _rel_err(got, want) <= 1e-4
    g = torch.randn(outs["torch"][2].shape, generator=gen).to(DEVICE)
    grads = {kernel: torch.autograd.grad(sum((o * g).sum() for o in outs[kernel][1:]),
                                         [layers[kernel].uvqk, layers[kernel].ts_w, layers[kernel].pos_w])
             for kernel in layers}
    for a, b in zip(grads["triton"], grads["torch"]):
        assert _rel_err(a, b) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("weight_dtype,bias", [(torch.float32, True), (torch.bfloat16, True), (None, False)])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_long_sequences_bf16(weight_dtype, bias, path):
    """Lengths near 2,000 with d = 128 bf16 (the benchmark's dtype); rab weights fp32, bf16 or none; each
    backward path at the GPU's own tiles."""
    q, k, v, offsets, n, extra = _make_inputs([1999, 1, 1024, 0, 1500], 2, 128, 128,
                                              torch.bfloat16, 7, bias, max_seq_len=2048,
                                              weight_dtype=weight_dtype)
    with _backward_path(path):
        _check(q, k, v, offsets, n, extra, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", sorted(PATHS))
def test_fp32_gpu_dims(path):
    """fp32 on the GPU (exact dots) with a non-power-of-two head dim and ragged lengths, each backward path."""
    q, k, v, offsets, n, extra = _make_inputs([300, 0, 1, 257], 2, 50, 25, torch.float32, 11, True,
                                              ordered=False, scale=10**5)
    with _backward_path(path):
        _check(q, k, v, offsets, n, extra, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_sequences_of_8192_in_one_batch():
    """The longest lengths the issue asks for, beside tiny ones, bf16 with the bias."""
    q, k, v, offsets, n, extra = _make_inputs([8192, 1, 0, 3001], 1, 64, 64, torch.bfloat16, 5, True)
    _check(q, k, v, offsets, n, extra, torch.bfloat16)


def test_training_is_the_same_with_and_without_the_kernel(tmp_path):
    """A short training with the kernel gives the PyTorch path's losses and metrics.

    fp32 without TF32 and without CUDA graphs (the graph path encodes the padded
    layout, which draws other negatives), so both runs consume the same random
    numbers; what remains is summation order: 1e-4 relative on the losses, and
    a few users' ranks on the metrics. Under the CPU interpreter the data set is
    smaller (each kernel launch there costs ~0.1 s per program).
    """
    from tiny_config import train_tiny

    def train(kernel: str) -> dict:
        return train_tiny(tmp_path, [
            "train_fn.num_epochs = 2", f"synthetic_data.num_users = {300 if CUDA else 130}", "train_fn.enable_tf32 = False",
            "train_fn.cuda_graphs = False", f"hstu_encoder.attention_kernel = '{kernel}'",
        ], run_name=kernel)

    fused, plain = train("triton"), train("torch")
    for a, b in zip(fused["per_epoch"], plain["per_epoch"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        for metric in ("hr@10", "ndcg@10", "mrr"):
            assert abs(a["eval"][metric] - b["eval"][metric]) <= 0.02, (metric, a["eval"], b["eval"])
