"""train_fn.mixed_precision = "bf16" (generative_recommenders/precision.py), on the CPU with bf16 autocast.

What is checked: training steps of the embedded synthetic configs run under autocast and stay close to
fp32 while parameters stay fp32; HSTU's attention gets bf16 q, k, v (reference and fused-kernel dispatch)
and fp32 relative-bias weights; logits, losses and evaluation scores are fp32, equal to the fp32
computation on the upcast inputs; the setting is validated and names a new run only when bound.
A few GPU-only tests (CUDA graphs, the composite layer norm under CUDA autocast) are skipped here.
"""

from __future__ import annotations

import os

import gin
import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as test_triton_hstu_attention: before any triton import

from generative_recommenders.config import ConfigError, TrainConfig, first_line
from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.data.synthetic import generate_synthetic, generate_synthetic_ratings
from generative_recommenders.objectives.losses import LOSSES, RetrievalLoss
from generative_recommenders.precision import autocast
from generative_recommenders.tasks.ranking import RankingTask
from generative_recommenders.tasks.retrieval import RetrievalTask
from generative_recommenders.trainer import TrainStep
from tiny_config import REPO, TINY, run_name_of, train_tiny

CPU = torch.device("cpu")
SYNTHETIC_CONFIGS = {"HSTU": "configs/synthetic/hstu-default.gin", "SASRec": "configs/synthetic/sasrec-default.gin"}
NO_DROPOUT = ["train_fn.dropout_rate = 0.0", "hstu_encoder.linear_dropout_rate = 0.0",
              "sasrec_encoder.ffn_dropout_rate = 0.0"]


def _config(config_file: str, bindings) -> TrainConfig:
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(REPO / config_file)], list(bindings))
    config = TrainConfig()
    config.validate()
    return config


@pytest.fixture(scope="module")
def synthetic_data():
    """The embedded configs' data set (synthetic_data.num_users = 6000), generated once."""
    return generate_synthetic(num_users=6000)


def _train_steps(config_file: str, bindings, data, steps: int):
    """`steps` TrainSteps of the config on the first batches of the training split, from the same initial
    weights and random numbers whatever the precision; returns (losses, task, optimizer, whether autocast
    was on at each encoder call)."""
    config = _config(config_file, bindings)
    torch.manual_seed(0)
    task = RetrievalTask(config, data, CPU)
    gin.clear_config()
    autocast_on = []
    task.model.encoder.register_forward_pre_hook(lambda *_: autocast_on.append(torch.is_autocast_enabled("cpu")))
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98))
    step = TrainStep(task, task.model, optimizer)
    train = task.splits["train"]
    losses = []
    for i in range(steps):
        batch = train[i * config.local_batch_size:(i + 1) * config.local_batch_size]
        losses.append(float(step(torch.as_tensor(batch), task.batch_total(batch))))
    return losses, task, optimizer, autocast_on


@pytest.mark.parametrize("module", ["HSTU", "SASRec"])
def test_bf16_training_steps_of_the_embedded_config_stay_close_to_fp32(module, synthetic_data, monkeypatch,
                                                                       on_cpu):
    import generative_recommenders.objectives.losses as losses_module

    logit_dtypes = []
    original = losses_module.sampled_softmax_loss

    def spy(positive_logits, negative_logits, *args):
        logit_dtypes.append((positive_logits.dtype, negative_logits.dtype, torch.is_autocast_enabled("cpu")))
        return original(positive_logits, negative_logits, *args)

    monkeypatch.setattr(losses_module, "sampled_softmax_loss", spy)
    # Dropout off: both runs then draw the same negatives from the same random numbers, so step 1 differs
    # only by the encoder's bf16 rounding.
    config_file = SYNTHETIC_CONFIGS[module]
    fp32, _, _, autocast_on = _train_steps(config_file, NO_DROPOUT, synthetic_data, 3)
    assert autocast_on == [False] * 3 and logit_dtypes == [(torch.float32, torch.float32, False)] * 3
    logit_dtypes.clear()
    bf16, task, optimizer, autocast_on = _train_steps(
        config_file, NO_DROPOUT + ["train_fn.mixed_precision = 'bf16'"], synthetic_data, 3)
    assert np.isfinite(bf16).all()
    # The encoder ran under autocast, yet the logits the loss reads are fp32 and computed with autocast off.
    assert autocast_on == [True] * 3 and logit_dtypes == [(torch.float32, torch.float32, False)] * 3
    # Step 1 (same weights, same batch, same negatives) differs only by the bf16 rounding of the encoder's
    # matmuls: 2^-8 relative at most per rounding, of either sign, on queries that are then L2-normalised;
    # the loss (~8.9 nats) is a mean over the batch's few thousand positions, where such errors mostly
    # cancel. Measured: 4e-7 (HSTU, whose fp32 residual stream carries the input embeddings) and 3e-5
    # (SASRec) relative; 1e-3 leaves a 30x margin. Later steps follow other weights and are not compared.
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-3)
    parameters = list(task.model.parameters())
    assert all(p.dtype == torch.float32 for p in parameters)
    assert all(p.grad.dtype == torch.float32 for p in parameters if p.grad is not None)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert state and all(t.dtype == torch.float32 for t in state)


