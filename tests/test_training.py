"""Tests for common/training.py, the training loop's plumbing: the checkpointed loop state and --resume, the one-sync
statistics (a step's, an interval's logged metrics, the progress line), throughput, response lengths, work shared out
over distinct items, the NLL fine-tuning loop, and how a run stops (bad input, a fault, Ctrl-C) and ends. The scripts'
end-to-end runs (test_alol, test_scaling, test_faults) cover the same paths through a real run."""

from __future__ import annotations

import dataclasses
import json
import os
import types

import numpy as np
import pytest
import torch

from common.batches import response_rows
from common.models import load_policy
from common.tasks import RewardError, make_task
from common.training import (
    finetune_nll,
    finish_run,
    flush_steps,
    guard_training,
    keep_curve,
    log_throughput,
    map_distinct,
    progress_line,
    reduce_steps,
    response_lengths,
    restore_training_state,
    step_statistics,
    stop_on_fault,
    training_state,
)
from common.utils import Run, RunArgs, TaskArgs, TrainArgs, rank_slice, rng_states


@dataclasses.dataclass
class ScriptArgs(TrainArgs, TaskArgs, RunArgs):
    """The shared blocks as the text-task scripts inherit them."""


def make_run(tmp_path) -> Run:
    return Run(dataclasses.replace(ScriptArgs(), output_dir=str(tmp_path), save_model=False), script="t.py")


def test_training_state_round_trip(tmp_path, capsys):
    """What training_state keeps (state dicts, a Generator's state, plain values) restore_training_state puts back,
    with the process's RNG states; it returns the first step still to run."""
    run = make_run(tmp_path)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    rng = np.random.default_rng(5)
    rng.random(3)
    state = {**training_state(7, model=model, optimizer=optimizer, data_rng=rng, note="kept"), "rng": [rng_states()]}
    expected_draw, expected_torch = rng.random(), torch.rand(1)

    fresh, fresh_rng = torch.nn.Linear(3, 2), np.random.default_rng(0)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    torch.rand(5)  # moves the global torch RNG on: restoring must bring it back
    first = restore_training_state(state, run, "step", model=fresh, optimizer=fresh_optimizer, data_rng=fresh_rng)
    run.close()
    assert first == 8 and state["step"] == 7 and state["note"] == "kept"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert fresh_rng.random() == expected_draw and torch.equal(torch.rand(1), expected_torch)
    assert f"resumed {run.dir} after step 7" in capsys.readouterr().out


def test_reduce_steps_and_throughput(tmp_path):
    rows = [
        {"loss": torch.tensor(1.5), "tokens": torch.tensor(4)},
        {"loss": torch.tensor(2.0), "tokens": torch.tensor(6)},
    ]
    assert reduce_steps(rows) == [{"loss": 1.5, "tokens": 4.0}, {"loss": 2.0, "tokens": 6.0}]  # one process
    run = make_run(tmp_path)
    run.tokens = 5
    assert log_throughput(run, 10, 4, 2.0, 3) == 5.0
    run.close()
    assert run.tokens == 15
    assert rank_slice([1, 2, 3]) == [1, 2, 3]  # the whole batch without torchrun


