"""What per-row seeded sampling costs in generation: `Policy.generate` with and without `seeds`.

    python benchmarks/generation.py                                             # built-in tiny GPT-2, CPU
    python benchmarks/generation.py --model-name runs/gpt2-small-shape --cuda   # GPT-2-small shape, GPU

With `seeds` (what every script passes), `SeededSampling` draws each row's Gumbel noise from its own
`torch.Generator`: one small random kernel per row per token. Without, transformers samples the whole batch
from the global generator in one call. Both generate exactly `--length` tokens per row (EOS is banned until
then), so the work is the same; the script alternates the two and reports the median wall time of each.
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.models import load_policy  # noqa: E402  (ROOT must be on sys.path first)
from common.tasks import make_task  # noqa: E402
from common.utils import bf16_autocast, pick_device  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-name", default="tiny-gpt2")
    p.add_argument("--batch", type=int, default=64, help="rows per generate call (ppo.py's rollout batch)")
    p.add_argument("--length", type=int, default=48, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant, alternating")
    p.add_argument("--cuda", action="store_true", help="run on the GPU, under bf16 autocast as the scripts do")
    args = p.parse_args(argv)
    device = pick_device(args.cuda)
    task = make_task("sentiment")
    policy = load_policy(args.model_name, task, device)
    ids, mask = policy.encode_prompts(task.train_prompts[: args.batch], task.max_prompt_tokens, device)
    autocast = bf16_autocast(device)

    def run(seeded: bool) -> float:
        seeds = list(range(args.batch)) if seeded else None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            policy.generate(ids, mask, args.length, args.length, seeds=seeds)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds = {"per-row seeds": [], "one global stream": []}
    run(True), run(False)  # warm-up
    for _ in range(args.repeats):
        for name in seconds:
            seconds[name].append(run(name == "per-row seeds"))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model_name}, {args.batch} rows x {args.length} new tokens, {where}:")
    for name, value in median.items():
        print(f"  {name:18s} {1000 * value:8.1f} ms per generate call ({1000 * value / args.length:.2f} ms per token)")
    print(f"  seeded / global: {median['per-row seeds'] / median['one global stream']:.2f}")
    return median


if __name__ == "__main__":
    main()
