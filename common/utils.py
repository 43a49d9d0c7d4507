"""Plumbing every script shares and that is not the algorithm: the shared `Args` blocks and the checks of
every flag, seeding, the run directory with its TensorBoard writer and `summary.json`, masked statistics,
exact_div, torch.distributed helpers (torchrun, the DDP wrapper), checkpoints for `--resume`, and the one-line
stop on a fault."""

from __future__ import annotations

import contextlib
import datetime
import glob
import importlib
import json
import math
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist


# The flags the scripts share, in three blocks; each script's `Args` inherits the blocks it reads and nothing else,
# so its --help lists only flags it uses. The text-task scripts write `Args(TrainArgs, TaskArgs, RunArgs)`: a
# dataclass lists inherited fields from the last base to the first, so --help shows run, task, then training flags.
@dataclass
class RunArgs:
    """Every script's flags: the run's name and seed, device, W&B, the model, where the run is written and resumed.
    `Run` also reads `task` (the run directory's name): `TaskArgs` has it, reward_lm.py declares its own."""

    exp_name: str = "run"
    """the name of this experiment (each script sets it to its own file name)"""
    seed: int = 1
    """seed of the experiment (random, numpy, torch)"""
    torch_deterministic: bool = True
    """if toggled, torch uses deterministic algorithms where it has them (`torch.use_deterministic_algorithms`)"""
    cuda: bool = True
    """if toggled, use CUDA when it is available; CPU otherwise"""
    track: bool = False
    """if toggled, also log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "lmrl"
    """the W&B project name"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    model_name: str = "tiny-gpt2"
    """the policy: `tiny-gpt2`/`tiny-t5` (built here on first use), a hub id, or a local `save_pretrained` directory"""
    output_dir: str = "runs"
    """where run directories are created"""
    save_model: bool = True
    """if toggled, save the trained policy to `<run dir>/model` with `save_pretrained`"""
    resume: Optional[str] = None
    """a run directory to continue from its last checkpoint (the run keeps the arguments it was started with)"""


@dataclass
class TaskArgs:
    """The text tasks' flags: which task, its data and reward (common/tasks.py `make_task` reads these), and how
    many held-out prompts an evaluation scores."""

    task: str = "sentiment"
    """the task: `sentiment`/`wordle` (embedded, offline), `imdb` (GRUE, from the hub) or `jsonl` (your
    `--prompts-file`)"""
    prompts_file: Optional[str] = None
    """task jsonl: one {"prompt": ...} object per line (docs/running.md, Hub tasks)"""
    dataset: Optional[str] = None
    """task imdb: a hub dataset id, a `save_to_disk` directory or local train/test files (docs/running.md, Hub tasks)"""
    reward_model: Optional[str] = None
    """hub tasks: a sequence classifier (hub id or local directory) that scores prompt + response"""
    reward_label: Optional[str] = None
    """the reward model's label whose probability is the reward, by name or index (None: index 1 of 2 labels)"""
    reward_fn: Optional[str] = None
    """hub tasks: a Python reward `module:function` or `file.py:function`, instead of --reward-model"""
    eval_episodes: int = 256
    """number of held-out prompts per evaluation"""


@dataclass
class TrainArgs:
    """The update loop of the scripts that fine-tune a policy on a task (ppo, nlpo, ilql, alol): bf16 autocast, and
    how often the loop evaluates and checkpoints. reward_lm.py runs in fp32, evaluates after every round and
    checkpoints after every wave of simulations: it has none of these."""

    bf16: Literal["auto", "on", "off"] = "auto"
    """bf16 autocast for the transformer passes (logits, log-probs, values stay fp32); auto: on with CUDA, off on CPU"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many updates (and before the first and after the last)"""
    checkpoint_every: int = 10
    """save `<run dir>/checkpoint` (weights, optimizer, data position, RNG states) every this many updates"""


