"""Encoders and the full recommender (REFERENCE.md sections 4-6).

Shapes, padding invariance, causality, initialisation statistics, input/output
processing, and from-scratch recomputations of the HSTU, SASRec and FuXi-alpha forward passes.
"""

from __future__ import annotations

import math

import gin
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from generative_recommenders.cuda_graph import TOKEN_BUCKETS, token_bucket
from generative_recommenders.modeling.embeddings import InputPreprocessor, ItemEmbedding, normalize_output
from generative_recommenders.modeling.fuxi import FuXiLayer
from generative_recommenders.modeling.hstu import HSTUEncoder, HSTULayer
from generative_recommenders.modeling.recommender import SequentialRecommender, pad_lengths
from generative_recommenders.modeling.sasrec import SASRecEncoder

D = 16
N = 10  # padded length
MAX_ITEM = 40
ENCODERS = ["HSTU", "SASRec", "FuXi"]
GIN = [
    "hstu_encoder.num_blocks = 2",
    "hstu_encoder.num_heads = 2",
    "hstu_encoder.dqk = 4",
    "hstu_encoder.dv = 3",
    "hstu_encoder.linear_dropout_rate = 0.3",
    "sasrec_encoder.num_blocks = 2",
    "sasrec_encoder.num_heads = 2",
    "sasrec_encoder.ffn_hidden_dim = 12",
    "sasrec_encoder.ffn_dropout_rate = 0.3",
    "fuxi_encoder.num_blocks = 2",
    "fuxi_encoder.num_heads = 2",
    "fuxi_encoder.dqk = 4",
    "fuxi_encoder.dv = 3",
    "fuxi_encoder.ffn_hidden_dim = 12",
    "fuxi_encoder.linear_dropout_rate = 0.3",
]


@pytest.fixture(autouse=True)
def _gin():
    gin.clear_config()
    gin.parse_config(GIN)
    yield
    gin.clear_config()


def _model(encoder_type, seed=0, padded_layout=False, **kwargs):
    torch.manual_seed(seed)
    model = SequentialRecommender(encoder_type, MAX_ITEM, N, D, dropout_rate=0.3, **kwargs)
    model.padded_layout = padded_layout  # a test-only switch: use_padded_layout turns it on only on CUDA
    if encoder_type in ("HSTU", "FuXi"):
        # Larger relative-bias weights than the N(0, 0.02) init so that timestamp effects are visible.
        with torch.no_grad():
            for layer in model.encoder.layers:
                layer.ts_w.normal_(0.0, 1.0)
                layer.pos_w.normal_(0.0, 1.0)
    return model.eval()


