"""Tests for common/training.py, the training loop's plumbing: the checkpointed loop state and --resume, the one-sync
statistics, throughput, response lengths, and how a run stops (bad input, a fault, Ctrl-C) and ends. The scripts'
end-to-end runs (test_alol, test_scaling, test_faults) cover the same paths through a real run."""

from __future__ import annotations

import dataclasses
import json
import os
import types

import numpy as np
import pytest
import torch

from common.tasks import RewardError
from common.training import (
    finish_run,
    guard_training,
    log_throughput,
    reduce_steps,
    response_lengths,
    restore_training_state,
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