# ----------------------------------------------------------------------------------------------
# Checks and arithmetic
# ----------------------------------------------------------------------------------------------
def exact_div(a: int, b: int, what: str = "") -> int:
    """a / b when b divides a; otherwise a clear error naming the sizes involved."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{what or 'sizes'}: {a} is not divisible by {b}")
    return a // b


# Every numeric flag's allowed values, as an interval: "(0, inf)" is positive, "[0, 1)" a fraction, "[2, inf)" at
# least 2; a bound written "inf]" admits infinity itself. This table covers the shared blocks' flags (a rule applies
# where a script's Args has the flag); each script passes its own table to `validate_args`; a float flag no table
# names must be finite.
COMMON_LIMITS = {
    "seed": "[0, 4294967295]",
    "eval_every": "(0, inf)",
    "eval_episodes": "(0, inf)",
    "checkpoint_every": "(0, inf)",
    **dict.fromkeys(["wordle_games", "wordle_layers", "wordle_width"], "(0, inf)"),  # common/wordle.py WordleArgs
    "wordle_vocab": "[0, inf)",
}
_INTERVAL = re.compile(r"([\[(])(-?[\w.]+), (-?[\w.]+)([\])])")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _allowed(value: float, rule: str) -> bool:
    opening, low, high, closing = _INTERVAL.fullmatch(rule).groups()
    low, high = float(low), float(high)
    return (low <= value if opening == "[" else low < value) and (value <= high if closing == "]" else value < high)


def _describe(rule: str) -> str:
    opening, low, high, closing = _INTERVAL.fullmatch(rule).groups()
    if high != "inf" or low == "-inf":
        return f"in {rule}"
    if low == "0":
        bound = "positive" if opening == "(" else "non-negative"
    else:
        bound = f"at least {low}" if opening == "[" else f"greater than {low}"
    return bound + (" or inf" if closing == "]" else "")


def validate_args(args, limits: dict[str, str]) -> None:
    """Refuse bad flags before any work (no model loaded, no run directory made), with one ValueError naming the
    flag: every numeric flag against `COMMON_LIMITS` and the script's `limits` (None, a flag's "unset", passes;
    NaN never does), then the output location, which must be a directory this process can write into. Rules that
    tie flags together (sizes that must divide) stay next to the call in each script."""
    names = {f.name for f in fields(args)}
    rules = {**{name: rule for name, rule in COMMON_LIMITS.items() if name in names}, **limits}
    assert set(rules) <= names, f"limits for unknown flags: {sorted(set(rules) - names)}"
    for name in sorted(names):
        value = getattr(args, name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if name in rules and not _allowed(item, rules[name]):
                raise ValueError(f"{_flag(name)} must be {_describe(rules[name])}, got {value}")
            if name not in rules and isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{_flag(name)} must be a finite number, got {value}")
    check_writable(args.resume or args.output_dir, "--resume" if args.resume else "--output-dir")


def check_writable(path: str, flag: str) -> None:
    """A run directory can be made in (or, resuming, written into) `path`: the nearest part of it that exists is a
    directory this process may write into. Said now, not as a traceback after the model has loaded."""
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no permission to write in {existing}")


def error_line(error) -> str:
    """`error: <message>` on one line, whatever the message holds (some libraries' messages span several)."""
    return "error: " + " ".join(str(error).split())


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None, across_ranks: bool = False
) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all entries, or along `dim`).

    `across_ranks=True` (no gradient) averages over the whole batch of all torchrun processes: the
    statistics that steer the run (whitening, the KL controller) must not depend on the world size."""
    mask = mask.to(values.dtype)
    if dim is None:
        total, count = (values * mask).sum(), mask.sum()
        if across_ranks:
            total, count = all_reduce(total.detach()), all_reduce(count)
        return total / count
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(
    values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, across_ranks: bool = False
) -> torch.Tensor:
    """Variance of `values` where `mask` is 1; Bessel-corrected by default, as in lm-human-preferences."""
    mask = mask.to(values.dtype)
    count = all_reduce(mask.sum()) if across_ranks else mask.sum()
    if count == 0 or (unbiased and count == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} unmasked values, got {int(count)}")
    mean = masked_mean(values, mask, across_ranks=across_ranks)
    variance = masked_mean((values - mean) ** 2, mask, across_ranks=across_ranks)
    return variance * count / (count - 1) if unbiased else variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, across_ranks: bool = False
) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries; `shift_mean=False` keeps the mean (for rewards)."""
    mean = masked_mean(values, mask, across_ranks=across_ranks)
    var = masked_var(values, mask, across_ranks=across_ranks)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ----------------------------------------------------------------------------------------------
