"""An offline method's plumbing beside its losses (ilql.py): the logged episodes in the per-token MDP layout
(`common.batches`) with their returns, the best fraction of them (%BC), a rank's slice of a batch of them, and the
evaluation of a policy deployed as its own decoding rule (not the model's softmax) on held-out prompts or Wordle games,
and the training loop's logging interval.
"""

from __future__ import annotations

import functools
import math
import time
from types import SimpleNamespace

import numpy as np
import torch

from common import wordle
from common.batches import sentiment_layout
from common.tasks import Task, evaluate
from common.training import log_throughput, reduce_steps
from common.utils import Run, episode_seeds, world


def offline_episodes(task: Task, tokenizer, args) -> tuple[list[dict], np.ndarray]:
    """Every offline episode in the per-token layout, with its return: `args.wordle_games` games of
    `args.wordle_data` (`wordle.offline_games`), or the task's logged responses (`Task.offline_data`)."""
    if task.name == "wordle":
        games = wordle.offline_games(args.wordle_data, args.wordle_games, args.seed)
        return [g.layout() for g in games], np.array([g.ret for g in games])
    episodes = task.offline_data(args.seed)
    rows = [
        sentiment_layout(
            tokenizer, e["prompt"], e["response"], e["reward"], task.max_prompt_tokens, task.max_new_tokens
        )
        for e in episodes
    ]
    return rows, np.array([e["reward"] for e in episodes])


def best_fraction(returns: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the best `fraction` of episodes by return, ties broken at random (%BC's filter)."""
    order = np.random.default_rng(seed).permutation(len(returns))
    order = order[np.argsort(-returns[order], kind="stable")]
    return np.sort(order[: max(1, int(np.ceil(fraction * len(returns))))])


def rank_batch(
    data: dict[str, torch.Tensor],
    order: np.ndarray,
    order_on_device: torch.Tensor,
    start: int,
    batch_size: int,
    lengths: np.ndarray,
    n_actions: np.ndarray,
) -> tuple[dict[str, torch.Tensor], float, int]:
    """This rank's equal slice of the global batch `order[start:start + batch_size]` of the episodes in `data` (all
    of them, right-padded on the device; `order_on_device` is `order` there, so no index is copied per step), cut to
    its longest episode by the host's counts of tokens (`lengths`) and action tokens (`n_actions`). Also its token
    share: the number of ranks times its part of the batch's action tokens, which makes the average over the ranks
    of its token means the mean over all of them; and the global batch's token count."""
    rank, world_size = world()
    local = batch_size // world_size
    mine, everyone = slice(start + rank * local, start + (rank + 1) * local), slice(start, start + batch_size)
    width = int(lengths[order[mine]].max())  # right-padded: drop the all-pad columns
    token_share = world_size * float(n_actions[order[mine]].sum()) / float(n_actions[order[everyone]].sum())
    batch = {k: v[order_on_device[mine], :width] for k, v in data.items()}
    return batch, token_share, int(lengths[order[everyone]].sum())


def evaluate_decoding(
    task: Task, seed: int, episodes: int, batch_size: int, device, start_model, deployed, no_repeat: bool = False
) -> tuple[dict, list]:
    """Metrics and samples of `deployed` on the first `episodes` held-out prompts (`common.tasks.evaluate`) or
    Wordle evaluation games (`wordle.play_eval_games`, with `no_repeat` its oracle), shared among the ranks; sampling
    (if any) draws each episode from its own seed (stream 1 of `seed`), the same at every evaluation. `deployed` has a
    `policy` (prompts, tokenizer), `generate(ids, mask, max_new, min_new, logits_processors, seeds)` returning
    response ids and mask as `Policy.generate` does, and `logits(input_ids, attention_mask, start)`, its distribution
    teacher-forced (eval/perplexity); `start_model` is the yardstick of eval/ref_nll."""
    if task.name == "wordle":
        games = wordle.play_eval_games(episodes, deployed.generate, seed, device, no_repeat)
        return wordle.game_metrics(games), [(g.answer, g.text(), g.ret) for g in games]
    policy = deployed.policy

    def generate_fn(prompts: list[str], indices: list[int]) -> list[str]:
        ids, mask = policy.encode_prompts(prompts, task.max_prompt_tokens, device)
        seeds = episode_seeds(seed, 1, 0, indices)
        return policy.decode(*deployed.generate(ids, mask, task.max_new_tokens, task.min_new_tokens, [], seeds))

    # eval/perplexity under the distribution deployed, not the policy's own
    scorer = SimpleNamespace(
        tokenizer=policy.tokenizer, text_nll=functools.partial(policy.text_nll, logits_fn=deployed.logits)
    )
    return evaluate(
        task,
        generate_fn,
        episodes,
        batch_size,
        policy=scorer,
        start_model=start_model,
        response_length=task.max_new_tokens,
    )


def log_steps(run: Run, pending: list, since: float, optimizer, args, learn_values: bool) -> None:
    """ilql.py's one host sync of a logging interval: average the pending (step, statistics on the device, target
    syncs, tokens) rows over the ranks, stop at the first non-finite loss (every rank reads the same averages, so all
    stop together), then log every step and print the progress line (with V's advantage when `learn_values`).
    Nothing pending: nothing to do."""
    if not pending:
        return
    averages = reduce_steps([row for _, row, _, _ in pending], "mean")
    for (step, _, step_syncs, _), stats in zip(pending, averages, strict=True):
        losses = {k[len("losses/") :]: v for k, v in stats.items() if k.startswith("losses/")}
        if not math.isfinite(losses["total_loss"]):
            raise FloatingPointError(
                f"non-finite loss at update {step} (gradient step {step}/{args.total_steps}): "
                + ", ".join(f"{k} {v}" for k, v in losses.items())
            )
        run.log(
            {**stats, "charts/target_syncs": step_syncs, "charts/learning_rate": optimizer.param_groups[0]["lr"]}, step
        )
    n_tokens = sum(n for *_, n in pending)
    speed = log_throughput(run, n_tokens, len(pending) * args.batch_size, time.time() - since, step)
    if step % args.print_every == 0 or step == args.total_steps:
        print(
            f"step {step}/{args.total_steps} | "
            + " | ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "total_loss")
            + (f" | advantage {stats['values/advantage']:+.3f}" if learn_values else "")
            + f" | {speed:.0f} tok/s",
            flush=True,
        )
