"""GRU4Rec and BERT4Rec encoders, and causality of the SASRec, HSTU and FuXi-alpha encoders.

Ragged batches are drawn by hypothesis: each row has a valid prefix (the
outputs the encoder returns) and possibly more non-zero ids after it (a target,
or a [MASK] token), then padding (id 0, zero input as the input module makes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import gin
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from generative_recommenders.modeling.bert4rec import BERT4RecEncoder, attention_bias
from generative_recommenders.modeling.fuxi import FuXiEncoder
from generative_recommenders.modeling.gru4rec import GRU4RecEncoder
from generative_recommenders.modeling.hstu import HSTUEncoder
from generative_recommenders.modeling.sasrec import SASRecEncoder

SETTINGS = settings(max_examples=25, deadline=None)
MAX_ID = 50


@dataclass
class Batch:
    x: torch.Tensor  # (B, N, D), zero where ids == 0
    ids: torch.Tensor  # (B, N)
    timestamps: torch.Tensor  # (B, N)
    lengths: List[int]  # valid prefix of each row
    nonzero: List[int]  # non-zero ids of each row (>= its length)

    @property
    def offsets(self) -> torch.Tensor:
        return F.pad(torch.tensor(self.lengths).cumsum(0), (1, 0))

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def run(self, encoder: nn.Module, x: torch.Tensor = None, ids: torch.Tensor = None) -> torch.Tensor:
        x = self.x if x is None else x
        ids = self.ids if ids is None else ids
        return encoder(x, ids, self.offsets, self.total, self.timestamps)

    def split(self, out: torch.Tensor) -> List[torch.Tensor]:
        return list(torch.split(out, self.lengths))


def make_batch(lengths: List[int], extra: List[int], n: int, dim: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    nonzero = [min(n, length + e) for length, e in zip(lengths, extra)]
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, nz in enumerate(nonzero):
        ids[b, :nz] = torch.randint(1, MAX_ID + 1, (nz,), generator=gen)
    x = torch.randn(len(lengths), n, dim, generator=gen) * (ids != 0).unsqueeze(-1)
    timestamps = torch.randint(0, 10**6, (len(lengths), n), generator=gen).sort(dim=1).values
    return Batch(x, ids, timestamps, list(lengths), nonzero)


@st.composite
def batches(draw, dim: int, min_length: int = 0, max_batch: int = 4, max_len: int = 9) -> Batch:
    n = draw(st.integers(max(1, min_length), max_len))
    b = draw(st.integers(1, max_batch))
    lengths = draw(st.lists(st.integers(min_length, n), min_size=b, max_size=b))
    extra = draw(st.lists(st.integers(0, 2), min_size=b, max_size=b))
    return make_batch(lengths, extra, n, dim, draw(st.integers(0, 2**16)))


def _gru(dim: int, seed: int = 0, **kwargs) -> GRU4RecEncoder:
    torch.manual_seed(seed)
    return GRU4RecEncoder(dim, max_seq_len=16, **kwargs).eval()


def _bert(dim: int, seed: int = 0, **kwargs) -> BERT4RecEncoder:
    torch.manual_seed(seed)
    encoder = BERT4RecEncoder(dim, max_seq_len=16, **kwargs).eval()
    # Unit-scale weights instead of N(0, 0.02): with tiny weights the attention
    # is nearly uniform and a wrong mask or formula would hide under tolerances.
    with torch.no_grad():
        for param in encoder.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]))
            else:  # biases around 0, LayerNorm scales around 1
                param.add_(torch.randn_like(param) * 0.3)
    return encoder


# Hypothesis draws of a model shape: (dim, num_heads) with dim = heads * head_dim.
heads_and_dims = st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([2, 4, 8])).map(lambda t: (t[0] * t[1], t[0]))


def _assert_rows_match_alone(encoder: nn.Module, batch: Batch, atol: float) -> None:
    """Each row's valid outputs equal the encoder run on that row alone, unpadded."""
    rows = batch.split(batch.run(encoder))
    for b, (length, nz) in enumerate(zip(batch.lengths, batch.nonzero)):
        if length == 0:
            continue
        alone = encoder(batch.x[b : b + 1, :nz], batch.ids[b : b + 1, :nz], torch.tensor([0, length]), length,
                        batch.timestamps[b : b + 1, :nz])
        torch.testing.assert_close(rows[b], alone, rtol=0, atol=atol)