# Seeding and devices
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    # warn_only: an op that has no deterministic kernel (a few CUDA ops) warns and runs anyway instead of
    # stopping the run; a run that printed such a warning is not bit-exact on --resume (docs/running.md, Resuming).
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:  # cuBLAS needs this for deterministic matmuls; harmless elsewhere
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pick_device(use_cuda: bool) -> torch.device:
    """CUDA when asked for and present, else CPU. On CUDA, fp32 matmuls (the output layer, value heads, the
    whole model with --bf16 off) may use TF32 tensor cores: a 10-bit mantissa instead of 23, still finer than bf16."""
    if use_cuda and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda")
    return torch.device("cpu")


def bf16_enabled(device: torch.device, bf16: str = "auto") -> bool:
    """Whether the --bf16 setting turns bf16 autocast on for `device`: "on", or "auto" on CUDA."""
    if bf16 not in ("auto", "on", "off"):
        raise ValueError(f"bf16 must be auto, on or off, got {bf16!r}")
    return bf16 == "on" or (bf16 == "auto" and device.type == "cuda")


def bf16_autocast(device: torch.device, bf16: str = "auto") -> torch.autocast:
    """The autocast context of the transformer passes: bf16 on `device` if `bf16_enabled`.
    It follows the device, so the bf16 path runs on CPU too (tests use that). The pieces whose precision
    matters run in fp32 inside it: the output layer and log-softmax (`models.FP32OutputLayer`), value heads,
    losses, and rewards (`full_precision` in `Task.score`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(device, bf16))


@contextlib.contextmanager
def full_precision():
    """Leave every active autocast region (CPU and CUDA): the code inside runs in its tensors' own dtype."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def episode_seeds(seed: int, stream: int, step: int, indices) -> list[int]:
    """One seed per episode from (run seed, stream, step, the episode's index in the global batch).

    Sampling an episode with its own seed (`Policy.generate(..., seeds=)`) makes its tokens independent of
    which process, batch or position it lands in: the same run on 1 or N processes samples the same text."""
    return [int(np.random.SeedSequence([seed, stream, step, int(i)]).generate_state(1)[0]) for i in indices]


