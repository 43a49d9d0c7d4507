"""A-LoL: Advantage-Leftover-Lunch RL, offline policy gradient on whole sequences, and its baselines.

Paper: Baheti, Lu, Brahman, Le Bras, Sap, Riedl, "Leftover Lunch: Advantage-based Offline Reinforcement
Learning for Language Models" (ICLR 2024). Reference code: abaheti95/LoL-RL, `lolrl_qlora_llama_hh.py` (H)
and `train_generation_task_with_off_policy_PG.py` (G). Docs: docs/alol.md (implementation details, the
reference code's bugs and what we do instead, every metric, results).

A-LoL learns from a fixed dataset of (prompt x, response y, reward R) and treats the whole response as one
action, so pi(y|x) is the product of its token probabilities. Starting from the reference policy pi_ref
(the model that is fine-tuned; frozen copy), it follows

    grad J = -E_{(x,y) ~ D} [ (R(x, y) - V_ref(x)) * pi_theta(y|x) / pi_ref(y|x) * grad log pi_theta(y|x) ]

with the advantage A = R - V_ref(x) measured against a value head on the frozen pi_ref (fit first, to
pi_ref's own sampled responses), the sequence importance weight clamped to [1 - eps, 1 + eps] and held
constant (no gradient through it), and only the "leftover" examples with A > 0 used, drawn with
probability proportional to A. `--algorithm` picks A-LoL, its variants (ref-free, seq, KL) or the
baselines (NLL/BC, weighted BC, R-GOLD, R-LoL); the losses are the table of functions below.

Run:  python alol.py                              # A-LoL on the embedded sentiment task's noisy offline data
      python alol.py --algorithm nll              # behaviour cloning on the same data
      torchrun --nproc_per_node 2 alol.py         # data parallel: each process takes its slice of every batch
      python alol.py --resume runs/<run dir>      # continue a stopped run from its last checkpoint
      python alol.py --help                       # every flag and every variant
"""

import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

from common.batches import prompt_response_batch, response_rows
from common.models import Policy, frozen_copy, load_policy, logprobs_of, prompt_features
from common.tasks import Task, eval_line, make_task
from common.training import (
    evaluate_policy,
    finetune_nll,
    finish_run,
    fit_early_stopping,
    flush_steps,
    guard_training,
    keep_curve,
    offline_log,
    progress_line,
    record_eval,
    response_lengths,
    restore_curves,
    restore_training_state,
    sample_and_score,
    step_statistics,
    stop_on_fault,
    training_state,
)
from common.utils import (
    Run,
    RunArgs,
    TaskArgs,
    TrainArgs,
    bf16_autocast,
    data_parallel,
    episode_seeds,
    error_line,
    exact_div,
    init_distributed,
    masked_mean,
    rank_slice,
    resume_args,
    save_checkpoint,
    seed_everything,
    validate_args,
)
from common.value_head import PromptValueHead, prompt_values

ALGORITHMS = ("a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl", "nll", "wbc", "r_gold", "r_lol")
ADVANTAGE_METHODS = ("a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl")
REWARD_METHODS = ("wbc", "r_gold", "r_lol")


