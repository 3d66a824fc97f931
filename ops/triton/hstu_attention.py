"""Fused Triton kernels for jagged HSTU attention, forward and backward.

Computes exactly `ops.hstu_attention.hstu_attention_reference(..., "silu")`:

    rab(i, j) = pos_w[N - 1 + j - i] + ts_w[bucket(t[min(i + 1, N - 1)] - t[j])]
    out_i     = sum_{j <= i} SiLU(q_i . k_j + rab(i, j)) / N * v_j

for every sequence of a jagged batch, without ever holding an N x N matrix in
memory: like FlashAttention, each program keeps one block of rows and walks
over the blocks of the other side, recomputing scores in the backward pass.
SiLU attention has no row-wise normaliser, so unlike softmax attention the
forward saves no statistics and the backward needs no `rowsum(dO * O)` pass.

Layout (kernels, then the autograd Function, then the public function):

* `_hstu_fwd_kernel`: grid (B * heads, query blocks). Key blocks strictly
  before the query block need no causal mask; the diagonal blocks do. With
  `num_targets` (M-FALCON, forward only, ops/targets.py) key blocks stop at
  the end of the prefix, target rows take the prefix end as their position
  and a row-wise dot adds each target's attention to itself; a constexpr
  flag compiles this out when the argument is absent.
* `_hstu_bwd_kernel`: grid (B * heads, blocks). Program p first computes
  dK, dV of key block p (walking the query blocks after it), then dQ of
  query block p (walking the key blocks before it). The two walks have
  complementary lengths, so every program of a sequence does about the same
  work, and neither dQ nor dK/dV needs atomics. With FUSED_DQ (the default
  with the bias and two or more heads, `fused_dq_wins`) the dK/dV walk also
  adds each tile's dS @ K to an fp32 dQ by atomics and the dQ walk is
  compiled out: S, dP and the bias are computed once per score in the
  backward instead of twice, and the weight gradients come from the pass.
* `_rab_grad_kernel`: grid (B, query blocks). The relative-bias weight
  gradients in their own pass: a program walks the key blocks of one query
  block with every head, builds each tile's bias once, sums the heads' dS
  (recomputing S and dP, two small dots per head) and runs the two
  reductions below once per tile instead of once per head and tile. It holds
  no dQ/dK/dV accumulators, so its reductions do not spill as they do in the
  dQ walk. Used beside the fused walk, and beside two walks where that
  measured faster (`_use_rab_pass`: 16-bit inputs, two or more heads, enough
  sequences x query blocks to fill the GPU); the backward kernel then
  compiles its weight-gradient code out.
* Relative-bias weight gradients (computed in that pass, or in the dQ walk,
  where a tile's rows are queries):
  - d pos_w: the diagonals of a (BLOCK_M, BLOCK_N) tile of dS are summed in
    registers by skewing the tile (`tl.gather` of row (r + c) mod BLOCK_M in
    column c) and reducing along columns: 2 * BLOCK_M atomics per tile
    instead of BLOCK_M * BLOCK_N. They go to a private copy of pos_w's
    gradient per (sequence, head) (per sequence in the rab pass), so
    concurrent programs (same query block, other sequences) never hit the
    same addresses; the copies are summed at the end (memory B * heads * N
    floats, linear in the batch).
  - d ts_w: only 129 targets, so per-element atomics would serialise badly.
    Each row of a tile is cut into runs of equal bucket and a run's sum is
    the difference of two prefix sums (`tl.cumsum`), so an atomic is issued
    only where the bucket changes along a row; the row totals get the same
    treatment down the last column. This is exact for any timestamps; with
    time-ordered histories (real data) buckets change a few times per row,
    so atomics drop by one to two orders of magnitude. They go to a private
    129-entry copy per program (summed at the end), spreading the remaining
    atomics over many cache lines instead of 4.
  In the dQ walk both are per head (summing heads there would need every
  head's dQ accumulator live at once). fp32 atomics make these two gradients
  (and dQ on the fused path) non-deterministic in the last bits.
* Head dims are padded to the next power of two (at least 16, tl.dot's
  minimum) with masked loads/stores. The 1/N scale is applied once to the
  accumulators (and to the rab gradients on the host), not per element.
* Time buckets: floor(log2(|dt|) * ln2 / 0.301) in fp32, i.e. the reference's
  floor(ln(|dt|) / 0.301) up to fp32 rounding: the two can differ (by one
  bucket) only when ln(|dt|) / 0.301 lies within ~1e-5 of an integer (the
  reference itself differs there between CPU and CUDA, which divides by
  multiplying with the reciprocal). `kernel_time_buckets` exposes the kernels'
  bucket function for tests.
* Per-score arithmetic dominates the cost of the bias (it runs once in the
  forward and twice in the backward), so it is kept lean: |dt| and max(., 1)
  on the float, MUFU.LG2 without denormal fix-ups, floor by the magic-number
  trick instead of F2I, and for bf16/fp16 SiLU through one MUFU.TANH
  (sigmoid(x) = (1 + tanh(x / 2)) / 2, rel. error <= 2^-11, below bf16's
  2^-8); fp32 keeps exp + divide. Both are GPU-only (inline PTX); the
  interpreter takes the plain tl.log2 / tl.sigmoid path.
* Block sizes come from small per-head-dim tables timed on an H100
  (benchmarks/hstu_attention.py --tune), not autotuning: trials would need the
  rab-gradient buffers reset, and a table never re-tunes on a new length.

* Timestamps are loaded one block ahead in every unmasked loop: the key
  block's in the forward and the dQ walk, the query block's in the dK/dV
  walk. A profile (ncu, H200) showed the forward stalled mostly on the int64
  delta waiting for that block's timestamps, loaded right before use
  (Triton's pipeliner prefetches only the loads that feed a dot); the
  prefetch took the forward from 0.78 to 0.52 ms at N=4096, the backward's
  about 2% more (it spills a little more at its 64 x 16 tiles, and the
  spill-free tiles were slower).

Measured (bf16, B=8, h=2, d=128, N=4096, full lengths; see
benchmarks/hstu_attention.md): without the relative bias 0.23 ms forward and
0.84 ms forward+backward (H200); with it (and both weight gradients) forward
0.52 ms (H200), forward+backward 2.99 ms with the pass and the fused walk
(H100, CUDA graph; 3.50 with the two walks and per-head reductions).

The module imports without a GPU; on CPU tensors the kernels run under
TRITON_INTERPRET=1 (tests), with small blocks.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ops.dispatch import dot_precision
from ops.time_buckets import BUCKET_INCREMENT

_LOG2_TO_BUCKET = tl.constexpr(math.log(2.0) / BUCKET_INCREMENT)


# --------------------------------------------------------------------------- #
# Shared device helpers
# --------------------------------------------------------------------------- #


@triton.jit
def _lg2(x, HW_MATH: tl.constexpr):
    if HW_MATH:  # MUFU.LG2 without the denormal fix-ups (x >= 1 here)
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _sigmoid(x, FAST_SILU: tl.constexpr):
    if FAST_SILU:  # one MUFU.TANH instead of EX2 + RCP; rel. error <= 2^-11, below bf16's 2^-8
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5], dtype=tl.float32,
                                      is_pure=True, pack=1)
        y = 0.5 * t + 0.5
    else:
        y = tl.sigmoid(x)
    return y


@triton.jit
def _time_bucket(tq, tk, NUM_BUCKETS: tl.constexpr, HW_MATH: tl.constexpr):
    """bucket(tq - tk) = floor(ln(max(|dt|, 1)) / 0.301) clamped to NUM_BUCKETS (int32).

    Written for few instructions (this runs once or twice per score): |.| and
    max on the float (float(|d|) == |float(d)|), and floor by the magic-number
    trick (round-to-nearest of y - 0.5 at 1.5 * 2^23) instead of F2I.
    """
    delta = (tq - tk).to(tl.float32)
    delta = tl.maximum(tl.abs(delta), 1.0)
    y = _lg2(delta, HW_MATH) * _LOG2_TO_BUCKET - 0.5
    bucket = (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    return tl.minimum(bucket, NUM_BUCKETS)


@triton.jit
def _rel_bias(qpos, kpos, tq, tk, TsW, PosW, max_seq_len, mask,
              NUM_BUCKETS: tl.constexpr, MASKED: tl.constexpr, HW_MATH: tl.constexpr):
    """rab for broadcastable (query, key) index tensors; also returns the time bucket.

    qpos is clamped to N - 1 by the caller, so unmasked tiles (keys strictly
    before the queries) always index inside pos_w; masked tiles mask the load.
    """
    pos_idx = max_seq_len - 1 + kpos - qpos
    if MASKED:
        pos = tl.load(PosW + pos_idx, mask=mask, other=0.0)
    else:
        pos = tl.load(PosW + pos_idx)
    bucket = _time_bucket(tq, tk, NUM_BUCKETS, HW_MATH)
    ts = tl.load(TsW + bucket)  # bucket is always in [0, NUM_BUCKETS]
    return pos.to(tl.float32) + ts.to(tl.float32), bucket


@triton.jit
def _sequence_bounds(SeqOffsets, off_b):
    """(first row in the jagged tensors as int64, length as int32) of sequence off_b."""
    seq_start = tl.load(SeqOffsets + off_b).to(tl.int64)
    return seq_start, (tl.load(SeqOffsets + off_b + 1) - seq_start).to(tl.int32)


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Masked 2D load; masks are emitted only where they are needed (padding or ragged rows)."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #


@triton.jit
def _key_times(TS, ts_base, start_n, max_seq_len, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The key block's timestamps (clamped: rows past N read the last one), or nothing without bias."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        tk = tl.load(TS + ts_base + tl.minimum(offs_n, max_seq_len - 1))
    else:
        tk = offs_n
    return tk


@triton.jit
def _fwd_tile(acc, q, qpos, kmax, tq, tk, K, V, TsW, PosW, k_base, v_base,
              start_n, seq_len, max_seq_len, stride_km, stride_vm, offs_qk, offs_v,
              DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_BUCKETS: tl.constexpr,
              DOT_PREC: tl.constexpr, MASKED: tl.constexpr, HW_MATH: tl.constexpr,
              FAST_SILU: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < seq_len
    k = _load_tile(K + k_base + offs_n[:, None] * stride_km + offs_qk[None, :], kv_ok,
                   offs_qk < DQK, MASKED, DQK != BLOCK_DQK)
    v = _load_tile(V + v_base + offs_n[:, None] * stride_vm + offs_v[None, :], kv_ok,
                   offs_v < DV, MASKED, DV != BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    causal = offs_n[None, :] <= kmax[:, None]
    if HAS_BIAS:
        rab, _ = _rel_bias(qpos[:, None], offs_n[None, :], tq[:, None], tk[None, :], TsW, PosW,
                           max_seq_len, causal, NUM_BUCKETS, MASKED, HW_MATH)
        s += rab
    p = s * _sigmoid(s, FAST_SILU)  # SiLU; the 1/N is applied to the accumulator at the end
    if MASKED:
        p = tl.where(causal, p, 0.0)
    acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc


@triton.jit
def _target_self_term(acc, q, offs_m, is_target, K, V, TsW, PosW, k_base, v_base, max_seq_len,
                      stride_km, stride_vm, offs_qk, offs_v,
                      DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                      HAS_BIAS: tl.constexpr, FAST_SILU: tl.constexpr):
    """Each target row's attention to its own key: a row-wise dot, relative position 0, bucket 0."""
    k = _load_tile(K + k_base + offs_m[:, None] * stride_km + offs_qk[None, :], is_target,
                   offs_qk < DQK, True, DQK != BLOCK_DQK)
    v = _load_tile(V + v_base + offs_m[:, None] * stride_vm + offs_v[None, :], is_target,
                   offs_v < DV, True, DV != BLOCK_DV)
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)
    if HAS_BIAS:
        s += tl.load(PosW + max_seq_len - 1).to(tl.float32) + tl.load(TsW).to(tl.float32)
    p = tl.where(is_target, s * _sigmoid(s, FAST_SILU), 0.0)
    return acc + p[:, None] * v.to(tl.float32)