def test_hstu_attention_gets_bf16_qkv_and_fp32_bias_weights(monkeypatch, on_cpu):
    """The PyTorch path (CPU) and the fused kernel's dispatch (its bf16 path needs a GPU: the interpreter's
    bf16 arithmetic is wrong, so the kernel is replaced by a recorder here)."""
    import generative_recommenders.modeling.hstu as hstu_module
    from ops.hstu_attention import hstu_attention_reference

    seen = []
    original = hstu_module.hstu_attention

    def spy(q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, **kwargs):
        out = original(q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, **kwargs)
        seen.append((q.dtype, k.dtype, v.dtype, ts_w.dtype, pos_w.dtype, out.dtype))
        return out

    monkeypatch.setattr(hstu_module, "hstu_attention", spy)
    config = _config("configs/synthetic/hstu-default.gin", TINY + ["train_fn.mixed_precision = 'bf16'"])
    task = RetrievalTask(config, generate_synthetic(num_users=100, num_items=50), CPU)
    gin.clear_config()
    step = TrainStep(task, task.model, torch.optim.AdamW(task.model.parameters()))
    batch = task.splits["train"][:16]
    assert np.isfinite(float(step(torch.as_tensor(batch), task.batch_total(batch))))
    bf16, fp32 = torch.bfloat16, torch.float32
    assert seen and all(s == (bf16, bf16, bf16, fp32, fp32, bf16) for s in seen), seen
    assert all(p.grad.dtype == fp32 for p in task.model.parameters() if p.grad is not None)

    pytest.importorskip("triton")
    import ops.triton.hstu_attention as kernel_module

    kernel_calls = []

    def kernel_spy(q, k, v, seq_offsets, max_seq_len, timestamps=None, ts_w=None, pos_w=None, num_targets=None):
        kernel_calls.append((q.dtype, k.dtype, v.dtype, ts_w.dtype, pos_w.dtype))
        return hstu_attention_reference(q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w)

    monkeypatch.setattr(kernel_module, "triton_hstu_attention", kernel_spy)
    for layer in task.model.encoder.layers:
        layer.attention_kernel = "triton"
    assert np.isfinite(float(step(torch.as_tensor(batch), task.batch_total(batch))))
    assert kernel_calls and all(c == (bf16, bf16, bf16, fp32, fp32) for c in kernel_calls), kernel_calls


def test_the_pytorch_attention_computes_in_fp32_under_autocast():
    """Under CPU autocast the reference returns bf16, equal to its fp32 result on the upcast inputs rounded
    once (autocast would otherwise run its einsums in bf16)."""
    from ops.hstu_attention import hstu_attention_reference

    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 7, 7, 12])
    q, k, v = (torch.randn(12, 2, 8, generator=gen).bfloat16() for _ in range(3))
    timestamps = torch.cumsum(torch.randint(1, 10_000, (3, 8), generator=gen), 1)
    ts_w, pos_w = torch.randn(129, generator=gen) * 0.1, torch.randn(15, generator=gen) * 0.1
    args = (offsets, 8, timestamps, ts_w, pos_w)
    with autocast("bf16", CPU):
        got = hstu_attention_reference(q, k, v, *args)
    want = hstu_attention_reference(q.float(), k.float(), v.float(), *args).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("name", LOSSES)
