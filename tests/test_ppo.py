"""ppo.py: every loss term against hand values, first-update invariants, the CLI, and learning."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ppo
from common.models import entropy_of, frozen_copy, load_policy, logprobs_of, response_mask_from, top_k_top_p_keep
from common.tasks import make_task

from helpers import SENTIMENT_EVAL_KEYS, args_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Pure pieces against hand-computed values
# ----------------------------------------------------------------------------------------------
def gae_plain_loop(rewards, values, gamma, lam):
    """Textbook GAE for one episode of length T (terminal after the last step)."""
    T = len(rewards)
    advantages = np.zeros(T)
    for t in range(T):
        total = 0.0
        for k in range(t, T):
            next_value = values[k + 1] if k + 1 < T else 0.0
            delta = rewards[k] + gamma * next_value - values[k]
            total += (gamma * lam) ** (k - t) * delta
        advantages[t] = total
    return advantages


def test_gae_matches_plain_loop_with_variable_lengths():
    torch.manual_seed(0)
    lengths = [5, 3, 1, 6]
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).float()
    rewards = rewards * mask  # nothing is earned after the response
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expected = gae_plain_loop(rewards[i, :n].numpy(), values[i, :n].numpy(), 0.9, 0.8)
        np.testing.assert_allclose(advantages[i, :n].numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(returns[i, :n].numpy(), expected + values[i, :n].numpy(), rtol=1e-5, atol=1e-6)
        assert torch.all(advantages[i, n:] == 0) and torch.all(returns[i, n:] == 0)


def test_gae_hand_values():
    # rewards [0, 1], values [0.5, 0.2], gamma 1, lambda 1: A_1 = 1 - 0.2 = 0.8; A_0 = 0 + 0.2 - 0.5 + 0.8 = 0.5
    advantages, returns = ppo.compute_gae(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), gamma=1.0, lam=1.0
    )
    assert torch.allclose(advantages, torch.tensor([[0.5, 0.8]]))
    assert torch.allclose(returns, torch.tensor([[1.0, 1.0]]))


def test_shaped_rewards_kl_on_every_token_score_on_last():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-2.0, -1.0, 0.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    rewards, kl = ppo.shaped_rewards(torch.tensor([2.0, -1.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1, -1.0, 0.0, 0.0]]))


def test_policy_loss_hand_values():
    # ratios e^0 = 1, e^0.5 = 1.6487 (clipped to 1.2), e^-0.5 = 0.6065 (clipped to 0.8); last token masked out
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.0, 0.5, -0.5, 3.0]])
    advantages = torch.tensor([[1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo.ppo_policy_loss(new, old, advantages, mask, clip_range=0.2)
    r1, r2 = math.exp(0.5), math.exp(-0.5)
    # per token: max(-A r, -A clip(r)): -1; max(-2*1.6487, -2*1.2) = -2.4; max(0.6065, 0.8) = 0.8
    assert loss.item() == pytest.approx((-1.0 - 2.4 + 0.8) / 3, abs=1e-6)
    assert stats["ratio"].item() == pytest.approx((1 + r1 + r2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)

    def k3(lr):
        return math.exp(lr) - 1 - lr

    assert stats["approx_kl"].item() == pytest.approx((k3(0.5) + k3(-0.5)) / 3, abs=1e-6)


def test_value_loss_hand_values():
    values, old_values = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]])
    returns, mask = torch.tensor([[0.0, 1.0]]), torch.ones(1, 2)
    plain, _ = ppo.ppo_value_loss(values, old_values, returns, mask, None)
    assert plain.item() == pytest.approx((1.0 + 1.0) / 2)
    # clipped: V_clip = [0.7, 0.0]; losses max(1, 0.49) = 1 and max(1, 1) = 1
    clipped, stats = ppo.ppo_value_loss(values, old_values, returns, mask, 0.2)
    assert clipped.item() == pytest.approx(1.0)
    assert stats["value_clipfrac"].item() == 0.0
    # a prediction that moved past the clip toward a far return pays the clipped (larger) loss
    clipped, stats = ppo.ppo_value_loss(
        torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.5
    )
    assert clipped.item() == pytest.approx((0.5 - 3.0) ** 2)
    assert stats["value_clipfrac"].item() == 1.0


def test_kl_controllers():
    ctl = ppo.KLController(0.1, target=0.1, horizon=640)
    ctl.update(0.3, n_episodes=64)  # error clipped to +0.2: beta *= 1 + 0.2 * 0.1
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(0.09, n_episodes=64)  # error -0.1: beta *= 1 - 0.01
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99)
    fixed = ppo.KLController(0.3, target=0.1, horizon=640, adaptive=False)
    fixed.update(5.0, 64)
    assert fixed.value == 0.3


# ----------------------------------------------------------------------------------------------
# First-update invariants on the real policy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-t5"])
def test_first_update_invariants(model_name):
    task = make_task("sentiment")
    torch.manual_seed(0)
    policy = load_policy(model_name, task)
    ref = frozen_copy(policy)
    critic = ppo.Critic(policy)
    prompt_ids, prompt_mask = policy.encode_prompts(task.train_prompts[:8], task.max_prompt_tokens, "cpu")
    response_ids, mask = policy.generate(prompt_ids, prompt_mask, 12)
    input_ids, attention_mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, mask], 1)
    start, mask = prompt_ids.shape[1], mask.float()
    with torch.no_grad():
        old_logprobs, _ = ppo.forward_logprobs(policy, input_ids, attention_mask, start, 1.0)
        ref_logprobs, _ = ppo.forward_logprobs(ref, input_ids, attention_mask, start, 1.0)
        values = critic(input_ids, attention_mask, start)
    _, kl = ppo.shaped_rewards(torch.zeros(8), old_logprobs, ref_logprobs, mask, 0.1)
    assert torch.all(kl == 0), "KL to the reference must be exactly 0 before any step"
    assert torch.all(values == 0), "the value head starts at 0"
    policy.train()  # the update runs in train mode; dropout is off, so nothing changes
    new_logprobs, _ = ppo.forward_logprobs(policy, input_ids, attention_mask, start, 1.0)
    advantages = torch.randn_like(mask)
    loss, stats = ppo.ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, 0.2)
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


# ----------------------------------------------------------------------------------------------
# The script: --help, bad input, a tiny end-to-end run
# ----------------------------------------------------------------------------------------------


def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "ppo.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    ).stdout
    fields = args_fields(os.path.join(ROOT, "ppo.py"), "Args") + [
        field
        for block in ("RunArgs", "TaskArgs", "TrainArgs")  # the shared blocks ppo.py's Args inherits
        for field in args_fields(os.path.join(ROOT, "common", "utils.py"), block)
    ]
    assert len(fields) > 30
    for name, documented in fields:
        assert documented, f"Args.{name} has no docstring (it is the --help text)"
        flag = "--" + name.replace("_", "-")
        assert flag in out, f"{flag} missing from --help"


@pytest.mark.parametrize(
    "fields, message",
    [  # tests/test_scaling.py checks the flags every script shares
        ({"minibatch_size": 10}, "not divisible"),
        ({"response_length": 0}, "response length"),
        ({"min_response_length": 30}, "response length"),
        ({"total_updates": -1}, "--total-updates must be positive"),
    ],
)
def test_bad_input_fails_fast_with_one_line(fields, message, tmp_path):
    with pytest.raises(SystemExit) as error:
        ppo.main(ppo.Args(output_dir=str(tmp_path), **fields))
    text = str(error.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not os.listdir(tmp_path), "no run directory is created for bad input"


def test_bad_input_on_the_cli_is_one_line_on_stderr(tmp_path):
    result = subprocess.run(
        [sys.executable, "ppo.py", "--output-dir", str(tmp_path), "--minibatch-size", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: --rollout-batch-size / --minibatch-size: 64 is not divisible by 10"
    ]


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize(
    "model_name, auto_class", [("tiny-gpt2", "AutoModelForCausalLM"), ("tiny-t5", "AutoModelForSeq2SeqLM")]
)
def test_tiny_run_end_to_end(model_name, auto_class, tmp_path):
    cmd = [
        sys.executable,
        "ppo.py",
        "--model-name",
        model_name,
        "--total-updates",
        "2",
        "--rollout-batch-size",
        "8",
        "--minibatch-size",
        "4",
        "--ppo-epochs",
        "1",
        "--eval-episodes",
        "8",
        "--eval-every",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "update 2/2" in result.stdout and "initial eval/return_mean" in result.stdout
    (run_name,) = os.listdir(tmp_path)
    assert run_name.startswith("sentiment__ppo__1__")
    run_dir = tmp_path / run_name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["script"] == "ppo.py" and summary["task"] == "sentiment" and summary["seed"] == 1
    for key in ("initial", "final", "best"):
        assert set(summary[key]) == SENTIMENT_EVAL_KEYS  # the reward, fluency and diversity (docs/evaluation.md)
    assert summary["wall_seconds"] > 0 and summary["tokens_per_second"] > 0
    assert summary["args"]["total_updates"] == 2
    scalars = _scalars(str(run_dir))
    assert [s for s, _ in scalars["eval/return_mean"]] == [0, 1, 2]
    assert scalars["objective/kl"][0] == (1, 0.0), "KL to the reference is 0 at the first rollout"
    for tag in (
        "objective/scores",
        "objective/entropy",
        "losses/policy_loss",
        "losses/value_loss",
        "charts/learning_rate",
        "charts/tokens_per_second",
        "charts/episodes_per_second",
    ):
        assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag])
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(run_dir / "model")
    assert model.config.vocab_size > 0


# ----------------------------------------------------------------------------------------------
# Learning: the trained policy beats the starting policy on held-out prompts
# ----------------------------------------------------------------------------------------------
def test_ppo_improves_heldout_return(tmp_path):
    """20 updates of 64 episodes on the embedded sentiment task, seed 1.

    The starting tiny GPT-2 scores about +0.16 VADER compound on the 256 held-out prompts (std 0.5,
    so the standard error of a 256-prompt mean is about 0.03). We require +0.2 over the starting
    policy: more than 6 standard errors, and well inside what PPO reaches (about +0.5 after 10
    updates with these settings), so the test fails if learning breaks but not on noise.
    """
    args = ppo.Args(total_updates=20, eval_every=20, output_dir=str(tmp_path), save_model=False)
    summary = ppo.main(args)
    initial, final = summary["initial"]["eval/return_mean"], summary["final"]["eval/return_mean"]
    assert final >= initial + 0.2, f"held-out return {initial:+.3f} -> {final:+.3f}"
    kl = [v for _, v in _scalars(os.path.join(str(tmp_path), os.listdir(tmp_path)[0]))["objective/kl"]]
    assert all(math.isfinite(v) for v in kl) and max(kl) < 1.0, f"KL per token went to {max(kl)}"


def test_min_length_forbids_eos_in_the_ratio_too():
    """With a minimum length, generate never samples EOS early, so the scored policy must not either:
    the EOS probability at those positions is 0 and the rest renormalises."""
    task = make_task("sentiment")
    policy = load_policy("tiny-gpt2", task)
    prompt_ids, prompt_mask = policy.encode_prompts(task.train_prompts[:4], task.max_prompt_tokens, "cpu")
    response_ids, mask = policy.generate(prompt_ids, prompt_mask, 8, min_new_tokens=5)
    assert torch.all(mask[:, :5] == 1) and not torch.any(response_ids[:, :5] == policy.tokenizer.eos_token_id)
    input_ids, attention_mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, mask], 1)
    start = prompt_ids.shape[1]
    with torch.no_grad():
        free, free_entropy = ppo.forward_logprobs(policy, input_ids, attention_mask, start, 1.0)
        constrained, entropy = ppo.forward_logprobs(policy, input_ids, attention_mask, start, 1.0, min_length=5)
        logits, _ = policy(input_ids, attention_mask, start)
    p_eos = torch.softmax(logits, -1)[:, :5, policy.tokenizer.eos_token_id]
    # renormalised without EOS: log p'(a) = log p(a) - log(1 - p(eos))
    torch.testing.assert_close(constrained[:, :5], free[:, :5] - torch.log1p(-p_eos), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(constrained[:, 5:], free[:, 5:])
    probs = torch.softmax(logits, -1)[:, :5]
    probs[..., policy.tokenizer.eos_token_id] = 0
    probs = probs / probs.sum(-1, keepdim=True)
    expected_entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(-1)
    torch.testing.assert_close(entropy[:, :5], expected_entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy[:, 5:], free_entropy[:, 5:])


def test_forward_logprobs_one_log_softmax_and_entropy_out_of_the_graph_without_bonus():
    task = make_task("sentiment")
    policy = load_policy("tiny-gpt2", task)
    prompt_ids, prompt_mask = policy.encode_prompts(task.train_prompts[:3], task.max_prompt_tokens, "cpu")
    response_ids, mask = policy.generate(prompt_ids, prompt_mask, 6, seeds=[1, 2, 3])
    input_ids, attention_mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, mask], 1)
    start = prompt_ids.shape[1]
    logits, _ = policy(input_ids, attention_mask, start)
    expected_logprobs, expected_entropy = logprobs_of(logits / 0.7, response_ids), entropy_of(logits / 0.7)
    for entropy_grad in (True, False):
        logprobs, entropy = ppo.forward_logprobs(
            policy, input_ids, attention_mask, start, 0.7, entropy_grad=entropy_grad
        )
        torch.testing.assert_close(logprobs, expected_logprobs)
        torch.testing.assert_close(entropy, expected_entropy)
        assert logprobs.requires_grad and entropy.requires_grad == entropy_grad


def test_forward_logprobs_scores_given_logits_without_a_pass_and_leaves_them_as_they_were():
    """nlpo.py scores one policy pass under two masks: with `logits` given, no pass runs, the numbers are the pass's
    own, and the EOS ban of the minimum length does not write into the caller's logits."""
    task = make_task("sentiment")
    policy = load_policy("tiny-gpt2", task)
    prompt_ids, prompt_mask = policy.encode_prompts(task.train_prompts[:3], task.max_prompt_tokens, "cpu")
    response_ids, mask = policy.generate(prompt_ids, prompt_mask, 6, min_new_tokens=3, seeds=[1, 2, 3])
    input_ids, attention_mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, mask], 1)
    start = prompt_ids.shape[1]
    with torch.no_grad():
        expected = ppo.forward_logprobs(policy, input_ids, attention_mask, start, 1.0, min_length=3)
        logits, _ = policy(input_ids, attention_mask, start)
    before = logits.clone()

    def no_pass(*args, **kwargs):
        raise AssertionError("forward_logprobs ran a pass although it was given the logits")

    given = ppo.forward_logprobs(policy, input_ids, None, start, 1.0, min_length=3, forward=no_pass, logits=logits)
    for got, want in zip(given, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(logits, before)


# ----------------------------------------------------------------------------------------------
# --top-k / --top-p: rollouts, old log-probs, ratio and KL share one truncated, renormalised distribution
# ----------------------------------------------------------------------------------------------
def test_top_k_top_p_keep_hand_computed():
    # probabilities 0.1, 0.4, 0.2, 0.3 (unsorted): ranked 1, 3, 2, 0 with masses 0.4, 0.7, 0.9, 1.0
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3]).log()

    def keep(*a):
        return top_k_top_p_keep(logits, *a).tolist()

    assert keep(0, 1.0) == [True, True, True, True]  # both off
    assert keep(2, 1.0) == [False, True, False, True]
    assert keep(0, 0.4) == [False, True, False, False]  # token 1 alone reaches 0.4
    assert keep(0, 0.5) == [False, True, False, True]  # token 3 crosses 0.5 and is kept
    assert keep(0, 0.8) == [False, True, True, True]
    # top-p applies to the top-k distribution: over all four, token 1 (0.4) falls short of 0.55 and token 3 is
    # kept; top-2 renormalised is 4/7, 3/7, and 4/7 reaches 0.55 alone
    assert keep(0, 0.55) == [False, True, False, True] and keep(2, 0.55) == [False, True, False, False]
    assert keep(0, 0.4, 3) == [False, True, True, True]  # the floor keeps the 3 most probable (NLPO's mask uses it)
    ties = torch.tensor([1.0, 2.0, 2.0, 0.0])
    assert top_k_top_p_keep(ties, 1).tolist() == [False, True, True, False]  # ties at the k-th are kept (transformers)
    forbidden = logits.clone()
    forbidden[1] = float("-inf")  # e.g. EOS before the minimum length
    assert top_k_top_p_keep(forbidden, 4).tolist() == [True, False, True, True]  # never kept, even inside the top-k
    assert top_k_top_p_keep(forbidden, 0, 0.1, 4).tolist() == [True, False, True, True]  # nor by the floor
    batch = torch.stack([logits, logits.flip(0)]).unsqueeze(0)  # [1, 2, 4]: each row its own set
    assert top_k_top_p_keep(batch, 0, 0.5).tolist() == [[[False, True, False, True], [True, False, True, False]]]


