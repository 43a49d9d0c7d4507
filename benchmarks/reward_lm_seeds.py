"""The results table of docs/reward_lm.md: every agent on seeds 101-120 (never used to choose a setting), plus TS
with a separate reward model; resumable.

    python benchmarks/reward_lm_seeds.py --jobs 2                # every seed, two runs at a time
    python benchmarks/reward_lm_seeds.py --table-only --page     # the table from the JSON, into docs/reward_lm.md

Each seed is one `reward_lm.py --seed S --num-seeds 1` run with the script's defaults and the agents below, in a
subprocess, recorded in `--results` (benchmarks/results/reward_lm.json) the moment it ends. A seed's agents share
its environment and pretrained LM, and no agent's run depends on another's, so these per-seed runs are the runs of
`python reward_lm.py --seed 101 --num-seeds 20` (tests/test_scaling.py checks that a simulation logs the same
alone or among others).

`records` in the JSON: one per agent, over the seeds that finished: seeds reaching 95% of the optimum, queries to it
(median, min, max; None = never), the final true approval of the exploit policy (beta = inf) and of the LM's own
policy conditioned on approval (beta = 1), cumulative regret and the fit error, each as mean and s.e. over seeds.
`claims`: paired differences over the same seeds.
"""

import argparse
import csv
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from resumable import add_queue_arguments, load, mean_se, run_queue, save, summary_of, write_region  # noqa: E402

AGENTS = ("ts", "greedy", "passive", "ts_rm")
NAMES = {
    "ts": "`ts` (Thompson sampling, the method)",
    "greedy": "`greedy` (no exploration)",
    "passive": "`passive` (queries sampled from the pretrained LM)",
    "ts_rm": "`ts_rm` (TS, a separate reward model)",
}
DOC = os.path.join(ROOT, "docs", "reward_lm.md")
START, END = "<!-- reward_lm table: start -->", "<!-- reward_lm table: end -->"


def command(seed: int, opts) -> list[str]:
    return [
        sys.executable,
        os.path.join(ROOT, "reward_lm.py"),
        "--seed",
        str(seed),
        "--num-seeds",
        "1",
        "--agents",
        *opts.agents,
        "--exp-name",
        f"seed{seed}",
        "--no-save-model",
        "--progress-every",
        "1000",
        "--output-dir",
        os.path.join(opts.output_dir, f"seed{seed}"),
        *opts.extra,
    ]


def record_run(seed: int, opts, seconds: float) -> dict:
    """Per agent: queries to target, final values, regret, and from curves.csv the final fit error and how many
    queries asked about the best response."""
    out = os.path.join(opts.output_dir, f"seed{seed}")
    summary = summary_of(out)
    (run_dir,) = [d for d in os.listdir(out) if os.path.exists(os.path.join(out, d, "summary.json"))]
    with open(os.path.join(out, run_dir, "curves.csv")) as f:
        rows = list(csv.DictReader(f))
    agents = {}
    for agent, s in summary["agents"].items():
        curve = [r for r in rows if r["agent"] == agent]
        fit = float(curve[-1]["eval/fit_error"])
        agents[agent] = {
            "queries_to_target": s["queries_to_target"][str(seed)],
            "final_value": s["final_value"],
            "final_value_beta1": s["final_value_beta1"],
            "cum_regret": s["final_cum_regret"],
            "fit_error": None if math.isnan(fit) else fit,
            "best_queries": round(
                sum(
                    float(r["objective/frac_queried_best"]) * opts.per_round
                    for r in curve
                    if r["objective/frac_queried_best"]
                )
            ),
        }
    return {
        "seed": seed,
        "flags": opts.extra,
        "seconds": round(seconds),
        "opt_value": summary["opt_value"],
        "agents": agents,
    }