def test_retrieval_losses_are_fp32_under_autocast(name):
    """Called under bf16 autocast with bf16 queries and item vectors, every loss equals the fp32 computation
    on the upcast inputs (the same negatives from the same generator), in value and dtype."""
    gen = torch.Generator().manual_seed(1)
    table = torch.nn.functional.normalize(torch.randn(41, 16, generator=gen), dim=-1)
    query = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=-1).bfloat16()
    positive_ids = torch.randint(0, 41, (300,), generator=gen)
    loss = RetrievalLoss(name, CandidateIndex(torch.arange(1, 41), 40), num_negatives=8,
                         temperature=1.0 if name == "BCELoss" else 0.05)
    bf16_vectors = lambda ids: table[ids].bfloat16()  # noqa: E731  (what a bf16 table would give)
    with autocast("bf16", CPU):
        got = loss(query, positive_ids, bf16_vectors, torch.Generator().manual_seed(2))
    want = loss(query.float(), positive_ids, lambda ids: bf16_vectors(ids).float(), torch.Generator().manual_seed(2))
    assert got.dtype == torch.float32 and torch.equal(got, want), (got, want)


def _spy_autocast(monkeypatch, owner, name):
    """Records whether CPU autocast is on each time owner.name is called."""
    calls = []
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_evaluation_scores_are_fp32_from_an_encoder_under_autocast(monkeypatch, on_cpu):
    from generative_recommenders.evaluation.retrieval import Evaluator

    config = _config("configs/synthetic/hstu-default.gin", TINY + ["train_fn.mixed_precision = 'bf16'"])
    task = RetrievalTask(config, generate_synthetic(num_users=100, num_items=50), CPU)
    gin.clear_config()
    samples = task.splits["eval"][:32]
    # The task's evaluator runs the encoder under autocast.
    calls = _spy_autocast(monkeypatch, task.evaluator, "query")
    metrics = task.evaluate(samples)
    assert calls and all(calls) and 0.0 <= metrics["hr@10"] <= 1.0

    # An encoder whose last op is a matmul gives bf16 queries under autocast (the ones here end in a norm
    # or a residual sum, fp32): the scores are still the fp32 products of the upcast queries.
    def bf16_query(model, batch):
        return task.objective.query(model, batch).bfloat16()

    evaluator = Evaluator(task.model, bf16_query, task.sequences, task.index, config.max_sequence_length, 32,
                          mixed_precision="bf16")
    evaluator.refresh_candidates()
    batch = task.sequences.gather(torch.as_tensor(samples), config.max_sequence_length, config.padded_len,
                                  task.batch_total(samples))
    with torch.no_grad():
        query, scores = evaluator.score(batch)
        bf16_scores = bf16_query(task.model, batch) @ evaluator.candidates.bfloat16().T
    assert query.dtype == scores.dtype == evaluator.candidates.dtype == torch.float32
    kept = torch.isfinite(scores)  # removed history items are -inf
    assert torch.equal(scores[kept], (query @ evaluator.candidates.T)[kept])
    # What bf16 scores would have done: ties between candidates the fp32 scores tell apart.
    distinct = lambda x: sum(len(torch.unique(row[torch.isfinite(row)])) for row in x)  # noqa: E731
    assert distinct(scores) > distinct(torch.where(kept, bf16_scores.float(), float("-inf")))


def _ranking_task(mixed_precision: str) -> RankingTask:
    config = _config("configs/synthetic/hstu-ranking-default.gin",
                     TINY + NO_DROPOUT + ["train_fn.task = 'ranking'", "train_fn.dataset_name = 'synthetic-ratings'",
                                          "ranking_objective.next_item_weight = 1.0",
                                          f"train_fn.mixed_precision = '{mixed_precision}'"])
    torch.manual_seed(0)
    task = RankingTask(config, generate_synthetic_ratings(num_users=120, num_items=100), CPU)
    gin.clear_config()
    return task


