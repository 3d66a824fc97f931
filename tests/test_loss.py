"""generative_recommenders/objectives/losses.py: sampled softmax, BCE, full softmax, BPR, BPR-max, negative
sampling (REFERENCE.md sections 3 and 12), each against a direct formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hypothesis import given, settings
from hypothesis import strategies as st

from generative_recommenders.config import ConfigError
from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.modeling.embeddings import ItemEmbedding, ItemTable
from generative_recommenders.objectives.losses import (
    consecutive_range,
    NEGATIVE_EQUALS_POSITIVE_LOGIT,
    NegativesSampler,
    RetrievalLoss,
    bce_loss,
    bpr_loss,
    bpr_max_loss,
    full_softmax_loss,
    negative_logits,
    sampled_softmax_loss,
)


def _hand_softmax_loss(pos, negs, weights):
    """-log(e^p / (e^p + sum e^n)) per row, weighted mean; pure Python floats."""
    total, wsum = 0.0, 0.0
    for p, row, w in zip(pos, negs, weights):
        denom = math.exp(p) + sum(math.exp(n) for n in row)
        total += w * -(p - math.log(denom))
        wsum += w
    return total / max(wsum, 1.0)


POS = torch.tensor([1.0, -0.5, 2.0])
NEGS = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.5, 1.5, -2.0, 0.3], [-0.7, 0.1, 0.2, 3.0]])
POS_IDS = torch.tensor([5, 0, 9])
NEG_IDS = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])


def test_sampled_softmax_equals_hand_formula():
    weights = torch.tensor([1.0, 1.0, 1.0])
    got = sampled_softmax_loss(POS, NEGS, torch.tensor([5, 7, 9]), NEG_IDS, weights)
    assert got.item() == pytest.approx(_hand_softmax_loss(POS.tolist(), NEGS.tolist(), [1, 1, 1]), rel=1e-6)
    # First row alone, fully by hand: -log(e^1 / (e^1 + e^.5 + e^-1 + e^2 + e^0)).
    one = sampled_softmax_loss(POS[:1], NEGS[:1], torch.tensor([5]), NEG_IDS[:1], torch.ones(1))
    expected = -(1.0 - math.log(math.e + math.exp(0.5) + math.exp(-1) + math.exp(2) + 1.0))
    assert one.item() == pytest.approx(expected, rel=1e-6)


def test_padded_positions_have_zero_weight_and_do_not_change_the_loss():
    weights = (POS_IDS != 0).float()
    got = sampled_softmax_loss(POS, NEGS, POS_IDS, NEG_IDS, weights)
    expected = _hand_softmax_loss([1.0, 2.0], [NEGS[0].tolist(), NEGS[2].tolist()], [1, 1])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    pos2, negs2 = POS.clone(), NEGS.clone()
    pos2[1], negs2[1] = -30.0, 30.0  # would dominate the loss if it counted
    assert sampled_softmax_loss(pos2, negs2, POS_IDS, NEG_IDS, weights).item() == pytest.approx(got.item(), rel=1e-7)
    # No supervised position at all: loss 0, not NaN.
    zero = sampled_softmax_loss(POS, NEGS, POS_IDS, NEG_IDS, torch.zeros(3))
    assert zero.item() == 0.0


def test_negative_equal_to_positive_is_masked_out():
    pos_ids = torch.tensor([5, 7, 9])
    neg_ids = torch.tensor([[5, 2, 5, 4], [1, 2, 3, 4], [1, 9, 3, 4]])
    negs = NEGS.clone()
    negs[0, 0] = 10.0  # an accidental positive would dominate without the mask
    got = sampled_softmax_loss(POS, negs, pos_ids, neg_ids, torch.ones(3))
    kept = [[negs[0, 1].item(), negs[0, 3].item()], negs[1].tolist(), [negs[2, 0].item(), negs[2, 2].item(), negs[2, 3].item()]]
    expected = _hand_softmax_loss(POS.tolist(), kept, [1, 1, 1])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert NEGATIVE_EQUALS_POSITIVE_LOGIT == -5e4


def _vectors(table: torch.nn.Module, l2_norm: bool = True):
    """The model's item_vectors: normalised (eps 1e-6) embeddings, as SequentialRecommender gives them."""
    def vectors(ids):  # ids, or a slice of consecutive ids (a whole catalog), as ItemEmbedding takes them
        rows = table.weight[ids] if isinstance(ids, slice) else table(ids)
        return F.normalize(rows, dim=-1, eps=1e-6) if l2_norm else rows

    return vectors