def _batch(lengths=(5, 1, 9, 3), seed=0):
    """History left-aligned, target id and timestamp at position `length`, zeros after."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.zeros(B, N, dtype=torch.long)
    ts = torch.zeros(B, N, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, : n + 1] = torch.randint(1, MAX_ITEM + 1, (n + 1,), generator=gen)
        ts[b, : n + 1] = torch.randint(0, 10**6, (n + 1,), generator=gen).sort().values
    return ids, ts, torch.tensor(lengths, dtype=torch.long)


def _split(out, lengths):
    return list(torch.split(out, [int(n) for n in lengths]))


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_output_shapes_offsets_and_l2_norm(encoder_type):
    model = _model(encoder_type)
    ids, ts, lengths = _batch()
    out, offsets = model(ids, ts, lengths)
    assert out.shape == (int(lengths.sum()), D)
    assert offsets.tolist() == [0, 5, 6, 15, 18]
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(out.shape[0]))
    out_total, _ = model(ids, ts, lengths, total=18)
    torch.testing.assert_close(out_total, out)


def test_layer_norm_output_option():
    model = _model("HSTU", user_embedding_norm="layer_norm")
    ids, ts, lengths = _batch()
    out, _ = model(ids, ts, lengths)
    torch.testing.assert_close(out.mean(-1), torch.zeros(out.shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(out.shape[0]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        SequentialRecommender("HSTU", MAX_ITEM, N, D, 0.0, user_embedding_norm="batch_norm")
    with pytest.raises(ValueError):
        SequentialRecommender("GRU", MAX_ITEM, N, D, 0.0)


def test_normalize_output_eps():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-7, 0.0]])
    out = normalize_output(x, "l2_norm")
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.1, 0.0]]))


def test_encoder_and_layer_shapes():
    ids, ts, lengths = _batch()
    offsets = torch.tensor([0, 5, 6, 15, 18])
    x = torch.randn(4, N, D)
    torch.manual_seed(0)
    hstu = HSTUEncoder(dim=D, max_seq_len=N).eval()
    assert len(hstu.layers) == 2
    assert hstu(x, ids, offsets, 18, ts).shape == (18, D)
    layer = HSTULayer(D, num_heads=2, dqk=4, dv=3, max_seq_len=N, linear_dropout_rate=0.0)
    assert layer(torch.randn(18, D), offsets, ts).shape == (18, D)
    sasrec = SASRecEncoder(dim=D, max_seq_len=N).eval()
    assert len(sasrec.blocks) == 2
    assert sasrec(x, ids, offsets, 18, ts).shape == (18, D)


def test_encoder_gin_parameters_are_required():
    gin.clear_config()
    with pytest.raises(Exception):
        HSTUEncoder(dim=D, max_seq_len=N)
    with pytest.raises(Exception):
        SASRecEncoder(dim=D, max_seq_len=N)


# ----------------------------------------------------------------------------- padding and causality


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_padding_positions_never_influence_valid_outputs(encoder_type):
    model = _model(encoder_type)
    ids, ts, lengths = _batch()
    base, _ = model(ids, ts, lengths)
    gen = torch.Generator().manual_seed(7)
    ids2, ts2 = ids.clone(), ts.clone()
    for b, n in enumerate(lengths.tolist()):
        ids2[b, n + 1 :] = torch.randint(1, MAX_ITEM + 1, (N - n - 1,), generator=gen)
        ts2[b, n + 1 :] = torch.randint(0, 10**9, (N - n - 1,), generator=gen)
    out, _ = model(ids2, ts2, lengths)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_target_id_is_not_seen_by_any_output(encoder_type):
    model = _model(encoder_type)
    ids, ts, lengths = _batch()
    base, _ = model(ids, ts, lengths)
    ids2 = ids.clone()
    ids2[torch.arange(4), lengths] = (ids[torch.arange(4), lengths] % MAX_ITEM) + 1
    out, _ = model(ids2, ts, lengths)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


def test_hstu_last_output_uses_target_timestamp():
    """rab of the last history position uses t[length], the target's timestamp (REFERENCE 5.4)."""
    model = _model("HSTU")
    ids, ts, lengths = _batch()
    base = _split(model(ids, ts, lengths)[0], lengths)
    ts2 = ts.clone()
    ts2[torch.arange(4), lengths] += 10**8  # moves the target's time buckets
    out = _split(model(ids, ts2, lengths)[0], lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b][: n - 1], base[b][: n - 1], rtol=0, atol=1e-6)
        assert (out[b][n - 1] - base[b][n - 1]).abs().max() > 1e-4


