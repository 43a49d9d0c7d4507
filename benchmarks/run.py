"""Benchmark runner: methods x tasks x seeds, then one Markdown table and one figure of learning curves.

Each (script, task) entry of benchmarks/config.toml runs once per seed, sequentially, as a child
process of the real CLI (`python ppo.py --task sentiment --seed 1 --output-dir ...`). From every run
it reads `summary.json` (held-out return before and after training, wall time, tokens per second)
and the TensorBoard scalars (`eval/return_mean` over training), measures the child's peak resident
memory (`os.wait4`), and writes

    benchmarks/results/benchmark.md     the table (mean +- std over seeds) and the command that made it
    benchmarks/results/benchmark.png    learning curves (needs matplotlib: pip install -r requirements-bench.txt)
    benchmarks/results/runs.json        every run's numbers and curves, for other tools
    benchmarks/README.md                the region between <!-- benchmark:start --> and <!-- benchmark:end -->

With `--results` it runs every entry on the sentiment task at its configured budget over seeds 1-5 and
writes docs/results.md instead (every method side by side on the same task and the same evaluation:
return, perplexity, ref_nll, grammatical, distinct-2, KL, wall time, memory; mean +- standard error) and
benchmarks/results/results.json. Every finished run is saved to the JSON at once, and `--resume` reuses
the runs it already holds (same script, task, seed and flags), so a killed benchmark loses one run at most.

Usage:
    python benchmarks/run.py --quick                 # small budgets, seeds 1-3: minutes on 2 CPU cores
    python benchmarks/run.py                         # the configured budgets (the scripts' defaults)
    python benchmarks/run.py --only ppo.py --seeds 3 --no-readme   # one method, table only
    python benchmarks/run.py --results --threads 1 --resume        # docs/results.md
    python benchmarks/run.py --help

A script that is missing or exits non-zero is listed under the table with its last output line;
the other entries still run. Runs' directories and logs go to benchmarks/results/runs/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


# ----------------------------------------------------------------------------------------------
# Running one child and reading what it wrote
# ----------------------------------------------------------------------------------------------
def run_child(cmd: list[str], log_path: str, cwd: str = ROOT, env: Optional[dict] = None) -> dict:
    """Run `cmd`, its stdout and stderr to `log_path`; return exit code, wall seconds and peak RSS.

    Peak RSS is the child's own `ru_maxrss` from `os.wait4`, so sequential runs never see each
    other's peaks (RUSAGE_CHILDREN would report the largest child so far)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except KeyboardInterrupt:
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": process.returncode,
        "process_seconds": time.perf_counter() - start,
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }  # Linux reports KiB


def find_run_dir(output_dir: str) -> Optional[str]:
    """The run directory a script created under `output_dir` (the newest one with a summary)."""
    if not os.path.isdir(output_dir):
        return None
    dirs = [os.path.join(output_dir, d) for d in os.listdir(output_dir)]
    dirs = [d for d in dirs if os.path.isfile(os.path.join(d, "summary.json"))]
    return max(dirs, key=os.path.getmtime) if dirs else None


def read_scalars(run_dir: str, prefixes: tuple[str, ...] = ("eval/",)) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run whose tag starts with one of `prefixes`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith(prefixes)
    }


def last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