def _perturb_at(batch: Batch, position: int, seed: int) -> torch.Tensor:
    """batch.x with every row's input at `position` moved (where it is not padding)."""
    gen = torch.Generator().manual_seed(seed)
    x = batch.x.clone()
    x[:, position] += torch.randn(x.shape[0], x.shape[2], generator=gen) * (batch.ids[:, position:position + 1] != 0)
    return x


def _assert_causal(encoder: nn.Module, batch: Batch, position: int) -> None:
    """Moving position j changes no output at i < j and does change the output at j."""
    base = batch.split(batch.run(encoder))
    moved = batch.split(batch.run(encoder, x=_perturb_at(batch, position, seed=position)))
    for b, length in enumerate(batch.lengths):
        torch.testing.assert_close(moved[b][:position], base[b][:position], rtol=0, atol=0)
        if position < length:
            assert (moved[b][position] - base[b][position]).abs().max() > 1e-6


def _assert_every_parameter_gets_a_gradient(encoder: nn.Module, batch: Batch) -> None:
    out = batch.run(encoder.train())
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name
        assert param.grad.abs().max() > 0, name


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a device value on the host or has a data-dependent shape."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FORBIDDEN:
            raise AssertionError(f"host sync: {func}")
        if func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            raise AssertionError("boolean indexing: data-dependent shape")
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- interface


def test_class_attributes_and_gin_names():
    assert GRU4RecEncoder.CAUSAL is True and GRU4RecEncoder.USES_POSITIONS is False
    assert BERT4RecEncoder.CAUSAL is False and BERT4RecEncoder.USES_POSITIONS is True
    gin.clear_config()
    try:
        gin.parse_config(["gru4rec_encoder.hidden_dim = 12", "gru4rec_encoder.num_layers = 3",
                          "bert4rec_encoder.num_blocks = 3", "bert4rec_encoder.ffn_hidden_dim = 20"])
        gru = GRU4RecEncoder(dim=8, max_seq_len=5)
        assert (gru.gru.hidden_size, gru.gru.num_layers, gru.project.out_features) == (12, 3, 8)
        bert = BERT4RecEncoder(dim=8, max_seq_len=5)
        assert len(bert.layers) == 3 and bert.layers[0].ffn_in.out_features == 20
    finally:
        gin.clear_config()
    with pytest.raises(ValueError, match="num_heads"):
        BERT4RecEncoder(dim=10, max_seq_len=5, num_heads=4)


@pytest.mark.parametrize("make", [lambda: _gru(8, num_layers=2, hidden_dim=6, dropout_rate=0.3),
                                  lambda: _bert(8, dropout_rate=0.3)], ids=["gru4rec", "bert4rec"])
def test_forward_and_backward_never_sync_with_the_host(make):
    encoder = make().train()
    batch = make_batch([3, 0, 5], [1, 0, 0], 6, 8, seed=0)
    with _NoHostSync():
        batch.run(encoder).sum().backward()


# ----------------------------------------------------------------------------- GRU4Rec


def _gru_reference(encoder: GRU4RecEncoder, x: torch.Tensor) -> torch.Tensor:
    """The GRU gate equations, one step at a time, for one sequence x (n, D)."""
    gru = encoder.gru
    hidden = gru.hidden_size
    inputs = x
    for layer in range(gru.num_layers):
        w_ih, w_hh = getattr(gru, f"weight_ih_l{layer}"), getattr(gru, f"weight_hh_l{layer}")
        b_ih, b_hh = getattr(gru, f"bias_ih_l{layer}"), getattr(gru, f"bias_hh_l{layer}")
        h = torch.zeros(hidden)
        states = []
        for x_t in inputs:
            gi, gh = w_ih @ x_t + b_ih, w_hh @ h + b_hh
            r = torch.sigmoid(gi[:hidden] + gh[:hidden])  # reset gate
            z = torch.sigmoid(gi[hidden : 2 * hidden] + gh[hidden : 2 * hidden])  # update gate
            candidate = torch.tanh(gi[2 * hidden :] + r * gh[2 * hidden :])
            h = (1 - z) * candidate + z * h
            states.append(h)
        inputs = torch.stack(states)
    return encoder.project(inputs)