class _FixedLogits(torch.nn.Module):
    """A stand-in policy whose response logits are given: forward_logprobs needs only the call and the EOS id."""

    def __init__(self, logits, eos_token_id=0):
        super().__init__()
        self.logits, self.tokenizer = logits, type("Tok", (), {"eos_token_id": eos_token_id})()

    def forward(self, input_ids, attention_mask, start):
        return self.logits.clone(), None


def test_forward_logprobs_of_the_truncated_distribution_hand_computed():
    """Log-probs and entropy under a keep-mask are the kept probabilities renormalised: with probabilities 0.1, 0.4,
    0.2, 0.3 and top-2 = {1, 3}, token 3 has log(0.3 / 0.7) and token 1 log(0.4 / 0.7). At temperature 0.5 the
    probabilities become proportional to p^2 (0.01, 0.16, 0.04, 0.09), the top-p 0.6 nucleus of those is {1, 3}
    (0.16 / 0.30 = 0.53 < 0.6) and token 3 has log(0.09 / 0.25); at temperature 1 the same p keeps {1, 3} too."""
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = probs.log().expand(1, 2, 4).clone()
    input_ids = torch.tensor([[7, 3, 1]])  # one prompt token, then the response tokens 3 and 1
    policy = _FixedLogits(logits)
    keep = top_k_top_p_keep(logits, 2)
    logprobs, entropy = ppo.forward_logprobs(policy, input_ids, None, 1, 1.0, keep=keep)
    torch.testing.assert_close(logprobs, torch.tensor([[math.log(0.3 / 0.7), math.log(0.4 / 0.7)]]))
    h = -(3 / 7 * math.log(3 / 7) + 4 / 7 * math.log(4 / 7))
    torch.testing.assert_close(entropy, torch.tensor([[h, h]]))
    keep = top_k_top_p_keep(logits / 0.5, 0, 0.6)
    assert keep[0, 0].tolist() == [False, True, False, True]
    logprobs, _ = ppo.forward_logprobs(policy, input_ids, None, 1, 0.5, keep=keep)
    torch.testing.assert_close(logprobs[0, 0], torch.tensor(math.log(0.09 / 0.25)))
    # with the minimum length the EOS (token 0 here) cut and the top-k cut combine
    keep = top_k_top_p_keep(logits, 3)  # {1, 2, 3}
    logprobs, _ = ppo.forward_logprobs(policy, input_ids, None, 1, 1.0, min_length=1, keep=keep)
    torch.testing.assert_close(logprobs, torch.tensor([[math.log(0.3 / 0.9), math.log(0.4 / 0.9)]]))