def _loss(name, candidates, num_negatives=5, temperature=0.05, **kwargs):
    index = CandidateIndex(candidates, int(candidates.max()))
    return RetrievalLoss(name, index, "local", num_negatives, temperature, **kwargs)


def test_logits_are_divided_by_temperature():
    torch.manual_seed(0)
    table = torch.nn.Embedding(30, 8)
    query = F.normalize(torch.randn(6, 8), dim=-1)
    pos_ids = torch.tensor([3, 0, 7, 7, 12, 29])
    for temperature in (0.05, 1.0, 0.5):
        loss = _loss("SampledSoftmaxLoss", torch.arange(1, 30), temperature=temperature)
        got = loss(query, pos_ids, _vectors(table), torch.Generator().manual_seed(11))
        neg_ids, _ = negative_logits(query, pos_ids, _vectors(table), loss.sampler, 5,
                                     torch.Generator().manual_seed(11))
        items = F.normalize(table.weight, dim=-1, eps=1e-6)
        pos = ((query * items[pos_ids]).sum(-1) / temperature).tolist()
        negs = (torch.einsum("ld,lrd->lr", query, items[neg_ids]) / temperature)
        negs = negs.masked_fill(neg_ids == pos_ids[:, None], -5e4).tolist()
        expected = _hand_softmax_loss(pos, negs, (pos_ids != 0).float().tolist())
        assert got.item() == pytest.approx(expected, rel=1e-5), temperature


def test_bce_loss_formula():
    pos_ids = torch.tensor([5, 0, 9])
    neg_ids = torch.tensor([[1], [2], [3]])
    weights = (pos_ids != 0).float()
    got = bce_loss(POS, NEGS[:, :1], pos_ids, neg_ids, weights)
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731
    # -log sigmoid(p) = softplus(-p); -log(1 - sigmoid(n)) = softplus(n); rows 0 and 2 count.
    expected = (softplus(-1.0) + softplus(0.5) + softplus(-2.0) + softplus(-0.7)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # A negative equal to the positive contributes no negative term (module's documented behaviour).
    same = bce_loss(POS, NEGS[:, :1], pos_ids, torch.tensor([[5], [2], [3]]), weights)
    assert same.item() == pytest.approx((softplus(-1.0) + softplus(-2.0) + softplus(-0.7)) / 2, rel=1e-6)


def test_bce_uses_one_negative_at_temperature_one_and_refuses_another():
    torch.manual_seed(1)
    table = torch.nn.Embedding(20, 4)
    query = torch.randn(5, 4)
    pos_ids = torch.tensor([1, 2, 0, 4, 5])
    loss = _loss("BCELoss", torch.arange(6, 20), num_negatives=128, temperature=1.0)  # negatives never equal positives
    got = loss(query, pos_ids, _vectors(table), torch.Generator().manual_seed(3))
    neg_ids, _ = negative_logits(query, pos_ids, _vectors(table), loss.sampler, 1, torch.Generator().manual_seed(3))
    assert neg_ids.shape == (5, 1)
    items = F.normalize(table.weight, dim=-1, eps=1e-6)
    pos = (query * items[pos_ids]).sum(-1)
    neg = (query * items[neg_ids[:, 0]]).sum(-1)
    w = (pos_ids != 0).float()
    expected = ((F.softplus(-pos) + F.softplus(neg)) * w).sum() / w.sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="temperature = 1.0"):
        _loss("BCELoss", torch.arange(6, 20), temperature=0.05)
    with pytest.raises(ConfigError, match="loss_module"):
        _loss("HingeLoss", torch.arange(6, 20))