gru_shapes = st.tuples(st.integers(1, 8), st.sampled_from([None, 3, 7]), st.integers(1, 2))


@SETTINGS
@given(shape=gru_shapes, data=st.data())
def test_gru4rec_matches_gate_equations_and_each_row_alone(shape, data):
    dim, hidden_dim, num_layers = shape
    batch = data.draw(batches(dim))
    encoder = _gru(dim, num_layers=num_layers, hidden_dim=hidden_dim, dropout_rate=0.5)
    with torch.no_grad():
        rows = batch.split(batch.run(encoder))
        assert batch.run(encoder).shape == (batch.total, dim)
        for b, length in enumerate(batch.lengths):
            if length:
                expected = _gru_reference(encoder, batch.x[b, :length])
                torch.testing.assert_close(rows[b], expected, rtol=1e-5, atol=1e-5)
        _assert_rows_match_alone(encoder, batch, atol=1e-6)


@SETTINGS
@given(shape=gru_shapes, data=st.data())
def test_gru4rec_ignores_everything_after_the_valid_prefix(shape, data):
    dim, hidden_dim, num_layers = shape
    batch = data.draw(batches(dim))
    encoder = _gru(dim, num_layers=num_layers, hidden_dim=hidden_dim)
    x, ids = batch.x.clone(), batch.ids.clone()
    for b, length in enumerate(batch.lengths):
        x[b, length:] = torch.randn(x.shape[1] - length, dim) * 5
        ids[b, length:] = torch.randint(0, MAX_ID + 1, (x.shape[1] - length,))
    with torch.no_grad():
        torch.testing.assert_close(batch.run(encoder, x, ids), batch.run(encoder), rtol=0, atol=0)


@SETTINGS
@given(shape=gru_shapes, data=st.data())
def test_gru4rec_never_sees_the_future(shape, data):
    dim, hidden_dim, num_layers = shape
    batch = data.draw(batches(dim))
    position = data.draw(st.integers(0, batch.x.shape[1] - 1))
    with torch.no_grad():
        _assert_causal(_gru(dim, num_layers=num_layers, hidden_dim=hidden_dim), batch, position)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_gru4rec_dropout_only_in_training(num_layers):
    encoder = _gru(8, num_layers=num_layers, dropout_rate=0.5)
    batch = make_batch([4, 6], [1, 0], 6, 8, seed=1)
    with torch.no_grad():
        a, b = batch.run(encoder), batch.run(encoder)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        c = batch.run(encoder.train())
    assert (c == 0).float().mean() > 0.3  # the output dropout (hidden == D: no projection after it)
    assert (c - a).abs().max() > 1e-3
    if num_layers > 1:  # dropout between the GRU layers too
        encoder.dropout = nn.Identity()
        with torch.no_grad():
            assert (batch.run(encoder) - a).abs().max() > 1e-3


@pytest.mark.parametrize("hidden_dim,num_layers", [(None, 1), (5, 2)])
def test_gru4rec_gradients_reach_every_parameter(hidden_dim, num_layers):
    encoder = _gru(8, num_layers=num_layers, hidden_dim=hidden_dim, dropout_rate=0.2)
    _assert_every_parameter_gets_a_gradient(encoder, make_batch([4, 6, 1], [1, 0, 3], 7, 8, seed=2))


# ----------------------------------------------------------------------------- BERT4Rec


