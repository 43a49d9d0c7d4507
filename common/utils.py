"""Plumbing every script shares and that is not the algorithm: the common `Args` block, seeding,
the run directory with its TensorBoard writer and `summary.json`, masked statistics, exact_div."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class CommonArgs:
    exp_name: str = "run"
    """the name of this experiment (each script sets it to its own file name)"""
    seed: int = 1
    """seed of the experiment (random, numpy, torch)"""
    torch_deterministic: bool = True
    """if toggled, torch uses deterministic algorithms where it has them (`torch.use_deterministic_algorithms`)"""
    cuda: bool = True
    """if toggled, use CUDA when it is available (bf16 autocast there); CPU otherwise"""
    track: bool = False
    """if toggled, also log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "lmrl"
    """the W&B project name"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    task: str = "sentiment"
    """the task: `sentiment`/`wordle` (embedded, offline), `imdb` (GRUE, from the hub) or `jsonl` (your `--prompts-file`)"""
    prompts_file: Optional[str] = None
    """task jsonl: one JSON object per line, {"prompt": ...} plus an optional "split": "eval" for held-out prompts (without any, 10% are held out, seed 42)"""
    dataset: Optional[str] = None
    """task imdb: a hub dataset id (None: stanfordnlp/imdb), a `save_to_disk` directory, or a local data directory with train/test files"""
    reward_model: Optional[str] = None
    """hub tasks: a sequence classifier (hub id or local directory) scoring prompt + response; imdb defaults to lvwerra/distilbert-imdb"""
    reward_label: Optional[str] = None
    """the reward model's label whose softmax probability is the reward, by name (POSITIVE) or index; None: index 1 of a 2-label model"""
    reward_fn: Optional[str] = None
    """hub tasks: a Python reward `module:function` or `file.py:function`, called as fn(prompts, responses) -> floats, instead of --reward-model"""
    model_name: str = "tiny-gpt2"
    """the policy: `tiny-gpt2`/`tiny-t5` (built-in, pretrained on the task's corpus on first use), a hub id such as `gpt2`, or a local `save_pretrained` directory"""
    output_dir: str = "runs"
    """where run directories are created"""
    save_model: bool = True
    """if toggled, save the trained policy to `<run dir>/model` with `save_pretrained`"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many updates (and before the first and after the last)"""
    eval_episodes: int = 256
    """number of held-out prompts per evaluation"""


# ----------------------------------------------------------------------------------------------
# Checks and arithmetic
# ----------------------------------------------------------------------------------------------
def exact_div(a: int, b: int, what: str = "") -> int:
    """a / b when b divides a; otherwise a clear error naming the sizes involved."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{what or 'sizes'}: {a} is not divisible by {b}")
    return a // b


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all entries, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1; Bessel-corrected by default, as in lm-human-preferences."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count == 0 or (unbiased and count == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} unmasked values, got {int(count)}")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return variance * count / (count - 1) if unbiased else variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries; `shift_mean=False` keeps the mean (for rewards)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
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
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:  # cuBLAS needs this for deterministic matmuls; harmless elsewhere
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pick_device(use_cuda: bool) -> torch.device:
    return torch.device("cuda" if use_cuda and torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# Runs: directory, TensorBoard, summary.json
# ----------------------------------------------------------------------------------------------
class Run:
    """A run directory `runs/{task}__{exp_name}__{seed}__{unix_time}` with its TensorBoard writer.

    Holds the evaluations so that `summary.json` can report the initial (before any update), final
    (last) and best values of every `eval/*` metric.
    """

    def __init__(self, args, script: str):
        from torch.utils.tensorboard import SummaryWriter

        self.args, self.script, self.start = args, script, time.time()
        self.name = f"{args.task}__{args.exp_name}__{args.seed}__{int(self.start)}"
        self.dir = os.path.join(args.output_dir, self.name)
        suffix = 0
        while True:  # two runs started in the same second never share (and overwrite) one directory
            try:
                os.makedirs(self.dir)
                break
            except FileExistsError:
                suffix += 1
                self.dir = os.path.join(args.output_dir, f"{self.name}_{suffix}")
        config = asdict(args)
        if args.track:
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("--track needs W&B: pip install wandb") from e
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=config, name=self.name, save_code=True)
        self.writer = SummaryWriter(self.dir)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                             "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        self.evals: list[dict[str, float]] = []
        self.tokens = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_eval(self, metrics: dict[str, float], samples: list[tuple[str, str, float]], step: int, n_text: int = 8) -> None:
        self.evals.append(dict(metrics))
        self.log(metrics, step)
        table = "|prompt|response|reward|\n|-|-|-|\n" + "\n".join(
            f"|{p}|{r}|{s:.3f}|".replace("\n", " ") for p, r, s in samples[:n_text])
        self.writer.add_text("eval/samples", table, step)

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        """Write `summary.json` (the shape benchmark tools read) and return it."""
        wall = time.time() - self.start
        best = {}
        for key in self.evals[0] if self.evals else []:
            best[key] = (min if key.endswith(("_std", "mean_guesses")) else max)(e[key] for e in self.evals)
        summary = {
            "script": self.script, "task": self.args.task, "seed": self.args.seed, "args": asdict(self.args),
            "initial": self.evals[0] if self.evals else {}, "final": self.evals[-1] if self.evals else {},
            "best": best, "wall_seconds": wall, "tokens_per_second": self.tokens / max(wall, 1e-9), **(extra or {}),
        }
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def close(self) -> None:
        self.writer.close()
        if self.args.track:
            import wandb

            wandb.finish()