def aggregate(results: dict, agents: list[str], seeds: list[int], budget: int) -> tuple[list[dict], list[dict]]:
    runs = [results["runs"][str(s)] for s in seeds if str(s) in results["runs"]]
    runs = [r for r in runs if all(a in r["agents"] for a in agents)]
    if not runs:
        return [], []
    complete = [r["seed"] for r in runs]
    records = []
    for agent in agents:
        per_seed = [r["agents"][agent] for r in runs]
        q = [p["queries_to_target"] if p["queries_to_target"] is not None else math.inf for p in per_seed]
        record = {
            "agent": agent,
            "seeds": complete,
            "seeds_reached": sum(math.isfinite(v) for v in q),
            "queries_median": float(np.median(q)),
            "queries_min": min(q),
            "queries_max": max(q),
            "queries_per_seed": [None if math.isinf(v) else v for v in q],
            "budget": budget,
        }
        for key in ("final_value", "final_value_beta1", "cum_regret", "best_queries"):
            record[f"{key}_mean"], record[f"{key}_se"] = mean_se([p[key] for p in per_seed])
        fits = [p["fit_error"] for p in per_seed if p["fit_error"] is not None]
        record["fit_error_mean"] = float(np.mean(fits)) if fits else None
        for key in ("queries_median", "queries_min", "queries_max"):
            record[key] = None if math.isinf(record[key]) else record[key]
        records.append(record)

    def paired(a: str, b: str, metric: str = "final_value") -> dict:
        mean, se = mean_se([r["agents"][a][metric] - r["agents"][b][metric] for r in runs])
        return {
            "a": a,
            "b": b,
            "metric": metric,
            "difference_mean": mean,
            "difference_se": se,
            "a_wins": sum(r["agents"][a][metric] > r["agents"][b][metric] for r in runs),
            "ties": sum(r["agents"][a][metric] == r["agents"][b][metric] for r in runs),
            "seeds": complete,
        }

    wanted = [
        ("TS ends above greedy", "ts", "greedy"),
        ("TS ends above passive", "ts", "passive"),
        ("one LM in all three roles vs a separate reward model", "ts", "ts_rm"),
    ]
    claims = [{"claim": c, **paired(a, b)} for c, a, b in wanted if a in agents and b in agents]
    return records, claims


def table(records: list[dict], opt_value: float) -> str:

    def fmt(v, budget: int) -> str:
        return f"{v:.0f}" if v is not None else f"> {budget}"

    lines = [
        "| agent | seeds reaching 95% | queries to 95%: median [min, max] | final value, beta = inf | "
        "beta = 1 (the LM's own policy) | cumulative regret | queries to the best response | fit error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        b = r["budget"]
        fit = f"{r['fit_error_mean']:.2f}" if r["fit_error_mean"] is not None else "-"
        lines.append(
            f"| {NAMES.get(r['agent'], r['agent'])} | {r['seeds_reached']}/{len(r['seeds'])} | "
            f"{fmt(r['queries_median'], b)} [{fmt(r['queries_min'], b)}, {fmt(r['queries_max'], b)}] | "
            f"{r['final_value_mean']:.3f} ± {r['final_value_se']:.3f} "
            f"({r['final_value_mean'] / opt_value:.0%}) | {r['final_value_beta1_mean']:.3f} ± "
            f"{r['final_value_beta1_se']:.3f} | {r['cum_regret_mean']:.0f} ± {r['cum_regret_se']:.0f} | "
            f"{r['best_queries_mean']:.0f} | {fit} |"
        )
    return "\n".join(lines)


def claims_table(claims: list[dict]) -> str:
    lines = [
        "| comparison | final value difference (mean ± s.e. over seeds) | seeds where the first is higher (ties) |",
        "|---|---|---|",
    ]
    for c in claims:
        lines.append(
            f"| {c['claim']} | {c['difference_mean']:+.3f} ± {c['difference_se']:.3f} | "
            f"{c['a_wins']}/{len(c['seeds'])} ({c['ties']}) |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(101, 121)))
    parser.add_argument("--queries", type=int, default=4096, help="the budget (reward_lm.py --queries)")
    parser.add_argument("--per-round", type=int, default=64, help="queries per round (reward_lm.py default)")
    add_queue_arguments(
        parser,
        "reward_lm.py",
        os.path.join(ROOT, "runs", "reward_lm_seeds"),
        os.path.join(ROOT, "benchmarks", "results", "reward_lm.json"),
        DOC,
        ROOT,
    )
    return parser.parse_args(argv)


def main() -> None:
    opts = parse_args()
    results = load(opts.results)
    if not opts.table_only:
        todo = [(str(s), command(s, opts)) for s in opts.seeds]
        run_queue(
            todo,
            lambda key, log, seconds: record_run(int(key), opts, seconds),
            results,
            opts.results,
            opts.output_dir,
            ROOT,
            opts.jobs,
            opts.threads,
        )
    records, claims = aggregate(results, opts.agents, opts.seeds, opts.queries)
    results["records"], results["claims"] = records, claims
    save(opts.results, results)
    opt_values = [r["opt_value"] for r in results["runs"].values()]
    text = (
        table(records, float(np.mean(opt_values))) + "\n\n" + claims_table(claims)
        if records
        else "(no seed has finished yet)"
    )
    print(text)
    if opts.page:
        write_region(opts.page, text, START, END)


if __name__ == "__main__":
    main()