def _ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _bert_reference(encoder: BERT4RecEncoder, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Post-LN BERT layers on one sequence x (n, D) in plain ops; keys are the positions with id != 0."""
    keys = ids != 0
    h = _ln(x, encoder.input_norm)
    for layer in encoder.layers:
        heads = layer.num_heads
        d = h.shape[1] // heads
        wq, wk, wv = layer.qkv.weight.chunk(3)
        bq, bk, bv = layer.qkv.bias.chunk(3)
        outs = []
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            q = h @ wq[cols].T + bq[cols]
            k = h[keys] @ wk[cols].T + bk[cols]
            v = h[keys] @ wv[cols].T + bv[cols]
            outs.append(torch.softmax(q @ k.T / math.sqrt(d), dim=-1) @ v)
        h = _ln(h + torch.cat(outs, dim=-1) @ layer.attn_out.weight.T + layer.attn_out.bias, layer.attn_norm)
        z = h @ layer.ffn_in.weight.T + layer.ffn_in.bias
        gelu = 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))
        h = _ln(h + gelu @ layer.ffn_out.weight.T + layer.ffn_out.bias, layer.ffn_norm)
    return h


@SETTINGS
@given(shape=heads_and_dims, num_blocks=st.integers(1, 2), data=st.data())
def test_bert4rec_matches_attention_formula_and_each_row_alone(shape, num_blocks, data):
    dim, num_heads = shape
    batch = data.draw(batches(dim))
    encoder = _bert(dim, num_blocks=num_blocks, num_heads=num_heads, ffn_hidden_dim=2 * dim + 1)
    with torch.no_grad():
        out = batch.run(encoder)
        assert out.shape == (batch.total, dim)
        for b, (row, length) in enumerate(zip(batch.split(out), batch.lengths)):
            expected = _bert_reference(encoder, batch.x[b], batch.ids[b])[:length]
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)
        _assert_rows_match_alone(encoder, batch, atol=1e-5)


@SETTINGS
@given(shape=heads_and_dims, data=st.data())
def test_bert4rec_padding_never_influences_valid_outputs(shape, data):
    """Inputs at id 0 are invisible, and ids matter only through id != 0 (a [MASK] id is ordinary)."""
    dim, num_heads = shape
    batch = data.draw(batches(dim))
    encoder = _bert(dim, num_heads=num_heads)
    padding = (batch.ids == 0).unsqueeze(-1)
    x = torch.where(padding, torch.randn(batch.x.shape) * 5, batch.x)
    ids = torch.where(batch.ids != 0, torch.randint(1, 10 * MAX_ID, batch.ids.shape), 0)
    with torch.no_grad():
        torch.testing.assert_close(batch.run(encoder, x, ids), batch.run(encoder), rtol=0, atol=1e-6)


@SETTINGS
@given(shape=heads_and_dims.filter(lambda s: s[0] >= 8), data=st.data())
def test_bert4rec_attends_both_ways(shape, data):
    """Moving any non-padding input changes every valid output of its row, earlier ones included."""
    dim, num_heads = shape
    batch = data.draw(batches(dim, min_length=1))
    position = data.draw(st.integers(0, batch.x.shape[1] - 1))
    encoder = _bert(dim, num_heads=num_heads)
    with torch.no_grad():
        base = batch.split(batch.run(encoder))
        moved = batch.split(batch.run(encoder, x=_perturb_at(batch, position, seed=position)))
    for b, nz in enumerate(batch.nonzero):
        change = (moved[b] - base[b]).abs().amax(dim=-1)
        if position < nz:
            assert bool((change > 1e-6).all()), (b, position, change)


@SETTINGS
@given(batch=batches(1))
def test_attention_bias_masks_padding_keys_but_never_a_whole_row(batch):
    """Query i sees key j iff id j != 0 or j == i; so no softmax row is empty, on any SDPA backend."""
    bias = attention_bias(batch.ids, torch.float32)
    b, n = batch.ids.shape
    assert bias.shape == (b, 1, n, n) and bias.stride(-2) % 8 == 0  # aligned rows for the mem-efficient kernel
    expected = (batch.ids != 0)[:, None, None, :] | torch.eye(n, dtype=torch.bool)
    assert torch.equal(bias == 0, expected)
    assert bool((bias[~expected] == float("-inf")).all())


def test_bert4rec_rows_of_only_padding_stay_finite():
    """A row with no non-padding key (padded layout: returned in full) gives finite values and gradients."""
    encoder = _bert(8, dropout_rate=0.1).train()
    batch = make_batch([6, 0, 2], [0, 0, 1], 6, 8, seed=3)
    out = encoder(batch.x, batch.ids, torch.tensor([0, 6, 12, 18]), 18, batch.timestamps)
    assert bool(torch.isfinite(out).all())
    out.sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in encoder.parameters())


def test_bert4rec_dropout_only_in_training():
    encoder = _bert(8, dropout_rate=0.1)
    batch = make_batch([4, 6], [1, 0], 6, 8, seed=1)
    with torch.no_grad():
        a, b = batch.run(encoder), batch.run(encoder)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        c, d = batch.run(encoder.train()), batch.run(encoder)
    assert (c - a).abs().max() > 1e-3 and (c - d).abs().max() > 1e-3


def test_bert4rec_gradients_reach_every_parameter():
    encoder = _bert(8, num_blocks=2, num_heads=2, dropout_rate=0.1)
    _assert_every_parameter_gets_a_gradient(encoder, make_batch([4, 6, 1], [1, 0, 3], 7, 8, seed=2))


def test_bert4rec_initialisation():
    """Linear weights N(0, 0.02) truncated at 2 std, zero biases, LayerNorm scale 1 shift 0."""
    torch.manual_seed(0)
    encoder = BERT4RecEncoder(dim=64, max_seq_len=10, num_blocks=4)
    weights = torch.cat([m.weight.detach().flatten() for m in encoder.modules() if isinstance(m, nn.Linear)])
    assert weights.abs().max() <= 0.04 + 1e-7
    truncated_std = 0.02 * 0.8796  # std of N(0, 0.02) truncated at +/- 2 std
    assert abs(weights.std().item() - truncated_std) < 0.03 * truncated_std
    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            assert bool((module.bias == 0).all())
        if isinstance(module, nn.LayerNorm):
            assert bool((module.weight == 1).all()) and bool((module.bias == 0).all())


# ----------------------------------------------------------------------------- SASRec, HSTU and FuXi causality


# dim >= 4: the layer norm of a 2-vector is its sign pattern, so a moved input may not show.
@SETTINGS
@given(shape=heads_and_dims.filter(lambda s: s[0] >= 4), data=st.data())
def test_sasrec_never_sees_the_future(shape, data):
    dim, num_heads = shape
    batch = data.draw(batches(dim))
    position = data.draw(st.integers(0, batch.x.shape[1] - 1))
    torch.manual_seed(0)
    encoder = SASRecEncoder(dim, 16, num_blocks=2, num_heads=num_heads, ffn_hidden_dim=dim + 3).eval()
    with torch.no_grad():
        _assert_causal(encoder, batch, position)


@pytest.mark.parametrize("encoder_cls", [HSTUEncoder, FuXiEncoder])
@SETTINGS
@given(num_heads=st.integers(1, 2), dqk=st.integers(1, 5), dv=st.integers(1, 5), data=st.data())
def test_hstu_and_fuxi_never_see_the_future(encoder_cls, num_heads, dqk, dv, data):
    dim = 6
    batch = data.draw(batches(dim))
    position = data.draw(st.integers(0, batch.x.shape[1] - 1))
    torch.manual_seed(0)
    extra = dict(ffn_hidden_dim=dim + 2) if encoder_cls is FuXiEncoder else {}
    encoder = encoder_cls(dim, batch.x.shape[1], num_blocks=2, num_heads=num_heads, dqk=dqk, dv=dv,
                          attention_kernel="torch", **extra).eval()
    with torch.no_grad():
        for layer in encoder.layers:  # bias weights large enough that a leak through the bias shows
            layer.ts_w.normal_(0.0, 1.0)
            layer.pos_w.normal_(0.0, 1.0)
        _assert_causal(encoder, batch, position)


def test_fuxi_every_parameter_gets_a_gradient():
    batch = make_batch([5, 1, 7], [1, 0, 1], 8, 6, seed=3)
    torch.manual_seed(0)
    encoder = FuXiEncoder(6, 8, num_blocks=2, num_heads=2, dqk=3, dv=2, ffn_hidden_dim=8, linear_dropout_rate=0.1,
                          attention_kernel="torch")
    _assert_every_parameter_gets_a_gradient(encoder, batch)