@dataclass
class Args(TrainArgs, TaskArgs, RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    eval_every: int = 100
    """evaluate on held-out prompts every this many gradient steps (and before the first and after the last)"""
    task: str = "sentiment_grammar"
    """the task; default `sentiment_grammar`, a noisy log of good and corrupted answers (docs/alol.md, detail 20)"""

    # Algorithm specific arguments
    algorithm: Literal["a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl", "nll", "wbc", "r_gold", "r_lol"] = "a_lol"
    """the loss: a_lol, a_lol_ref_free, a_lol_seq, a_lol_kl, or a baseline nll, wbc, r_gold, r_lol (docs/alol.md)"""
    data_seed: int = 0
    """seed of the offline dataset, fixed apart from `seed` so every run and variant learns from the same log"""
    offline_size: Optional[int] = None
    """use only the first this many offline examples; None uses all (sentiment, sentiment_grammar: 4096)"""
    ref_epochs: int = 1
    """epochs of NLL fine-tuning that make pi_ref from the loaded model (0: as loaded; docs/alol.md, detail 23)"""
    offline_samples_per_prompt: int = 1
    """tasks without an offline dataset get one sampled from pi_ref: this many responses per training prompt"""
    total_steps: int = 400
    """gradient steps (the same budget for every variant, so they compare at equal compute)"""
    batch_size: int = 16
    """examples per gradient step (H: 16 = 4 x 4 accumulation; G: 8 x 2)"""
    learning_rate: float = 3e-4
    """AdamW learning rate (G: 2e-5 for 350M-1.5B models; H: 2e-4 for QLoRA; the tiny built-in model takes more)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over `total_steps` (G: linear, no warmup)"""
    weight_decay: float = 0.01
    """AdamW weight decay (G: 0.01)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip (G: 1.0; H: 0.3)"""
    clip_eps: float = 0.9
    """importance weights are clamped to [1 - eps, 1 + eps] (H default 0.9; G's old README used 0.2); in (0, 1)"""
    kl_beta: float = 0.1
    """beta of the sequence-level KL term of a_lol_kl (not recorded in the reference; on rewards scaled to [0, 1])"""
    gold_min_prob: float = 0.1
    """R-GOLD's floor u on the detached token probability, max(u, pi) (reference: 0.1)"""
    priority_sampling: bool = True
    """draw examples with p ~ A+ (A-LoL) or R (wbc, r_gold, r_lol); off: uniform (docs/alol.md, detail 8)"""
    keep_negative: bool = False
    """ablation: keep A <= 0 and weigh by A instead of A+ (docs/alol.md, detail 24)"""
    response_length: Optional[int] = None
    """maximum response tokens (offline responses are truncated to it, eval generates it); None: the task's"""
    min_response_length: Optional[int] = None
    """EOS is forbidden before this many tokens at evaluation; None takes the task's"""
    forward_batch_size: int = 64
    """prompts per batch for generation and for pi_ref's forward passes (value data, advantages, evaluation)"""
    log_every: int = 10
    """print a progress line, and bring the statistics to the host, every this many steps"""
    checkpoint_every: int = 100
    """save `<run dir>/checkpoint` (weights, optimizer, data position, RNG states, advantages) every this many steps"""

    # The value head V_ref(x)
    value_prompts: int = 1024
    """training prompts on which pi_ref's sampled responses are scored to fit V (H: 280 dev prompts)"""
    value_samples_per_prompt: int = 1
    """responses sampled from pi_ref per value prompt (reference: 1, greedy or beam)"""
    value_holdout: float = 0.2
    """fraction of value prompts held out to pick the epoch to keep and to stop early (reference: none)"""
    value_epochs: int = 30
    """maximum epochs of value-head training (H: 10, G: 5)"""
    value_patience: int = 3
    """stop after this many epochs without a better held-out MSE"""
    value_learning_rate: float = 1e-3
    """AdamW learning rate of the value head (H: 1e-5 on a 7B trunk; a fresh head on a tiny trunk needs more)"""
    value_batch_size: int = 32
    """examples per value-head step (H: 16; G: 32)"""
    value_heads: int = 8
    """attention heads of the value head's pooler (reference: 8); must divide the hidden size"""
    value_dropout: float = 0.1
    """dropout of the value head while it trains (reference: 0.1); it is in eval mode whenever V is used"""


# The allowed values of the numeric flags, checked before any work (common/utils.py `validate_args`; a float flag not
# named must be finite). The response lengths depend on the task: checked in main.
LIMITS = (
    dict.fromkeys(["data_seed", "ref_epochs", "weight_decay", "kl_beta"], "[0, inf)")
    | dict.fromkeys(["total_steps", "batch_size", "learning_rate", "forward_batch_size", "log_every"], "(0, inf)")
    | dict.fromkeys(["offline_size", "offline_samples_per_prompt", "value_samples_per_prompt"], "(0, inf)")
    | dict.fromkeys(["value_epochs", "value_patience", "value_learning_rate", "value_batch_size"], "(0, inf)")
    | {"max_grad_norm": "(0, inf]", "clip_eps": "(0, 1)", "gold_min_prob": "[0, 1]", "value_heads": "(0, inf)"}
    | {"value_prompts": "[2, inf)", "value_holdout": "(0, 1)", "value_dropout": "[0, 1)"}
)
# The progress line: label -> (metric, format), each the mean over the steps since the last line
PROGRESS = {"loss": ("losses/loss", ".3f"), "nll": ("losses/nll", ".2f"), "kl": ("objective/kl", "+.4f")}
PROGRESS |= {"w": ("losses/importance_weight", ".3f"), "data score": ("objective/scores", "+.3f")}


# ALGO LOGIC: the losses as small pure functions (each unit-tested in tests/test_alol.py)
def importance_weight(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """clamp(pi_theta(y|x) / pi_ref(y|x), 1 - eps, 1 + eps) per sequence without gradient, clamped in log space so a
    long response's ratio cannot overflow (H L865-870, G L671-673; docs/alol.md, detail 3)."""
    log_ratio = ((logprobs - ref_logprobs) * mask).sum(1).detach()
    return log_ratio.clamp(math.log1p(-clip_eps), math.log1p(clip_eps)).exp()


def token_importance_weights(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """A-LoL seq's per-token weights clamp(pi_theta(y_t|.) / pi_ref(y_t|.), 1 - eps, 1 + eps), no gradient,
    zero outside the response (H L906-952, G L662-668)."""
    log_ratio = (logprobs - ref_logprobs).detach()
    return log_ratio.clamp(math.log1p(-clip_eps), math.log1p(clip_eps)).exp() * mask


def sequence_loss(
    algorithm: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.9,
    kl_beta: float = 0.1,
    gold_min_prob: float = 0.1,
    keep_negative: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The batch loss of `algorithm`: the mean of a per-example loss on the *summed* response NLL (H L757-759), from
    `[B, T]` log-probs and mask and `[B]` rewards in [0, 1] and advantages A = R - V_ref(x); the A-LoL family weighs
    by A+ = max(A, 0), or by A with `keep_negative` (docs/alol.md, details 7 and 24)."""
    mask = mask.to(logprobs.dtype)
    nll = -(logprobs * mask).sum(1)  # -log pi_theta(y|x): the whole response is one action
    positive = advantages if keep_negative else advantages.clamp(min=0.0)
    stats = {}
    if algorithm == "nll":  # behaviour cloning (H L756-760)
        per_example = nll
    elif algorithm == "wbc":  # reward-weighted BC (H L761-769)
        per_example = rewards * nll
    elif algorithm == "r_gold":  # GOLD with the sequence reward (H L772-788)
        floor = logprobs.detach().exp().clamp(min=gold_min_prob)
        per_example = rewards * -(floor * logprobs * mask).sum(1)
    elif algorithm in ("r_lol", "a_lol"):  # H L789-843, L844-905
        weight = importance_weight(logprobs, ref_logprobs, mask, clip_eps)
        per_example = (rewards if algorithm == "r_lol" else positive) * weight * nll
        stats["importance_weight"] = weight.mean()
        stats["clipfrac"] = ((weight <= 1 - clip_eps + 1e-6) | (weight >= 1 + clip_eps - 1e-6)).float().mean()
    elif algorithm == "a_lol_ref_free":  # weight 1 (H L953-962)
        per_example = positive * nll
    elif algorithm == "a_lol_seq":  # per-token clamped ratios inside the sum (H L906-952)
        weights = token_importance_weights(logprobs, ref_logprobs, mask, clip_eps)
        per_example = positive * -(weights * logprobs * mask).sum(1)
        stats["importance_weight"] = masked_mean(weights, mask)
        clipped = (weights <= 1 - clip_eps + 1e-6) | (weights >= 1 + clip_eps - 1e-6)
        stats["clipfrac"] = masked_mean(clipped.float(), mask)
    elif algorithm == "a_lol_kl":  # weight 1 plus beta * (log pi - log pi_ref) (G L698-703)
        log_ratio = ((logprobs - ref_logprobs) * mask).sum(1)
        per_example = positive * nll + kl_beta * log_ratio
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
    return per_example.mean(), stats


def sampling_probabilities(
    algorithm: str, rewards: np.ndarray, advantages: np.ndarray, priority: bool, keep_negative: bool = False
) -> np.ndarray:
    """Each example's probability of being drawn: the A-LoL family drops A <= 0 (the "leftover lunch") and draws
    p ~ A+ (H L590-623, G L504-511), the reward baselines p ~ R (H L668-677, G L467-476), the rest uniformly;
    `keep_negative` keeps every example at p ~ |A|; without `priority` the kept examples are drawn uniformly."""
    if algorithm in ADVANTAGE_METHODS and keep_negative:
        weights = np.abs(advantages) if priority else np.ones(len(advantages))
    elif algorithm in ADVANTAGE_METHODS:
        weights = np.clip(advantages, 0.0, None) if priority else (advantages > 0).astype(np.float64)
    elif algorithm in REWARD_METHODS and priority:
        weights = np.clip(rewards, 0.0, None)
    else:
        weights = np.ones(len(rewards))
    if weights.sum() <= 0:
        raise ValueError(
            f"{algorithm}: no training example has a positive sampling weight "
            f"(max advantage {advantages.max():+.3f}, max reward {rewards.max():.3f})"
        )
    return weights / weights.sum()


def scale_rewards(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """Rewards mapped to [0, 1] by the offline data's min and max, as R-weighted losses and p ~ R need; V's targets
    are mapped alike, so A = R - V compares numbers on one scale (docs/alol.md, detail 9)."""
    return (np.asarray(raw, dtype=np.float64) - low) / (high - low)


def advantages_of(rewards: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A = R - V_ref(x) per example, both scaled by `scale_rewards`: positive where the logged response scored
    better than pi_ref's own responses to that prompt are expected to (H L590-623; computed once, V is frozen)."""
    return np.asarray(rewards, dtype=np.float64) - np.asarray(values, dtype=np.float64)


def finetune_reference(
    policy: Policy, prompts: list[str], responses: list, args: Args, task: Task, device, autocast, log
):
    """The paper's first step (section 2, "we first fine-tune the reference policy on the training set"): NLL on
    every logged response for `ref_epochs` passes, on random stream 1 of `seed` so that --ref-epochs 0 leaves V's
    split and the batches as they were (docs/alol.md, detail 23)."""
    total = args.ref_epochs * (len(prompts) // args.batch_size)
    if total == 0:
        raise ValueError(
            f"--ref-epochs: the offline log ({len(prompts)} examples) is smaller than one batch "
            f"({args.batch_size}); pass --ref-epochs 0 or a smaller --batch-size"
        )
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    finetune_nll(
        policy,
        optimizer,
        scheduler,
        prompts,
        responses,
        args.ref_epochs,
        args.batch_size,
        np.random.default_rng([args.seed, 1]),
        task.max_prompt_tokens,
        args.max_grad_norm,
        args.log_every,
        device,
        autocast,
        "pi_ref",
        "reference/nll",
        log,
    )


def fit_value_head(
    ref_policy: Policy, task: Task, args: Args, rng, low, high, max_new: int, min_new: int, device, autocast, log
) -> tuple[PromptValueHead, dict]:
    """V_ref fit to pi_ref's own samples on `value_prompts` training prompts, scored and scaled like the data's
    rewards, on pi_ref's prompt features; every rank fits alike on all of it (docs/alol.md, details 11, 12, 22)."""
    value_order = rng.permutation(len(task.train_prompts))[: args.value_prompts]
    prompts = [task.train_prompts[i] for i in value_order for _ in range(args.value_samples_per_prompt)]
    seeds = episode_seeds(args.seed, 2, 0, range(len(prompts)))  # stream 2: V's data
    with autocast:
        _, scores = sample_and_score(
            ref_policy, prompts, seeds, task, max_new, min_new, args.forward_batch_size, device
        )
    targets = torch.tensor(scale_rewards(scores, low, high), dtype=torch.float32, device=device).clamp(0, 1)
    features = prompt_features(ref_policy, prompts, task.max_prompt_tokens, args.forward_batch_size, device)
    head = PromptValueHead(ref_policy.hidden_size, args.value_heads, args.value_dropout).to(device)
    groups = np.repeat(np.arange(len(value_order)), args.value_samples_per_prompt)  # a prompt's samples stay together
    return head, fit_early_stopping(
        head,
        features,
        targets,
        groups,
        holdout=args.value_holdout,
        epochs=args.value_epochs,
        patience=args.value_patience,
        lr=args.value_learning_rate,
        batch_size=args.value_batch_size,
        rng=rng,
        name="value",
        log=log,
    )


def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: check the arguments before any heavy work; a bad one exits with one line
    try:
        args, checkpoint = resume_args(args, Args, os.path.basename(__file__))
        validate_args(args, LIMITS)
        _, world_size, device = init_distributed(args.cuda)
        exact_div(args.batch_size, world_size, "--batch-size / number of processes")
        seed_everything(args.seed, args.torch_deterministic)  # the same seed on every rank (see init_distributed)
        task = make_task(args.task, args)
        max_new, min_new = response_lengths(task, args.response_length, args.min_response_length)
        policy = load_policy(args.model_name, task, device)
        if policy.hidden_size % args.value_heads != 0:
            raise ValueError(f"--value-heads {args.value_heads} must divide the hidden size {policy.hidden_size}")
        # prompts keep what fits the model's context beside the response (a long line in a --prompts-file)
        task.max_prompt_tokens = policy.prompt_budget(task.max_prompt_tokens, max_new)
        run = Run(args, os.path.basename(__file__), checkpoint)
    except (ValueError, OSError) as error:
        raise SystemExit(error_line(error)) from error
    autocast = bf16_autocast(device, args.bf16)  # a no-op on CPU unless --bf16
    rng = np.random.default_rng(args.seed)  # the same draws on every rank: V's split, then the global batches
    start_policy = frozen_copy(policy)  # the model as loaded: the yardstick of eval/ref_nll for every variant
    evaluate_model = functools.partial(  # evaluate_model(model) -> (metrics, samples) (docs/alol.md, detail 19)
        evaluate_policy,
        start_model=start_policy,
        task=task,
        seed=args.seed,
        episodes=args.eval_episodes,
        batch_size=args.forward_batch_size,
        max_new=max_new,
        min_new=min_new,
        device=device,
        autocast=autocast,
    )

    def run_eval(step: int) -> dict:
        return record_eval(run, *evaluate_model(policy), step, "step")

    # 1. the offline log, its rewards mapped to [0, 1] by their min and max; --resume reuses a log sampled from the
    # loaded model, not the task's (the checkpoint keeps only the former)
    with stop_on_fault(run, 0, "step"):
        data = checkpoint["data"] if checkpoint is not None else None
        if data is None:
            with autocast:
                data = offline_log(
                    task,
                    policy,
                    args.data_seed,
                    args.offline_samples_per_prompt,
                    args.offline_size,
                    max_new,
                    min_new,
                    args.forward_batch_size,
                    device,
                )
        raw_rewards = np.array([d["reward"] for d in data], dtype=np.float64)
        low, high = float(raw_rewards.min()), float(raw_rewards.max())
        if not high > low:
            raise ValueError(f"every offline reward equals {low}: there is nothing to learn from")
    rewards = scale_rewards(raw_rewards, low, high)
    print(
        f"offline data: {len(data)} examples, reward {raw_rewards.mean():+.3f} in [{low:+.3f}, {high:+.3f}], "
        f"scaled to [0, 1]",
        flush=True,
    )
    prompts = [d["prompt"] for d in data]
    responses = response_rows(policy.tokenizer, [d["response"] for d in data], max_new)
    data_stats = {"offline_examples": len(data), "offline_reward_mean": float(raw_rewards.mean())}
    # --resume: what steps 2-4 made (pi_ref's weights, V's advantages, their curves), not made again
    data_stats = checkpoint["data_stats"] if checkpoint is not None else data_stats
    ref_history, value_history = restore_curves(run, checkpoint, "ref_history", "value_history")
    advantages = checkpoint["advantages"] if checkpoint is not None else np.zeros(len(data))

    # ALGO LOGIC: 2. pi_ref, the paper's first step: the loaded model fine-tuned by NLL on the whole log (a log sampled
    # from the loaded model needs none); pi_theta starts from it, and every weight and advantage is measured against it
    ref_policy = start_policy  # --ref-epochs 0: pi_ref is the model as loaded
    if checkpoint is not None and checkpoint.get("ref_policy") is not None:
        ref_policy = frozen_copy(policy)
        ref_policy.load_state_dict(checkpoint["ref_policy"])
    elif checkpoint is None and args.ref_epochs > 0 and task.offline_data is not None:
        with stop_on_fault(run, 0, "step"):
            data_stats["loaded_eval"], _ = evaluate_model(start_policy)  # the table's "model as loaded" row
            print(f"eval of the model as loaded: {eval_line(data_stats['loaded_eval'])}", flush=True)
            finetune_reference(policy, prompts, responses, args, task, device, autocast, keep_curve(run, ref_history))
        ref_policy = frozen_copy(policy)

    # ALGO LOGIC: 3. V_ref(x), for the advantage methods only (as in H L500), fit to pi_ref's own samples
    if checkpoint is None and args.algorithm in ADVANTAGE_METHODS:
        value_log = keep_curve(run, value_history)
        with stop_on_fault(run, 0, "step"):
            head, value_stats = fit_value_head(
                ref_policy, task, args, rng, low, high, max_new, min_new, device, autocast, value_log
            )
        # ALGO LOGIC: 4. advantages A = R - V_ref(x) of the whole dataset, once: V is frozen and in eval mode, so
        # recomputing it every step (as the reference does) would give the same numbers (docs/alol.md, detail 15)
        values = prompt_values(head, ref_policy, prompts, task.max_prompt_tokens, args.forward_batch_size, device)
        advantages = advantages_of(rewards, values)
        data_stats.update(
            positive_fraction=float((advantages > 0).mean()), value_mean=float(values.mean()), **value_stats
        )
        print(
            f"V: held-out MSE {value_stats['value_heldout_mse']:.4f} (a constant: "
            f"{value_stats['value_constant_mse']:.4f}) after {value_stats['value_epochs']} epochs | mean V "
            f"{values.mean():.3f} | A > 0 for {100 * data_stats['positive_fraction']:.1f}% of the data",
            flush=True,
        )
    with stop_on_fault(run, 0, "step"):
        probabilities = sampling_probabilities(
            args.algorithm, rewards, advantages, args.priority_sampling, args.keep_negative
        )
    print(
        f"sampling: {args.algorithm} draws from {int((probabilities > 0).sum())} of the {len(data)} examples "
        f"({'priority' if args.priority_sampling and args.algorithm != 'nll' else 'uniform'})",
        flush=True,
    )

    # 5. the optimiser (G L520-523: AdamW, linear decay without warmup, gradient clip 1.0)
    parameters = list(policy.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / args.total_steps if args.anneal_lr else 1.0
    )
    # What a checkpoint holds (besides the RNG states) and --resume restores; then what steps 1-4 made, which --resume
    # reads instead of making it again
    parts = dict(policy=policy, optimizer=optimizer, scheduler=scheduler, data_rng=rng)
    first_step = 1 if checkpoint is None else restore_training_state(checkpoint, run, "step", **parts)
    made = dict(
        data=data if task.offline_data is None else None,
        advantages=advantages,
        data_stats=data_stats,
        value_history=value_history,
        ref_history=ref_history,
        ref_policy=ref_policy if ref_policy is not start_policy else None,
    )
    ddp_policy = data_parallel(policy)  # torchrun: its backward averages gradients over ranks (DDP)

    policy.train()
    step, pending, window, since = first_step - 1, [], [], time.time()
    with guard_training(run, "step", lambda: step):  # Ctrl-C, SIGTERM: on to the final evaluation; a fault: one line
        if checkpoint is None:
            run_eval(0)
            save_checkpoint(run, training_state(0, **parts, **made))  # V's fit and the advantages are never redone
        for step in range(first_step, args.total_steps + 1):
            # ALGO LOGIC: 6. draw a global batch by p, with replacement (docs/alol.md, detail 8); this rank's slice
            idx = rng.choice(len(data), size=args.batch_size, p=probabilities)
            mine = rank_slice(idx)
            input_ids, attention_mask, start, response_mask = prompt_response_batch(
                policy, [prompts[i] for i in mine], [responses[i] for i in mine], task.max_prompt_tokens, device
            )
            tokens = input_ids[:, start:]

            # ALGO LOGIC: 7. log-probs of the dataset responses under pi_theta and the frozen pi_ref
            with autocast:
                logits, _ = ddp_policy(input_ids, attention_mask, start)
                with torch.no_grad():
                    ref_logits, _ = ref_policy(input_ids, attention_mask, start)
            logprobs, ref_logprobs = logprobs_of(logits, tokens), logprobs_of(ref_logits, tokens)
            batch_rewards = torch.tensor(rewards[mine], dtype=torch.float32, device=device)
            batch_advantages = torch.tensor(advantages[mine], dtype=torch.float32, device=device)

            # ALGO LOGIC: 8. the method's loss (a mean over this rank's equal share of examples), one step
            loss, stats = sequence_loss(
                args.algorithm,
                logprobs,
                ref_logprobs,
                response_mask,
                batch_rewards,
                batch_advantages,
                args.clip_eps,
                args.kl_beta,
                args.gold_min_prob,
                args.keep_negative,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()

            # TRY NOT TO MODIFY: keep the step's statistics on the device; sync once per logging interval
            statistics = step_statistics(loss, stats, logprobs, ref_logprobs, logits, response_mask, grad_norm)
            host = {"objective/scores": float(raw_rewards[idx].mean()), "charts/learning_rate": lr}
            if args.algorithm in ADVANTAGE_METHODS:
                host["objective/advantage"] = float(advantages[idx].mean())
            pending.append((step, statistics, host))
            last = step == args.total_steps
            if last or any(step % every == 0 for every in (args.log_every, args.eval_every, args.checkpoint_every)):
                logged, speed = flush_steps(run, pending, args.total_steps, args.batch_size, time.time() - since)
                window, pending = window + logged, []
                if step % args.log_every == 0 or last:
                    print(progress_line(step, args.total_steps, window, PROGRESS, speed), flush=True)
                    window = []
                if step % args.eval_every == 0 and not last:
                    run_eval(step)
                if step % args.checkpoint_every == 0 and not last:
                    save_checkpoint(run, training_state(step, **parts, **made))
                since = time.time()

    # TRY NOT TO MODIFY: final evaluation, model, summary
    extra = {"steps": step, "algorithm": args.algorithm, **data_stats}
    del ddp_policy  # before finish_run closes the process group (common/utils.py `data_parallel`)
    return finish_run(run, policy, run_eval, step, extra, "step", label=f"{args.algorithm}: ")


if __name__ == "__main__":
    main(tyro.cli(Args))
