"""Scaling out and surviving faults, for every method script (issue 8):

- torchrun with 2 CPU processes (gloo) logs the same losses as one process on the same global batch;
- a run killed with SIGKILL and resumed with `--resume` logs the same next metrics as an uninterrupted run;
- a non-finite loss (or policy output) stops the run with the update named and the last checkpoint kept;
- bad input fails fast with one line and a non-zero exit.

Each script appears once in SCRIPTS with a tiny budget. `distributed` flags make every rank's share of the
batch equal in tokens (e.g. fixed-length responses), so the average of per-rank losses is exactly the loss
of the whole batch and the comparison can be tight (DISTRIBUTED_RTOL); with unequal shares the two differ
by the usual data-parallel weighting of a per-rank mean.
"""

import glob
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import TINY_FLAGS, TORCHRUN_2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DISTRIBUTED_RTOL = 1e-4

# script -> flags of a tiny run (6 updates, checkpoints every 2) in which every rank's share of a batch has the
# same number of tokens, the loss metrics to compare, and flags that make the loss diverge after one update.
SCRIPTS = {
    "alol.py": dict(  # progress lines count gradient steps ("step N/6"); the loss is a mean over equal shares
        tiny=[
            "--total-steps",
            "6",
            "--batch-size",
            "4",
            "--offline-size",
            "64",
            "--value-prompts",
            "32",
            "--value-epochs",
            "3",
            "--eval-every",
            "3",
            "--eval-episodes",
            "16",
            "--log-every",
            "1",
            "--forward-batch-size",
            "8",
            "--checkpoint-every",
            "2",
        ],
        losses=[
            "losses/loss",
            "losses/nll",
            "losses/importance_weight",
            "objective/kl",
            "objective/scores",
            "eval/return_mean",
        ],
        diverge=["--learning-rate", "1e30", "--checkpoint-every", "1", "--ref-epochs", "0"],  # diverge in training
        marker="step 5/",
    ),
    "ilql.py": dict(  # Wordle games differ in length: each rank's token means are rescaled to exact global means
        tiny=[
            "--task",
            "wordle",
            "--wordle-games",
            "64",
            "--wordle-width",
            "32",
            "--batch-size",
            "8",
            "--total-steps",
            "6",
            "--eval-every",
            "3",
            "--eval-episodes",
            "16",
            "--print-every",
            "1",
            "--checkpoint-every",
            "2",
        ],
        losses=[
            "losses/q_loss",
            "losses/v_loss",
            "losses/cql_loss",
            "losses/bc_loss",
            "values/advantage",
            "objective/entropy",
            "eval/return_mean",
        ],
        diverge=["--learning-rate", "1e30", "--checkpoint-every", "1"],
        marker="step 5/",
    ),
    "reward_lm.py": dict(  # the batch is the set of simulations: one seed per rank per wave, checkpoint per wave
        tiny=[*TINY_FLAGS["reward_lm.py"], "--seed", "1", "--num-seeds", "2"],  # two seeds: two ranks, two waves
        losses=["eval/return_mean", "eval/frac_optimal", "eval/reward_err", "eval/std_best"],
        diverge=["--learning-rate", "1e30"],
        marker="seed 2: pretraining",
    ),
    "ppo.py": dict(
        tiny=[
            "--total-updates",
            "6",
            "--rollout-batch-size",
            "8",
            "--minibatch-size",
            "8",
            "--ppo-epochs",
            "2",
            "--min-response-length",
            "24",
            "--eval-every",
            "3",
            "--eval-episodes",
            "16",
            "--checkpoint-every",
            "2",
        ],
        losses=["losses/policy_loss", "losses/value_loss", "objective/kl", "objective/scores", "eval/return_mean"],
        diverge=["--learning-rate", "1e30", "--ppo-epochs", "1", "--checkpoint-every", "1"],
    ),
    "nlpo.py": dict(
        tiny=[
            "--total-updates",
            "6",
            "--rollout-batch-size",
            "8",
            "--minibatch-size",
            "8",
            "--ppo-epochs",
            "2",
            "--min-response-length",
            "24",
            "--eval-every",
            "3",
            "--eval-episodes",
            "16",
            "--checkpoint-every",
            "2",
            "--mask-update-every",
            "2",
        ],
        losses=["losses/policy_loss", "losses/value_loss", "objective/kl", "objective/mask_tokens", "eval/return_mean"],
        diverge=["--learning-rate", "1e30", "--ppo-epochs", "1", "--checkpoint-every", "1"],
    ),
}
_straight_runs: dict[str, str] = {}


