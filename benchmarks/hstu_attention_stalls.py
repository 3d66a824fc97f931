"""Warp stall reasons of each kernel in ncu's per-SASS-instruction CSV (--page source --csv --print-source sass).

    python3 benchmarks/hstu_attention_stalls.py bias.sass.csv [...]

Prints, per kernel: the share of each stall reason over all samples, the share by opcode, and the top
instructions with the instructions just before them (what a long-scoreboard stall waits on is usually there).
"""
import collections
import csv
import sys
from typing import Dict, List


def kernels(path: str) -> Dict[str, List[Dict[str, str]]]:
    out, name, header = {}, None, None
    for row in csv.reader(open(path)):
        if len(row) >= 2 and row[0] == "Kernel Name":
            name, header = row[1], None
            out[name] = []
        elif row and row[0] == "Address":
            header = row
        elif header and name and len(row) == len(header):
            out[name].append(dict(zip(header, row)))
    return out


def samples(row: Dict[str, str]) -> float:
    return float(row["Warp Stall Sampling (All Samples)"] or 0)


def report(path: str, top: int = 5) -> None:
    for name, rows in kernels(path).items():
        reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
        by_reason = collections.Counter({c[6:]: sum(float(r[c] or 0) for r in rows) for c in reasons})
        by_op = collections.Counter()
        for r in rows:
            words = [w for w in r["Source"].split() if not w.startswith("@")]
            by_op[words[0].split(".")[0] if words else "?"] += samples(r)
        total = sum(by_reason.values())
        print(f"{path} {name}: {int(total)} samples")
        print("  reasons: " + " ".join(f"{k}:{100 * v / total:.0f}%" for k, v in by_reason.most_common(8)))
        print("  opcodes: " + " ".join(f"{k}:{100 * v / total:.0f}%" for k, v in by_op.most_common(10)))
        for i in sorted(range(len(rows)), key=lambda i: -samples(rows[i]))[:top]:
            before = " | ".join(rows[j]["Source"].strip() for j in range(max(0, i - 2), i))
            print(f"  {100 * samples(rows[i]) / total:4.1f}%  {rows[i]['Source'].strip()}   (after: {before})")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        report(p)