def test_step_statistics_sum_the_response_tokens():
    """The loss, the mean summed NLL, the grad norm and the loss's own statistics (all `losses/`); sums over the
    response tokens of log pi - log pi_ref and of the entropy, and their number."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    ref_logprobs = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    logits = torch.zeros(2, 2, 4)  # uniform over 4 tokens: entropy log 4 per token
    row = step_statistics(
        torch.tensor(0.7), {"clipfrac": torch.tensor(0.5)}, logprobs, ref_logprobs, logits, mask, torch.tensor(3.0)
    )
    assert list(row) == [
        "losses/loss",
        "losses/nll",
        "losses/grad_norm",
        "losses/clipfrac",
        "objective/kl",
        "objective/entropy",
        "tokens",
    ]
    assert row["losses/nll"].item() == pytest.approx((3.0 + 0.5) / 2)  # the padding's -9 is not counted
    assert row["objective/kl"].item() == pytest.approx(0.0 - 1.0 + 0.5)
    assert row["objective/entropy"].item() == pytest.approx(3 * np.log(4))
    assert row["tokens"].item() == 3 and row["losses/clipfrac"].item() == 0.5


def test_flush_steps_logs_every_step_and_stops_on_a_non_finite_loss_before_logging(tmp_path):
    def row(loss, kl, tokens):
        return {
            "losses/loss": torch.tensor(loss),
            "objective/kl": torch.tensor(kl),
            "objective/entropy": torch.tensor(2.0 * tokens),
            "tokens": torch.tensor(float(tokens)),
        }

    run = make_run(tmp_path)
    seen = []
    run.log = lambda metrics, step: seen.append(step)
    pending = [(1, row(0.5, 1.0, 4), {"charts/learning_rate": 0.1}), (2, row(0.25, -2.0, 8), {"objective/scores": 1.5})]
    logged, speed = flush_steps(run, pending, 10, 4, 2.0)
    # one process: the losses as they are, kl and entropy per token, the host metrics beside them
    assert logged == [
        {"losses/loss": 0.5, "objective/kl": 0.25, "objective/entropy": 2.0, "charts/learning_rate": 0.1},
        {"losses/loss": 0.25, "objective/kl": -0.25, "objective/entropy": 2.0, "objective/scores": 1.5},
    ]
    assert speed == 6.0 and run.tokens == 12 and seen == [1, 2, 2]  # the steps, then the throughput at the last
    seen.clear()
    with pytest.raises(FloatingPointError, match="non-finite loss at update 4 of 10"):
        flush_steps(run, [(3, row(0.5, 0.0, 1), {}), (4, row(float("nan"), 0.0, 1), {})], 10, 4, 1.0)
    assert seen == [] and run.tokens == 12, "nothing of the interval is logged"
    run.close()


def test_progress_line_shows_the_window_means_of_the_logged_fields():
    window = [{"losses/loss": 1.0, "objective/kl": 0.01}, {"losses/loss": 2.0, "objective/kl": -0.03}]
    fields = {"loss": ("losses/loss", ".3f"), "w": ("losses/importance_weight", ".3f"), "kl": ("objective/kl", "+.4f")}
    assert progress_line(4, 10, window, fields, 123.4) == "step 4/10 | loss 1.500 | kl -0.0100 | 123 tok/s"


def test_map_distinct_calls_once_per_distinct_item():
    calls = []

    def lengths(items):
        calls.append(items)
        return [len(x) for x in items]

    assert map_distinct(lengths, ["bb", "a", "bb", "ccc"]) == [2, 1, 2, 3]
    assert calls == [["a", "bb", "ccc"]]  # sorted, each once
    assert map_distinct(lengths, []) == [] and len(calls) == 1


def test_keep_curve_logs_and_keeps_each_point(tmp_path):
    run = make_run(tmp_path)
    seen, curve = [], []
    run.log = lambda metrics, x: seen.append((x, metrics))
    log = keep_curve(run, curve)
    log({"value/heldout_mse": 0.5}, 1)
    log({"value/heldout_mse": 0.25}, 2)
    assert curve == seen == [(1, {"value/heldout_mse": 0.5}), (2, {"value/heldout_mse": 0.25})]
    run.close()


def test_finetune_nll_lowers_the_nll_and_stops_on_a_diverged_loss(capsys):
    """Shuffled passes in full batches (8 examples, batches of 3: 2 steps a pass), the mean NLL checked, logged and
    printed every `log_every` steps and at the last; a diverged loss stops with the model's name and the update."""
    task = make_task("sentiment")
    data = task.offline_data(0)[:8]
    prompts, texts = [d["prompt"] for d in data], [d["response"] for d in data]

    def tune(policy, lr, log):
        optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        responses = response_rows(policy.tokenizer, texts, 16)
        no_autocast = torch.autocast("cpu", enabled=False)
        rng = np.random.default_rng(0)
        args = (prompts, responses, 3, 3, rng, 32, 1.0, 2, "cpu", no_autocast, "pi_ref", "reference/nll", log)
        finetune_nll(policy, optimizer, scheduler, *args)

    policy, points = load_policy("tiny-gpt2", task), []
    before = policy.text_nll(prompts, texts, 32)[0].sum()
    tune(policy, 0.1, lambda metrics, step: points.append((step, metrics["reference/nll"])))
    assert [step for step, _ in points] == [2, 4, 6] and all(0 < nll < 100 for _, nll in points), points
    after = policy.text_nll(prompts, texts, 32)[0].sum()
    assert after < 0.9 * before, (before, after)  # measured: 143 -> 117
    assert "pi_ref fine-tuning 6/6 | nll" in capsys.readouterr().out
    with pytest.raises(FloatingPointError, match="non-finite loss in pi_ref's fine-tuning by update 2 of 6"):
        tune(load_policy("tiny-gpt2", task), 1e30, lambda metrics, step: None)