def run(cmd, tmp_path, *extra, check=True, **kwargs):
    result = subprocess.run(
        cmd + ["--output-dir", str(tmp_path), *extra],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """Every scalar of a run's TensorBoard events, {tag: {step: value}} (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def only_run_dir(path) -> str:
    dirs = [d for d in glob.glob(os.path.join(str(path), "*")) if os.path.isdir(d)]
    assert len(dirs) == 1, dirs
    return dirs[0]


def straight_run(script: str, tmp_path_factory) -> str:
    """The run directory of one uninterrupted single-process tiny run of `script` (made once per session)."""
    if script not in _straight_runs:
        out = tmp_path_factory.mktemp("straight")
        run([sys.executable, script, *SCRIPTS[script]["tiny"], "--no-save-model"], out)
        _straight_runs[script] = only_run_dir(out)
    return _straight_runs[script]


def assert_same_scalars(expected: dict, actual: dict, tags, rel: float, context: str = "") -> None:
    for tag in tags:
        assert actual[tag].keys() == expected[tag].keys() and len(expected[tag]) >= 2, (tag, expected[tag], actual[tag])
        for step, value in expected[tag].items():
            if math.isnan(value):  # not measurable yet (reward_lm's fit_error before 50 labels): NaN on both sides
                assert math.isnan(actual[tag][step]), (tag, step, context)
                continue
            assert actual[tag][step] == pytest.approx(value, rel=rel, abs=1e-6), (tag, step, context)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_torchrun_two_processes_log_the_losses_of_one(script, tmp_path, tmp_path_factory):
    result = run([sys.executable, *TORCHRUN_2, script, *SCRIPTS[script]["tiny"], "--no-save-model"], tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert '"world_size": 2' in open(os.path.join(run_dir, "summary.json")).read()
    assert len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) == 1  # only rank 0 writes
    assert_same_scalars(
        scalars(straight_run(script, tmp_path_factory)),
        scalars(run_dir),
        SCRIPTS[script]["losses"],
        DISTRIBUTED_RTOL,
        result.stdout[-2000:],
    )


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_killed_run_resumes_to_the_same_metrics(script, tmp_path, tmp_path_factory):
    out_dir, log_path = tmp_path / "killed", tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, script, *SCRIPTS[script]["tiny"], "--no-save-model", "--output-dir", str(out_dir)],
            cwd=ROOT,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        # the checkpoint of update 4 is written before update 5 prints; kill during update 5 or 6
        while time.time() < deadline and SCRIPTS[script].get("marker", "update 5/") not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_dir = only_run_dir(out_dir)
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))  # it really died before the end
    result = run([sys.executable, script, "--resume", run_dir], tmp_path / "unused")
    assert "resumed" in result.stdout
    straight, resumed = scalars(straight_run(script, tmp_path_factory)), scalars(run_dir)
    assert straight.keys() == resumed.keys()
    timings = [t for t in straight if t.endswith("_per_second")]  # timings differ by nature
    assert_same_scalars(straight, resumed, sorted(set(straight) - set(timings)), 1e-5)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_non_finite_loss_stops_naming_the_update_and_keeps_the_checkpoint(script, tmp_path):
    spec = SCRIPTS[script]
    result = run([sys.executable, script, *spec["tiny"], *spec["diverge"], "--no-save-model"], tmp_path, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite") and "at update" in last, result.stderr[-2000:]
    run_dir = only_run_dir(tmp_path)
    assert os.path.isfile(os.path.join(run_dir, "checkpoint", "state.pt")), last
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))  # nothing corrupted is reported as the result


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"task": "no-such-task"}, "unknown task"),
        ({"model_name": "./no/such/dir"}, "does not exist"),
        ({"eval_episodes": 0}, "must be positive"),
        ({"checkpoint_every": -1}, "must be positive"),
        ({"resume": "/no/such/run"}, "no checkpoint"),
    ],
)
def test_bad_input_fails_fast_with_one_line(script, fields, message, tmp_path):
    module = importlib.import_module(script[: -len(".py")])
    if not all(hasattr(module.Args(), k) for k in fields):
        pytest.skip(f"{script} has no {', '.join(fields)} flag (it does not use one)")
    with pytest.raises(SystemExit) as error:
        module.main(module.Args(output_dir=str(tmp_path), **fields))
    text = str(error.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not os.listdir(tmp_path), "no run directory is created for bad input"


@pytest.mark.parametrize("script", ["ppo.py", "nlpo.py"])
def test_reward_turning_non_finite_mid_run_stops_with_one_line(script, tmp_path):
    from common.builtin_models import ensure_builtin_model
    from common.tasks import make_task

    (tmp_path / "flaky_reward.py").write_text(
        "calls = 0\n\n\ndef score(prompts, responses):  # finite for 3 calls (the check, eval, update 1), then NaN\n"
        "    global calls\n    calls += 1\n    return [float('nan') if calls > 3 else 0.5 for _ in responses]\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"the film was {i} times", "split": "eval" if i < 8 else "train"}) + "\n"
            for i in range(40)
        )
    )
    model_dir = ensure_builtin_model(make_task("sentiment"), "tiny-gpt2")
    flags = [
        "--task",
        "jsonl",
        "--prompts-file",
        str(prompts),
        "--reward-fn",
        "flaky_reward:score",
        "--model-name",
        model_dir,
        "--total-updates",
        "4",
        "--rollout-batch-size",
        "8",
        "--minibatch-size",
        "8",
        "--ppo-epochs",
        "1",
        "--eval-episodes",
        "8",
        "--checkpoint-every",
        "1",
        "--response-length",
        "8",
    ]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags, "--output-dir", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: task 'jsonl': the reward function returned") and "checkpoint" in last, result.stderr
    assert "Traceback" not in result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert os.path.isfile(os.path.join(run_dir, "checkpoint", "state.pt"))