def test_hstu_timestamp_of_position_p_affects_outputs_from_p_minus_1():
    model = _model("HSTU")
    ids, ts, lengths = _batch(lengths=(8, 6))
    base = _split(model(ids, ts, lengths)[0], lengths)
    p = 4
    ts2 = ts.clone()
    ts2[:, p] += 10**8
    out = _split(model(ids, ts2, lengths)[0], lengths)
    for b in range(2):
        torch.testing.assert_close(out[b][: p - 1], base[b][: p - 1], rtol=0, atol=1e-6)
        assert (out[b][p - 1] - base[b][p - 1]).abs().max() > 1e-4


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_causality_later_item_does_not_change_earlier_outputs(encoder_type):
    model = _model(encoder_type)
    ids, ts, lengths = _batch(lengths=(8, 6, 9))
    base = _split(model(ids, ts, lengths)[0], lengths)
    p = 3
    ids2 = ids.clone()
    ids2[:, p] = (ids[:, p] % MAX_ITEM) + 1
    out = _split(model(ids2, ts, lengths)[0], lengths)
    for b in range(3):
        torch.testing.assert_close(out[b][:p], base[b][:p], rtol=0, atol=1e-6)
        assert (out[b][p:] - base[b][p:]).abs().max() > 1e-4


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_padded_layout_gives_same_valid_outputs(encoder_type):
    ids, ts, lengths = _batch()
    base, _ = _model(encoder_type)(ids, ts, lengths)
    padded, offsets = _model(encoder_type, padded_layout=True)(ids, ts, lengths)
    assert padded.shape == (4 * N, D)
    assert offsets.tolist() == [0, N, 2 * N, 3 * N, 4 * N]
    valid = torch.cat([padded[b * N : b * N + n] for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(valid, base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_each_sequence_independent_of_the_batch(encoder_type):
    model = _model(encoder_type)
    ids, ts, lengths = _batch()
    base = _split(model(ids, ts, lengths)[0], lengths)
    for b in range(4):
        alone, _ = model(ids[b : b + 1], ts[b : b + 1], lengths[b : b + 1])
        torch.testing.assert_close(alone, base[b], rtol=0, atol=1e-5)


def test_dropout_only_in_training_mode():
    model = _model("HSTU")
    ids, ts, lengths = _batch()
    a, _ = model(ids, ts, lengths)
    b, _ = model(ids, ts, lengths)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    c, _ = model(ids, ts, lengths)
    assert (c - a).abs().max() > 1e-3


# ----------------------------------------------------------------------------- input preprocessing


def test_input_is_scaled_embedding_plus_position_zeroed_at_padding():
    torch.manual_seed(0)
    pre = InputPreprocessor(max_seq_len=N, dim=D, dropout_rate=0.5).eval()
    ids = torch.tensor([[3, 5, 0, 0, 0, 0], [0, 7, 2, 9, 1, 0]])
    emb = torch.randn(2, 6, D)
    out = pre(ids, emb)
    expected = (emb * math.sqrt(D) + pre.position.weight[:6]) * (ids != 0).unsqueeze(-1)
    torch.testing.assert_close(out, expected)
    assert bool((out[0, 2:] == 0).all()) and bool((out[1, 0] == 0).all())
    # Training mode: dropout with p = 0.5 on valid entries, padding still zero.
    pre.train()
    dropped = pre(ids, emb)
    valid = (ids != 0).unsqueeze(-1).expand_as(dropped)
    zero_fraction = (dropped[valid] == 0).float().mean().item()
    assert 0.35 < zero_fraction < 0.65
    kept = dropped[valid] != 0
    torch.testing.assert_close(dropped[valid][kept], 2.0 * expected[valid][kept])
    assert bool((dropped[~valid] == 0).all())


# ----------------------------------------------------------------------------- initialisation


def _truncated_std(std):
    return std * 0.8796  # std of N(0, std) truncated at +/- 2 std


def test_item_table_truncated_normal_std_002():
    torch.manual_seed(0)
    table = ItemEmbedding(3000, 32).table.weight.detach()
    assert table.shape == (3001, 32)
    assert table.abs().max().item() <= 0.04 + 1e-7
    assert abs(table.std().item() - _truncated_std(0.02)) < 0.05 * _truncated_std(0.02)
    assert abs(table.mean().item()) < 1e-3
    assert ItemEmbedding(5, 4).table.padding_idx == 0


def test_hstu_layer_initialisation():
    torch.manual_seed(0)
    dim, h, dqk, dv, n = 64, 2, 16, 24, 50
    layers = [HSTULayer(dim, h, dqk, dv, n, 0.0) for _ in range(8)]
    layer = layers[0]
    assert layer.uvqk.shape == (dim, h * (2 * dv + 2 * dqk))
    uvqk = torch.cat([l.uvqk.detach().flatten() for l in layers])
    assert abs(uvqk.std().item() - 0.02) < 0.05 * 0.02
    assert uvqk.abs().max().item() > 0.05  # plain normal, not truncated at 2 std
    assert layer.ts_w.shape == (129,)
    assert layer.pos_w.shape == (2 * n - 1,)
    rel = torch.cat([torch.cat([l.ts_w.detach(), l.pos_w.detach()]) for l in layers])
    assert abs(rel.std().item() - 0.02) < 0.1 * 0.02
    # W2: Linear(h dv -> D) with bias and Xavier-uniform weight.
    assert layer.output.weight.shape == (dim, h * dv)
    assert layer.output.bias is not None and layer.output.bias.shape == (dim,)
    bound = math.sqrt(6.0 / (dim + h * dv))
    w2 = torch.cat([l.output.weight.detach().flatten() for l in layers])
    assert w2.abs().max().item() <= bound
    assert abs(w2.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert len(list(layer.parameters())) == 5  # uvqk, W2 weight, W2 bias, ts_w, pos_w


def test_hstu_relative_bias_switch_removes_weights_and_timestamp_dependence():
    layer = HSTULayer(D, 2, 4, 3, N, 0.0, relative_bias=False)
    assert layer.ts_w is None and layer.pos_w is None
    gin.bind_parameter("hstu_encoder.relative_bias", False)
    model = _model_no_bias()
    names = [name for name, _ in model.named_parameters()]
    assert not any("ts_w" in name or "pos_w" in name for name in names)
    ids, ts, lengths = _batch()
    a, _ = model(ids, ts, lengths)
    b, _ = model(ids, torch.randint(0, 10**9, ts.shape), lengths)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _model_no_bias():
    torch.manual_seed(0)
    return SequentialRecommender("HSTU", MAX_ITEM, N, D, 0.0).eval()


def test_position_table_init_hstu_xavier_vs_sasrec_truncated_normal():
    n, dim = 300, 64
    gin.clear_config()
    gin.parse_config(GIN)
    torch.manual_seed(0)
    hstu = SequentialRecommender("HSTU", 10, n, dim, 0.0).input_preproc.position.weight.detach()
    sasrec = SequentialRecommender("SASRec", 10, n, dim, 0.0).input_preproc.position.weight.detach()
    assert hstu.shape == sasrec.shape == (n, dim)
    xavier = math.sqrt(2.0 / (n + dim))  # 0.0741
    trunc = _truncated_std(math.sqrt(1.0 / dim))  # 0.110
    assert abs(hstu.std().item() - xavier) < 0.05 * xavier
    assert abs(sasrec.std().item() - trunc) < 0.05 * trunc
    assert sasrec.abs().max().item() <= 2 * math.sqrt(1.0 / dim) + 1e-6


def test_hstu_recommender_keeps_item_table_and_stack_init():
    torch.manual_seed(0)
    model = SequentialRecommender("HSTU", 2000, N, 32, 0.0)
    table = model.item_embedding.table.weight.detach()
    assert table.abs().max().item() <= 0.04 + 1e-7  # still the truncated N(0, 0.02)
    uvqk = model.encoder.layers[0].uvqk.detach()
    assert abs(uvqk.std().item() - 0.02) < 0.15 * 0.02


def test_sasrec_two_dim_parameters_are_xavier_normal():
    dim, hidden = 64, 128
    gin.bind_parameter("sasrec_encoder.ffn_hidden_dim", hidden)
    gin.bind_parameter("sasrec_encoder.num_blocks", 4)
    torch.manual_seed(0)
    model = SequentialRecommender("SASRec", 2000, N, dim, 0.0)
    blocks = model.encoder.blocks
    expected = {
        "attention.in_proj_weight": math.sqrt(2.0 / (dim + 3 * dim)),
        "attention.out_proj.weight": math.sqrt(2.0 / (dim + dim)),
        "ffn.inner.weight": math.sqrt(2.0 / (dim + hidden)),
        "ffn.outer.weight": math.sqrt(2.0 / (hidden + dim)),
    }
    params = {name: [] for name in expected}
    for block in blocks:
        named = dict(block.named_parameters())
        for name in expected:
            params[name].append(named[name].detach().flatten())
    for name, std in expected.items():
        values = torch.cat(params[name])
        assert abs(values.std().item() - std) < 0.05 * std, name
        assert values.abs().max().item() > 2.5 * std, name  # not truncated, not uniform
    # Every 2-D encoder parameter is covered by the list above.
    two_dim = {name.split(".", 1)[1] for name, p in blocks.named_parameters() if p.dim() >= 2}
    assert two_dim == set(expected)
    # Item table is not re-initialised by the encoder.
    assert model.item_embedding.table.weight.abs().max().item() <= 0.04 + 1e-7


# ----------------------------------------------------------------------------- forward recomputed from REFERENCE


def _ln(x, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _naive_hstu_layer(layer, x, n, ts, normalization):
    """One sequence x (n, D), timestamps ts (N,); REFERENCE 5.1-5.6, dense masks."""
    h, dqk, dv, big_n = layer.num_heads, layer.dqk, layer.dv, layer.max_seq_len
    proj = F.silu(_ln(x, 1e-6) @ layer.uvqk)
    u = proj[:, : h * dv]
    v = proj[:, h * dv : 2 * h * dv].view(n, h, dv)
    q = proj[:, 2 * h * dv : 2 * h * dv + h * dqk].view(n, h, dqk)
    k = proj[:, 2 * h * dv + h * dqk :].view(n, h, dqk)
    outs = []
    for head in range(h):
        s = q[:, head] @ k[:, head].T
        if layer.ts_w is not None:
            rab = torch.zeros(n, n)
            for i in range(n):
                for j in range(n):
                    d = int(ts[min(i + 1, big_n - 1)]) - int(ts[j])
                    bucket = min(128, max(0, math.floor(math.log(max(abs(d), 1)) / 0.301)))
                    rab[i, j] = layer.pos_w[big_n - 1 + j - i] + layer.ts_w[bucket]
            s = s + rab
        mask = torch.ones(n, n).tril().bool()
        if normalization == "silu":
            a = torch.where(mask, F.silu(s) / big_n, torch.zeros(()))
        else:
            a = torch.softmax((s / math.sqrt(dqk)).masked_fill(~mask, float("-inf")), dim=-1)
        outs.append(a @ v[:, head])
    o = torch.cat(outs, dim=-1)
    return x + layer.output(u * _ln(o, 1e-6))


@pytest.mark.parametrize("normalization", ["silu", "softmax"])
def test_hstu_forward_recomputed_from_reference(normalization):
    gin.bind_parameter("hstu_encoder.normalization", normalization)
    _assert_forward_recomputed("HSTU", lambda layer, x, n, ts: _naive_hstu_layer(layer, x, n, ts, normalization))


def _assert_forward_recomputed(main_module, naive_layer):
    """The model's outputs equal its input (item embedding x sqrt(D) + position) run through
    `naive_layer(layer, x, n, ts)` per layer and sequence, then L2-normalised."""
    model = _model(main_module)
    ids, ts, lengths = _batch()
    with torch.no_grad():
        out, _ = model(ids, ts, lengths)
        expected = []
        for b, n in enumerate(lengths.tolist()):
            x = model.item_embedding.table.weight[ids[b, :n]] * math.sqrt(D) + model.input_preproc.position.weight[:n]
            for layer in model.encoder.layers:
                x = naive_layer(layer, x, n, ts[b])
            expected.append(x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-4, atol=1e-5)


def _rms(x):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)


def _naive_fuxi_channels(layer, x, n, ts):
    """One sequence x (n, D), timestamps ts (N,): u and the three channel outputs (n, h * dv), loops and dense masks."""
    h, dqk, dv, big_n = layer.num_heads, layer.dqk, layer.dv, layer.max_seq_len
    proj = F.silu(_rms(x) @ layer.uvqk)
    u = proj[:, : 3 * h * dv]
    v = proj[:, 3 * h * dv : 4 * h * dv].view(n, h, dv)
    q = proj[:, 4 * h * dv : 4 * h * dv + h * dqk].view(n, h, dqk)
    k = proj[:, 4 * h * dv + h * dqk :].view(n, h, dqk)
    semantic, temporal, positional = (torch.zeros(n, n, h) for _ in range(3))
    for i in range(n):
        for j in range(i + 1):  # causal: keys up to the query
            d = int(ts[min(i + 1, big_n - 1)]) - int(ts[j])
            bucket = min(128, max(0, math.floor(math.log(max(abs(d), 1)) / 0.301)))
            semantic[i, j] = F.silu((q[i] * k[j]).sum(-1)) / big_n
            temporal[i, j] = F.silu(layer.ts_w[bucket]) / big_n
            positional[i, j] = F.silu(layer.pos_w[big_n - 1 + j - i]) / big_n
    return u, [torch.einsum("ijh,jhd->ihd", a, v).reshape(n, h * dv) for a in (semantic, temporal, positional)]


def _naive_fuxi_layer(layer, x, n, ts):
    u, outputs = _naive_fuxi_channels(layer, x, n, ts)
    x = x + layer.stage1(u * torch.cat([_rms(o) for o in outputs], dim=-1))
    z = _rms(x)
    return x + layer.down(F.silu(layer.gate(z)) * layer.up(z))


def test_fuxi_channels_equal_the_dense_formula():
    torch.manual_seed(3)
    layer = FuXiLayer(D, num_heads=2, dqk=4, dv=3, ffn_hidden_dim=12, max_seq_len=N, linear_dropout_rate=0.0)
    with torch.no_grad():
        layer.ts_w.normal_(0.0, 1.0)
        layer.pos_w.normal_(0.0, 1.0)
    ids, ts, lengths = _batch()
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    x = torch.randn(int(lengths.sum()), D)
    with torch.no_grad():
        u, *outputs = layer.channels(x, offsets, ts)
        for b, (start, n) in enumerate(zip(offsets.tolist(), lengths.tolist())):
            want_u, want = _naive_fuxi_channels(layer, x[start : start + n], n, ts[b])
            torch.testing.assert_close(u[start : start + n], want_u)
            for got, expected in zip(outputs, want):
                torch.testing.assert_close(got[start : start + n].reshape(n, -1), expected, rtol=1e-4, atol=1e-6)
    # The bias channels differ from each other and from the semantic one (none is silently dropped).
    assert min((a - b).abs().max() for a, b in [(outputs[0], outputs[1]), (outputs[1], outputs[2])]) > 1e-3


def test_fuxi_forward_recomputed_from_formula():
    _assert_forward_recomputed("FuXi", _naive_fuxi_layer)


def test_hstu_softmax_differs_from_silu():
    ids, ts, lengths = _batch()
    silu, _ = _model("HSTU")(ids, ts, lengths)
    gin.bind_parameter("hstu_encoder.normalization", "softmax")
    soft, _ = _model("HSTU")(ids, ts, lengths)
    assert soft.shape == silu.shape and bool(torch.isfinite(soft).all())
    assert (soft - silu).abs().max() > 1e-3


def _naive_mha(attn, query, key, value, causal):
    n, d = query.shape
    h = attn.num_heads
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q = (query @ wq.T + bq).view(n, h, d // h).transpose(0, 1)
    k = (key @ wk.T + bk).view(n, h, d // h).transpose(0, 1)
    v = (value @ wv.T + bv).view(n, h, d // h).transpose(0, 1)
    s = (q @ k.transpose(1, 2)) / math.sqrt(d // h)
    s = s.masked_fill(~causal, float("-inf"))
    o = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(n, d)
    return attn.out_proj(o)


def test_sasrec_forward_recomputed_from_reference():
    model = _model("SASRec")
    ids, ts, lengths = _batch()
    causal = torch.ones(N, N).tril().bool()
    with torch.no_grad():
        out, _ = model(ids, ts, lengths)
        expected = []
        for b, n in enumerate(lengths.tolist()):
            valid = (ids[b] != 0).unsqueeze(-1).float()
            x = (model.item_embedding.table.weight[ids[b]] * math.sqrt(D) + model.input_preproc.position.weight) * valid
            for block in model.encoder.blocks:
                q = _ln(x, 1e-8)
                a = _naive_mha(block.attention, q, x, x, causal)
                z = _ln(q + a, 1e-8)
                x = (z + block.ffn.outer(F.relu(block.ffn.inner(z)))) * valid
            y = x[:n]
            expected.append(y / y.norm(dim=-1, keepdim=True).clamp(min=1e-6))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_padded_layout_to_a_token_bucket_gives_same_valid_outputs(encoder_type):
    ids, ts, lengths = _batch()
    base, _ = _model(encoder_type)(ids, ts, lengths)
    total = int(lengths.sum()) + N + 3  # the first sequence filled up (+5), the second lengthened (+8)
    padded, offsets = _model(encoder_type, padded_layout=True)(ids, ts, lengths, total)
    grown = (offsets[1:] - offsets[:-1]).tolist()
    assert padded.shape[0] == total == offsets[-1] and all(n <= N for n in grown)
    assert all(g >= n for g, n in zip(grown, lengths.tolist())) and grown[0] == N
    valid = torch.cat([padded[o : o + n] for o, n in zip(offsets.tolist(), lengths.tolist())])
    torch.testing.assert_close(valid, base, rtol=0, atol=1e-5)


@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6), slack=st.integers(0, 60))
def test_pad_lengths_reaches_the_total_within_capacity(lengths, slack):
    lengths = torch.tensor(lengths)
    total = min(int(lengths.sum()) + slack, 9 * lengths.numel())
    grown = pad_lengths(lengths, 9, total)
    assert int(grown.sum()) == total and bool((grown >= lengths).all()) and bool((grown <= 9).all())


@given(capacity=st.integers(1, 30_000), data=st.data())
def test_token_bucket_holds_the_batch_in_few_static_sizes(capacity, data):
    total = data.draw(st.integers(0, capacity))
    bucket = token_bucket(total, capacity)
    assert max(total, 1) <= bucket <= capacity
    assert len({token_bucket(t, capacity) for t in range(0, capacity + 1, max(1, capacity // 500))}) <= TOKEN_BUCKETS
