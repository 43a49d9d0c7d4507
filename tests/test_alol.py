"""alol.py: every variant's loss against hand values, the clamp, dropped negatives and sampling weights, the
value head's masking and eval mode, first-step invariants, the CLI, every variant end to end, and learning."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import alol
from common import tasks
from common.batches import prompt_response_batch
from common.models import frozen_copy, load_policy, logprobs_of, prompt_hidden_states
from common.tasks import make_task
from common.training import fit_early_stopping
from common.value_head import PromptValueHead

from helpers import SENTIMENT_EVAL_KEYS, args_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# The losses against hand-computed values
# ----------------------------------------------------------------------------------------------
# Two responses: the first has 3 tokens, the second 2 (its third column is padding).
LOGPROBS = torch.tensor([[-1.0, -3.0, -0.5], [-0.5, -1.5, -3.0]])
REF_LOGPROBS = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -1.0, -7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
REWARDS = torch.tensor([0.8, 0.25])
ADVANTAGES = torch.tensor([0.5, -0.2])  # the second is negative: A+ = 0
# NLL = [1 + 3 + 0.5, 0.5 + 1.5] = [4.5, 2.0]
# sequence log ratios: [0.5 - 2 + 0, 0 - 0.5] = [-1.5, -0.5] -> ratios [0.2231, 0.6065];
# with eps = 0.5 the first is clamped up to 0.5, the second stays 0.6065
E = math.exp
HAND = {
    "nll": (4.5 + 2.0) / 2,
    "wbc": (0.8 * 4.5 + 0.25 * 2.0) / 2,
    # R * sum_t max(p_t, 0.1) * (-log p_t); p = e^-1, e^-3 (= 0.0498, floored to 0.1), e^-0.5 | e^-0.5, e^-1.5
    "r_gold": (0.8 * (E(-1) * 1 + 0.1 * 3 + E(-0.5) * 0.5) + 0.25 * (E(-0.5) * 0.5 + E(-1.5) * 1.5)) / 2,
    "r_lol": (0.8 * 0.5 * 4.5 + 0.25 * E(-0.5) * 2.0) / 2,
    "a_lol": (0.5 * 0.5 * 4.5 + 0.0) / 2,
    "a_lol_ref_free": (0.5 * 4.5 + 0.0) / 2,
    # token ratios of the first response e^0.5 -> 1.5, e^-2 -> 0.5, e^0 = 1: 1.5 * 1 + 0.5 * 3 + 1 * 0.5 = 3.5
    "a_lol_seq": (0.5 * 3.5 + 0.0) / 2,
    # A+ * NLL + beta * log ratio: 0.5 * 4.5 + 0.1 * (-1.5) and 0 + 0.1 * (-0.5)
    "a_lol_kl": ((0.5 * 4.5 - 0.15) + (-0.05)) / 2,
}


@pytest.mark.parametrize("algorithm", alol.ALGORITHMS)
def test_every_loss_hand_value(algorithm):
    assert set(HAND) == set(alol.ALGORITHMS)
    loss, _ = alol.sequence_loss(
        algorithm, LOGPROBS, REF_LOGPROBS, MASK, REWARDS, ADVANTAGES, clip_eps=0.5, kl_beta=0.1, gold_min_prob=0.1
    )
    assert loss.item() == pytest.approx(HAND[algorithm], abs=1e-6)


def _grad(algorithm, **kw):
    logprobs = LOGPROBS.clone().requires_grad_(True)
    loss, stats = alol.sequence_loss(algorithm, logprobs, REF_LOGPROBS, MASK, REWARDS, ADVANTAGES, **kw)
    loss.backward()
    return logprobs.grad, stats


def test_gradients_carry_constant_weights():
    """The weights are constants: d loss / d log pi_t = -coefficient / B on every response token."""
    grad, stats = _grad("a_lol", clip_eps=0.5)
    assert torch.allclose(grad, torch.tensor([[-0.125, -0.125, -0.125], [0.0, 0.0, 0.0]]))  # -A+ * w / B = -0.5*0.5/2
    assert stats["importance_weight"].item() == pytest.approx((0.5 + E(-0.5)) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    grad, _ = _grad("r_lol", clip_eps=0.5)
    assert torch.allclose(grad, torch.tensor([[-0.2, -0.2, -0.2], [-0.25 * E(-0.5) / 2] * 2 + [0.0]]))
    grad, _ = _grad("a_lol_seq", clip_eps=0.5)
    assert torch.allclose(grad, torch.tensor([[-0.5 * 1.5 / 2, -0.5 * 0.5 / 2, -0.5 / 2], [0.0, 0.0, 0.0]]))
    # R-GOLD: the probability factor is detached, so the gradient is -R * max(p, u) / B
    grad, _ = _grad("r_gold", gold_min_prob=0.1)
    assert torch.allclose(
        grad,
        torch.tensor([[-0.4 * E(-1), -0.04, -0.4 * E(-0.5)], [-0.125 * E(-0.5), -0.125 * E(-1.5), 0.0]]),
        atol=1e-6,
    )
    # A-LoL KL = (A+ - beta) * NLL + const: the KL term lowers every response's likelihood by beta
    grad, _ = _grad("a_lol_kl", kl_beta=0.1)
    assert torch.allclose(grad, torch.tensor([[-0.2, -0.2, -0.2], [0.05, 0.05, 0.0]]))


def test_negative_advantages_never_push_likelihood_down():
    """A <= 0 contributes nothing to any A-LoL variant, even when the sampler is bypassed (the reference's
    ref-free branch uses the unclamped A)."""
    for algorithm in ("a_lol", "a_lol_ref_free", "a_lol_seq"):
        logprobs = LOGPROBS.clone().requires_grad_(True)
        loss, _ = alol.sequence_loss(algorithm, logprobs, REF_LOGPROBS, MASK, REWARDS, torch.tensor([-0.3, -1.0]))
        loss.backward()
        assert loss.item() == 0.0 and torch.all(logprobs.grad == 0), algorithm


def test_keep_negative_ablation_uses_the_signed_advantage():
    """--keep-negative: A instead of A+, so the second example (A = -0.2, ratio e^-0.5 inside [0.5, 1.5]) adds a
    negative term that pushes its likelihood down; sampling keeps every example, p ~ |A|."""
    loss, _ = alol.sequence_loss(
        "a_lol", LOGPROBS, REF_LOGPROBS, MASK, REWARDS, ADVANTAGES, clip_eps=0.5, keep_negative=True
    )
    assert loss.item() == pytest.approx((0.5 * 0.5 * 4.5 + -0.2 * E(-0.5) * 2.0) / 2, rel=1e-5)
    loss, _ = alol.sequence_loss(
        "a_lol_ref_free", LOGPROBS, REF_LOGPROBS, MASK, REWARDS, ADVANTAGES, keep_negative=True
    )
    assert loss.item() == pytest.approx((0.5 * 4.5 - 0.2 * 2.0) / 2, rel=1e-5)
    rewards, advantages = np.array([0.9, 0.2, 0.5]), np.array([0.3, -0.1, 0.0])
    np.testing.assert_allclose(
        alol.sampling_probabilities("a_lol", rewards, advantages, True, keep_negative=True), [0.75, 0.25, 0.0]
    )
    np.testing.assert_allclose(
        alol.sampling_probabilities("a_lol", rewards, advantages, False, keep_negative=True), [1 / 3] * 3
    )
    # the reward baselines ignore it
    np.testing.assert_allclose(
        alol.sampling_probabilities("wbc", rewards, advantages, True, keep_negative=True), rewards / rewards.sum()
    )


def test_advantage_pipeline_scales_rewards_and_values_alike():
    """R and V's targets both go through scale_rewards (the data's min -> 0, max -> 1), so A = R - V compares
    numbers on one scale, and A > 0 exactly where the logged reward beats pi_ref's expected reward."""
    raw = np.array([-2.0, -0.5, 1.0])
    np.testing.assert_allclose(alol.scale_rewards(raw, -2.0, 1.0), [0.0, 0.5, 1.0])
    # pi_ref's own rewards (V's targets) on the data's scale; outside the data's range they leave [0, 1]
    # and are clamped by the caller to the sigmoid's range
    np.testing.assert_allclose(alol.scale_rewards(np.array([-0.5, 1.6]), -2.0, 1.0), [0.5, 1.2])
    values = np.array([0.25, 0.5, 0.75])  # V(x) of each example's prompt
    advantages = alol.advantages_of(alol.scale_rewards(raw, -2.0, 1.0), values)
    np.testing.assert_allclose(advantages, [-0.25, 0.0, 0.25])
    assert (advantages > 0).tolist() == [False, False, True]  # A = 0 is not leftover lunch either
    np.testing.assert_allclose(alol.sampling_probabilities("a_lol", np.zeros(3), advantages, True), [0, 0, 1])