@pytest.mark.parametrize("name", ["SampledSoftmaxLoss", "FullSoftmaxLoss", "BPRLoss", "BPRMaxLoss"])
def test_unsupervised_positions_do_not_change_the_loss(name):
    torch.manual_seed(2)
    table = torch.nn.Embedding(50, 8)
    query = torch.randn(4, 8)
    pos_ids = torch.tensor([3, 0, 7, 0])
    loss = _loss(name, torch.arange(1, 50), num_negatives=6)
    base = loss(query, pos_ids, _vectors(table), torch.Generator().manual_seed(0))
    query2 = query.clone()
    query2[[1, 3]] = torch.randn(2, 8) * 100
    other = loss(query2, pos_ids, _vectors(table), torch.Generator().manual_seed(0))
    assert other.item() == pytest.approx(base.item(), rel=1e-6)


@pytest.mark.parametrize("num_candidates", [10, 500])  # matmul path (C <= 2 R D) and gather path
def test_negative_logits_both_paths_are_dot_products_with_normalised_sampled_items(num_candidates):
    torch.manual_seed(3)
    table = torch.nn.Embedding(600, 4)
    query = torch.randn(7, 4)
    pos_ids = torch.randint(1, 600, (7,))
    candidates = torch.arange(100, 100 + num_candidates)
    sampler = NegativesSampler("local", candidates)
    ids, logits = negative_logits(query, pos_ids, _vectors(table), sampler, 5, torch.Generator().manual_seed(9))
    assert ids.shape == logits.shape == (7, 5)
    assert bool(torch.isin(ids, candidates).all())
    expected = torch.einsum("ld,lrd->lr", query, F.normalize(table.weight[ids], dim=-1, eps=1e-6))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_local_sampler_draws_only_candidates_uniformly():
    torch.manual_seed(4)
    table = torch.nn.Embedding(100, 4)
    candidates = torch.tensor([3, 17, 42, 88])
    sampler = NegativesSampler("local", candidates)
    assert torch.equal(sampler.pool(torch.tensor([1, 2, 0])), candidates)
    ids, _ = negative_logits(torch.randn(100, 4), torch.arange(100), _vectors(table), sampler, 100,
                             torch.Generator().manual_seed(0))
    counts = torch.stack([(ids == c).sum() for c in candidates]).float()
    assert counts.sum().item() == 10000  # nothing outside the candidate set
    assert bool(((counts - 2500).abs() < 250).all()), counts  # uniform: 2500 +/- 5 sigma


def test_in_batch_sampler_draws_only_batch_ids():
    torch.manual_seed(5)
    table = torch.nn.Embedding(100, 4)
    sampler = NegativesSampler("in-batch", torch.arange(1, 100))
    pos_ids = torch.tensor([7, 0, 7, 31, 56, 0, 31])
    assert sampler.pool(pos_ids).tolist() == [7, 31, 56]
    ids, _ = negative_logits(torch.randn(7, 4), pos_ids, _vectors(table), sampler, 300,
                             torch.Generator().manual_seed(1))
    assert set(ids.unique().tolist()) == {7, 31, 56}
    with pytest.raises(ConfigError):
        NegativesSampler("global", torch.arange(1, 5))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), candidates=st.integers(2, 60), dim=st.integers(1, 8),
       temperature=st.sampled_from([0.05, 0.5, 1.0]), chunk=st.sampled_from([1, 7, 1 << 20]), seed=st.integers(0, 99))