@triton.jit
def _hstu_fwd_kernel(
    Q, K, V, Out, SeqOffsets, TS, TsW, PosW, NumTargets,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    stride_tb, num_heads, max_seq_len, inv_n,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    NUM_BUCKETS: tl.constexpr, DOT_PREC: tl.constexpr, HW_MATH: tl.constexpr, FAST_SILU: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # Query blocks on grid axis 1, last block first: the longest (most keys)
    # programs start first, which shortens the tail of the causal grid.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    seq_start, seq_len = _sequence_bounds(SeqOffsets, off_b)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_qk = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < seq_len
    q = _load_tile(Q + seq_start * stride_qm + off_h * stride_qh + offs_m[:, None] * stride_qm
                   + offs_qk[None, :], rows_ok, offs_qk < DQK, True, DQK != BLOCK_DQK)
    k_base = seq_start * stride_km + off_h * stride_kh
    v_base = seq_start * stride_vm + off_h * stride_vh
    ts_base = off_b.to(tl.int64) * stride_tb
    if HAS_TARGETS:
        # M-FALCON (ops/targets.py): targets sit at position n_hist, see the prefix and themselves,
        # and read their own timestamp, as does the last prefix row.
        num_targets = tl.load(NumTargets + off_b).to(tl.int32)
        n_hist = tl.maximum(seq_len - num_targets, 0)
        qpos = tl.minimum(tl.minimum(offs_m, n_hist), max_seq_len - 1)
        kmax = tl.minimum(offs_m, n_hist - 1)  # last visible key of the row, before the self term
        tq_index = tl.where((offs_m >= n_hist - 1) & (num_targets > 0), offs_m, offs_m + 1)
        full_end = tl.minimum(start_m, n_hist - n_hist % BLOCK_N)
        diag_end = tl.minimum(start_m + BLOCK_M, n_hist)
    else:
        qpos = tl.minimum(offs_m, max_seq_len - 1)  # rows past the sequence are junk, never stored
        kmax = qpos
        tq_index = offs_m + 1
        full_end = start_m
        diag_end = tl.minimum(start_m + BLOCK_M, seq_len)
    if HAS_BIAS:
        tq = tl.load(TS + ts_base + tl.minimum(tq_index, max_seq_len - 1))
    else:
        tq = qpos

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    # Key blocks every row of the block sees entirely: no masks. The key times of the next block are
    # loaded one iteration ahead: waiting on them right before use was the forward's main stall.
    tk = _key_times(TS, ts_base, 0, max_seq_len, BLOCK_N, HAS_BIAS)
    for start_n in range(0, full_end, BLOCK_N):
        tk_next = _key_times(TS, ts_base, start_n + BLOCK_N, max_seq_len, BLOCK_N, HAS_BIAS)
        acc = _fwd_tile(acc, q, qpos, kmax, tq, tk, K, V, TsW, PosW, k_base, v_base,
                        start_n, seq_len, max_seq_len, stride_km, stride_vm, offs_qk, offs_v,
                        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HAS_BIAS, NUM_BUCKETS, DOT_PREC,
                        False, HW_MATH, FAST_SILU)
        tk = tk_next
    # Diagonal key blocks (and the prefix's ragged end): masked.
    for start_n in range(full_end, diag_end, BLOCK_N):
        tk = _key_times(TS, ts_base, start_n, max_seq_len, BLOCK_N, HAS_BIAS)
        acc = _fwd_tile(acc, q, qpos, kmax, tq, tk, K, V, TsW, PosW, k_base, v_base,
                        start_n, seq_len, max_seq_len, stride_km, stride_vm, offs_qk, offs_v,
                        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HAS_BIAS, NUM_BUCKETS, DOT_PREC,
                        True, HW_MATH, FAST_SILU)
    if HAS_TARGETS:
        if start_m + BLOCK_M > n_hist:
            acc = _target_self_term(acc, q, offs_m, rows_ok & (offs_m >= n_hist), K, V, TsW, PosW,
                                    k_base, v_base, max_seq_len, stride_km, stride_vm, offs_qk, offs_v,
                                    DQK, DV, BLOCK_DQK, BLOCK_DV, HAS_BIAS, FAST_SILU)
    acc = acc * inv_n
    o_ptrs = Out + seq_start * stride_om + off_h * stride_oh + offs_m[:, None] * stride_om + offs_v[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=rows_ok[:, None] & (offs_v < DV)[None, :])


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #


@triton.jit
def _query_times(TS, ts_base, start_m, max_seq_len, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr):
    """t[min(i + 1, N - 1)] for the query block's rows i (the time each row's bias reads)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if HAS_BIAS:
        tq = tl.load(TS + ts_base + tl.minimum(offs_m + 1, max_seq_len - 1))
    else:
        tq = offs_m
    return tq


@triton.jit
def _dq_key_times(TS, ts_base, start_n, max_seq_len, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                  TS_GRAD: tl.constexpr):
    """The dQ walk's key times: t[j], t[j - 1] (the d ts_w runs' left neighbours) and the block's last."""
    tk = _key_times(TS, ts_base, start_n, max_seq_len, BLOCK_N, HAS_BIAS)
    if TS_GRAD:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        tk_left = tl.load(TS + ts_base + tl.minimum(tl.maximum(offs_n - 1, 0), max_seq_len - 1))
        tk_last = tl.load(TS + ts_base + tl.minimum(start_n + BLOCK_N - 1, max_seq_len - 1))
    else:
        tk_left = tk
        tk_last = start_n
    return tk, tk_left, tk_last