def test_ranking_trains_and_evaluates_with_fp32_heads_under_autocast(monkeypatch, on_cpu):
    heads_out = []

    def record(module, inputs, outputs):
        heads_out.append((torch.is_autocast_enabled("cpu"), outputs["liked"].dtype, outputs["rating"].dtype))

    losses = {}
    for mode in ("none", "bf16"):
        task = _ranking_task(mode)
        task.model.heads.register_forward_hook(record)
        step = TrainStep(task, task.model, torch.optim.AdamW(task.model.parameters()))
        batch = task.splits["train"][:32]
        torch.manual_seed(1)
        losses[mode] = float(step(torch.as_tensor(batch), task.batch_total(batch)))
    # The heads were called under autocast in the bf16 step, and gave fp32 all the same.
    assert heads_out[0] == (False, torch.float32, torch.float32) and heads_out[1][0]
    assert all(h[1:] == (torch.float32, torch.float32) for h in heads_out)
    assert np.isfinite(losses["bf16"])
    # As in the retrieval test (one step from the same weights and random numbers); measured 1e-4.
    assert losses["bf16"] == pytest.approx(losses["none"], rel=1e-3)
    assert all(p.dtype == torch.float32 for p in task.model.parameters())

    encoder_calls = _spy_autocast(monkeypatch, task.model, "forward")
    predictions = task.evaluator.predictions(task.splits["test"][:20])
    assert encoder_calls and all(encoder_calls)
    assert predictions.liked_prob.dtype == predictions.expected_rating.dtype == torch.float32


def test_a_short_bf16_run_end_to_end(tmp_path, on_cpu):
    results = train_tiny(tmp_path, ["train_fn.mixed_precision = 'bf16'", "train_fn.num_epochs = 1",
                                    "synthetic_data.num_users = 200"])
    epoch = results["per_epoch"][0]
    assert np.isfinite(epoch["train_loss"]) and 0.0 <= epoch["eval"]["hr@10"] <= epoch["eval"]["hr@50"] <= 1.0
    assert "train_fn.mixed_precision = 'bf16'" in results["config"]


def test_validate_rejects_an_unknown_precision_in_one_line():
    assert TrainConfig().mixed_precision == "none"
    TrainConfig(mixed_precision="bf16").validate()
    with pytest.raises(ConfigError) as error:
        TrainConfig(mixed_precision="fp16").validate()
    message = str(error.value)
    assert first_line(error.value) == message
    assert message == "train_fn.mixed_precision must be one of none, bf16; got 'fp16'"


def test_only_a_bound_precision_changes_the_run_name():
    assert run_name_of([]) == "hstu-default"  # existing runs keep their names
    assert run_name_of(["train_fn.mixed_precision = 'bf16'"]) != "hstu-default"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_composite_layer_norm_under_cuda_autocast():
    """Sizes not divisible by 4 take the composite; under autocast it upcasts as F.layer_norm does, and its
    backward (PyTorch's kernel, which reads fp32 statistics for 16-bit inputs) works."""
    from ops.layer_norm import layer_norm

    x = (torch.randn(300, 50, device="cuda") * 4 + 1).bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer_norm(x, 1e-6)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    ref_x = x.detach().float().requires_grad_()
    ref = torch.nn.functional.layer_norm(ref_x, (50,), eps=1e-6)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("module", ["HSTU", "SASRec"])
def test_bf16_steps_and_evaluation_as_cuda_graphs(module):
    """The padded layout on one GPU: training steps and evaluation batches captured and replayed under
    autocast (cache_enabled=False); losses finite and near fp32's first step, scores fp32."""
    bindings = TINY + NO_DROPOUT + [f"train_fn.main_module = '{module}'", "train_fn.loss_module = 'FullSoftmaxLoss'"]
    data = generate_synthetic(num_users=600, num_items=300)
    device = torch.device("cuda")
    first = {}
    for mode in ("none", "bf16"):
        config = _config("configs/synthetic/hstu-default.gin", bindings + [f"train_fn.mixed_precision = '{mode}'"])
        torch.manual_seed(0)
        task = RetrievalTask(config, data, device)
        gin.clear_config()
        assert task.use_cuda_graphs(device)
        optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-3, betas=(0.9, 0.98), fused=True,
                                      capturable=True)
        step = TrainStep(task, task.model, optimizer)
        samples = task.splits["train"][:64]
        on_device = torch.as_tensor(samples, device=device)
        losses = [float(step(on_device, task.batch_total(samples))) for _ in range(6)]  # warm-up, capture, replay
        assert step.graphed.graphs and np.isfinite(losses).all()
        assert all(p.dtype == torch.float32 for p in task.model.parameters())
        first[mode] = losses[0]
        for _ in range(3):  # 2 full batches each: 3 warm-up calls, then capture and replays
            metrics = task.evaluate(task.splits["eval"])
        assert task.evaluator.step.graphs and 0.0 <= metrics["hr@10"] <= 1.0
    assert first["bf16"] == pytest.approx(first["none"], rel=1e-2)  # looser than on CPU: unmeasured here
