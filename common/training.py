"""The training loop's plumbing that is not the method: a policy's responses sampled and scored with the work shared
out over the ranks, response lengths from the flags, evaluations logged and printed, the interval's statistics
reduced over the ranks in one sync, throughput, what a checkpoint keeps of the loop and how `--resume` puts it back,
how a run stops (bad input, a fault, Ctrl-C or SIGTERM) and how it ends (the final evaluation, the model,
`summary.json`). Written for any script's loop; ppo.py, nlpo.py, ilql.py and alol.py use it."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch

from common.models import Policy
from common.tasks import RewardError, Task, eval_line
from common.utils import (
    Run,
    all_gather_objects,
    all_reduce,
    close_distributed,
    error_line,
    rank_share,
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