@triton.jit
def _dkdv_tile(dk, dv, k, v, offs_n, tk, tq, Q, DO, DQAcc, TsW, PosW, q_base, do_base, dqa_base, start_m, seq_len,
               max_seq_len, stride_qm, stride_dom, stride_dqam, offs_qk, offs_v,
               DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_BUCKETS: tl.constexpr,
               DOT_PREC: tl.constexpr, MASKED: tl.constexpr, HW_MATH: tl.constexpr,
               FAST_SILU: tl.constexpr, FUSED_DQ: tl.constexpr):
    """One (keys x queries) tile, transposed so that dK, dV accumulate with plain dots.

    With FUSED_DQ the tile's share of dQ (dS @ K) is also added, by fp32 atomics, to DQAcc.
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_ok = offs_m < seq_len
    # Queries past the sequence load as 0 (q and dO): their dS and P.dO vanish.
    q = _load_tile(Q + q_base + offs_m[:, None] * stride_qm + offs_qk[None, :], rows_ok,
                   offs_qk < DQK, True, DQK != BLOCK_DQK)
    do = _load_tile(DO + do_base + offs_m[:, None] * stride_dom + offs_v[None, :], rows_ok,
                    offs_v < DV, True, DV != BLOCK_DV)
    qpos = tl.minimum(offs_m, max_seq_len - 1)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (keys, queries)
    causal = offs_n[:, None] <= qpos[None, :]
    if HAS_BIAS:
        rab, _ = _rel_bias(qpos[None, :], offs_n[:, None], tq[None, :], tk[:, None], TsW, PosW,
                           max_seq_len, causal, NUM_BUCKETS, MASKED, HW_MATH)
        s_t += rab
    sig = _sigmoid(s_t, FAST_SILU)
    p_t = s_t * sig
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = dp_t * sig * (1.0 + s_t * (1.0 - sig))  # SiLU'(s) = sig * (1 + s * (1 - sig))
    if MASKED:
        p_t = tl.where(causal, p_t, 0.0)
        ds_t = tl.where(causal, ds_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    if FUSED_DQ:  # rows past the sequence have dS = 0 and are masked out of the atomics
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PREC)
        tl.atomic_add(DQAcc + dqa_base + offs_m[:, None] * stride_dqam + offs_qk[None, :], dq,
                      mask=rows_ok[:, None] & (offs_qk < DQK)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _pos_grad_tile(ds, start_m, start_n, PosPart, max_seq_len,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adds the diagonal sums of a (queries x keys) dS tile to PosPart[N - 1 + j - i].

    Skew: sk[r, c] = ds[(r + c) mod BLOCK_M, c]. Without wrap-around, element
    (r + c, c) lies on diagonal j - i = -r; with it, on BLOCK_M - r. So two
    row reductions give every diagonal (BLOCK_M >= BLOCK_N).
    """
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    wrap = rows + cols >= BLOCK_M
    src = tl.where(wrap, rows + cols - BLOCK_M, rows + cols)
    sk = tl.gather(ds, src, axis=0)
    lo = tl.sum(tl.where(wrap, 0.0, sk), axis=1)
    hi = tl.sum(tl.where(wrap, sk, 0.0), axis=1)
    r = tl.arange(0, BLOCK_M)
    base = max_seq_len - 1 + start_n - start_m
    idx_lo = base - r
    idx_hi = base + BLOCK_M - r
    # Only j <= i (index < N) carries gradient; the range test also keeps junk rows in bounds.
    tl.atomic_add(PosPart + idx_lo, lo, mask=(idx_lo >= 0) & (idx_lo < max_seq_len), sem="relaxed")
    tl.atomic_add(PosPart + idx_hi, hi,
                  mask=(r > BLOCK_M - BLOCK_N) & (idx_hi >= 0) & (idx_hi < max_seq_len), sem="relaxed")


