"""Tests for common/utils.py: masked statistics, exact_div, the flag checks, the data order, atomic writes, seeding
and the Run directory."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re

import numpy as np
import pytest
import torch

from common.utils import (
    Run,
    RunArgs,
    TaskArgs,
    TrainArgs,
    exact_div,
    masked_mean,
    masked_var,
    masked_whiten,
    refill_order,
    resume_args,
    seed_everything,
    validate_args,
    write_atomically,
)

VALUES = torch.tensor([[1.0, 2.0, 100.0, 4.0], [-3.0, 50.0, 0.5, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]])
KEPT = np.array([1.0, 2.0, 4.0, -3.0, 0.5, 7.0])  # VALUES where MASK is 1, by hand


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------
def test_masked_mean():
    assert masked_mean(VALUES, MASK).item() == pytest.approx(np.mean(KEPT))
    rows = masked_mean(VALUES, MASK, dim=1)
    assert rows.shape == (2,)
    np.testing.assert_allclose(rows.numpy(), [np.mean([1.0, 2.0, 4.0]), np.mean([-3.0, 0.5, 7.0])])
    cols = masked_mean(VALUES, MASK, dim=0)
    np.testing.assert_allclose(cols.numpy(), [-1.0, 2.0, 0.5, 5.5])
    # A boolean mask works as well as an integer one.
    assert masked_mean(VALUES, MASK.bool()).item() == pytest.approx(np.mean(KEPT))


def test_masked_var():
    assert masked_var(VALUES, MASK).item() == pytest.approx(np.var(KEPT, ddof=1))
    assert masked_var(VALUES, MASK, unbiased=True).item() == pytest.approx(np.var(KEPT, ddof=1))
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(np.var(KEPT, ddof=0))
    assert np.var(KEPT, ddof=1) != pytest.approx(np.var(KEPT, ddof=0))  # the two really differ here


def test_masked_var_needs_values():
    with pytest.raises(ValueError):
        masked_var(VALUES, torch.zeros_like(MASK))
    with pytest.raises(ValueError):
        masked_var(VALUES, torch.zeros_like(MASK), unbiased=False)
    one = torch.zeros_like(MASK)
    one[0, 1] = 1
    with pytest.raises(ValueError):  # Bessel's correction needs two values
        masked_var(VALUES, one)
    assert masked_var(VALUES, one, unbiased=False).item() == 0.0


def test_masked_whiten():
    out = masked_whiten(VALUES, MASK)
    assert out.shape == VALUES.shape
    keep = MASK.bool()
    assert torch.all(out[~keep] == 0)
    kept = out[keep].numpy()
    assert np.mean(kept) == pytest.approx(0.0, abs=1e-9)
    assert np.var(kept, ddof=1) == pytest.approx(1.0, rel=1e-6)
    expected = (KEPT - KEPT.mean()) / np.std(KEPT, ddof=1)
    np.testing.assert_allclose(kept, expected, rtol=1e-6)


def test_masked_whiten_keeps_mean():
    out = masked_whiten(VALUES, MASK, shift_mean=False)
    keep = MASK.bool()
    assert torch.all(out[~keep] == 0)
    kept = out[keep].numpy()
    assert np.mean(kept) == pytest.approx(np.mean(KEPT))
    assert np.var(kept, ddof=1) == pytest.approx(1.0, rel=1e-6)
    expected = (KEPT - KEPT.mean()) / np.std(KEPT, ddof=1) + KEPT.mean()
    np.testing.assert_allclose(kept, expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# exact_div
# ----------------------------------------------------------------------------------------------
def test_exact_div():
    assert exact_div(12, 4) == 3
    assert exact_div(0, 4) == 0
    assert isinstance(exact_div(12, 4), int)
    with pytest.raises(ValueError) as err:
        exact_div(10, 4, what="batch_size / num_minibatches")
    message = str(err.value)
    assert "10" in message and "4" in message and "batch_size / num_minibatches" in message
    with pytest.raises(ValueError):
        exact_div(10, 0)
    with pytest.raises(ValueError):
        exact_div(0, 0)


# ----------------------------------------------------------------------------------------------
# Flag checks, data order, atomic writes
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScriptArgs(TrainArgs, TaskArgs, RunArgs):
    """The shared blocks as the text-task scripts (ppo, nlpo, ilql, alol) inherit them."""


@dataclasses.dataclass
class FlagArgs(ScriptArgs):
    learning_rate: float = 1e-3
    top_p: float = 1.0
    beta: float = float("inf")
    bonus: float = 0.0
    sizes: tuple[float, ...] = (0.5, 0.5)


FLAG_LIMITS = {"learning_rate": "(0, inf)", "top_p": "(0, 1]", "beta": "[0, inf]"}


def test_validate_args_names_the_flag_and_its_range(tmp_path):
    validate_args(FlagArgs(output_dir=str(tmp_path)), FLAG_LIMITS)  # the defaults pass, inf where "inf]" says so
    for fields, message in [
        ({"learning_rate": 0.0}, "--learning-rate must be positive, got 0.0"),
        ({"learning_rate": float("nan")}, "--learning-rate must be positive, got nan"),
        ({"learning_rate": float("inf")}, "--learning-rate must be positive, got inf"),
        ({"top_p": 1.5}, "--top-p must be in (0, 1], got 1.5"),
        ({"beta": -1.0}, "--beta must be non-negative or inf, got -1.0"),
        ({"bonus": float("nan")}, "--bonus must be a finite number, got nan"),  # named by no rule: finite
        ({"sizes": (0.5, float("inf"))}, "--sizes must be a finite number, got (0.5, inf)"),
        ({"eval_episodes": 0}, "--eval-episodes must be positive, got 0"),  # the common flags' rules
        ({"seed": -1}, "--seed must be in [0, 4294967295], got -1"),
        ({"output_dir": str(tmp_path / "f" / "runs")}, "is a file, not a directory"),
    ]:
        (tmp_path / "f").write_text("")
        with pytest.raises(ValueError, match=re.escape(message)):
            validate_args(FlagArgs(**{"output_dir": str(tmp_path), **fields}), FLAG_LIMITS)
    assert not (tmp_path / "runs").exists()  # checking makes nothing


def test_refill_order_keeps_one_permutation_and_wraps_a_short_set():
    order, cursor = refill_order(np.random.default_rng(0), 10, np.zeros(0, int), 0, 4)
    assert cursor == 0 and order.tolist() == np.random.default_rng(0).permutation(10).tolist()
    assert refill_order(np.random.default_rng(1), 10, order, 4, 4) == (order, 4)  # the batch still fits
    rng = np.random.default_rng(0)
    order, cursor = refill_order(rng, 3, np.zeros(0, int), 0, 8)  # 8 from 3 items: 3 permutations back to back
    assert cursor == 0 and len(order) == 9 and np.bincount(order).tolist() == [3, 3, 3]
    assert all(sorted(order[i : i + 3]) == [0, 1, 2] for i in (0, 3, 6))


def test_resume_args_takes_an_older_checkpoint_carrying_every_shared_flag(tmp_path):
    """Checkpoints written before they named their script are told apart by a flag the resuming script lacks. Until
    the shared flags were split into blocks every script's Args had all of them, so those flags do not count: an
    older reward_lm.py checkpoint (with --eval-every, --bf16, ...) still resumes, another script's does not."""

    @dataclasses.dataclass
    class RunOnlyArgs(RunArgs):
        task: str = "inclusive"

    saved = {**dataclasses.asdict(ScriptArgs()), "task": "inclusive", "seed": 7}
    os.makedirs(tmp_path / "checkpoint")
    torch.save({"step": 3, "args": saved, "run": {}, "rng": []}, tmp_path / "checkpoint" / "state.pt")
    args, checkpoint = resume_args(RunOnlyArgs(resume=str(tmp_path)), RunOnlyArgs, "reward_lm.py")
    assert args == RunOnlyArgs(seed=7, resume=str(tmp_path)) and checkpoint["step"] == 3
    torch.save(
        {"step": 3, "args": {**saved, "algorithm": "a_lol"}, "run": {}, "rng": []}, tmp_path / "checkpoint" / "state.pt"
    )
    with pytest.raises(ValueError, match="written by another script, not reward_lm.py"):
        resume_args(RunOnlyArgs(resume=str(tmp_path)), RunOnlyArgs, "reward_lm.py")