# ----------------------------------------------------------------------------------------------
# Aggregation and formatting (pure functions, tested in tests/test_benchmarks.py)
# ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def fmt(values: list[float], digits: int, signed: bool = False, se: bool = False) -> str:
    """mean ± sample std (or ± standard error of the mean with `se`) of the finite values; n/a if none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    spread = std / math.sqrt(len(values)) if se else std
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f}" + (f" ± {spread:.{digits}f}" if len(values) > 1 else "")


def budget_of(summary: dict) -> str:
    """How long the run trained, in the script's own unit: summary.json's count, else its args'."""
    args = summary.get("args") or {}
    for source, key, unit in (
        (summary, "updates", "updates"),
        (summary, "steps", "steps"),
        (args, "total_updates", "updates"),
        (args, "total_steps", "steps"),
        (args, "queries", "queries"),
    ):
        if isinstance(source.get(key), (int, float)) and not isinstance(source.get(key), bool):
            n = source[key]
            return f"{n} {unit if n != 1 else unit[:-1]}"
    return "n/a"


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (script, task) over its successful seeds."""
    rows: dict[tuple[str, str], dict] = {}
    for r in runs:
        row = rows.setdefault((r["script"], r["task"]), {"script": r["script"], "task": r["task"], "runs": []})
        if r.get("status") == "ok":
            row["runs"].append(r)
    out = []
    for row in rows.values():
        ok = row["runs"]
        if not ok:
            continue

        def pick(path: str, ok: list[dict] = ok) -> list:
            return [_get(r["summary"], path) for r in ok]

        out.append(
            {
                "script": row["script"],
                "task": row["task"],
                "seeds": sorted(r["seed"] for r in ok),
                "budget": budget_of(ok[0]["summary"]),
                "initial": pick("initial/eval/return_mean"),
                "final": pick("final/eval/return_mean"),
                **{f"{when}_{name}": pick(f"{when}/eval/{name}") for when in ("initial", "final") for name in FLUENCY},
                "kl": [final_kl(r) for r in ok],
                "wall": pick("wall_seconds"),
                "tokens_per_second": pick("tokens_per_second"),
                "peak_rss_mib": [r["peak_rss_mib"] for r in ok],
            }
        )
    return out


FLUENCY = ("perplexity", "ref_nll", "grammatical", "distinct_2")  # the columns read beside the return


def final_kl(run: dict) -> Optional[float]:
    """The last logged `objective/kl` of an online method (PPO, NLPO: per-token KL of its rollouts to the
    starting model); None for the others (A-LoL's `objective/kl` is measured on dataset responses, a drift
    measure rather than a KL, docs/alol.md)."""
    curve = run.get("curves", {}).get("objective/kl")
    return curve[-1][1] if curve and run["script"] in ("ppo.py", "nlpo.py") else None


def _get(summary: dict, path: str) -> Optional[float]:
    """summary["final"]["eval/return_mean"] for path "final/eval/return_mean"; None if absent."""
    head, _, rest = path.partition("/")
    value = summary.get(head) if rest == "" else (summary.get(head) or {}).get(rest)
    return float(value) if isinstance(value, (int, float)) else None


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| script | task | budget | seeds | held-out return before | final held-out return | perplexity "
        "| grammatical | wall (s) | tokens/s | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['script']}` | {row['task']} | {row['budget']} | {seeds_text(row['seeds'])} "
            f"| {fmt(row['initial'], 3, signed=True)} | **{fmt(row['final'], 3, signed=True)}** "
            f"| {fmt(row['final_perplexity'], 2)} | {fmt(row['final_grammatical'], 2)} "
            f"| {fmt(row['wall'], 0)} | {fmt(row['tokens_per_second'], 0)} | {fmt(row['peak_rss_mib'], 0)} |"
        )
    return "\n".join(lines)


def seeds_text(seeds: list[int]) -> str:
    return (
        f"{seeds[0]}-{seeds[-1]}"
        if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 1
        else ",".join(map(str, seeds))
    )


def results_table(rows: list[dict]) -> str:
    """docs/results.md's table: the starting model, then every method, final metrics as mean ± s.e."""
    lines = [
        "| method | budget | seeds | return | perplexity | ref_nll | grammatical | distinct-2 | KL to start "
        "| wall (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if rows:  # every method starts from the same model; ppo.py's step-0 evaluation samples it plainly
        start = next((r for r in rows if r["script"] == "ppo.py"), rows[0])
        lines.append(
            f"| starting model (`{start['script']}` at step 0) | - | {seeds_text(start['seeds'])} "
            f"| {fmt(start['initial'], 3, signed=True, se=True)} "
            + "".join(f"| {fmt(start['initial_' + n], 2, se=True)} " for n in FLUENCY)
            + "| 0 | - | - |"
        )
    for row in rows:
        lines.append(
            f"| `{row['script']}` | {row['budget']} | {seeds_text(row['seeds'])} "
            f"| **{fmt(row['final'], 3, signed=True, se=True)}** "
            + "".join(f"| {fmt(row['final_' + n], 2, se=True)} " for n in FLUENCY)
            + f"| {fmt(row['kl'], 3, se=True)} | {fmt(row['wall'], 0, se=True)} "
            f"| {fmt(row['peak_rss_mib'], 0, se=True)} |"
        )
    return "\n".join(lines)


def problems_text(runs: list[dict]) -> str:
    """One line per entry that did not produce a result."""
    seen, lines = set(), []
    for r in runs:
        if r.get("status") == "ok" or (r["script"], r["task"], r["status"]) in seen:
            continue
        seen.add((r["script"], r["task"], r["status"]))
        detail = f": {r['detail']}" if r.get("detail") else ""
        lines.append(f"- `{r['script']}` on {r['task']}: {r['status']}{detail}")
    return ("Not in the table:\n\n" + "\n".join(lines)) if lines else ""


def replace_region(text: str, body: str, start: str = START, end: str = END) -> str:
    """`text` with everything between the `start` and `end` markers replaced by `body`."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"markers {start} ... {end} not found (in this order)")
    return text[: i + len(start)] + "\n" + body.strip() + "\n" + text[j:]


def write_readme_region(body: str, start: str = START, end: str = END) -> None:
    """Put `body` between the `start` and `end` markers of benchmarks/README.md (the generated table's region)."""
    path = os.path.join(HERE, "README.md")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(replace_region(text, body, start, end))


# ----------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------
def plot_curves(runs: list[dict], path: str) -> bool:
    """One panel per (script, task): held-out return over training, mean +- std over seeds; and a last panel
    with every run's final return against its fluency (grammatical where measured, else perplexity)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install --no-deps -r requirements-bench.txt); no plot", flush=True)
        return False
    import numpy as np

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if r.get("status") == "ok" and r["curves"].get("eval/return_mean"):
            groups.setdefault((r["script"], r["task"]), []).append(r)
    if not groups:
        return False
    n = len(groups) + 1  # the last panel: return against fluency, one point per run
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 6.0), 3.2 * rows + 0.3), squeeze=False)
    # one panel per group; the grid has more (the scatter panel below, and blanks): zip stops at the groups
    for ax, ((script, task), group) in zip(axes.flat, groups.items(), strict=False):
        steps = sorted(set.intersection(*(set(s for s, _ in r["curves"]["eval/return_mean"]) for r in group)))
        values = np.array([[dict(r["curves"]["eval/return_mean"])[s] for s in steps] for r in group])
        mean = values.mean(0)
        std = values.std(0, ddof=1) if len(group) > 1 else np.zeros_like(mean)
        ax.plot(steps, mean, marker="o", markersize=3, label=f"{len(group)} seed{'s' * (len(group) > 1)}")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
        ax.axhline(mean[0], color="grey", linestyle=":", linewidth=1)
        unit = budget_of(group[0]["summary"]).split(" ")[-1]
        ax.set_title(f"{script} on {task}", fontsize=10)
        ax.set_xlabel(unit if unit != "n/a" else "step")
        ax.set_ylabel("eval/return_mean")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = list(axes.flat)[n - 1]
    fluency = (
        "eval/grammatical"
        if any("eval/grammatical" in r["summary"]["final"] for g in groups.values() for r in g)
        else "eval/perplexity"
    )
    starts = []
    for (script, task), group in groups.items():
        points = [(r["summary"]["final"].get(fluency), r["summary"]["final"]["eval/return_mean"]) for r in group]
        points = [(x, y) for x, y in points if x is not None]
        starts += [
            (r["summary"]["initial"].get(fluency), r["summary"]["initial"]["eval/return_mean"])
            for r in group
            if r["summary"]["initial"].get(fluency) is not None
        ]
        if points:
            ax.scatter(*zip(*points, strict=True), s=18, label=f"{script} ({task})")
    if starts:
        ax.scatter(*zip(*starts, strict=True), s=30, marker="x", color="black", label="before training")
    ax.set_title(f"final return against {fluency.split('/')[1]} (one point per run)", fontsize=10)
    ax.set_xlabel(fluency)
    ax.set_ylabel("eval/return_mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        "held-out return (mean ± std over seeds; dotted: before training), and return beside fluency", fontsize=10
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def load_config(path: str) -> list[dict]:
    with open(path, "rb") as f:
        entries = tomllib.load(f).get("entry", [])
    for e in entries:
        if not {"script", "task"} <= set(e):
            raise SystemExit(f"error: {path}: every [[entry]] needs `script` and `task`, got {e}")
    return entries


def machine_line() -> str:
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, 1/5/15-min load {' '.join(load)}"
    )


def save_runs(path: str, command: str, machine: list[str], runs: list[dict]) -> None:
    """Every run's record (flags, numbers, curves) as JSON, replaced atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"command": command, "machine": machine, "runs": runs}, f, indent=1)
    os.replace(path + ".tmp", path)


def changes_text(rows: list[dict]) -> str:
    """Per method, what training changed, as paired differences final - initial over its seeds (mean ± s.e.):
    the reward gain next to what it cost in fluency and diversity."""
    lines = []
    for row in rows:
        parts = []
        for name, label, digits in (
            ("", "return", 3),
            ("_perplexity", "perplexity", 2),
            ("_ref_nll", "ref_nll", 2),
            ("_grammatical", "grammatical", 3),
            ("_distinct_2", "distinct-2", 3),
        ):
            before, after = row["initial" + name], row["final" + name]
            pairs = [(b, a) for b, a in zip(before, after, strict=True) if b is not None and a is not None]
            if pairs:
                start = mean_std([b for b, _ in pairs])[0]
                parts.append(
                    f"{label} {start:.{digits}f} -> {mean_std([a for _, a in pairs])[0]:.{digits}f} "
                    f"({fmt([a - b for b, a in pairs], digits, signed=True, se=True)})"
                )
        lines.append(f"- `{row['script']}`: " + "; ".join(parts))
    return "\n".join(lines)


def write_results_page(
    path: str,
    rows: list[dict],
    runs: list[dict],
    command: str,
    machine_before: str,
    machine_after: str,
    threads: Optional[int],
) -> None:
    """docs/results.md: generated, never edited by hand."""
    when = time.strftime("%Y-%m-%d")
    text = f"""# Results: every method on the same task and the same evaluation

<!-- Generated by `{command}`; do not edit by hand. -->

Every method on the embedded `sentiment` task, from the same starting model (`tiny-gpt2`), at the budget
its script uses by default (`alol.py` with `--ref-epochs 0`, so that it too starts from the model as loaded;
benchmarks/config.toml), evaluated by the same function (`common/tasks.py` `evaluate`) on the same 256
held-out prompts with the same per-prompt sampling seeds. Final evaluation, mean ± standard error over
seeds. Made by `{command}` ({when}; {machine_before.split(", 1/5/15")[0]}; {threads_text(threads)};
1/5/15-minute load when the first run started: {machine_before.split("load ")[-1]}; when the page was
written: {machine_after.split("load ")[-1]}). Wall times grow with the load; the metrics do not.

{results_table(rows)}

{problems_text(runs)}

What training changed, per method: step 0 -> final, and in brackets the paired difference over its seeds
(mean ± s.e.). The starting points differ where a method's deployed decoding differs from plain
sampling at step 0 (NLPO samples through its top-p mask; ILQL's heads start at zero, so its step 0 is
the starting model's).

{changes_text(rows)}

How to read it (every metric is defined in [evaluation.md](evaluation.md)):

- **return**: the task's reward, VADER compound of the continuation in [-1, 1]. Higher is better.
- **perplexity**: of the held-out reviews' own second halves under the trained policy. Lower means the
  policy still assigns the grammar's text high probability; a rise is language lost to the reward.
- **ref_nll**: nats per token of the policy's own samples under the starting model. The starting model
  scores its own samples at its entropy; more means the samples moved away from what it would write.
- **grammatical**: the fraction of prompt + response texts that the task's grammar accepts, exactly.
- **distinct-2**: distinct word bigrams / all bigrams over the 256 responses; low is repetitive text.
- **KL to start**: the last `objective/kl` of the online methods (per-token KL of their rollouts to the
  frozen starting model, the quantity their KL penalty controls); the offline methods have no such term.
- **wall**: the script's `wall_seconds`; **peak RSS**: the process's peak resident memory.
"""
    with open(path, "w") as f:
        f.write(text.replace("\n\n\n", "\n\n"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="run each entry's `quick` budget instead of its `flags`")
    p.add_argument("--seeds", type=int, default=None, help="run seeds 1..SEEDS (default 3; 5 with --results)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=1,
        help="start at this seed instead of 1 (to split the seeds of a long benchmark over processes)",
    )
    p.add_argument("--only", default="", help="comma-separated scripts or script:task pairs to run (default: all)")
    p.add_argument("--config", default=os.path.join(HERE, "config.toml"), help="the entries to run")
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"), help="where the table, plot and runs go")
    p.add_argument("--extra", default="", help="flags appended to every run, e.g. --extra='--eval-episodes 16'")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="set OMP_NUM_THREADS for every run (default: inherit); 1 is far faster on a busy machine",
    )
    p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md's benchmark region")
    p.add_argument(
        "--results",
        action="store_true",
        help="every entry on the sentiment task, seeds 1-5 unless --seeds: write docs/results.md and "
        "results.json (not benchmarks/README.md)",
    )
    p.add_argument("--page", default=os.path.join(ROOT, "docs", "results.md"), help="where --results writes its page")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished runs the results JSON already holds (same script, task, seed, flags)",
    )
    return p.parse_args(argv)


def child_env(threads: Optional[int]) -> dict:
    """The children's environment: ours, with OMP_NUM_THREADS pinned when asked."""
    return {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def threads_text(threads: Optional[int]) -> str:
    return (
        f"{threads} intra-op thread{'s' * (threads != 1)} per run"
        if threads
        else f"torch's default intra-op threads ({os.environ.get('OMP_NUM_THREADS') or 'one per core'})"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.results and args.quick:
        raise SystemExit("error: --results reports the configured budgets; it does not take --quick")
    if args.seeds is None:
        args.seeds = 5 if args.results else 3
    if args.seeds <= 0 or (args.threads is not None and args.threads <= 0):
        raise SystemExit(f"error: --seeds and --threads must be positive, got {args.seeds} and {args.threads}")
    entries = load_config(args.config)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        entries = [e for e in entries if e["script"] in wanted or f"{e['script']}:{e['task']}" in wanted]
        if not entries:
            raise SystemExit(f"error: --only {args.only!r} matches no entry of {args.config}")
    if args.results:
        entries = [e for e in entries if e["task"] == "sentiment"]
    command = "python benchmarks/run.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    results_dir = os.path.abspath(args.results_dir)
    runs_root = os.path.join(results_dir, "runs")
    extra = shlex.split(args.extra)
    json_path = os.path.join(results_dir, "results.json" if args.results else "runs.json")
    previous, previous_machine = {}, []
    if args.resume and os.path.isfile(json_path):
        with open(json_path) as f:
            saved = json.load(f)
        previous = {
            (r["script"], r["task"], r["seed"], tuple(r["flags"])): r for r in saved["runs"] if r.get("status") == "ok"
        }
        previous_machine = saved.get("machine", [])
    machine_before = machine_line()
    print(
        f"benchmark: {len(entries)} entries x {args.seeds} seeds{' (quick)' if args.quick else ''}; {machine_before}",
        flush=True,
    )

    runs = []
    for entry in entries:
        script, task = entry["script"], entry["task"]
        flags = list(entry.get("quick", []) if args.quick else entry.get("flags", []))
        for seed in range(args.first_seed, args.seeds + 1):
            record = {"script": script, "task": task, "seed": seed, "flags": flags + extra}
            done = previous.get((script, task, seed, tuple(flags + extra)))
            if done is not None:  # --resume: this run finished in an earlier invocation
                runs.append(done)
                print(f"  {script} {task} seed {seed}: kept from {os.path.relpath(json_path, ROOT)}", flush=True)
                continue
            runs.append(record)
            if not os.path.isfile(os.path.join(ROOT, script)):
                record.update(status="missing", detail=f"{script} does not exist yet")
                print(f"  {script} {task}: missing, skipped", flush=True)
                break
            tag = f"{os.path.splitext(script)[0]}__{task}__{seed}"
            output_dir = os.path.join(runs_root, tag)
            shutil.rmtree(output_dir, ignore_errors=True)
            cmd = [
                sys.executable,
                script,
                "--task",
                task,
                "--seed",
                str(seed),
                "--output-dir",
                output_dir,
                *flags,
                *extra,
            ]
            print(f"  {script} {task} seed {seed} ...", end=" ", flush=True)
            result = run_child(cmd, os.path.join(runs_root, f"{tag}.log"), env=child_env(args.threads))
            record.update(result, log=os.path.relpath(os.path.join(runs_root, f"{tag}.log"), ROOT))
            run_dir = find_run_dir(output_dir)
            if result["returncode"] != 0 or run_dir is None:
                why = "exit code " + str(result["returncode"]) if result["returncode"] != 0 else "no summary.json"
                record.update(status="failed", detail=f"{why}: {last_line(os.path.join(runs_root, f'{tag}.log'))}")
                print(f"FAILED ({record['detail']})", flush=True)
                break  # a broken script fails the same way on every seed
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
            record.update(status="ok", summary=summary, curves=read_scalars(run_dir, ("eval/", "objective/kl")))
            final = _get(summary, "final/eval/return_mean")
            print(
                f"final {final if final is None else round(final, 3)}, {result['process_seconds']:.0f}s, "
                f"{result['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
            save_runs(json_path, command, [*previous_machine[:1], machine_before], runs)  # a kill keeps every run

    rows = aggregate(runs)
    machine_after = machine_line()
    save_runs(json_path, command, [*previous_machine[:1], machine_before, machine_after], runs)
    if args.results:  # the load when the first kept run started, if any, tells what the wall times were made under
        write_results_page(
            args.page, rows, runs, command, (previous_machine or [machine_before])[0], machine_after, args.threads
        )
        print("\n" + results_table(rows), flush=True)
        print(f"\nwrote {os.path.relpath(args.page, ROOT)} and {os.path.relpath(json_path, ROOT)}", flush=True)
        return 0 if rows else 1
    plotted = plot_curves(runs, os.path.join(results_dir, "benchmark.png"))
    table = markdown_table(rows) if rows else "(no run finished)"
    problems = problems_text(runs)
    when = time.strftime("%Y-%m-%d")
    readme_png = os.path.relpath(os.path.join(results_dir, "benchmark.png"), HERE)  # from benchmarks/README.md
    body = "\n\n".join(
        x
        for x in [
            f"`{command}` ({when}; {machine_before.split(', 1/5/15')[0]}; {threads_text(args.threads)}; "
            "load before/after: "
            f"{machine_before.split('load ')[-1]} / {machine_after.split('load ')[-1]}):",
            table,
            "Held-out return is `eval/return_mean` (the task score of the method's deployed decoding on held-out "
            "prompts or games), mean ± sample std over seeds; wall is the script's own `wall_seconds` (from its run "
            "directory's creation to the summary: training and evaluations, not imports; runs.json also keeps each "
            "whole process's seconds); tokens/s is the script's own `summary.json` figure; peak RSS is the process's "
            "maximum resident memory.",
            problems,
            f"![held-out return during training]({readme_png})" if plotted else "",
        ]
        if x
    )
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "benchmark.md"), "w") as f:
        f.write("# Benchmark\n\n" + body.replace(f"]({readme_png})", "](benchmark.png)") + "\n")
    if not args.no_readme:
        write_readme_region(body)
    print("\n" + table + ("\n\n" + problems if problems else ""), flush=True)
    print(
        f"\nwrote {os.path.relpath(results_dir, ROOT)}/benchmark.md, runs.json"
        f"{', benchmark.png' if plotted else ''}{'' if args.no_readme else ' and benchmarks/README.md'}",
        flush=True,
    )
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