@triton.jit
def _ts_grad_tile(ds, bucket, offs_m, offs_n, qpos, rows_ok, tq, tq_prev, tk_left, tk_last, TsPart,
                  start_n, seq_len, max_seq_len,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_BUCKETS: tl.constexpr,
                  HW_MATH: tl.constexpr):
    """Adds sum of dS per time bucket to TsPart, one atomic pair per change of bucket.

    Along a row, a run of equal buckets [s, e] sums to cs[e] - ecs[s] (inclusive
    / exclusive prefix sums). At each run start s > 0 we add ecs[s] to the
    bucket on its left (closing the previous run) and -ecs[s] to its own bucket;
    the row total closes the last run. Row totals are then reduced the same way
    down the tile. Invalid elements (j > i, rows past the sequence) get bucket
    -1 and zero dS, so runs of them cost no atomics.
    """
    cols = tl.arange(0, BLOCK_N)[None, :]
    valid = rows_ok[:, None] & (offs_n[None, :] <= qpos[:, None])
    here = tl.where(valid, bucket, -1)
    # Bucket of the left neighbour (r, c - 1), recomputed from its timestamp
    # (same inputs, same arithmetic, so equal buckets compare equal); tk_left = t[j - 1], tk_last the
    # block's last key time, loaded by the caller (`_dq_key_times`).
    left_ok = (cols > 0) & rows_ok[:, None] & ((offs_n - 1)[None, :] <= qpos[:, None])
    left = tl.where(left_ok, _time_bucket(tq[:, None], tk_left[None, :], NUM_BUCKETS, HW_MATH), -1)
    cs = tl.cumsum(ds, axis=1)
    ecs = cs - ds
    run_start = (here != left) & (cols > 0)
    tl.atomic_add(TsPart + left, ecs, mask=run_start & (left >= 0), sem="relaxed")
    tl.atomic_add(TsPart + here, -ecs, mask=run_start & (here >= 0), sem="relaxed")

    # Row totals belong to the bucket of each row's last element; reduce them down the column.
    rowtot = tl.sum(ds, axis=1)
    j_last = start_n + BLOCK_N - 1
    last = tl.where(rows_ok & (j_last <= qpos), _time_bucket(tq, tk_last, NUM_BUCKETS, HW_MATH), -1)
    r = tl.arange(0, BLOCK_M)
    prev_ok = (r > 0) & (offs_m - 1 < seq_len) & (j_last <= tl.minimum(offs_m - 1, max_seq_len - 1))
    up = tl.where(prev_ok, _time_bucket(tq_prev, tk_last, NUM_BUCKETS, HW_MATH), -1)
    crs = tl.cumsum(rowtot, axis=0)
    ecrs = crs - rowtot
    row_start = (last != up) & (r > 0)
    tl.atomic_add(TsPart + up, ecrs, mask=row_start & (up >= 0), sem="relaxed")
    tl.atomic_add(TsPart + last, -ecrs, mask=row_start & (last >= 0), sem="relaxed")
    tl.atomic_add(TsPart + last, crs, mask=(r == BLOCK_M - 1) & (last >= 0), sem="relaxed")


