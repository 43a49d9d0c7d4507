"""Where an update of ppo.py (or nlpo.py) spends its time, phase by phase, and the training phase's MFU.

    python benchmarks/ppo_phases.py                                   # built-in tiny GPT-2, CPU
    python benchmarks/ppo_phases.py --model-name runs/gpt2-small-shape --response-length 48 --bf16 on
    python benchmarks/ppo_phases.py --script nlpo.py                  # the same for nlpo.py

Flags this script does not know go to the script's own `Args` (`--bf16 on`, `--no-cuda`, `--ppo-epochs 2`).

Runs the script's own `main()` unchanged, with timers wrapped around the functions each phase calls:

- generation: `Policy.generate` (the rollout's sampling, KV cache, one token at a time);
- scoring passes: `forward_logprobs`, `Critic.forward` and any other `Policy` pass without gradients (old
  log-probs, reference log-probs, values; nlpo.py's policy pass scored under two masks, and its masking policy's
  pass over the rollout);
- minibatch forward / backward / optimizer: the same two functions with gradients, `Tensor.backward`,
  and the optimizer's `step`;
- reward: the task's `score`;
- other: the rest of the update (GAE, whitening, statistics, logging, NLPO's mask refresh).

Evaluation is timed apart and left out of the update. On CUDA each timer synchronises the device before and
after its phase, so the GPU's time is charged to the phase that launched the work (the synchronisations cost a
little; `benchmarks/gpu_check.sh`'s speed lines are measured without them).

MFU (model FLOP utilisation) of the training phase: the matmul FLOPs of the minibatch steps (forward and
backward of the policy's trunk and output layer over the response, and of the critic's trunk: 6 FLOPs per
weight per token, plus attention's scores and mixing) divided by the minibatch phases' time, as a fraction of
this machine's matmul peak measured here in the run's precision (`--peak`: an 8192^3 bf16 or fp32 product).
"""

import argparse
import functools
import json
import os
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resumable import load_records, write_region  # noqa: E402

START, END = "<!-- ppo-phases:start -->", "<!-- ppo-phases:end -->"
PHASES = ("generation", "scoring passes", "minibatch forward", "backward", "optimizer", "reward", "other")