def test_truncated_rollouts_first_update_ratio_one_and_rollout_logprobs_equal_scoring(tmp_path, monkeypatch):
    """A real run with --top-k 20 --top-p 0.9 at temperature 0.8, one update of one minibatch (one gradient step):
    the sampled tokens' log-probs at generation (the truncated, renormalised scores the sampler drew from) equal
    the scoring pass's old log-probs, and the first ratio is exactly 1, approx KL and clipfrac 0, and the KL to the
    reference 0 (the reference is cut by the same masks)."""
    events = []

    class Spy(ppo.TopKTopPProcessor):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            events.append(("step", self, torch.log_softmax(out.float() / self.temperature, -1)))
            return out

    real_forward_logprobs = ppo.forward_logprobs

    def spy_forward_logprobs(policy, input_ids, attention_mask, start, *a, **k):
        out = real_forward_logprobs(policy, input_ids, attention_mask, start, *a, **k)
        events.append(("score", input_ids[:, start:].clone(), out[0].detach().clone()))
        return out

    monkeypatch.setattr(ppo, "TopKTopPProcessor", Spy)
    monkeypatch.setattr(ppo, "forward_logprobs", spy_forward_logprobs)
    budget = dict(
        total_updates=1,
        rollout_batch_size=8,
        minibatch_size=8,
        ppo_epochs=1,
        eval_episodes=8,
        save_model=False,
        top_k=20,
        top_p=0.9,
        temperature=0.8,
        output_dir=str(tmp_path),
    )
    ppo.main(ppo.Args(**budget))
    first_score = next(i for i, e in enumerate(events) if e[0] == "score")
    _, response_ids, scored = events[first_score]
    rollout = events[first_score - 1][1]  # the processor of the rollout that was scored
    steps = torch.stack([e[2] for e in events[:first_score] if e[0] == "step" and e[1] is rollout], 1)
    assert steps.shape[:2] == response_ids.shape
    sampled = steps.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    eos_id = load_policy("tiny-gpt2", make_task("sentiment")).tokenizer.eos_token_id
    response = response_mask_from(response_ids, eos_id).bool()  # after EOS nothing was sampled
    keep = torch.stack(rollout.masks, 1)
    assert (keep.sum(-1) <= 20).all() and (keep.sum(-1) < 20).any()  # top-k binds, and top-p cuts further
    assert torch.isfinite(sampled[response]).all()
    torch.testing.assert_close(scored[response], sampled[response], atol=1e-4, rtol=1e-4)
    logged = _scalars(os.path.join(str(tmp_path), os.listdir(tmp_path)[0]))
    assert logged["losses/ratio"] == [(1, 1.0)] and logged["losses/clipfrac"] == [(1, 0.0)]
    assert logged["losses/approx_kl"] == [(1, 0.0)] and logged["objective/kl"] == [(1, 0.0)]