@triton.jit
def _dq_tile(dq, q, do, offs_m, qpos, rows_ok, tq, tq_prev, tk, tk_left, tk_last, K, V, TsW, PosW, TsPart, PosPart,
             k_base, v_base, start_m, start_n, seq_len, max_seq_len, stride_km, stride_vm,
             offs_qk, offs_v,
             DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
             POS_GRAD: tl.constexpr, TS_GRAD: tl.constexpr, NUM_BUCKETS: tl.constexpr,
             DOT_PREC: tl.constexpr, MASKED: tl.constexpr, HW_MATH: tl.constexpr,
             FAST_SILU: tl.constexpr):
    """One (queries x keys) tile: dQ, and the rab-weight gradients from the same dS."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < seq_len
    k = _load_tile(K + k_base + offs_n[:, None] * stride_km + offs_qk[None, :], kv_ok,
                   offs_qk < DQK, MASKED, DQK != BLOCK_DQK)
    v = _load_tile(V + v_base + offs_n[:, None] * stride_vm + offs_v[None, :], kv_ok,
                   offs_v < DV, MASKED, DV != BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    causal = offs_n[None, :] <= qpos[:, None]
    if HAS_BIAS:
        rab, bucket = _rel_bias(qpos[:, None], offs_n[None, :], tq[:, None], tk[None, :], TsW, PosW,
                                max_seq_len, causal, NUM_BUCKETS, MASKED, HW_MATH)
        s += rab
    sig = _sigmoid(s, FAST_SILU)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = dp * sig * (1.0 + s * (1.0 - sig))
    if MASKED:
        ds = tl.where(causal, ds, 0.0)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    # Rows past the sequence have dO = 0, hence dS = 0 exactly: no extra mask needed.
    if POS_GRAD:
        _pos_grad_tile(ds, start_m, start_n, PosPart, max_seq_len, BLOCK_M, BLOCK_N)
    if TS_GRAD:
        _ts_grad_tile(ds, bucket, offs_m, offs_n, qpos, rows_ok, tq, tq_prev, tk_left, tk_last, TsPart,
                      start_n, seq_len, max_seq_len, BLOCK_M, BLOCK_N, NUM_BUCKETS, HW_MATH)
    return dq


@triton.jit
def _hstu_bwd_kernel(
    Q, K, V, DO, GradQ, GradK, GradV, SeqOffsets, TS, TsW, PosW, TsGradPart, PosGradPart,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dqm, stride_dqh, stride_dkm, stride_dkh, stride_dvm, stride_dvh,
    stride_tb, num_heads, max_seq_len, inv_n,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N2: tl.constexpr,
    HAS_BIAS: tl.constexpr, POS_GRAD: tl.constexpr, TS_GRAD: tl.constexpr,
    NUM_BUCKETS: tl.constexpr, TS_PART_STRIDE: tl.constexpr, DOT_PREC: tl.constexpr,
    HW_MATH: tl.constexpr, FAST_SILU: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    """Grid (B * heads, blocks): dK, dV of one key block, then (unless FUSED_DQ) dQ of the same query block.

    FUSED_DQ: GradQ is an fp32 accumulator (zeroed, unscaled) that the dK/dV walk adds every tile's dS @ K to,
    so S, dP and the bias are evaluated once per score instead of twice; the weight gradients then come from
    the rab-gradient pass (POS_GRAD = TS_GRAD = False).
    """
    pid_bh = tl.program_id(0)
    pid_blk = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    seq_start, seq_len = _sequence_bounds(SeqOffsets, off_b)
    start = pid_blk * BLOCK
    if start >= seq_len:
        return

    offs_qk = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    q_base = seq_start * stride_qm + off_h * stride_qh
    k_base = seq_start * stride_km + off_h * stride_kh
    v_base = seq_start * stride_vm + off_h * stride_vh
    do_base = seq_start * stride_dom + off_h * stride_doh
    dq_base = seq_start * stride_dqm + off_h * stride_dqh
    ts_base = off_b.to(tl.int64) * stride_tb
    offs = start + tl.arange(0, BLOCK)
    blk_ok = offs < seq_len
    end_diag = tl.minimum(start + BLOCK, seq_len)

    # ---- Phase 1: dK, dV of keys [start, start + BLOCK), over queries i >= start.
    k = _load_tile(K + k_base + offs[:, None] * stride_km + offs_qk[None, :], blk_ok,
                   offs_qk < DQK, True, DQK != BLOCK_DQK)
    v = _load_tile(V + v_base + offs[:, None] * stride_vm + offs_v[None, :], blk_ok,
                   offs_v < DV, True, DV != BLOCK_DV)
    tk = _key_times(TS, ts_base, start, max_seq_len, BLOCK, HAS_BIAS)
    dk = tl.zeros((BLOCK, BLOCK_DQK), dtype=tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_DV), dtype=tl.float32)
    for start_m in range(start, end_diag, BLOCK_M1):
        tq = _query_times(TS, ts_base, start_m, max_seq_len, BLOCK_M1, HAS_BIAS)
        dk, dv = _dkdv_tile(dk, dv, k, v, offs, tk, tq, Q, DO, GradQ, TsW, PosW, q_base, do_base, dq_base,
                            start_m, seq_len, max_seq_len, stride_qm, stride_dom, stride_dqm, offs_qk, offs_v,
                            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M1, HAS_BIAS, NUM_BUCKETS, DOT_PREC,
                            True, HW_MATH, FAST_SILU, FUSED_DQ)
    # As in the forward, the next block's times are loaded one iteration ahead (here the queries').
    tq = _query_times(TS, ts_base, start + BLOCK, max_seq_len, BLOCK_M1, HAS_BIAS)
    for start_m in range(start + BLOCK, seq_len, BLOCK_M1):
        tq_next = _query_times(TS, ts_base, start_m + BLOCK_M1, max_seq_len, BLOCK_M1, HAS_BIAS)
        dk, dv = _dkdv_tile(dk, dv, k, v, offs, tk, tq, Q, DO, GradQ, TsW, PosW, q_base, do_base, dq_base,
                            start_m, seq_len, max_seq_len, stride_qm, stride_dom, stride_dqm, offs_qk, offs_v,
                            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M1, HAS_BIAS, NUM_BUCKETS, DOT_PREC,
                            False, HW_MATH, FAST_SILU, FUSED_DQ)
        tq = tq_next
    dk_ptrs = GradK + seq_start * stride_dkm + off_h * stride_dkh + offs[:, None] * stride_dkm + offs_qk[None, :]
    tl.store(dk_ptrs, (dk * inv_n).to(GradK.dtype.element_ty), mask=blk_ok[:, None] & (offs_qk < DQK)[None, :])
    dv_ptrs = GradV + seq_start * stride_dvm + off_h * stride_dvh + offs[:, None] * stride_dvm + offs_v[None, :]
    tl.store(dv_ptrs, (dv * inv_n).to(GradV.dtype.element_ty), mask=blk_ok[:, None] & (offs_v < DV)[None, :])
    if FUSED_DQ:
        return

    # ---- Phase 2: dQ (and rab gradients) of queries [start, start + BLOCK), over keys j <= i.
    q = _load_tile(Q + q_base + offs[:, None] * stride_qm + offs_qk[None, :], blk_ok,
                   offs_qk < DQK, True, DQK != BLOCK_DQK)
    do = _load_tile(DO + do_base + offs[:, None] * stride_dom + offs_v[None, :], blk_ok,
                    offs_v < DV, True, DV != BLOCK_DV)
    qpos = tl.minimum(offs, max_seq_len - 1)
    if HAS_BIAS:
        tq = tl.load(TS + ts_base + tl.minimum(offs + 1, max_seq_len - 1))
        tq_prev = tl.load(TS + ts_base + qpos)  # query i - 1 uses t[i]
    else:
        tq = qpos
        tq_prev = qpos
    # Private gradient copies (see module docstring): per program for ts_w, per (b, h) for pos_w.
    ts_part = TsGradPart + (pid_bh.to(tl.int64) * tl.num_programs(1) + pid_blk) * TS_PART_STRIDE
    pos_part = PosGradPart + pid_bh.to(tl.int64) * max_seq_len
    dq = tl.zeros((BLOCK, BLOCK_DQK), dtype=tl.float32)
    tk, tk_left, tk_last = _dq_key_times(TS, ts_base, 0, max_seq_len, BLOCK_N2, HAS_BIAS, TS_GRAD)
    for start_n in range(0, start, BLOCK_N2):  # key times one block ahead, as in the forward
        tk_next, tk_left_next, tk_last_next = _dq_key_times(TS, ts_base, start_n + BLOCK_N2, max_seq_len,
                                                            BLOCK_N2, HAS_BIAS, TS_GRAD)
        dq = _dq_tile(dq, q, do, offs, qpos, blk_ok, tq, tq_prev, tk, tk_left, tk_last, K, V, TsW, PosW,
                      ts_part, pos_part, k_base, v_base, start, start_n, seq_len, max_seq_len,
                      stride_km, stride_vm, offs_qk, offs_v, DQK, DV, BLOCK_DQK, BLOCK_DV,
                      BLOCK, BLOCK_N2, HAS_BIAS, POS_GRAD, TS_GRAD, NUM_BUCKETS, DOT_PREC, False,
                      HW_MATH, FAST_SILU)
        tk, tk_left, tk_last = tk_next, tk_left_next, tk_last_next
    for start_n in range(start, end_diag, BLOCK_N2):
        tk, tk_left, tk_last = _dq_key_times(TS, ts_base, start_n, max_seq_len, BLOCK_N2, HAS_BIAS, TS_GRAD)
        dq = _dq_tile(dq, q, do, offs, qpos, blk_ok, tq, tq_prev, tk, tk_left, tk_last, K, V, TsW, PosW,
                      ts_part, pos_part, k_base, v_base, start, start_n, seq_len, max_seq_len,
                      stride_km, stride_vm, offs_qk, offs_v, DQK, DV, BLOCK_DQK, BLOCK_DV,
                      BLOCK, BLOCK_N2, HAS_BIAS, POS_GRAD, TS_GRAD, NUM_BUCKETS, DOT_PREC, True,
                      HW_MATH, FAST_SILU)
    dq_ptrs = GradQ + dq_base + offs[:, None] * stride_dqm + offs_qk[None, :]
    tl.store(dq_ptrs, (dq * inv_n).to(GradQ.dtype.element_ty), mask=blk_ok[:, None] & (offs_qk < DQK)[None, :])


# --------------------------------------------------------------------------- #
# Relative-bias weight gradients in their own pass, heads summed in-program
# --------------------------------------------------------------------------- #


@triton.jit
def _rab_grad_tile(Q, K, V, DO, TsW, PosW, TsPart, PosPart, q_base, k_base, v_base, do_base,
                   offs_m, qpos, rows_ok, tq, tq_prev, tk, tk_left, tk_last, start_m, start_n,
                   seq_len, max_seq_len, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
                   stride_dom, stride_doh, offs_qk, offs_v, num_heads,
                   DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   POS_GRAD: tl.constexpr, TS_GRAD: tl.constexpr, NUM_BUCKETS: tl.constexpr,
                   DOT_PREC: tl.constexpr, MASKED: tl.constexpr, HW_MATH: tl.constexpr,
                   FAST_SILU: tl.constexpr):
    """One (queries x keys) tile: the bias once, every head's dS summed, then the two reductions once."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < seq_len
    causal = offs_n[None, :] <= qpos[:, None]
    rab, bucket = _rel_bias(qpos[:, None], offs_n[None, :], tq[:, None], tk[None, :], TsW, PosW,
                            max_seq_len, causal, NUM_BUCKETS, MASKED, HW_MATH)
    ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in range(num_heads):
        # Queries past the sequence load q = dO = 0, so their dS is 0 exactly.
        q = _load_tile(Q + q_base + h * stride_qh + offs_m[:, None] * stride_qm + offs_qk[None, :], rows_ok,
                       offs_qk < DQK, True, DQK != BLOCK_DQK)
        do = _load_tile(DO + do_base + h * stride_doh + offs_m[:, None] * stride_dom + offs_v[None, :], rows_ok,
                        offs_v < DV, True, DV != BLOCK_DV)
        k = _load_tile(K + k_base + h * stride_kh + offs_n[:, None] * stride_km + offs_qk[None, :], kv_ok,
                       offs_qk < DQK, MASKED, DQK != BLOCK_DQK)
        v = _load_tile(V + v_base + h * stride_vh + offs_n[:, None] * stride_vm + offs_v[None, :], kv_ok,
                       offs_v < DV, MASKED, DV != BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) + rab
        sig = _sigmoid(s, FAST_SILU)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds += dp * sig * (1.0 + s * (1.0 - sig))
    if MASKED:
        ds = tl.where(causal, ds, 0.0)
    if POS_GRAD:
        _pos_grad_tile(ds, start_m, start_n, PosPart, max_seq_len, BLOCK_M, BLOCK_N)
    if TS_GRAD:
        _ts_grad_tile(ds, bucket, offs_m, offs_n, qpos, rows_ok, tq, tq_prev, tk_left, tk_last, TsPart,
                      start_n, seq_len, max_seq_len, BLOCK_M, BLOCK_N, NUM_BUCKETS, HW_MATH)