def refill_order(
    rng: np.random.Generator, n: int, order: np.ndarray, cursor: int, batch: int
) -> tuple[np.ndarray, int]:
    """(order, cursor) such that the next batch is items order[cursor:cursor + batch]: the current order while it
    lasts, then a fresh one. A fresh order is a permutation of the n items, or, when one batch needs more than n (a
    prompt file shorter than the batch), as many permutations back to back as it takes: the items wrap around,
    each used equally often. Every rank draws the same orders and takes its slice of each batch."""
    if cursor + batch <= len(order):
        return order, cursor
    return np.concatenate([rng.permutation(n) for _ in range(-(-batch // n))]), 0


# ----------------------------------------------------------------------------------------------
# torch.distributed: `torchrun --nproc_per_node N script.py` runs N copies of a script, one per device
# ----------------------------------------------------------------------------------------------
def init_distributed(
    use_cuda: bool, timeout: datetime.timedelta = datetime.timedelta(minutes=30)
) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK) join the
    process group, NCCL between GPUs and gloo between CPU processes; plain `python` gives (0, 1, device).

    Every rank uses the same seed: the global batch is drawn identically everywhere and each rank takes
    its slice, models start identical, and sampling is seeded per episode (`episode_seeds`). Only rank 0
    prints and writes; other ranks' `print` is silenced here. `timeout` bounds every collective's wait (NCCL's
    own default is 10 minutes); it must exceed the longest time one rank works while another waits."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device(use_cuda)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        torch.set_float32_matmul_precision("high")  # as pick_device
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        importlib.import_module("torch._dynamo")  # before the group exists: see close_distributed
        dist.init_process_group(backend, timeout=timeout)
    if rank != 0:
        import builtins

        builtins.print = lambda *args, **kwargs: None
    return rank, world_size, device


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank_share(n: int) -> range:
    """This rank's contiguous share of n items (the last ranks may get fewer); range(n) without torchrun."""
    rank, world_size = world()
    share = -(-n // world_size)
    return range(min(rank * share, n), min((rank + 1) * share, n))


def rank_slice(batch):
    """This rank's equal contiguous slice of a global batch (a list or an array) whose size the number of processes
    divides: every rank draws the same global batch and trains on its slice; the whole batch without torchrun."""
    rank, world_size = world()
    share = len(batch) // world_size
    return batch[rank * share : (rank + 1) * share]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or "mean", "max") of a tensor over all ranks, as a new tensor; the tensor itself without torchrun."""
    if not dist.is_initialized():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out / dist.get_world_size() if op == "mean" else out


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without torchrun."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def data_parallel(module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
    """`module` wrapped in DistributedDataParallel under torchrun; in one process, `module` itself, unchanged.

    Call the wrapper in the forward passes whose loss is backpropagated: its backward averages the gradients over
    ranks (with equal shares of the minibatch, the gradient of the mean loss), all-reducing each bucket as soon as
    the backward has produced it, so the communication overlaps the rest of the backward (benchmarks/README.md,
    "Several processes"). Generation, passes without gradient, checkpoints and saving keep the bare module, whose
    parameters the wrapper shares. DDP needs a gradient for every trainable parameter in every step: pass
    `find_unused_parameters=True` for a module the loss does not reach whole (it then walks the autograd graph every
    step). Construction broadcasts rank 0's weights; every rank starts identical anyway (see init_distributed).
    Delete the wrapper before `close_distributed`: one that outlives the process group frees it when it goes,
    holding the GIL, while gloo's threads may wait for the GIL (a 2-process run hung at its exit)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def stop_on_sigterm() -> None:
    """Turn SIGTERM (what `kill`, schedulers and torchrun send) into KeyboardInterrupt, so a run stopped
    either way takes the same path: stop the loop, keep the last checkpoint, save what was learned."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def map_in_waves(fn, items: list, run: "Run", checkpoint: Optional[dict], after_wave) -> dict:
    """`done[item] = fn(item)` for every item, for independent units of work (reward_lm.py's simulations): each
    wave gives one item to each rank, gathers the wave's results into `done` on every rank, checkpoints `done`
    (rank 0 writes it), then calls `after_wave(results of the wave)` on every rank. A killed run therefore redoes
    at most one wave, and a resumed one (`checkpoint` from `resume_args`) runs only the missing items.
    A FloatingPointError on any rank stops all."""
    done = checkpoint["done"] if checkpoint is not None else {}
    if checkpoint is None:
        save_checkpoint(run, {"step": 0, "done": done})
    else:
        print(f"resumed {run.dir}: {len(done)} of {len(items)} done", flush=True)
    rank, world_size = world()
    todo = [item for item in items if item not in done]
    for wave in range(0, len(todo), world_size):
        mine = todo[wave + rank] if wave + rank < len(todo) else None
        try:
            result = fn(mine) if mine is not None else None
        except FloatingPointError as error:  # every rank must reach the gather, then all stop together
            result = FloatingPointError(str(error))
        results = {item: r for item, r in all_gather_objects((mine, result)) if item is not None}
        if errors := [r for r in results.values() if isinstance(r, FloatingPointError)]:
            raise errors[0]
        done.update(results)
        save_checkpoint(run, {"step": len(done), "done": done})
        after_wave(results)
    return done


class ScalarRecorder:
    """`add_scalar` into a list, so that work done on any rank can be written to TensorBoard by rank 0."""

    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, float(value), int(step)))


def close_distributed() -> None:
    """Destroy the process group, which joins its communication threads before the interpreter exits.

    In torch 2.13, importing torch._dynamo *after* the group exists (seed_everything does, through
    torch.use_deterministic_algorithms) leaves references to the group that destroy_process_group does not drop:
    gloo's threads then outlive it into the interpreter's exit, where a 2-process reward_lm.py run in CI aborted
    (SIGABRT, "terminate called without an active exception"). init_distributed therefore imports torch._dynamo
    first; tests/test_utils.py checks that no gloo thread is left."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything `--resume` needs, written atomically by rank 0
# ----------------------------------------------------------------------------------------------
def rng_states() -> dict:
    """Every global RNG this process draws from: on CUDA only this rank's own device's generator, so a run
    resumes with any number of visible GPUs."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_device"] = torch.cuda.get_rng_state()  # the current device (init_distributed sets it)
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda_device" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda_device"])


class _KeepWriteErrors:
    """A file's `write` that remembers the OSError it raised: torch.save reports a failed write (a full disk) as a
    bare RuntimeError from its zip writer, which would hide the cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def write_atomically(path: str, write) -> None:
    """`write(file)` into `path.tmp`, flushed to the disk, then renamed over `path`: whoever reads `path` (a resumed
    run) finds the old file or the new one, never a part. A write that fails (a full disk, a lost permission)
    removes the partial file, keeps the old one and raises OSError naming the path; so does an interrupted one
    (re-raised as it was)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as file:
            target = _KeepWriteErrors(file)
            try:
                write(target)
            except RuntimeError:
                if target.error is None:  # not the file's fault: ours, keep its traceback
                    raise
                raise target.error from None
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise _os_error(error, f"cannot write {path}: {error.strerror or error}") from None
        raise


def _os_error(error: OSError, message: str) -> OSError:
    """An OSError saying `message` (no "[Errno N]" in front) that keeps `error`'s errno."""
    out = OSError(message)
    out.errno = error.errno
    return out


@contextlib.contextmanager
def writing_dir(path: str):
    """A directory written whole or not at all (the saved model): yields `path.tmp` to write into, which replaces
    `path` once the block ends; if the block fails the partial directory is removed and `path` stays as it was.
    A full disk while safetensors writes surfaces as OSError here, like every other failed write."""
    from safetensors import SafetensorError

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        try:
            yield tmp
        except SafetensorError as error:
            if "I/O error" not in str(error):  # safetensors' own wording for a failed write
                raise
            raise OSError(f"cannot write {path}: {error}") from None
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run: "Run", state: dict) -> None:
    """Write `<run dir>/checkpoint/state.pt` with `state` plus the script that wrote it, the run's records and every
    rank's RNG states. The file is replaced atomically (`write_atomically`), so a run killed while saving, or whose
    disk fills up, keeps the previous checkpoint."""
    state = {
        **state,
        "script": run.script,
        "args": asdict(run.args),
        "run": run.state(),
        "rng": all_gather_objects(rng_states()),
    }
    if world()[0] != 0:
        return
    path = os.path.join(run.dir, "checkpoint", "state.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda file: torch.save(state, file))


# What unpickling damaged bytes raises (the pickle docs list all but RuntimeError and ValueError, which torch's zip
# reader raises for a truncated file and a bad header).
_DAMAGED = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, RuntimeError, ValueError)


def load_checkpoint(run_dir: str) -> dict:
    """The state saved by `save_checkpoint` in `run_dir`; FileNotFoundError with the path if there is none, and a
    ValueError naming the file if it is damaged (truncated, overwritten) or is not one of these checkpoints."""
    path = os.path.join(os.path.expanduser(run_dir), "checkpoint", "state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except _DAMAGED as error:  # torch's first sentence names the damage; the rest of its message is advice
        raise ValueError(
            f"--resume {run_dir}: {path} is damaged or not a checkpoint "
            f"({type(error).__name__}: {str(error).split('. ')[0]})"
        ) from None
    if not isinstance(checkpoint, dict) or not {"step", "args", "run", "rng"} <= set(checkpoint):
        raise ValueError(f"--resume {run_dir}: {path} is not a checkpoint of these scripts")
    return checkpoint


def resume_args(args, cls, script: str):
    """With `--resume`, the saved run's arguments (and the checkpoint); otherwise (args, None). A checkpoint of
    another script is refused: its state would not fit this one's models."""
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    names = {f.name for f in fields(cls)}
    written_by = checkpoint.get("script")
    # A checkpoint written before checkpoints named their script is told by flags this script lacks; the shared
    # blocks' flags do not count (every script's Args had all of them before the blocks were split).
    shared = {f.name for block in (RunArgs, TaskArgs, TrainArgs) for f in fields(block)}
    if written_by is None and set(checkpoint["args"]) - names - shared:
        written_by = "another script"
    if written_by not in (None, script):
        raise ValueError(f"--resume {args.resume}: the checkpoint was written by {written_by}, not {script}")
    saved = {k: v for k, v in checkpoint["args"].items() if k in names}
    return cls(**{**saved, "resume": args.resume}), checkpoint


# ----------------------------------------------------------------------------------------------
# Runs: directory, TensorBoard, summary.json
# ----------------------------------------------------------------------------------------------
class Run:
    """A run directory `runs/{task}__{exp_name}__{seed}__{unix_time}` with its TensorBoard writer.

    Holds the evaluations so that `summary.json` can report the initial (before any update), final
    (last) and best values of every `eval/*` metric. Under torchrun only rank 0 writes; the other ranks
    keep the same records. Given a checkpoint (`--resume`), it continues in that checkpoint's directory:
    TensorBoard events logged after the checkpoint by the interrupted run are dropped (`purge_step`).
    """

    def __init__(self, args, script: str, checkpoint: Optional[dict] = None):
        self.args, self.script, self.start = args, script, time.time()
        self.is_main = world()[0] == 0
        self.evals: list[dict[str, float]] = []
        self.tokens = 0
        self.writer = None
        if checkpoint is not None:
            self.dir, self.name = os.path.expanduser(args.resume), os.path.basename(os.path.normpath(args.resume))
            self.evals, self.tokens = checkpoint["run"]["evals"], checkpoint["run"]["tokens"]
            self.start -= checkpoint["run"]["wall_seconds"]
            if self.is_main:  # what a run killed while writing left half-written: every `*.tmp`
                # of `write_atomically` (checkpoint/state.pt, summary.json, ...) and `writing_dir` (model/)
                partials = glob.glob(os.path.join(self.dir, "*.tmp")) + glob.glob(os.path.join(self.dir, "*", "*.tmp"))
                for partial in partials:
                    if os.path.isdir(partial):
                        shutil.rmtree(partial)
                    elif os.path.lexists(partial):
                        os.unlink(partial)
        else:
            self.name = f"{args.task}__{args.exp_name}__{args.seed}__{int(self.start)}"
            self.dir = os.path.join(args.output_dir, self.name)
            if self.is_main:
                self.dir = self._make_dir(args.output_dir)
            self.dir = all_gather_objects(self.dir)[0]
        if not self.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        config = asdict(args)
        if args.track:
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("--track needs W&B: pip install wandb") from e
            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                sync_tensorboard=True,
                config=config,
                name=self.name,
                save_code=True,
                resume="allow" if checkpoint else None,
            )
        self.writer = SummaryWriter(self.dir, purge_step=checkpoint["step"] + 1 if checkpoint else None)
        if checkpoint is None:
            self.writer.add_text(
                "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items())
            )

    def _make_dir(self, output_dir: str) -> str:
        path, suffix = self.dir, 0
        while True:  # two runs started in the same second never share (and overwrite) one directory
            try:
                os.makedirs(path)
                return path
            except FileExistsError:
                suffix += 1
                path = os.path.join(output_dir, f"{self.name}_{suffix}")
            except OSError as error:  # a read-only file system, a full disk: say which directory
                raise _os_error(error, f"cannot create the run directory {path}: {error.strerror}") from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_eval(
        self, metrics: dict[str, float], samples: list[tuple[str, str, float]], step: int, n_text: int = 8
    ) -> None:
        self.evals.append(dict(metrics))
        self.log(metrics, step)
        table = "|prompt|response|reward|\n|-|-|-|\n" + "\n".join(
            f"|{p}|{r}|{s:.3f}|".replace("\n", " ") for p, r, s in samples[:n_text]
        )
        if self.writer is not None:
            self.writer.add_text("eval/samples", table, step)

    def state(self) -> dict:
        """What a checkpoint keeps of the run itself."""
        return {"evals": self.evals, "tokens": self.tokens, "wall_seconds": time.time() - self.start}

    def save_policy(self, policy) -> None:
        """`<run dir>/model`: the policy's model and tokenizer (`save_pretrained`), whole or not at all; rank 0."""
        if self.is_main:
            with writing_dir(os.path.join(self.dir, "model")) as path:
                policy.model.save_pretrained(path)
                policy.tokenizer.save_pretrained(path)

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        """Write `summary.json` (the shape benchmark tools read; rank 0 only) and return it."""
        wall = time.time() - self.start
        best = {}
        lower_is_better = ("_std", "mean_guesses", "perplexity", "ref_nll", "fit_error", "fit_error_max")
        for key in self.evals[0] if self.evals else []:
            known = [e[key] for e in self.evals if not math.isnan(e[key])]  # NaN: not measurable yet
            best[key] = (min if key.endswith(lower_is_better) else max)(known) if known else float("nan")
        summary = {
            "script": self.script,
            "task": self.args.task,
            "seed": self.args.seed,
            "args": asdict(self.args),
            "world_size": world()[1],
            "initial": self.evals[0] if self.evals else {},
            "final": self.evals[-1] if self.evals else {},
            "best": best,
            "wall_seconds": wall,
            "tokens_per_second": self.tokens / max(wall, 1e-9),
            **(extra or {}),
        }
        if self.is_main:
            text = json.dumps(summary, indent=2).encode()
            write_atomically(os.path.join(self.dir, "summary.json"), lambda file: file.write(text))
        return summary

    def fault(self, error: BaseException, step: Optional[int] = None, unit: str = "update") -> SystemExit:
        """The one line a run stops with when the user's reward, the machine (a full disk, a lost permission) or a
        diverged loss ends it: the cause, where (`unit` `step`; 0 is before training), and that the last checkpoint
        is kept. Nothing new is saved. A FloatingPointError names its update itself."""
        with contextlib.suppress(OSError):  # the disk that failed may fail the writer's last flush too
            self.close()
        where = (
            ""
            if step is None or isinstance(error, FloatingPointError)
            else f" (at {unit} {step}{', before training' if step == 0 else ''})"
        )
        return SystemExit(error_line(f"{error}{where}; the last checkpoint (if any) is kept in {self.dir}/checkpoint"))

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        if self.args.track:
            import wandb

            wandb.finish()