def test_importance_weight_clamp_in_log_space():
    mask = torch.ones(4, 2)
    logprobs = torch.tensor([[0.0, 0.0], [-500.0, -500.0], [-1.0, -0.5], [-1.0, -1.1]], requires_grad=True)
    ref = torch.tensor([[-500.0, -500.0], [0.0, 0.0], [-1.0, -0.5], [-1.0, -1.0]])
    # log ratios: +1000 (exp overflows in float32), -1000 (underflows), 0, -0.1
    weights = alol.importance_weight(logprobs, ref, mask, clip_eps=0.2)
    assert not weights.requires_grad
    assert torch.allclose(weights, torch.tensor([1.2, 0.8, 1.0, E(-0.1)]))
    assert torch.isfinite(weights).all()
    token_weights = alol.token_importance_weights(logprobs, ref, torch.tensor([[1.0, 0.0]] * 4), clip_eps=0.9)
    assert torch.allclose(token_weights, torch.tensor([[1.9, 0.0], [0.1, 0.0], [1.0, 0.0], [1.0, 0.0]]))


def test_dropped_negatives_and_sampling_weights():
    rewards = np.array([0.9, 0.1, 0.5, 0.0, 0.7])
    advantages = np.array([0.3, -0.2, 0.1, 0.0, 0.6])
    for algorithm in alol.ADVANTAGE_METHODS:
        p = alol.sampling_probabilities(algorithm, rewards, advantages, priority=True)
        np.testing.assert_allclose(p, [0.3, 0, 0.1, 0, 0.6])  # p = A+ / sum A+; A <= 0 never drawn
        p = alol.sampling_probabilities(algorithm, rewards, advantages, priority=False)
        np.testing.assert_allclose(p, [1 / 3, 0, 1 / 3, 0, 1 / 3])  # uniform over the leftovers
    for algorithm in alol.REWARD_METHODS:
        np.testing.assert_allclose(
            alol.sampling_probabilities(algorithm, rewards, advantages, True), rewards / rewards.sum()
        )
        np.testing.assert_allclose(alol.sampling_probabilities(algorithm, rewards, advantages, False), [0.2] * 5)
    np.testing.assert_allclose(alol.sampling_probabilities("nll", rewards, advantages, True), [0.2] * 5)
    with pytest.raises(ValueError, match="no training example"):
        alol.sampling_probabilities("a_lol", rewards, -np.abs(advantages), priority=True)