@triton.jit
def _rab_grad_kernel(
    Q, K, V, DO, SeqOffsets, TS, TsW, PosW, TsGradPart, PosGradPart,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_tb, max_seq_len, num_heads,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POS_GRAD: tl.constexpr, TS_GRAD: tl.constexpr, NUM_BUCKETS: tl.constexpr, TS_PART_STRIDE: tl.constexpr,
    DOT_PREC: tl.constexpr, HW_MATH: tl.constexpr, FAST_SILU: tl.constexpr,
):
    """Grid (B, query blocks): d pos_w and d ts_w of one query block of one sequence, all heads.

    The rab gradients are sums over heads of dS, so a program holding every head builds each
    tile's bias once and runs the diagonal and bucket reductions once per tile instead of once
    per head, in a kernel that holds no dQ/dK/dV accumulators (the fused dQ walk spills).
    The price is recomputing S and dP (two small dots per head and tile).
    """
    off_b = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # longest programs first
    seq_start, seq_len = _sequence_bounds(SeqOffsets, off_b)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_qk = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < seq_len
    qpos = tl.minimum(offs_m, max_seq_len - 1)
    ts_base = off_b.to(tl.int64) * stride_tb
    tq = tl.load(TS + ts_base + tl.minimum(offs_m + 1, max_seq_len - 1))
    tq_prev = tl.load(TS + ts_base + qpos)  # query i - 1 uses t[i]
    ts_part = TsGradPart + (off_b.to(tl.int64) * tl.num_programs(1) + pid_m) * TS_PART_STRIDE
    pos_part = PosGradPart + off_b.to(tl.int64) * max_seq_len
    q_base = seq_start * stride_qm
    k_base = seq_start * stride_km
    v_base = seq_start * stride_vm
    do_base = seq_start * stride_dom
    end_diag = tl.minimum(start_m + BLOCK_M, seq_len)
    tk, tk_left, tk_last = _dq_key_times(TS, ts_base, 0, max_seq_len, BLOCK_N, True, TS_GRAD)
    for start_n in range(0, start_m, BLOCK_N):  # key times one block ahead, as in the other walks
        tk_next, tk_left_next, tk_last_next = _dq_key_times(TS, ts_base, start_n + BLOCK_N, max_seq_len,
                                                            BLOCK_N, True, TS_GRAD)
        _rab_grad_tile(Q, K, V, DO, TsW, PosW, ts_part, pos_part, q_base, k_base, v_base, do_base,
                       offs_m, qpos, rows_ok, tq, tq_prev, tk, tk_left, tk_last, start_m, start_n,
                       seq_len, max_seq_len, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
                       stride_dom, stride_doh, offs_qk, offs_v, num_heads, DQK, DV, BLOCK_DQK, BLOCK_DV,
                       BLOCK_M, BLOCK_N, POS_GRAD, TS_GRAD, NUM_BUCKETS, DOT_PREC, False, HW_MATH, FAST_SILU)
        tk, tk_left, tk_last = tk_next, tk_left_next, tk_last_next
    for start_n in range(start_m, end_diag, BLOCK_N):
        tk, tk_left, tk_last = _dq_key_times(TS, ts_base, start_n, max_seq_len, BLOCK_N, True, TS_GRAD)
        _rab_grad_tile(Q, K, V, DO, TsW, PosW, ts_part, pos_part, q_base, k_base, v_base, do_base,
                       offs_m, qpos, rows_ok, tq, tq_prev, tk, tk_left, tk_last, start_m, start_n,
                       seq_len, max_seq_len, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
                       stride_dom, stride_doh, offs_qk, offs_v, num_heads, DQK, DV, BLOCK_DQK, BLOCK_DV,
                       BLOCK_M, BLOCK_N, POS_GRAD, TS_GRAD, NUM_BUCKETS, DOT_PREC, True, HW_MATH, FAST_SILU)


# --------------------------------------------------------------------------- #
# Host side: block sizes, launches, autograd
# --------------------------------------------------------------------------- #


def _pow2_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every dim >= 16


def _math_flags(q: torch.Tensor) -> dict:
    # PTX inline math exists only on NVIDIA GPUs (not in the CPU interpreter); the tanh-based
    # SiLU only where the result is rounded to 16 bits anyway.
    hw = q.is_cuda and torch.version.hip is None
    return dict(HW_MATH=hw, FAST_SILU=hw and q.dtype in (torch.bfloat16, torch.float16))


# Block sizes per padded head dim, bf16/fp16, timed on an H100 (benchmarks/hstu_attention.py --tune); the
# forward's d = 128 entry re-timed on an H200 with the key times loaded one block ahead (64 x 32 tiles: the
# prefetched int64 times of a 64-wide key block need 64 more registers per thread and spilled).
# Fixed tables rather than autotuning: the rab-gradient atomics would need resetting between
# autotune trials, and a table never re-tunes when a batch brings a new total length.
_FWD_TABLE = {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 2), 128: (64, 32, 4, 2)}
_BWD_TABLE = {16: (64, 64, 32, 8, 2), 32: (64, 64, 32, 8, 2), 64: (32, 16, 16, 4, 2), 128: (64, 16, 16, 4, 3)}
# fp32 with TF32 dots (the trainer's default), timed at the trainer's padded shapes (B = 128,
# N = 211 and 61, full length; benchmarks/hstu_attention_fp32_tiles.py): only head dim 64 gains
# from a change (ml-20m h = 4: forward 0.22 -> 0.12 ms, backward 0.67 -> 0.55 ms); the default
# tiles were fastest or within 5% elsewhere.
_FWD_TABLE_FP32 = {64: (32, 32, 4, 2)}
_BWD_TABLE_FP32 = {64: (32, 32, 32, 4, 2)}