def test_full_softmax_equals_cross_entropy_in_value_and_gradients(rows, candidates, dim, temperature, chunk, seed):
    import ops.linear_cross_entropy as chunked

    torch.manual_seed(seed)
    query = torch.randn(rows, dim, dtype=torch.float64, requires_grad=True)
    items = torch.randn(candidates, dim, dtype=torch.float64, requires_grad=True)
    columns = torch.randint(-1, candidates, (rows,))
    weights = (torch.rand(rows) < 0.8).double() * (columns >= 0).double()
    saved = chunked.CHUNK_ELEMENTS
    chunked.CHUNK_ELEMENTS = chunk * candidates  # forces chunks of `chunk` rows
    try:
        got = full_softmax_loss(query, items, columns, weights, temperature)
        got.backward()
    finally:
        chunked.CHUNK_ELEMENTS = saved
    q2, i2 = query.detach().clone().requires_grad_(), items.detach().clone().requires_grad_()
    per_row = F.cross_entropy(q2 @ i2.T / temperature, columns.clamp(min=0), reduction="none")
    expected = (per_row * weights).sum() / weights.sum().clamp(min=1.0)
    expected.backward()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(query.grad, q2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(items.grad, i2.grad, rtol=1e-6, atol=1e-9)


def test_full_softmax_loss_ranks_against_every_candidate():
    torch.manual_seed(6)
    table = torch.nn.Embedding(40, 6)
    candidates = torch.arange(5, 40)
    query = torch.randn(3, 6)
    pos_ids = torch.tensor([5, 0, 39])
    got = _loss("FullSoftmaxLoss", candidates, temperature=0.1)(query, pos_ids, _vectors(table))
    items = F.normalize(table.weight[candidates], dim=-1, eps=1e-6)
    logits = query @ items.T / 0.1
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([0, 34]))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("l2_norm", [True, False])
def test_full_softmax_with_the_raw_table_equals_the_item_vectors_path(l2_norm):
    """Given the item table, FullSoftmaxLoss scores its raw rows normalised inside the loss (the fused
    kernel's eps on CUDA): the same loss and table gradient as through item_vectors."""
    torch.manual_seed(7)
    table = torch.nn.Embedding(40, 6)
    candidates, query, pos_ids = torch.arange(1, 40), torch.randn(5, 6), torch.tensor([5, 0, 39, 1, 12])
    loss = _loss("FullSoftmaxLoss", candidates, temperature=0.1)
    got = loss(query, pos_ids, _vectors(table, l2_norm), item_table=ItemTable(table.weight, 1e-6 if l2_norm else None))
    got_grad, = torch.autograd.grad(got, [table.weight])
    want = loss(query, pos_ids, _vectors(table, l2_norm))
    want_grad, = torch.autograd.grad(want, [table.weight])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 12), negatives=st.integers(1, 6), seed=st.integers(0, 999))
def test_bpr_and_bpr_max_equal_their_direct_formulas(rows, negatives, seed):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(rows, generator=gen, dtype=torch.float64) * 3
    negs = torch.randn(rows, negatives, generator=gen, dtype=torch.float64) * 3
    pos_ids = torch.randint(0, 4, (rows,), generator=gen)
    neg_ids = torch.randint(1, 4, (rows, negatives), generator=gen)
    weights = (pos_ids != 0).double()
    bpr_rows, bpr_max_rows = [], []
    for p, row, p_id, row_ids in zip(pos.tolist(), negs.tolist(), pos_ids.tolist(), neg_ids.tolist()):
        real = [n for n, n_id in zip(row, row_ids) if n_id != p_id]
        sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        bpr_rows.append(sum(-math.log(sigmoid(p - n)) for n in real) / max(len(real), 1))
        if real:
            z = sum(math.exp(n) for n in real)
            soft = [math.exp(n) / z for n in real]
            bpr_max_rows.append(-math.log(sum(s * sigmoid(p - n) for s, n in zip(soft, real)))
                                + 0.5 * sum(s * n * n for s, n in zip(soft, real)))
        else:
            bpr_max_rows.append(0.0)
    w = weights.tolist()
    expect = lambda values: sum(v * wi for v, wi in zip(values, w)) / max(sum(w), 1.0)  # noqa: E731
    assert bpr_loss(pos, negs, pos_ids, neg_ids, weights).item() == pytest.approx(expect(bpr_rows), rel=1e-9, abs=1e-12)
    got = bpr_max_loss(pos, negs, pos_ids, neg_ids, weights, regularization=0.5).item()
    assert got == pytest.approx(expect(bpr_max_rows), rel=1e-9, abs=1e-12)


def test_consecutive_candidates_are_read_as_a_slice_with_the_same_vectors_and_gradients():
    assert consecutive_range(torch.arange(3, 9)) == slice(3, 9)
    assert consecutive_range(torch.tensor([1, 2, 4])) is None and consecutive_range(torch.tensor([], dtype=torch.long)) is None
    table = ItemEmbedding(10, 4)
    for rows in (slice(2, 9), torch.arange(2, 9)):
        table.zero_grad()
        out = F.normalize(table(rows), dim=-1)
        (out * torch.arange(28.0).view(7, 4)).sum().backward()
        if isinstance(rows, slice):
            sliced, sliced_grad = out.detach(), table.table.weight.grad.clone()
    torch.testing.assert_close(out.detach(), sliced, rtol=0, atol=0)
    torch.testing.assert_close(table.table.weight.grad, sliced_grad, rtol=0, atol=1e-7)