def measure_peak(device: str, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on random data (mean of `repeats` after 3 warm-ups)."""
    if device == "cpu":  # a CPU's bf16 products can be very slow: a smaller one, fewer times
        n, repeats = 1024, 3
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PhaseTimer:
    """Seconds per phase, accumulated by wrapped functions; work inside an evaluation counts as evaluation, and work
    inside a timed phase counts to that phase only (a `Policy` pass inside `forward_logprobs`)."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = dict.fromkeys((*PHASES, "evaluation"), 0.0)
        self.in_eval = False
        self.in_phase = False
        self.train_flops = 0.0  # forward matmul FLOPs of the minibatch steps (see `counting_forward`)

    def wrap(self, fn, phase):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = phase(args) if callable(phase) else phase
            if self.in_eval or self.in_phase or name is None:
                return fn(*args, **kwargs)
            sync(self.device)
            start, self.in_phase = time.perf_counter(), True
            try:
                out = fn(*args, **kwargs)
            finally:
                self.in_phase = False
            sync(self.device)
            self.seconds[name] += time.perf_counter() - start
            return out

        return timed

    def wrap_eval(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.in_eval = True
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds["evaluation"] += time.perf_counter() - start
                self.in_eval = False

        return timed


@functools.cache
def matmul_weights(model: torch.nn.Module) -> int:
    """Weights a token meets in the trunk's matmuls: every 2-D parameter but the embedding tables and output layer."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    skip.add(id(model.get_output_embeddings().weight))
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in skip)


def phase_table(records: list[dict]) -> str:
    """One row per record of `--json`: the run's shape, samples/s, each phase's share of the update, MFU."""
    head = "| script | model | device | bf16 | batch / minibatch x length | samples/s | s per update | "
    head += " | ".join(PHASES) + " | training TFLOP/s | MFU |"
    lines = [head, "|" + "---|" * (9 + len(PHASES))]
    for r in records:
        shares = " | ".join(f"{100 * r['phase_seconds_per_update'][k] / r['update_seconds']:.0f}%" for k in PHASES)
        mfu = f"{100 * r['mfu']:.0f}% of {r['peak_tflops']:.3g}" if "mfu" in r else "-"
        lines.append(
            f"| {r['script']} | {os.path.basename(r['model'])} | {r['device']} | {'yes' if r['bf16'] else 'no'} "
            f"| {r['batch']} / {r['minibatch']} x {r['response_length']} | {r['samples_per_second']:.3g} "
            f"| {r['update_seconds']:.3g} | {shares} | {r['train_tflops']:.3g} | {mfu} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--script", default="ppo.py", choices=("ppo.py", "nlpo.py"))
    p.add_argument("--model-name", default="tiny-gpt2")
    p.add_argument("--updates", type=int, default=4, help="updates timed (after one warm-up update)")
    p.add_argument("--rollout-batch-size", type=int, default=64)
    p.add_argument("--minibatch-size", type=int, default=16)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--peak", action="store_true", help="also measure the matmul peak and report MFU")
    p.add_argument("--json", default="", help="append the result to this JSON list")
    p.add_argument("--page", default="", help="write the --json file's table into this page's ppo-phases region")
    p.add_argument("--table-only", action="store_true", help="run nothing: the table of --json (into --page)")
    args, extra = p.parse_known_args(argv)  # the rest are the script's own flags
    if args.table_only:
        return write_table(args)

    import common.models
    from common.utils import bf16_enabled, pick_device

    module = __import__(args.script[:-3])
    flags = [
        f"--model-name={args.model_name}",
        f"--rollout-batch-size={args.rollout_batch_size}",
        f"--minibatch-size={args.minibatch_size}",
        f"--response-length={args.response_length}",
        f"--min-response-length={args.response_length}",  # every response as long as asked: fixed work
        f"--total-updates={args.updates + 1}",
        f"--eval-every={args.updates + 1}",
        "--eval-episodes=16",
        "--no-save-model",
        f"--output-dir={os.path.join(ROOT, 'runs', 'ppo_phases')}",
        *extra,
    ]
    run_args = module.tyro.cli(module.Args, args=flags)
    device = pick_device(run_args.cuda).type
    timer = PhaseTimer(device)
    update_marks = []  # time of each rollout's start: update k spans marks[k] .. marks[k + 1]

    def grad_phase(name_without, name_with):
        return lambda _: name_with if torch.is_grad_enabled() else name_without

    original_generate = common.models.Policy.generate

    def generate(*a, **k):
        if not timer.in_eval:
            sync(device)
            update_marks.append((time.perf_counter(), dict(timer.seconds), timer.train_flops))
        return original_generate(*a, **k)

    module.forward_logprobs = timer.wrap(module.forward_logprobs, grad_phase("scoring passes", "minibatch forward"))
    module.Critic.forward = timer.wrap(module.Critic.forward, grad_phase("scoring passes", "minibatch forward"))
    common.models.Policy.generate = timer.wrap(generate, "generation")
    torch.Tensor.backward = timer.wrap(torch.Tensor.backward, "backward")
    torch.optim.AdamW.step = timer.wrap(torch.optim.AdamW.step, "optimizer")
    module.evaluate = timer.wrap_eval(module.evaluate)
    make_task = module.make_task

    def timed_task(*a, **k):
        task = make_task(*a, **k)
        task.score = timer.wrap(task.score, "reward")
        return task

    module.make_task = timed_task
    original_forward = common.models.Policy.forward

    def counting_forward(self, input_ids, attention_mask, start, with_logits=True):
        """The forward matmul FLOPs of a pass with gradients: 2 per weight per token in the trunk, attention's
        scores and mixing (2 x 2 per position pair per width), the output layer over the response tokens."""
        if torch.is_grad_enabled() and not timer.in_eval:
            (rows, columns), layers = input_ids.shape, self.model.config.num_hidden_layers
            trunk = 2 * matmul_weights(self.model) * rows * columns
            attention = 4 * layers * rows * columns * columns * self.hidden_size
            output = 2 * self.model.config.vocab_size * self.hidden_size * rows * (columns - start) * with_logits
            timer.train_flops += trunk + attention + output
        return original_forward(self, input_ids, attention_mask, start, with_logits)

    # a pass outside the functions above (nlpo.py's): a scoring pass without gradients, else the minibatch's forward
    common.models.Policy.forward = timer.wrap(counting_forward, grad_phase("scoring passes", "minibatch forward"))
    module.main(run_args)
    sync(device)
    update_marks.append((time.perf_counter(), dict(timer.seconds), timer.train_flops))

    # the timed updates: from the second rollout (the first is the warm-up) to the end, evaluation left out
    (t0, s0, f0), (t1, s1, f1) = update_marks[1], update_marks[-1]
    phases = {k: s1[k] - s0[k] for k in PHASES if k != "other"}
    wall = t1 - t0 - (s1["evaluation"] - s0["evaluation"])
    phases["other"] = wall - sum(phases.values())
    episodes = args.rollout_batch_size * args.updates
    train_flops = 3 * (f1 - f0)  # forward + backward: the backward costs two forwards (inputs' and weights' grads)
    train_seconds = phases["minibatch forward"] + phases["backward"] + phases["optimizer"]
    result = {
        "script": args.script,
        "model": args.model_name,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "bf16": bf16_enabled(torch.device(device), run_args.bf16),
        "batch": args.rollout_batch_size,
        "minibatch": args.minibatch_size,
        "response_length": args.response_length,
        "updates": args.updates,
        "samples_per_second": episodes / wall,
        "update_seconds": wall / args.updates,
        "phase_seconds_per_update": {k: v / args.updates for k, v in phases.items()},
        "train_tflops": train_flops / train_seconds / 1e12,
        # CUDA: the tensors' peak on the device; CPU: the process's peak resident memory (models, optimizer, imports)
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated() / 2**20
            if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        ),
    }
    if args.peak:
        dtype = torch.bfloat16 if result["bf16"] else torch.float32
        result["peak_tflops"] = measure_peak(device, dtype) / 1e12
        result["mfu"] = result["train_tflops"] / result["peak_tflops"]
    print(
        f"{args.script} {args.model_name} on {result['device']}{' bf16' if result['bf16'] else ''}: "
        f"{result['samples_per_second']:.1f} samples/s, {result['update_seconds']:.2f} s per update"
    )
    for k, v in result["phase_seconds_per_update"].items():
        print(f"  {k:18s} {v:8.3f} s  {100 * v / result['update_seconds']:5.1f}%")
    line = f"  training phase: {result['train_tflops']:.3g} TFLOP/s"
    if args.peak:
        line += f" of a measured {result['peak_tflops']:.3g} peak (MFU {100 * result['mfu']:.1f}%)"
    print(line)
    if args.json:
        records = load_records(args.json) + [result]  # read before the file is opened for writing
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        write_table(args)
    return result


def write_table(args) -> dict:
    """Print the table of every record in `--json`, and write it into `--page`'s region."""
    text = phase_table(load_records(args.json))
    print(text)
    if args.page:
        write_region(args.page, text, START, END)
    return {}


if __name__ == "__main__":
    main()