# ----------------------------------------------------------------------------------------------
# The value head: padding masked, eval mode when used, held-out early stopping
# ----------------------------------------------------------------------------------------------
def test_value_head_ignores_padding():
    torch.manual_seed(0)
    head = PromptValueHead(16, num_heads=4, dropout=0.5).eval()
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    values = head(hidden, mask)
    garbage = hidden.clone()
    garbage[mask == 0] = 100 * torch.randn_like(garbage[mask == 0])
    assert torch.allclose(head(garbage, mask), values, atol=1e-6)
    wider = torch.cat([50 * torch.randn(2, 3, 16), hidden], 1)  # three more left-padding columns
    assert torch.allclose(head(wider, torch.cat([torch.zeros(2, 3, dtype=torch.long), mask], 1)), values, atol=1e-6)
    # the check can fail: the same head attending over padding (the reference's bug) gives other values
    unmasked = head(garbage, torch.ones_like(mask))
    assert (unmasked[0] - values[0]).abs() > 1e-3


def test_value_on_real_prompts_does_not_depend_on_batch_padding():
    task = make_task("sentiment")
    ref = frozen_copy(load_policy("tiny-gpt2", task))
    torch.manual_seed(0)
    head = PromptValueHead(ref.hidden_size).eval()
    short, long = "the movie was", task.train_prompts[0] + " " + task.train_prompts[1]
    ids, mask = ref.encode_prompts([short], 32, "cpu")
    alone = head(prompt_hidden_states(ref, ids, mask), mask)
    ids, mask = ref.encode_prompts([short, long], 32, "cpu")
    assert (mask[0] == 0).sum() >= 5, "the short prompt is left-padded in the batch"
    batched = head(prompt_hidden_states(ref, ids, mask), mask)
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_value_training_keeps_best_heldout_epoch_and_ends_in_eval_mode():
    torch.manual_seed(0)
    n, hidden_size = 256, 16
    hidden, mask = torch.randn(n, 4, hidden_size), torch.ones(n, 4, dtype=torch.long)
    mask[:, :2] = torch.randint(0, 2, (n, 2))
    mask[:, 2] = 1  # at least one real token per prompt
    targets = torch.sigmoid(2 * (hidden * mask[..., None]).sum(1)[:, 0] / mask.sum(1))  # depends on the prompt
    head = PromptValueHead(hidden_size, num_heads=2, dropout=0.5)
    history = []
    stats = fit_early_stopping(
        head,
        (hidden, mask),
        targets,
        np.arange(n) // 2,
        holdout=0.25,
        epochs=40,
        patience=3,
        lr=3e-3,
        batch_size=32,
        rng=np.random.default_rng(0),
        name="value",
        log=lambda metrics, epoch: history.append(metrics["value/heldout_mse"]),
    )
    assert stats["value_epochs"] == len(history) and len(history) >= 2
    assert stats["value_heldout_mse"] == pytest.approx(min(history))  # the best epoch's number is reported
    # ... and its weights are the ones kept: the head's own held-out MSE (the split drawn as fit_early_stopping
    # draws it) is the best epoch's, not the last epoch's, which early stopping makes worse
    assert len(history) < 40 and history[-1] > min(history) + 1e-4, history
    held_out = np.isin(np.arange(n) // 2, np.random.default_rng(0).permutation(n // 2)[: round(0.25 * n / 2)])
    with torch.no_grad():
        mse = ((head(hidden[held_out], mask[held_out]) - targets[held_out]) ** 2).mean().item()
    assert mse == pytest.approx(min(history), rel=1e-5), (mse, history)
    assert stats["value_heldout_mse"] < 0.5 * stats["value_constant_mse"], stats
    assert not head.training and not any(p.requires_grad for p in head.parameters())
    first, second = head(hidden, mask), head(hidden, mask)
    assert torch.equal(first, second), "V must be deterministic when used (dropout off)"
    head.train()
    assert not torch.equal(head(hidden, mask), first), "sanity: dropout 0.5 in train mode changes V"


# ----------------------------------------------------------------------------------------------
# First step on the real policy: pi_theta == pi_ref, so every weight is 1 and the variants coincide
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-t5"])
def test_first_step_invariants(model_name):
    task = make_task("sentiment")
    policy = load_policy(model_name, task)
    ref = frozen_copy(policy)
    policy.train()
    data = task.offline_data(0)[:6]
    tok = policy.tokenizer
    responses = [tok(d["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in data]
    input_ids, attention_mask, start, mask = prompt_response_batch(
        policy, [d["prompt"] for d in data], responses, 32, "cpu"
    )
    assert mask.sum(1).tolist() == [len(r) for r in responses]
    logprobs = logprobs_of(policy(input_ids, attention_mask, start)[0], input_ids[:, start:])
    with torch.no_grad():
        ref_logprobs = logprobs_of(ref(input_ids, attention_mask, start)[0], input_ids[:, start:])
    # equal up to float rounding (T5's kernels differ by ~1e-5 between grad and no-grad passes)
    assert torch.allclose(logprobs.detach() * mask, ref_logprobs * mask, atol=1e-4)
    assert torch.allclose(alol.importance_weight(logprobs, ref_logprobs, mask, 0.2), torch.ones(6), atol=1e-3)
    assert torch.allclose(alol.token_importance_weights(logprobs, ref_logprobs, mask, 0.2), mask.float(), atol=1e-4)
    generator = torch.Generator().manual_seed(0)
    rewards, advantages = torch.rand(6, generator=generator), torch.randn(6, generator=generator)
    assert (advantages > 0).any()
    losses = {
        a: alol.sequence_loss(a, logprobs, ref_logprobs, mask, rewards, advantages)[0].item()
        for a in ("a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl")
    }
    assert losses["a_lol"] > 0
    assert max(losses.values()) - min(losses.values()) < 1e-3 * losses["a_lol"], losses


# ----------------------------------------------------------------------------------------------
# The script: --help, bad input, a tiny end-to-end run, every variant, any task
# ----------------------------------------------------------------------------------------------


def test_help_documents_every_flag_and_variant():
    out = subprocess.run(
        [sys.executable, "alol.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    ).stdout
    fields = args_fields(os.path.join(ROOT, "alol.py"), "Args") + [
        field
        for block in ("RunArgs", "TaskArgs", "TrainArgs")  # the shared blocks alol.py's Args inherits
        for field in args_fields(os.path.join(ROOT, "common", "utils.py"), block)
    ]
    assert len(fields) > 35
    for name, documented in fields:
        assert documented, f"Args.{name} has no docstring (it is the --help text)"
        assert "--" + name.replace("_", "-") in out, f"--{name} missing from --help"
    for algorithm in alol.ALGORITHMS:
        assert algorithm in out


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"clip_eps": 1.0}, "--clip-eps must be in (0, 1)"),
        ({"value_prompts": 1}, "--value-prompts must be at least 2"),
        ({"value_holdout": 0.0}, "--value-holdout must be in (0, 1)"),
        ({"total_steps": 0}, "--total-steps must be positive"),
        ({"offline_size": -3}, "--offline-size must be positive"),
        ({"value_heads": 3}, "must divide the hidden size 128"),
        ({"value_dropout": 1.0}, "--value-dropout must be in [0, 1)"),
        ({"kl_beta": -0.1}, "--kl-beta must be non-negative"),
        ({"task": "nope"}, "unknown task"),
        ({"model_name": "./no/such/dir"}, "does not exist"),
    ],
)
def test_bad_input_fails_fast(fields, message, tmp_path):
    with pytest.raises(SystemExit) as error:
        alol.main(alol.Args(output_dir=str(tmp_path), **fields))
    assert str(error.value.code).startswith("error: ") and message in str(error.value.code)
    assert not os.listdir(tmp_path), "no run directory is created for bad input"


def test_bad_input_on_the_cli_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "alol.py", "--output-dir", str(tmp_path), "--clip-eps", "1.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--clip-eps must be in (0, 1)" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not os.listdir(tmp_path)


def test_diverging_reference_fine_tuning_stops_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "alol.py", *TINY, "--learning-rate", "1e30", "--output-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss in pi_ref's fine-tuning by update 2 of 64"), result.stderr[-2000:]


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


TINY = [
    "--total-steps",
    "4",
    "--batch-size",
    "4",
    "--offline-size",
    "256",
    "--value-prompts",
    "32",
    "--value-epochs",
    "3",
    "--eval-episodes",
    "8",
    "--eval-every",
    "2",
    "--log-every",
    "2",
]


def test_cli_run_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "alol.py", *TINY, "--output-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "step 4/4" in result.stdout and "initial eval/return_mean" in result.stdout
    (run_name,) = os.listdir(tmp_path)
    assert run_name.startswith("sentiment_grammar__alol__1__")
    run_dir = tmp_path / run_name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["script"] == "alol.py" and summary["algorithm"] == "a_lol" and summary["steps"] == 4
    for key in ("initial", "final", "best"):
        assert set(summary[key]) == SENTIMENT_EVAL_KEYS
    # the starting model's NLL of its own samples is its entropy: a few nats per token, finite
    assert 0 < summary["initial"]["eval/ref_nll"] < 10 and 1 < summary["final"]["eval/perplexity"] < 100
    assert summary["offline_examples"] == 256 and 0 < summary["positive_fraction"] < 1
    assert summary["wall_seconds"] > 0 and summary["tokens_per_second"] > 0
    scalars = _scalars(run_dir)
    assert [s for s, _ in scalars["eval/return_mean"]] == [0, 2, 4]
    # pi_theta starts as pi_ref (the fine-tuned model): the first step's drift is 0 and its weights are 1
    assert scalars["objective/kl"][0][0] == 1 and scalars["objective/kl"][0][1] == pytest.approx(0.0, abs=1e-5)
    assert scalars["losses/importance_weight"][0][0] == 1
    assert scalars["losses/importance_weight"][0][1] == pytest.approx(1.0, abs=1e-4)
    # pi_ref's fine-tuning: 256 examples / 4 per batch = 64 NLL steps, logged every 2
    ref_nll = scalars["reference/nll"]
    assert [s for s, _ in ref_nll] == list(range(2, 65, 2)) and all(0 < v < 1e3 for _, v in ref_nll)
    assert set(summary["loaded_eval"]) == SENTIMENT_EVAL_KEYS
    for tag in (
        "losses/loss",
        "losses/nll",
        "losses/clipfrac",
        "objective/entropy",
        "objective/scores",
        "objective/advantage",
        "charts/learning_rate",
        "charts/tokens_per_second",
        "charts/episodes_per_second",
        "value/heldout_mse",
        "value/train_mse",
    ):
        assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert all(v > 0 for _, v in scalars["objective/advantage"]), "A-LoL only ever draws A > 0"
    import transformers

    assert transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model").config.vocab_size > 0


def _tiny_args(tmp_path, **kw):
    flags = dict(zip(TINY[::2], TINY[1::2], strict=True))
    fields = {k[2:].replace("-", "_"): int(v) for k, v in flags.items()}
    return alol.Args(**{**fields, "output_dir": str(tmp_path), "save_model": False, **kw})


@pytest.mark.parametrize("algorithm", [a for a in alol.ALGORITHMS if a != "a_lol"])
def test_every_variant_runs(algorithm, tmp_path):
    # the variants differ only in the loss and the sampler: pi_ref's fine-tuning (the same for all) is tested above
    summary = alol.main(_tiny_args(tmp_path, algorithm=algorithm, ref_epochs=0))
    assert summary["algorithm"] == algorithm and summary["steps"] == 4
    scalars = _scalars(tmp_path / os.listdir(tmp_path)[0])
    assert all(math.isfinite(v) for _, v in scalars["losses/loss"])
    assert ("losses/importance_weight" in scalars) == (algorithm in ("r_lol", "a_lol_seq"))
    if algorithm in alol.ADVANTAGE_METHODS:
        assert all(v > 0 for _, v in scalars["objective/advantage"])


def test_flags_reach_the_loss_and_the_sampler(tmp_path, monkeypatch):
    """--clip-eps, --kl-beta, --gold-min-prob and --keep-negative arrive in every step's loss call and the sampler."""
    calls, sampler_calls = [], []
    loss_fn, sampler_fn = alol.sequence_loss, alol.sampling_probabilities
    monkeypatch.setattr(alol, "sequence_loss", lambda *a, **kw: calls.append(a[6:]) or loss_fn(*a, **kw))
    monkeypatch.setattr(alol, "sampling_probabilities", lambda *a, **kw: sampler_calls.append(a[3:]) or sampler_fn(*a))
    alol.main(_tiny_args(tmp_path, clip_eps=0.3, kl_beta=0.05, gold_min_prob=0.2, keep_negative=True, ref_epochs=0))
    assert calls == [(0.3, 0.05, 0.2, True)] * 4  # the 4 training steps (--ref-epochs 0: no fine-tuning calls)
    assert sampler_calls == [(True, True)]  # priority sampling, keep_negative


def test_reference_is_the_loaded_model_fine_tuned_on_the_log(tmp_path):
    """--ref-epochs 1: pi_ref differs from the loaded model and pi_theta starts from it; --ref-epochs 0: pi_ref is
    the loaded model. The checkpoint keeps pi_ref's weights for --resume, and `loaded_eval` the loaded model's."""
    from common.utils import load_checkpoint

    loaded = load_policy("tiny-gpt2", make_task("sentiment_grammar")).state_dict()
    for epochs in (1, 0):
        out = tmp_path / str(epochs)
        summary = alol.main(_tiny_args(out, ref_epochs=epochs, offline_size=64, checkpoint_every=1, total_steps=1))
        checkpoint = load_checkpoint(str(next(out.iterdir())))
        if epochs == 0:
            assert checkpoint["ref_policy"] is None and "loaded_eval" not in summary
            continue
        ref = checkpoint["ref_policy"]
        assert set(ref) == set(loaded) and "loaded_eval" in summary
        changed = [k for k in ref if not torch.allclose(ref[k], loaded[k])]
        assert len(changed) > len(ref) // 2, "the NLL steps moved pi_ref away from the loaded model"
        # ... towards the log: the log's 64 responses are likelier under pi_ref than under the loaded model
        policy = load_policy("tiny-gpt2", make_task("sentiment_grammar"))
        data = make_task("sentiment_grammar").offline_data(0)[:64]
        nll = {}
        for name, weights in (("loaded", loaded), ("pi_ref", ref)):
            policy.load_state_dict(weights)
            nll[name] = policy.text_nll([d["prompt"] for d in data], [d["response"] for d in data], 32, 64)[0].sum()
        assert nll["pi_ref"] < 0.97 * nll["loaded"], nll


def test_any_task_without_offline_data_and_seq2seq(tmp_path, monkeypatch):
    """A registry task with no offline dataset gets pi_ref's own samples on its training prompts."""
    monkeypatch.setitem(
        tasks.TASKS, "sentiment-no-log", lambda: dataclasses.replace(tasks.make_sentiment_task(), offline_data=None)
    )
    summary = alol.main(_tiny_args(tmp_path, task="sentiment-no-log", offline_size=64, model_name="tiny-t5"))
    assert summary["offline_examples"] == 64 and summary["task"] == "sentiment-no-log"
    scalars = _scalars(tmp_path / os.listdir(tmp_path)[0])
    assert scalars["losses/importance_weight"][0][1] == pytest.approx(1.0, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Learning: on the noisy log, A-LoL beats behaviour cloning on held-out prompts, in reward and in grammar
# ----------------------------------------------------------------------------------------------
LEARNING = dict(total_steps=150, eval_every=150, value_prompts=256, seed=1)
RETURN_MARGIN, GRAMMAR_MARGIN = 0.4, 0.25


def test_alol_beats_bc_on_noisy_offline_data(tmp_path):
    """A-LoL and NLL/BC on the same sentiment_grammar log (data seed 0: 4 answers per prompt, a quarter of them
    corrupted and rewarded 1 lower), both from the same pi_ref (the loaded model fine-tuned one epoch on the log),
    150 steps of 16 examples at the default learning rate, V fit on 256 prompts, seed 1.

    pi_ref imitates the noise (grammatical 0.35-0.39 against the loaded model's 0.92); BC keeps imitating it,
    A-LoL drops the negative-advantage examples. Measured with these settings on seeds 1-5 (the defaults, not
    tuned on them): A-LoL +0.393 / +0.313 / +0.439 / +0.361 / +0.442 against BC -0.430 / -0.426 / -0.392 / -0.433
    / -0.494 (gaps 0.74 to 0.94); grammatical 0.88-0.91 against 0.40-0.52 (gaps 0.39 to 0.51) and against
    pi_ref's 0.35-0.39 (gains 0.49 to 0.56). The eval stds are about 0.5 and 0.7, so the standard error of the
    difference of two 256-prompt means is about 0.053: the return margin 0.4 is 7.5 standard errors and about
    half the smallest gap. For the grammatical fraction the standard error of a difference is about 0.04; its
    margin 0.25 is 6 standard errors and two thirds of the smallest gap. The test fails when learning breaks,
    not on noise."""
    results = {}
    for algorithm in ("a_lol", "nll"):
        args = alol.Args(algorithm=algorithm, output_dir=str(tmp_path / algorithm), save_model=False, **LEARNING)
        results[algorithm] = alol.main(args)
    final = {k: v["final"] for k, v in results.items()}
    print({k: (v["eval/return_mean"], v["eval/grammatical"]) for k, v in final.items()})
    a_lol, bc = final["a_lol"]["eval/return_mean"], final["nll"]["eval/return_mean"]
    standard_error = math.hypot(final["a_lol"]["eval/return_std"], final["nll"]["eval/return_std"]) / math.sqrt(256)
    assert a_lol >= bc + RETURN_MARGIN, (
        f"A-LoL {a_lol:+.3f} vs BC {bc:+.3f} (s.e. of the difference {standard_error:.3f})"
    )
    grammar = {k: v["eval/grammatical"] for k, v in final.items()}
    assert grammar["a_lol"] >= grammar["nll"] + GRAMMAR_MARGIN, grammar
    # robust to the noise pi_ref learned: A-LoL ends more grammatical than the pi_ref it started from
    start = results["a_lol"]["initial"]["eval/grammatical"]
    assert grammar["a_lol"] >= start + GRAMMAR_MARGIN, (start, grammar)
