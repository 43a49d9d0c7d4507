"""The training loop's plumbing that is not the method: a policy's responses sampled and scored with the work shared
out over the ranks, a held-out evaluation of sampled responses, response lengths from the flags, evaluations logged
and printed, a supervised (NLL) fine-tuning loop, a step's statistics kept on the device and the interval's reduced
over the ranks in one sync, logged and printed, throughput, what a checkpoint keeps of the loop and how `--resume`
puts it back, how a run stops (bad input, a fault, Ctrl-C or SIGTERM) and how it ends (the final evaluation, the
model, `summary.json`); an offline log of responses and rewards loaded as rows, an early-stopping regression fit and
the curves a resumed run logs again. Written for any script's loop; ppo.py, nlpo.py, ilql.py and alol.py use it."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from common.batches import prompt_response_batch
from common.models import Policy, entropy_of, logprobs_of
from common.tasks import RewardError, Task, eval_line, evaluate
from common.utils import (
    Run,
    all_gather_objects,
    all_reduce,
    close_distributed,
    data_parallel,
    episode_seeds,
    error_line,
    rank_share,
    rank_slice,
    restore_rng_states,
    stop_on_sigterm,
    world,
)


def sample_responses(
    policy: Policy, prompts: list[str], seeds: list[int], task: Task, max_new: int, min_new: int, device
) -> list[str]:
    """`policy`'s sampled responses to one batch of prompts (full softmax, temperature 1), at most `max_new` tokens
    with no EOS before `min_new`; each response is drawn from its own seed, so it does not depend on the batch or the
    process."""
    ids, mask = policy.encode_prompts(prompts, task.max_prompt_tokens, device)
    response_ids, response_mask = policy.generate(ids, mask, max_new, min_new, seeds=seeds)
    return policy.decode(response_ids, response_mask)


def sample_and_score(
    policy: Policy,
    prompts: list[str],
    seeds: list[int],
    task: Task,
    max_new: int,
    min_new: int,
    batch_size: int,
    device,
) -> tuple[list[str], np.ndarray]:
    """Responses to every prompt and their rewards. Under torchrun each rank samples and scores its
    contiguous share (`rank_share`) and every rank receives all of them: the same result on 1 or N processes."""
    mine = rank_share(len(prompts))
    responses = []
    for i in range(mine.start, mine.stop, batch_size):
        batch = range(i, min(i + batch_size, mine.stop))
        responses += sample_responses(
            policy, [prompts[j] for j in batch], [seeds[j] for j in batch], task, max_new, min_new, device
        )
    scores = task.score([prompts[j] for j in mine], responses).tolist() if responses else []
    parts = all_gather_objects((responses, scores))
    return [r for part, _ in parts for r in part], np.array([s for _, part in parts for s in part])


def map_distinct(fn: Callable[[list], list], items: list) -> list:
    """[fn's value of each item], with `fn(distinct items) -> their values` called once per distinct item: each rank
    calls it on its contiguous share of the sorted distinct items (`rank_share`) and every rank receives all values."""
    distinct = sorted(set(items))
    mine = [distinct[i] for i in rank_share(len(distinct))]
    values = [v for part in all_gather_objects(fn(mine) if mine else []) for v in part]
    value_of = dict(zip(distinct, values, strict=True))
    return [value_of[item] for item in items]


def evaluate_policy(
    model: Policy,
    start_model: Policy,
    task: Task,
    seed: int,
    episodes: int,
    batch_size: int,
    max_new: int,
    min_new: int,
    device,
    autocast,
) -> tuple[dict, list]:
    """`evaluate` on the first `episodes` held-out prompts, with `model`'s samples as deployed (full softmax,
    temperature 1, under `autocast`), each prompt from the same seed at every evaluation (stream 1 of `seed`): the
    evaluations compare, and are the same on 1 or N processes. `start_model` (the model as loaded) is the yardstick
    of eval/ref_nll."""

    def generate_fn(prompts, indices):
        with autocast:
            seeds = episode_seeds(seed, 1, 0, indices)
            return sample_responses(model, prompts, seeds, task, max_new, min_new, device)

    return evaluate(
        task, generate_fn, episodes, batch_size, policy=model, start_model=start_model, response_length=max_new
    )


def response_lengths(task: Task, response_length: Optional[int], min_response_length: Optional[int]) -> tuple[int, int]:
    """(maximum, minimum) response tokens: the flags where given (not None), the task's otherwise. A ValueError
    unless 0 < maximum and 0 <= minimum <= maximum."""
    longest = task.max_new_tokens if response_length is None else response_length
    shortest = task.min_new_tokens if min_response_length is None else min_response_length
    if longest <= 0 or not 0 <= shortest <= longest:
        raise ValueError(
            f"need 0 < response length ({longest}) and 0 <= min response length ({shortest}) <= response length"
        )
    return longest, shortest


def record_eval(run: Run, metrics: dict, samples: list, step: int, unit: str = "update") -> dict:
    """Log an evaluation (TensorBoard, the run's records for `summary.json`) and print its line."""
    run.log_eval(metrics, samples, step)
    print(f"eval @ {unit} {step}: {eval_line(metrics)}", flush=True)
    return metrics


def reduce_steps(rows: list[dict[str, torch.Tensor]], op: str = "sum") -> list[dict[str, float]]:
    """The one host sync of a logging interval: every step's statistics (scalars kept on the device, the same keys in
    every row) summed (or "mean") over the ranks at once and brought to the host as floats."""
    reduced = all_reduce(torch.stack([torch.stack([v.float() for v in row.values()]) for row in rows]), op).tolist()
    return [dict(zip(rows[0], values, strict=True)) for values in reduced]


def finetune_nll(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler,
    prompts: list[str],
    responses: list[list[int]],
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    max_prompt_tokens: int,
    max_grad_norm: float,
    log_every: int,
    device,
    autocast,
    name: str,
    metric: str,
    log: Callable[[dict, int], None],
) -> None:
    """Supervised fine-tuning of `policy`: `epochs` shuffled passes (drawn from `rng`) over the (prompt, response
    token row) pairs, minimising the mean over each batch of the summed response NLL, one step of `optimizer` and
    `scheduler` per global batch of `batch_size`, gradients averaged over the ranks and clipped to `max_grad_norm`.
    Every rank draws the same global batches and takes its slice; the incomplete last batch of a pass is dropped (the
    next pass is shuffled anew). Every `log_every` steps (and at the last) the steps' mean NLL over the ranks is
    checked (non-finite: a FloatingPointError on every rank alike, naming the model `name`), passed to `log` as
    `{metric: nll}` and printed."""
    per_epoch = len(prompts) // batch_size
    total = epochs * per_epoch
    parameters = list(policy.parameters())
    policy.train()
    model = data_parallel(policy)  # torchrun: its backward averages gradients over ranks (DDP)
    step, since, window = 0, time.time(), []
    for _ in range(epochs):
        order = rng.permutation(len(prompts))
        for start in range(0, per_epoch * batch_size, batch_size):
            mine = rank_slice(order[start : start + batch_size])
            input_ids, attention_mask, offset, response_mask = prompt_response_batch(
                policy, [prompts[i] for i in mine], [responses[i] for i in mine], max_prompt_tokens, device
            )
            with autocast:
                logits, _ = model(input_ids, attention_mask, offset)
            logprobs = logprobs_of(logits, input_ids[:, offset:])
            loss = (-(logprobs * response_mask.to(logprobs.dtype)).sum(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            window.append(loss.detach())
            if step % log_every == 0 or step == total:
                nll = all_reduce(torch.stack(window).mean(), "mean").item()  # the same on every rank: all stop
                if not math.isfinite(nll):
                    raise FloatingPointError(
                        f"non-finite loss in {name}'s fine-tuning by update {step} of {total} "
                        f"(mean NLL {nll}); lower --learning-rate"
                    )
                log({metric: nll}, step)
                print(f"{name} fine-tuning {step}/{total} | nll {nll:.2f} | {time.time() - since:.0f}s", flush=True)
                window = []


@torch.no_grad()
def step_statistics(
    loss: torch.Tensor,
    stats: dict,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    logits: torch.Tensor,
    response_mask: torch.Tensor,
    grad_norm: torch.Tensor,
) -> dict:
    """One step of a sequence-level loss, its statistics kept on the device for `flush_steps`: the loss, the mean
    summed NLL of the responses, the gradient norm, the loss's own `stats` (all `losses/`), and sums over this rank's
    response tokens of log pi - log pi_ref (`objective/kl`) and of the entropy (`objective/entropy`), with the number
    of those tokens (`tokens`)."""
    mask = response_mask.float()
    return {
        "losses/loss": loss.detach(),
        "losses/nll": (-(logprobs * mask).sum(1)).mean(),
        "losses/grad_norm": grad_norm,
        **{f"losses/{k}": v.detach() for k, v in stats.items()},
        "objective/kl": ((logprobs - ref_logprobs) * mask).sum(),
        "objective/entropy": (entropy_of(logits.detach()) * mask).sum(),
        "tokens": mask.sum(),
    }


def flush_steps(
    run: Run, pending: list, total_steps: int, episodes_per_step: int, seconds: float
) -> tuple[list[dict], float]:
    """The one host sync of a logging interval. `pending` holds (step, statistics, host metrics) per step, the
    statistics from `step_statistics`: they are summed over the ranks at once; a non-finite `losses/loss` stops the
    run before anything is logged (every rank sees the same sums, so all stop together). Each step logs its `losses/`
    as means over the ranks (of equal shares), `objective/kl` and `objective/entropy` per response token of all ranks,
    and its host metrics; then the interval's throughput. Returns the logged metrics and the tokens per second."""
    world_size = world()[1]
    totals = reduce_steps([statistics for _, statistics, _ in pending])
    for (step, *_), total in zip(pending, totals, strict=True):
        if not math.isfinite(total["losses/loss"]):
            raise FloatingPointError(
                f"non-finite loss at update {step} of {total_steps} (an update is "
                f"a gradient step): {total['losses/loss'] / world_size}"
            )
    logged, n_tokens = [], 0
    for (step, _, host), total in zip(pending, totals, strict=True):
        tokens = total.pop("tokens")
        per_token = ("objective/kl", "objective/entropy")
        metrics = {**{k: v / tokens if k in per_token else v / world_size for k, v in total.items()}, **host}
        run.log(metrics, step)
        logged.append(metrics)
        n_tokens += int(tokens)
    return logged, log_throughput(run, n_tokens, len(pending) * episodes_per_step, seconds, pending[-1][0])


def progress_line(step: int, total_steps: int, window: list[dict], fields: dict[str, tuple[str, str]], speed) -> str:
    """`step N/T | label value | ... | S tok/s`: for each `label: (metric, format)` of `fields` that was logged, the
    metric's mean over `window` (the steps logged since the last line)."""
    mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
    shown = [f"{label} {mean[key]:{spec}}" for label, (key, spec) in fields.items() if key in mean]
    return " | ".join([f"step {step}/{total_steps}", *shown, f"{speed:.0f} tok/s"])


def keep_curve(run: Run, curve: list) -> Callable[[dict, int], None]:
    """`log(metrics, x)` for a curve drawn before the training loop (a first fit): logs the point to `run` and keeps
    it in `curve`, which the checkpoint saves, so that `--resume` can write again the points TensorBoard drops."""
    return lambda metrics, x: (curve.append((x, metrics)), run.log(metrics, x))


def log_throughput(run: Run, tokens: int, episodes: int, seconds: float, step: int) -> float:
    """Count `tokens` trained on into the run's total (`summary.json`'s tokens_per_second) and log the interval's
    tokens and episodes per second at `step`; returns the tokens per second."""
    run.tokens += tokens
    run.log({"charts/tokens_per_second": tokens / seconds, "charts/episodes_per_second": episodes / seconds}, step)
    return tokens / seconds


def _state_of(part):
    if isinstance(part, np.random.Generator):
        return part.bit_generator.state
    return part.state_dict() if hasattr(part, "state_dict") else part


def training_state(step: int, **parts) -> dict:
    """What `save_checkpoint` keeps of a training loop after `step`: each part under its name, as its `state_dict()`
    (models, optimizers, schedulers), its bit generator's state (a numpy Generator) or as it is (plain values)."""
    return {"step": step, **{name: _state_of(part) for name, part in parts.items()}}


def restore_training_state(checkpoint: dict, run: Run, unit: str = "update", **parts) -> int:
    """`--resume`: put back every part that `training_state` saved under the same name (`load_state_dict`, or a
    numpy Generator's state; a part that is None, an optional network the run does not have, is skipped) and this
    rank's RNG states, say where the run continues, and return the first step still to run. Plain values the caller
    reads from `checkpoint` itself."""
    for name, part in parts.items():
        if part is None:
            continue
        if isinstance(part, np.random.Generator):
            part.bit_generator.state = checkpoint[name]
        else:
            part.load_state_dict(checkpoint[name])
    restore_rng_states(checkpoint["rng"][world()[0]])
    print(f"resumed {run.dir} after {unit} {checkpoint['step']}", flush=True)
    return checkpoint["step"] + 1


@contextlib.contextmanager
def stop_on_fault(run: Run, step: int = 0, unit: str = "update"):
    """Around work outside the training loop (data, a first fit): the user's reward, the disk or a diverged loss stop
    the run with `Run.fault`'s line (at `unit` `step`; 0 is before training), bad input (a ValueError) with its own."""
    try:
        yield
    except (RewardError, OSError, FloatingPointError) as error:
        raise run.fault(error, step, unit) from error
    except ValueError as error:
        run.close()
        raise SystemExit(error_line(error)) from error


@contextlib.contextmanager
def guard_training(
    run: Run, unit: str, current_step: Callable[[], int], on_interrupt: Optional[Callable[[], None]] = None
):
    """Around the training loop. SIGTERM (`stop_on_sigterm`) and Ctrl-C stop the loop and keep what was learned: the
    run goes on to its final evaluation, model and summary (one process; under torchrun the ranks stopped at
    different points, where no collective is safe, so it exits with 130), after `on_interrupt()` (e.g. logging the
    steps not yet synced). The user's reward, the disk or a diverged loss, in the loop or in `on_interrupt`, stop it
    with `Run.fault`'s line: the last checkpoint kept, nothing new saved. `current_step()` says where."""
    stop_on_sigterm()
    try:
        try:
            yield
        except KeyboardInterrupt:
            print(f"interrupted during {unit} {current_step()}; the last checkpoint is kept", flush=True)
            if world()[1] > 1:
                raise SystemExit(130) from None
            if on_interrupt is not None:
                on_interrupt()
            print("evaluating and saving what was trained so far", flush=True)
    except (FloatingPointError, RewardError, OSError) as error:
        raise run.fault(error, current_step(), unit) from error


def finish_run(
    run: Run,
    policy,
    run_eval: Callable[[int], dict],
    step: int,
    extra: dict,
    unit: str = "update",
    label: str = "",
    save_more: Optional[Callable[[], None]] = None,
) -> dict:
    """The end of every run: the final evaluation (`run_eval(step)`), the model (`--save-model`; then `save_more()`
    for what else the run keeps beside it), `summary.json` with `extra` (read after `run_eval`, which may add to it);
    then the run and the process group are closed and one line (`label` first) sums the run up. A fault on the way
    (the reward, the disk) stops the run with `Run.fault`'s line."""
    try:
        run_eval(step)
        if run.args.save_model:
            run.save_policy(policy)
            if save_more is not None:
                save_more()
        summary = run.write_summary(extra)
    except (RewardError, OSError) as error:
        raise run.fault(error, step, unit) from error
    run.close()
    close_distributed()
    print(
        f"{label}initial eval/return_mean {summary['initial']['eval/return_mean']:+.3f} -> final "
        f"{summary['final']['eval/return_mean']:+.3f}; {summary['wall_seconds']:.0f}s, "
        f"{summary['tokens_per_second']:.0f} tok/s; run dir {run.dir}",
        flush=True,
    )
    return summary


def offline_log(
    task: Task,
    policy: Policy,
    seed: int,
    samples_per_prompt: int,
    size: Optional[int],
    max_new: int,
    min_new: int,
    batch_size: int,
    device,
) -> list[dict]:
    """The first `size` (None: all) {prompt, response, reward} examples of the task's logged dataset (drawn with
    `seed`); a task without one gets `policy`'s samples, `samples_per_prompt` per training prompt (stream 3 of
    `seed`), scored by the task's reward."""
    if task.offline_data is not None:
        return task.offline_data(seed)[:size]
    prompts = [p for p in task.train_prompts for _ in range(samples_per_prompt)][:size]
    seeds = episode_seeds(seed, 3, 0, range(len(prompts)))
    responses, scores = sample_and_score(policy, prompts, seeds, task, max_new, min_new, batch_size, device)
    examples = zip(prompts, responses, scores, strict=True)
    return [{"prompt": p, "response": r, "reward": float(s)} for p, r, s in examples]


def fit_early_stopping(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    groups: np.ndarray,
    holdout: float,
    epochs: int,
    patience: int,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
    name: str,
    log: Optional[Callable[[dict, int], None]] = None,
) -> dict:
    """Fit `model(*inputs)` to `targets` by MSE (AdamW at `lr`, shuffled batches drawn from `rng`), keeping the epoch
    with the lowest held-out MSE and stopping after `patience` epochs without a better one. The held-out fraction
    `holdout` is drawn over `groups` (each row's group), so a group's rows stay on one side of the split. Each epoch
    is passed to `log` as `{name}/train_mse` and `{name}/heldout_mse`; returns `{name}_heldout_mse` (the best),
    `{name}_constant_mse` (the training mean as the prediction) and `{name}_epochs`. The model is left in eval mode
    with its best weights and no gradients."""
    shuffled = rng.permutation(np.unique(groups))
    is_holdout = np.isin(groups, shuffled[: max(1, int(round(holdout * len(shuffled))))])
    train_idx, holdout_idx = np.flatnonzero(~is_holdout), torch.as_tensor(np.flatnonzero(is_holdout))
    if len(train_idx) == 0:
        raise ValueError(f"the {name} fit needs at least 2 groups of samples (one to train on, one held out)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def mse(idx) -> torch.Tensor:
        return ((model(*(x[idx] for x in inputs)) - targets[idx]) ** 2).mean()

    def heldout_mse() -> float:
        model.eval()
        with torch.no_grad():
            return float(mse(holdout_idx))

    constant_mse = float(((targets[train_idx].mean() - targets[holdout_idx]) ** 2).mean())
    best, best_state, since_best, history = heldout_mse(), None, 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for batch in torch.as_tensor(rng.permutation(train_idx)).split(batch_size):
            loss = mse(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())  # on the device: one host sync per epoch, not per step
        history.append(heldout_mse())
        if log is not None:
            log({f"{name}/train_mse": torch.stack(losses).mean().item(), f"{name}/heldout_mse": history[-1]}, epoch)
        if history[-1] < best:
            best, best_state, since_best = history[-1], {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval().requires_grad_(False)
    return {f"{name}_heldout_mse": best, f"{name}_constant_mse": constant_mse, f"{name}_epochs": len(history)}


def restore_curves(run: Run, checkpoint: Optional[dict], *names: str) -> list[list]:
    """The curves that `keep_curve` kept, saved in `checkpoint` under `names` (empty without a checkpoint, or where
    one lacks a curve; a curve of bare metrics, from before the x's were kept, is numbered from 1). Their points
    after the checkpoint's step are logged again: TensorBoard drops them on `--resume` (`purge_step`)."""
    if checkpoint is None:
        return [[] for _ in names]
    curves = [[p if isinstance(p, tuple) else (x, p) for x, p in enumerate(checkpoint.get(n, []), 1)] for n in names]
    for x, metrics in [point for curve in curves for point in curve]:
        if x > checkpoint["step"]:
            run.log(metrics, x)
    return curves