def _fwd_config(q: torch.Tensor, block_d: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if not q.is_cuda:
        return 16, 16, 1, 1  # interpreter: small tiles keep numpy work low
    if q.dtype == torch.float32:  # fp32 (exact or TF32 dots): small tiles
        return _FWD_TABLE_FP32.get(block_d, (64, 32, 4, 2))
    return _FWD_TABLE.get(block_d, (64, 32, 4, 2))


def _bwd_config(q: torch.Tensor, block_d: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK, BLOCK_M1, BLOCK_N2, num_warps, num_stages)."""
    if not q.is_cuda:
        return 16, 16, 16, 1, 1
    if q.dtype == torch.float32:
        return _BWD_TABLE_FP32.get(block_d, (64, 16, 16, 4, 1))
    return _BWD_TABLE.get(block_d, (64, 16, 16, 4, 2))


# The rab-gradient pass (`_rab_grad_kernel`) replaces the dQ walk's per-head reductions where it measured faster
# (one H100, benchmarks/hstu_attention.md, "The rab-gradient pass"): 16-bit inputs with at least two heads and at
# least one pass program per SM (its grid has no heads axis, so smaller batches leave SMs idle). It lost at every
# fp32 (TF32) shape measured, the trainers' shapes included, and by 6.6x with one head. The fused backward (FUSED_DQ
# below) always takes it, and wins with it where this rule would not. RAB_PASS forces it on (True) or off (False) for
# tests and benchmarks beside two walks; None applies that rule. Its tiles (BLOCK_M, BLOCK_N, num_warps,
# num_stages): 64 x 32 over 8 warps, one stage, compile without spills at bf16 d = 128 (offline sm_90 compile,
# benchmarks/hstu_attention_sass.py); (32, 32, 4, 2) timed 3% faster at N = 4096, the only 16-bit shape swept.
RAB_PASS: Optional[bool] = None
_RAB_TILES = (64, 32, 8, 1)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def rab_pass_wins(dtype: torch.dtype, heads: int, programs: int, sm_count: int) -> bool:
    """The measured rule above; `programs` = sequences x query blocks of the pass."""
    return dtype != torch.float32 and heads >= 2 and programs >= sm_count


def _use_rab_pass(q: torch.Tensor, programs: int) -> bool:
    if RAB_PASS is not None:
        return RAB_PASS
    return q.is_cuda and rab_pass_wins(q.dtype, q.shape[1], programs, _sm_count(q.device.index or 0))


# The backward in one walk (`_hstu_bwd_kernel` with FUSED_DQ): dQ by fp32 atomics from the dK/dV walk instead of
# a second walk over the keys, so S, dP and the bias are computed once per score in the backward; the weight
# gradients then come from the rab-gradient pass. Measured on an H100 (benchmarks/hstu_attention.md, "The backward
# in one walk"), pass + fused walk against the better of the other two paths: -3% to -14% with the bias at every
# shape with two or more heads, fp32 trainer shapes (h = 2, 4, 8) and bf16 N = 4096 / 8192 alike; slower with one
# head (the pass's cost there) and without the bias (the atomics cost more than the cheap bias-free dQ walk).
# FUSED_DQ forces it on (True) or off (False) for tests and benchmarks; None applies `fused_dq_wins`.
FUSED_DQ: Optional[bool] = None


def fused_dq_wins(has_bias: bool, heads: int, programs: int, sm_count: int) -> bool:
    """The measured rule above; `programs` = sequences x query blocks of the rab-gradient pass (as for the pass
    alone, smaller grids than the SM count were not shown to win)."""
    return has_bias and heads >= 2 and programs >= sm_count


def _use_fused_dq(q: torch.Tensor, has_bias: bool, programs: int) -> bool:
    if FUSED_DQ is not None:
        return FUSED_DQ
    return q.is_cuda and fused_dq_wins(has_bias, q.shape[1], programs, _sm_count(q.device.index or 0))


def _rab_config(q: torch.Tensor) -> Tuple[int, int, int, int]:
    return _RAB_TILES if q.is_cuda else (16, 16, 1, 1)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, config=None, num_targets=None):
    total, heads, dqk = q.shape
    dv = v.shape[-1]
    batch = seq_offsets.numel() - 1
    out = torch.empty((total, heads, dv), dtype=q.dtype, device=q.device)
    has_bias = ts_w is not None
    block_dqk, block_dv = _pow2_dim(dqk), _pow2_dim(dv)
    block_m, block_n, num_warps, num_stages = config or _fwd_config(q, max(block_dqk, block_dv))
    assert block_m % block_n == 0
    dummy = q  # unused pointer arguments when there is no bias
    grid = (batch * heads, triton.cdiv(max_seq_len, block_m))
    _hstu_fwd_kernel[grid](
        q, k, v, out, seq_offsets,
        timestamps if has_bias else dummy, ts_w if has_bias else dummy, pos_w if has_bias else dummy,
        num_targets if num_targets is not None else dummy,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), timestamps.stride(0) if has_bias else 0,
        heads, max_seq_len, 1.0 / max_seq_len,
        DQK=dqk, DV=dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_BIAS=has_bias, NUM_BUCKETS=(ts_w.numel() - 1) if has_bias else 0,
        DOT_PREC=dot_precision(q.dtype), **_math_flags(q), HAS_TARGETS=num_targets is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _rab_grad_pass(do, q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w,
                   need_ts_grad, need_pos_grad, ts_stride, config):
    """d ts_w, d pos_w (before the 1/N) as private copies: (B * query blocks, ts_stride), (B, N)."""
    total, heads, dqk = q.shape
    dv_dim = v.shape[-1]
    batch = seq_offsets.numel() - 1
    block_dqk, block_dv = _pow2_dim(dqk), _pow2_dim(dv_dim)
    block_m, block_n, num_warps, num_stages = config
    assert block_m % block_n == 0
    num_blocks = triton.cdiv(max_seq_len, block_m)
    f32 = dict(dtype=torch.float32, device=q.device)
    ts_part = torch.zeros((batch * num_blocks, ts_stride) if need_ts_grad else (1,), **f32)
    pos_part = torch.zeros((batch, max_seq_len) if need_pos_grad else (1,), **f32)
    _rab_grad_kernel[(batch, num_blocks)](
        q, k, v, do, seq_offsets, timestamps, ts_w, pos_w, ts_part, pos_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), timestamps.stride(0), max_seq_len, heads,
        DQK=dqk, DV=dv_dim, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        BLOCK_M=block_m, BLOCK_N=block_n, POS_GRAD=need_pos_grad, TS_GRAD=need_ts_grad,
        NUM_BUCKETS=ts_w.numel() - 1, TS_PART_STRIDE=ts_stride, DOT_PREC=dot_precision(q.dtype),
        **_math_flags(q), num_warps=num_warps, num_stages=num_stages,
    )
    return ts_part, pos_part


def _backward(do, q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w,
              need_ts_grad, need_pos_grad, config=None, rab_config=None):
    total, heads, dqk = q.shape
    dv_dim = v.shape[-1]
    batch = seq_offsets.numel() - 1
    has_bias = ts_w is not None
    dk = torch.empty((total, heads, dqk), dtype=k.dtype, device=q.device)
    dv = torch.empty((total, heads, dv_dim), dtype=v.dtype, device=q.device)
    block_dqk, block_dv = _pow2_dim(dqk), _pow2_dim(dv_dim)
    block, block_m1, block_n2, num_warps, num_stages = config or _bwd_config(q, max(block_dqk, block_dv))
    assert block % block_m1 == 0 and block % block_n2 == 0
    num_blocks = triton.cdiv(max_seq_len, block)
    num_buckets = ts_w.numel() - 1 if has_bias else 0
    ts_stride = 32 * triton.cdiv(num_buckets + 1, 32)  # whole 128-byte lines per private copy
    rab_config = rab_config or _rab_config(q)
    weight_grads = has_bias and (need_ts_grad or need_pos_grad)
    pass_programs = batch * triton.cdiv(max_seq_len, rab_config[0])  # both rules count the pass's grid
    fused = _use_fused_dq(q, has_bias, pass_programs)
    rab_pass = weight_grads and (fused or _use_rab_pass(q, pass_programs))
    # The fused walk adds unscaled fp32 partial sums into dQ; the 1/N and the cast come after it.
    dq = (torch.zeros if fused else torch.empty)((total, heads, dqk), dtype=torch.float32 if fused else q.dtype,
                                                 device=q.device)
    if rab_pass:
        ts_part, pos_part = _rab_grad_pass(do, q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w,
                                           need_ts_grad, need_pos_grad, ts_stride, rab_config)
    else:  # the dQ walk computes them, per head
        f32 = dict(dtype=torch.float32, device=q.device)
        ts_part = torch.zeros((batch * heads * num_blocks, ts_stride) if need_ts_grad else (1,), **f32)
        pos_part = torch.zeros((batch * heads, max_seq_len) if need_pos_grad else (1,), **f32)
    dummy = q
    grid = (batch * heads, num_blocks)
    _hstu_bwd_kernel[grid](
        q, k, v, do, dq, dk, dv, seq_offsets,
        timestamps if has_bias else dummy, ts_w if has_bias else dummy, pos_w if has_bias else dummy,
        ts_part, pos_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1), timestamps.stride(0) if has_bias else 0,
        heads, max_seq_len, 1.0 / max_seq_len,
        DQK=dqk, DV=dv_dim, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        BLOCK=block, BLOCK_M1=block_m1, BLOCK_N2=block_n2,
        HAS_BIAS=has_bias, POS_GRAD=need_pos_grad and not rab_pass, TS_GRAD=need_ts_grad and not rab_pass,
        NUM_BUCKETS=num_buckets, TS_PART_STRIDE=ts_stride, DOT_PREC=dot_precision(q.dtype),
        **_math_flags(q), FUSED_DQ=fused, num_warps=num_warps, num_stages=num_stages,
    )
    if fused:
        dq = dq.mul_(1.0 / max_seq_len).to(q.dtype)
    d_ts = d_pos = None
    if need_ts_grad:  # sum the private copies; the 1/N of dS is applied here
        d_ts = (ts_part[:, : num_buckets + 1].sum(0) / max_seq_len).to(ts_w.dtype)
    if need_pos_grad:
        d_pos = torch.zeros_like(pos_w)
        d_pos[:max_seq_len] = (pos_part.sum(0) / max_seq_len).to(pos_w.dtype)  # j > i: no gradient
    return dq, dk, dv, d_ts, d_pos


@triton.jit
def _time_bucket_kernel(Delta, Out, n, NUM_BUCKETS: tl.constexpr, HW_MATH: tl.constexpr,
                        BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    delta = tl.load(Delta + offs, mask=offs < n, other=0)
    tl.store(Out + offs, _time_bucket(delta, 0, NUM_BUCKETS, HW_MATH).to(tl.int64), mask=offs < n)


def kernel_time_buckets(delta: torch.Tensor, num_buckets: int = 128) -> torch.Tensor:
    """The kernels' own bucket function on a tensor of time differences (int64 result).

    Same contract as `ops.hstu_attention.time_buckets`; equal to it except where
    ln(|d|) / 0.301 is within fp32 rounding of an integer (tests use it to
    separate that documented difference from the attention arithmetic).
    """
    flat = delta.reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.int64, device=delta.device)
    if flat.numel():
        block = 1024
        _time_bucket_kernel[(triton.cdiv(flat.numel(), block),)](
            flat, out, flat.numel(), NUM_BUCKETS=num_buckets,
            HW_MATH=_math_flags(delta)["HW_MATH"], BLOCK=block)
    return out.view(delta.shape)


class _HSTUAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, fwd_config, bwd_config,
                rab_config, num_targets):
        out = _forward(q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, fwd_config, num_targets)
        ctx.save_for_backward(q, k, v, seq_offsets, timestamps, ts_w, pos_w)
        ctx.max_seq_len = max_seq_len
        ctx.bwd_config = bwd_config
        ctx.rab_config = rab_config
        ctx.has_targets = num_targets is not None
        return out

    @staticmethod
    def backward(ctx, do):
        if ctx.has_targets:
            raise NotImplementedError("the Triton kernel's backward does not take num_targets (M-FALCON is "
                                      "inference); train through targets with attention kernel 'torch'")
        q, k, v, seq_offsets, timestamps, ts_w, pos_w = ctx.saved_tensors
        has_bias = ts_w is not None
        dq, dk, dv, d_ts, d_pos = _backward(
            _prepare(do), q, k, v, seq_offsets, ctx.max_seq_len, timestamps, ts_w, pos_w,
            need_ts_grad=has_bias and ctx.needs_input_grad[6],
            need_pos_grad=has_bias and ctx.needs_input_grad[7],
            config=ctx.bwd_config, rab_config=ctx.rab_config,
        )
        return dq, dk, dv, None, None, None, d_ts, d_pos, None, None, None, None


def _hstu_attention(q, k, v, seq_offsets, max_seq_len, timestamps=None, ts_w=None, pos_w=None,
                    fwd_config=None, bwd_config=None, num_targets=None, rab_config=None):
    """triton_hstu_attention with explicit block configs (tests and tuning)."""
    total, heads, _ = q.shape
    batch = seq_offsets.numel() - 1
    if batch == 0 or total == 0:
        return v.new_zeros(total, heads, v.shape[-1])
    has_bias = timestamps is not None and ts_w is not None and pos_w is not None
    if not has_bias:
        timestamps = ts_w = pos_w = None
    else:
        timestamps = _prepare(timestamps)
        ts_w = ts_w.contiguous()
        pos_w = pos_w.contiguous()
    return _HSTUAttentionFunction.apply(
        _prepare(q), _prepare(k), _prepare(v), seq_offsets.contiguous(), int(max_seq_len),
        timestamps, ts_w, pos_w, fwd_config, bwd_config, rab_config,
        None if num_targets is None else num_targets.contiguous(),
    )


def triton_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    timestamps: Optional[torch.Tensor] = None,
    ts_w: Optional[torch.Tensor] = None,
    pos_w: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused jagged HSTU attention; same contract as `hstu_attention_reference(..., "silu")`.

    q, k: (L, h, dqk); v: (L, h, dv); seq_offsets: (B + 1,) int; every length <= max_seq_len.
    timestamps: (B, max_seq_len) int (position `length` holds the target's timestamp);
    ts_w: (num_buckets + 1,); pos_w: (2 * max_seq_len - 1,). Without all three, no bias.
    num_targets: (B,) int, num_targets[b] <= length b: M-FALCON targets (ops/targets.py),
    forward only. Without it the targets code is compiled out (HAS_TARGETS is a constexpr).
    Differentiable in q, k, v, ts_w and pos_w. Returns (L, h, dv) in q's dtype.
    """
    return _hstu_attention(q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, num_targets=num_targets)