def test_response_lengths():
    task = types.SimpleNamespace(max_new_tokens=48, min_new_tokens=4)
    assert response_lengths(task, None, None) == (48, 4)
    assert response_lengths(task, 8, 0) == (8, 0)
    for longest, shortest in ((0, None), (8, 9), (None, -1)):
        with pytest.raises(ValueError, match="response length"):
            response_lengths(task, longest, shortest)


def test_stop_on_fault_says_one_line(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(SystemExit) as stop, stop_on_fault(run, 0, "step"):
        raise RewardError("the reward returned NaN")
    assert str(stop.value.code).startswith("error: the reward returned NaN (at step 0, before training)")
    with pytest.raises(SystemExit) as stop, stop_on_fault(run, 0, "step"):
        raise ValueError("every offline reward equals 1.0:\n  there is nothing to learn from")
    assert stop.value.code == "error: every offline reward equals 1.0: there is nothing to learn from"


def test_guard_training_keeps_what_was_learned_and_stops_on_a_fault(tmp_path, capsys):
    run = make_run(tmp_path)
    step = 3
    with guard_training(run, "update", lambda: step):
        raise KeyboardInterrupt  # Ctrl-C or SIGTERM: on to the final evaluation
    assert "interrupted during update 3; the last checkpoint is kept" in capsys.readouterr().out
    step = 4
    with pytest.raises(SystemExit) as stop, guard_training(run, "update", lambda: step):
        raise OSError("cannot write state.pt: No space left on device")
    assert str(stop.value.code).startswith("error: cannot write state.pt: No space left on device (at update 4)")


def test_guard_training_runs_on_interrupt_and_a_fault_in_it_stops_with_one_line(tmp_path, capsys):
    """`on_interrupt` (ilql.py: log the steps not yet synced) runs after Ctrl-C, before the final evaluation; a
    diverged loss it finds stops the run with Run.fault's line, as one in the loop would."""
    run = make_run(tmp_path)
    step, calls = 5, []
    with guard_training(run, "step", lambda: step, on_interrupt=lambda: calls.append(step)):
        raise KeyboardInterrupt
    out = capsys.readouterr().out
    assert calls == [5] and out.index("interrupted during step 5") < out.index("evaluating and saving")

    def diverged():
        raise FloatingPointError("non-finite loss at update 6")

    step = 6
    with pytest.raises(SystemExit) as stop, guard_training(run, "step", lambda: step, on_interrupt=diverged):
        raise KeyboardInterrupt
    assert "non-finite loss at update 6" in str(stop.value.code)
    assert "evaluating and saving" not in capsys.readouterr().out


def test_restore_training_state_skips_parts_that_are_none(tmp_path):
    """An optional network the run does not have (ilql.py's heads for BC) is saved as None and skipped on resume."""
    run = make_run(tmp_path)
    model = torch.nn.Linear(2, 2)
    state = {**training_state(3, model=model, heads=None), "rng": [rng_states()]}
    assert state["heads"] is None
    assert restore_training_state(state, run, "step", model=torch.nn.Linear(2, 2), heads=None) == 4
    run.close()


def test_finish_run_evaluates_and_writes_the_summary(tmp_path, capsys):
    run = make_run(tmp_path)
    calls = []

    def run_eval(step: int) -> dict:
        calls.append(step)
        metrics = {"eval/return_mean": 0.25 * (len(calls) + 1)}
        run.log_eval(metrics, [], step)
        return metrics

    run_eval(0)
    summary = finish_run(run, None, run_eval, 9, {"steps": 9}, "step", label="a_lol: ")
    assert calls == [0, 9] and summary["steps"] == 9
    with open(os.path.join(run.dir, "summary.json")) as f:
        assert json.load(f)["final"] == {"eval/return_mean": 0.75}
    assert "a_lol: initial eval/return_mean +0.500 -> final +0.750" in capsys.readouterr().out


def test_finish_run_saves_more_only_with_save_model(tmp_path):
    """`save_more` (ilql.py: the value heads) runs after the policy is saved, and only with --save-model."""
    saved = []
    for save_model in (False, True):
        run = Run(
            dataclasses.replace(ScriptArgs(), output_dir=str(tmp_path / str(save_model)), save_model=save_model),
            script="t.py",
        )
        run.save_policy = lambda policy: saved.append("policy")

        def run_eval(step: int, run=run) -> dict:
            run.log_eval({"eval/return_mean": 0.0}, [], step)
            return {}

        finish_run(run, None, run_eval, 1, {}, "step", save_more=lambda: saved.append("more"))
    assert saved == ["policy", "more"]


def test_restore_curves_logs_again_the_points_after_the_checkpoint(tmp_path):
    """--resume gets back the curves keep_curve kept; the points after the checkpoint's step, which TensorBoard drops,
    are logged again, in order; a curve of bare metrics is numbered from 1; no checkpoint: empty curves."""
    from common.training import restore_curves

    run = make_run(tmp_path)
    seen = []
    run.log = lambda metrics, x: seen.append((x, metrics))
    checkpoint = {"step": 2, "ref": [(2, {"a": 1.0}), (4, {"a": 0.5})], "value": [{"v": 0.3}, {"v": 0.2}, {"v": 0.1}]}
    ref, value, missing = restore_curves(run, checkpoint, "ref", "value", "missing")
    assert ref == checkpoint["ref"] and value == [(1, {"v": 0.3}), (2, {"v": 0.2}), (3, {"v": 0.1})] and missing == []
    assert seen == [(4, {"a": 0.5}), (3, {"v": 0.1})]
    assert restore_curves(run, None, "ref", "value") == [[], []] and len(seen) == 2
    run.close()


def test_offline_log_takes_the_task_log_or_samples_one():
    """The task's log cut to `size`; a task without one gets the policy's responses, scored, `samples_per_prompt`
    per training prompt, the same from the same seed."""
    from common.training import offline_log

    task = make_task("sentiment")
    policy = load_policy("tiny-gpt2", task)
    assert offline_log(task, policy, 0, 1, 5, 8, 1, 4, "cpu") == task.offline_data(0)[:5]
    unlogged = dataclasses.replace(task, offline_data=None)
    data = offline_log(unlogged, policy, 0, 2, 6, 8, 1, 4, "cpu")
    assert [d["prompt"] for d in data] == [p for p in task.train_prompts[:3] for _ in range(2)]
    assert all(isinstance(d["response"], str) and np.isfinite(d["reward"]) for d in data)
    assert data == offline_log(unlogged, policy, 0, 2, 6, 8, 1, 4, "cpu")
