"""generative_recommenders/loss.py: sampled softmax, BCE, negative sampling (REFERENCE.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from generative_recommenders.loss import (
    NEGATIVE_EQUALS_POSITIVE_LOGIT,
    NegativesSampler,
    autoregressive_loss,
    bce_loss,
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


def test_logits_are_divided_by_temperature():
    gen_seed = 11
    torch.manual_seed(0)
    table = torch.nn.Embedding(30, 8)
    query = F.normalize(torch.randn(6, 8), dim=-1)
    pos_ids = torch.tensor([3, 0, 7, 7, 12, 29])
    sampler = NegativesSampler("local", torch.arange(1, 30))
    for temperature in (0.05, 1.0, 0.5):
        got = autoregressive_loss("SampledSoftmaxLoss", query, pos_ids, table, sampler, 5, temperature,
                                  torch.Generator().manual_seed(gen_seed))
        neg_ids, _ = negative_logits(query, pos_ids, table, sampler, 5, torch.Generator().manual_seed(gen_seed))
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


def test_autoregressive_bce_uses_one_negative():
    torch.manual_seed(1)
    table = torch.nn.Embedding(20, 4)
    query = torch.randn(5, 4)
    pos_ids = torch.tensor([1, 2, 0, 4, 5])
    sampler = NegativesSampler("local", torch.arange(6, 20))  # negatives never equal positives
    got = autoregressive_loss("BCELoss", query, pos_ids, table, sampler, 128, 1.0, torch.Generator().manual_seed(3))
    neg_ids, _ = negative_logits(query, pos_ids, table, sampler, 1, torch.Generator().manual_seed(3))
    assert neg_ids.shape == (5, 1)
    items = F.normalize(table.weight, dim=-1, eps=1e-6)
    pos = (query * items[pos_ids]).sum(-1)
    neg = (query * items[neg_ids[:, 0]]).sum(-1)
    w = (pos_ids != 0).float()
    expected = ((F.softplus(-pos) + F.softplus(neg)) * w).sum() / w.sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError):
        autoregressive_loss("HingeLoss", query, pos_ids, table, sampler, 4, 1.0)


def test_unsupervised_positions_do_not_change_autoregressive_loss():
    torch.manual_seed(2)
    table = torch.nn.Embedding(50, 8)
    query = torch.randn(4, 8)
    pos_ids = torch.tensor([3, 0, 7, 0])
    sampler = NegativesSampler("local", torch.arange(1, 50))
    base = autoregressive_loss("SampledSoftmaxLoss", query, pos_ids, table, sampler, 6, 0.05,
                               torch.Generator().manual_seed(0))
    query2 = query.clone()
    query2[[1, 3]] = torch.randn(2, 8) * 100
    other = autoregressive_loss("SampledSoftmaxLoss", query2, pos_ids, table, sampler, 6, 0.05,
                                torch.Generator().manual_seed(0))
    assert other.item() == pytest.approx(base.item(), rel=1e-6)


@pytest.mark.parametrize("num_candidates", [10, 500])  # matmul path (C <= 2 R D) and gather path
def test_negative_logits_both_paths_are_dot_products_with_normalised_sampled_items(num_candidates):
    torch.manual_seed(3)
    table = torch.nn.Embedding(600, 4)
    query = torch.randn(7, 4)
    pos_ids = torch.randint(1, 600, (7,))
    candidates = torch.arange(100, 100 + num_candidates)
    sampler = NegativesSampler("local", candidates)
    ids, logits = negative_logits(query, pos_ids, table, sampler, 5, torch.Generator().manual_seed(9))
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
    ids, _ = negative_logits(torch.randn(100, 4), torch.arange(100), table, sampler, 100,
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
    ids, _ = negative_logits(torch.randn(7, 4), pos_ids, table, sampler, 300, torch.Generator().manual_seed(1))
    assert set(ids.unique().tolist()) == {7, 31, 56}


def test_sampler_l2_normalisation_eps_and_switch():
    sampler = NegativesSampler("local", torch.arange(1, 5))
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-8, 0.0]])
    torch.testing.assert_close(sampler.normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0], [1e-2, 0.0]]))
    assert sampler.eps == 1e-6
    raw = NegativesSampler("local", torch.arange(1, 5), l2_norm=False)
    assert torch.equal(raw.normalize(x), x)
    with pytest.raises(ValueError):
        NegativesSampler("global", torch.arange(1, 5))
