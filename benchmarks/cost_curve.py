"""What a ppo.py run costs: samples/s and peak memory against model size and response length.

    python benchmarks/cost_curve.py                 # tiny GPT-2 and GPT-2-small shape x lengths 24, 48, 96 (CPU)
    python benchmarks/cost_curve.py --table-only    # the table and figure from the JSON, nothing run

Each point is one `benchmarks/ppo_phases.py` run in its own process (so its peak memory is its own): one
warm-up update, then `--updates` timed ones, every response exactly as long as asked (`--min-response-length`
equal to the length), evaluation left out. Points already in the JSON are skipped, so a killed sweep resumes.
The GPT-2-small-shape model is the one `benchmarks/gpt2_small.py` writes (random weights, 50,257-token BPE).
Writes `results/cost_curve.json`, the table into benchmarks/README.md's `cost-curve` region and
`results/cost_curve.png` (with matplotlib: pip install --no-deps -r requirements-bench.txt).
"""

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from resumable import load_records, write_region  # noqa: E402

START, END = "<!-- cost-curve:start -->", "<!-- cost-curve:end -->"
# model -> (rollout batch, minibatch): GPT-2-small shape takes a smaller batch so each point stays minutes on a CPU
SHAPES = {"tiny-gpt2": (64, 16), "runs/gpt2-small-shape": (8, 8)}
LENGTHS = (24, 48, 96)


def table(records: list[dict]) -> str:
    lines = [
        "| model | device | batch / minibatch | response length | samples/s | s per update | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["device"], r["model"] != "tiny-gpt2", r["response_length"])):
        memory = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        lines.append(
            f"| {os.path.basename(r['model'])} | {r['device']} | {r['batch']} / {r['minibatch']} "
            f"| {r['response_length']} | {r['samples_per_second']:.3g} | {r['update_seconds']:.3g} | {memory} |"
        )
    return "\n".join(lines)


def figure(records: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install --no-deps -r requirements-bench.txt); no figure", flush=True)
        return
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({(r["model"], r["device"]) for r in records}):
        points = sorted((r for r in records if (r["model"], r["device"]) == name), key=lambda r: r["response_length"])
        lengths = [r["response_length"] for r in points]
        label = f"{os.path.basename(name[0])}, {name[1]}"
        speed.plot(lengths, [r["samples_per_second"] for r in points], "o-", label=label)
        memory.plot(lengths, [r["peak_memory_mib"] or float("nan") for r in points], "o-", label=label)
    for ax, ylabel in ((speed, "samples/s (log)"), (memory, "peak memory, MiB (log)")):
        ax.set_xlabel("response length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_xticks(LENGTHS)
        ax.grid(alpha=0.3)
    speed.legend(fontsize=8)
    fig.suptitle("ppo.py: cost of an update against model size and response length")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}", flush=True)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(SHAPES), help="comma-separated: tiny-gpt2 and/or a local model dir")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--updates", type=int, default=1, help="timed updates per point (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (OMP_NUM_THREADS) per run")
    p.add_argument("--results", default=os.path.join(HERE, "results", "cost_curve.json"))
    p.add_argument("--page", default=os.path.join(HERE, "README.md"))
    p.add_argument("--figure", default=os.path.join(HERE, "results", "cost_curve.png"))
    p.add_argument("--table-only", action="store_true", help="run nothing: the table and figure from the JSON")
    args, extra = p.parse_known_args(argv)  # the rest go to every ppo_phases.py run (e.g. --bf16 on)
    if not args.table_only:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        for model in args.models.split(","):
            batch, minibatch = SHAPES.get(model, (8, 8))
            for length in map(int, args.lengths.split(",")):
                if any(r["model"] == model and r["response_length"] == length for r in load_records(args.results)):
                    continue  # measured already (delete its record to measure again)
                print(f"cost curve: {model}, response length {length}", flush=True)
                cmd = [sys.executable, os.path.join(HERE, "ppo_phases.py"), f"--model-name={model}"]
                cmd += [f"--rollout-batch-size={batch}", f"--minibatch-size={minibatch}"]
                cmd += [f"--response-length={length}", f"--updates={args.updates}", f"--json={args.results}"]
                subprocess.run([*cmd, *extra], cwd=ROOT, env=env, check=True)
    records = load_records(args.results)
    text = table(records)
    print(text)
    if args.page:
        write_region(args.page, text, START, END)
    if records and args.figure:
        figure(records, args.figure)
    return records


if __name__ == "__main__":
    main()