def test_write_atomically_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = str(tmp_path / "state.pt")
    write_atomically(path, lambda file: torch.save({"step": 1}, file))

    def full_disk(file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=re.escape(f"cannot write {path}: No space left on device")):
        write_atomically(path, full_disk)
    with pytest.raises(KeyError):  # not the file's fault: raised as it was, the old file kept all the same
        write_atomically(path, lambda file: {}["missing"])
    assert torch.load(path)["step"] == 1 and os.listdir(tmp_path) == ["state.pt"]


# ----------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored after the test
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_seed_everything(restore_determinism):
    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first
    assert torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------------------------
# Run: directory, TensorBoard, summary.json
# ----------------------------------------------------------------------------------------------
def test_run_dir_tensorboard_and_summary(tmp_path):
    args = dataclasses.replace(ScriptArgs(), output_dir=str(tmp_path), exp_name="t", seed=3, task="sentiment")
    run = Run(args, script="ppo.py")
    assert os.path.dirname(run.dir) == str(tmp_path)
    assert re.fullmatch(r"sentiment__t__3__\d+", os.path.basename(run.dir))
    assert os.path.isdir(run.dir)

    evals = [
        {"eval/return_mean": 0.1, "eval/return_std": 0.4, "eval/perplexity": 4.0, "eval/grammatical": 0.9},
        {"eval/return_mean": 0.5, "eval/return_std": 0.2, "eval/perplexity": 5.0, "eval/grammatical": 0.8},
        {"eval/return_mean": 0.3, "eval/return_std": 0.3, "eval/perplexity": 4.5, "eval/grammatical": 0.85},
    ]
    samples = [("the movie", " was great .", 0.62), ("the plot", " was bad .", -0.54)]
    for step, metrics in enumerate(evals):
        run.log({"train/loss": 1.0 / (step + 1)}, step)
        run.log_eval(metrics, samples, step)
    run.tokens = 1000
    summary = run.write_summary()
    run.close()

    events = glob.glob(os.path.join(run.dir, "events.out.tfevents.*"))
    assert len(events) == 1
    with open(events[0], "rb") as f:
        data = f.read()
    for tag in (b"train/loss", b"eval/return_mean", b"eval/return_std", b"eval/samples"):
        assert tag in data  # the scalars and the samples table were flushed on close()
    with open(os.path.join(run.dir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert set(on_disk) == {
        "script",
        "task",
        "seed",
        "args",
        "world_size",
        "initial",
        "final",
        "best",
        "wall_seconds",
        "tokens_per_second",
    }
    assert on_disk["script"] == "ppo.py"
    assert on_disk["task"] == "sentiment"
    assert on_disk["seed"] == 3
    assert on_disk["args"] == dataclasses.asdict(args)
    assert on_disk["initial"] == evals[0]
    assert on_disk["final"] == evals[-1]
    # each metric's own best over the evaluations: lowest std and perplexity, highest return and grammar
    assert on_disk["best"] == {
        "eval/return_mean": 0.5,
        "eval/return_std": 0.2,
        "eval/perplexity": 4.0,
        "eval/grammatical": 0.9,
    }
    assert on_disk["wall_seconds"] > 0
    assert on_disk["tokens_per_second"] == pytest.approx(1000 / on_disk["wall_seconds"])


def test_summary_best_skips_metrics_not_yet_measurable(tmp_path):
    """reward_lm's eval/fit_error is NaN until a cell has 50 labels, and lower is better: its best is the lowest
    measured value, not NaN (max or min over a list starting with NaN returns NaN)."""
    args = dataclasses.replace(ScriptArgs(), output_dir=str(tmp_path), exp_name="t", seed=1, task="sentiment")
    run = Run(args, script="reward_lm.py")
    for step, (fit, worst) in enumerate([(float("nan"), float("nan")), (2.0, 5.0), (1.5, 6.0)]):
        run.log_eval({"eval/return_mean": 0.5, "eval/fit_error": fit, "eval/fit_error_max": worst}, [], step)
    best = run.write_summary()["best"]
    run.close()
    assert best == {"eval/return_mean": 0.5, "eval/fit_error": 1.5, "eval/fit_error_max": 5.0}


def test_summary_extra_and_no_evals(tmp_path):
    args = dataclasses.replace(ScriptArgs(), output_dir=str(tmp_path), exp_name="x", seed=1)
    run = Run(args, script="s.py")
    summary = run.write_summary(extra={"note": "hi"})
    run.close()
    assert summary["note"] == "hi"
    assert summary["initial"] == summary["final"] == summary["best"] == {}


def test_close_flushes_tensorboard(tmp_path):
    args = dataclasses.replace(ScriptArgs(), output_dir=str(tmp_path), exp_name="flush", seed=2)
    run = Run(args, script="s.py")
    run.log({"train/only_metric": 1.5}, 0)  # one event: stays queued in the writer until close()
    run.close()
    events = glob.glob(os.path.join(run.dir, "events.out.tfevents.*"))
    assert len(events) == 1
    with open(events[0], "rb") as f:
        assert b"train/only_metric" in f.read()


# ----------------------------------------------------------------------------------------------
# torch.distributed helpers, on 2 CPU processes (gloo)
# ----------------------------------------------------------------------------------------------
def _distributed_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from common.utils import all_gather_objects, all_reduce, data_parallel, masked_mean, rank_share, rank_slice

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different starting weights: the wrapper must broadcast rank 0's
    layer = torch.nn.Linear(1, 1, bias=False)
    wrapped = data_parallel(layer)
    wrapped(torch.full((1, 1), float(rank + 1))).sum().backward()  # gradients 1 and 2 on the ranks: the average is 1.5
    values, mask = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1), torch.tensor([1.0, 1.0, rank * 1.0])
    results[rank] = (
        type(wrapped).__name__,
        layer.weight.item(),
        layer.weight.grad.item(),
        masked_mean(values, mask, across_ranks=True).item(),
        all_reduce(torch.tensor(3.0), "mean").item(),
        all_gather_objects(f"rank{rank}"),
        (rank_share(5), rank_share(1)),
        rank_slice([10, 11, 12, 13]),
    )
    dist.destroy_process_group()


def test_data_parallel_is_the_module_itself_in_one_process():
    from common.utils import data_parallel

    layer = torch.nn.Linear(2, 1)
    assert data_parallel(layer) is layer and data_parallel(layer, find_unused_parameters=True) is layer


def test_data_parallel_and_statistics_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert results[0][1] == results[1][1]  # both ranks hold rank 0's starting weight
    for rank in (0, 1):
        wrapper, _, grad, mean, reduced, gathered, shares, sliced = results[rank]
        assert wrapper == "DistributedDataParallel" and grad == 1.5  # the backward averaged the ranks' gradients
        assert mean == pytest.approx((1 + 2 + 2 + 4 + 6) / 5)  # every unmasked value of both ranks
        assert reduced == 3.0 and gathered == ["rank0", "rank1"]
        assert shares == [(range(0, 3), range(0, 1)), (range(3, 5), range(1, 1))][rank]  # the last rank may get fewer
        assert sliced == [[10, 11], [12, 13]][rank]  # an equal contiguous slice of the global batch


def _closing_worker(rank: int, port: int, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    from common.utils import all_gather_objects, close_distributed, init_distributed

    init_distributed(use_cuda=False)
    seed_everything(1)  # use_deterministic_algorithms imports torch._dynamo: after the group exists, as in every script
    all_gather_objects(rank)
    close_distributed()
    tasks = f"/proc/{os.getpid()}/task"
    results[rank] = [
        name for name in (open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)) if "gloo" in name
    ]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to list a process's threads")
def test_close_distributed_leaves_no_communication_thread():
    """Every script's order (init_distributed, then seed_everything, collectives, close_distributed) must end with
    gloo's threads joined: threads left running into the interpreter's exit aborted a 2-process run in CI."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_closing_worker, args=(port, results), nprocs=2, join=True)
    assert results[0] == [] and results[1] == []
