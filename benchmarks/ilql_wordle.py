"""The Wordle table of docs/ilql.md: BC, %BC and ILQL on two offline datasets, several seeds, resumable.

    python benchmarks/ilql_wordle.py                                  # every dataset, method and seed
    python benchmarks/ilql_wordle.py --datasets per_move --jobs 2    # two runs at a time, one thread each
    python benchmarks/ilql_wordle.py --table-only --page             # the table from the JSON, into docs/ilql.md
    python benchmarks/ilql_wordle.py --openers                       # who opens the datasets' games (no training)

Each (dataset, method, seed) is one `ilql.py --task wordle` run in a subprocess. A finished run is recorded in
`--results` (benchmarks/results/ilql_wordle.json) the moment it ends, with its final metrics and its evaluation
curve, so an interrupted benchmark resumes where it stopped: a run already in the JSON is not trained again.

Datasets (docs/ilql.md, "The Wordle task"): `per_move` draws the player of every move (expert or repeat, 50/50),
so bad moves sit in every game; `per_game` draws one player per game, so filtering the best games removes every
bad move. Methods: `bc` (`--beta 0`), `pct_bc_F` (`--beta 0 --top-fraction F/100`) and `ilql` (the defaults).

The records the table is built from (`records` in the JSON): one per dataset and method, with the mean over seeds
of each run's final return and its standard error over seeds (`return_se`), win, repeat and non-word rates, plus
the scripted expert on the same games and each dataset's own mean return. Greedy decoding and the expert are
deterministic, so the evaluation plays each of the words in play once (`--eval-episodes`, 200).
"""

import argparse
import os
import random
import re
import sys
from collections import Counter

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# E402 on purpose (here and below): these import only once ROOT and benchmarks/ are on sys.path
from common import wordle  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resumable import add_queue_arguments, load, mean_se, run_queue, save, summary_of, write_region  # noqa: E402

DATASETS = {"per_move": "expert=0.5,repeat=0.5", "per_game": "game:expert=0.5,repeat=0.5"}
METHODS = {
    "ilql": [],
    "bc": ["--beta", "0"],
    "pct_bc_10": ["--beta", "0", "--top-fraction", "0.1"],
    "pct_bc_25": ["--beta", "0", "--top-fraction", "0.25"],
    "pct_bc_50": ["--beta", "0", "--top-fraction", "0.5"],
}
BETAS = (0, 1, 4, 16, 64)
METRICS = ("return_mean", "win_rate", "mean_guesses", "repeat_rate", "nonword_rate")
DOC = os.path.join(ROOT, "docs", "ilql.md")
START, END = "<!-- ilql_wordle table: start -->", "<!-- ilql_wordle table: end -->"


def command(dataset: str, method: str, seed: int, opts) -> list[str]:
    return [
        sys.executable,
        os.path.join(ROOT, "ilql.py"),
        "--task",
        "wordle",
        "--seed",
        str(seed),
        "--wordle-data",
        DATASETS[dataset],
        "--wordle-vocab",
        str(opts.vocab),
        "--total-steps",
        str(opts.steps),
        "--eval-every",
        str(opts.eval_every),
        "--eval-episodes",
        str(opts.eval_episodes),
        "--print-every",
        str(opts.eval_every),
        "--exp-name",
        f"{dataset}_{method}_{seed}",
        "--no-save-model",
        "--eval-betas",
        *map(str, BETAS),  # ILQL runs: the beta sweep on the trained networks (no retraining)
        "--output-dir",
        os.path.join(opts.output_dir, f"{dataset}_{method}_{seed}"),
        *METHODS[method],
        *opts.extra,
    ]


def log_lines(text: str) -> dict:
    """What a run's log adds to its summary: the evaluation curve, and for ILQL the final beta sweep (`--eval-betas`,
    the same networks decoded at each beta) as [return, win, repeat rate] and pi_beta under the no-repeat oracle
    (`wordle.NoRepeat`) as [return, win]."""
    curve = [[int(s), float(r)] for s, r in re.findall(r"eval @ step (\d+): return ([-+.\d]+)", text)]
    number = r"([-+.\d]+)"
    sweep = {
        b: [float(r), float(w), float(p)]
        for b, r, w, p in re.findall(
            rf"^beta ([\d.]+): return {number} \+- [.\d]+ \| win rate {number} \| repeat rate {number}", text, re.M
        )
    }
    oracle = re.search(rf"oracle\): return {number} \+- [.\d]+ \| win rate {number}", text)
    return {
        "curve": curve,
        "beta_sweep": sweep,
        "no_repeat_oracle": [float(x) for x in oracle.groups()] if oracle else None,
    }


def finished_run(dataset: str, method: str, seed: int, opts, log_path: str, seconds: float) -> dict:
    """The record of a finished run: its final metrics, and what its log adds (`log_lines`)."""
    final = summary_of(os.path.join(opts.output_dir, f"{dataset}_{method}_{seed}"))["final"]
    with open(log_path) as f:
        from_log = log_lines(f.read())
    return {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "steps": opts.steps,
        "flags": opts.extra,
        "seconds": round(seconds),
        **{m: final[f"eval/{m}"] for m in METRICS},
        **from_log,
    }


def train(opts, results: dict) -> None:
    todo = [
        (f"{d}/{m}/{s}", command(d, m, s, opts))  # whole seeds first
        for s in opts.seeds
        for d in opts.datasets
        for m in opts.methods
    ]
    run_queue(
        todo,
        lambda key, log_path, seconds: finished_run(
            *key.split("/")[:2], int(key.split("/")[2]), opts, log_path, seconds
        ),
        results,
        opts.results,
        opts.output_dir,
        ROOT,
        opts.jobs,
        opts.threads,
    )


def aggregate(opts, results: dict) -> list[dict]:
    """One record per dataset and method over the runs in the JSON, plus the expert and the datasets' own."""
    wordle.use_words(opts.vocab)
    games = wordle.play(
        wordle.eval_answers(opts.eval_episodes), lambda gs: [wordle.expert(g, random.Random(0)) for g in gs]
    )
    expert = wordle.game_metrics(games)
    records = [
        {
            "dataset": "-",
            "method": "expert",
            "seeds": [],
            "steps": 0,
            "return_se": 0.0,
            **{m: expert[f"eval/{m}"] for m in METRICS},
        }
    ]
    for dataset, spec in DATASETS.items():
        data = wordle.game_metrics(wordle.offline_games(spec, 4096, 1))
        records.append(
            {
                "dataset": dataset,
                "method": "data",
                "seeds": [1],
                "steps": 0,
                "return_se": data["eval/return_std"] / np.sqrt(4096),
                **{m: data[f"eval/{m}"] for m in METRICS},
            }
        )
        for method in METHODS:
            runs = [r for r in results["runs"].values() if r["dataset"] == dataset and r["method"] == method]
            if not runs:
                continue
            se = mean_se([r["return_mean"] for r in runs])[1]
            records.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "seeds": sorted(r["seed"] for r in runs),
                    "steps": runs[0]["steps"],
                    "return_se": se,
                    **{m: mean_of([r.get(m) for r in runs]) for m in METRICS},
                    "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
                }
            )
    return records


def claims(records: list[dict], results: dict) -> list[dict]:
    """The issue's claim per dataset: ILQL against the best %BC (the filtering with the highest mean return) and
    BC. `combined_se` = sqrt(se_ilql^2 + se_pct_bc^2) of the two means; the paired difference over the seeds both
    ran; `gap_closed` = (ILQL - BC) / (expert - BC)."""
    by = {(r["dataset"], r["method"]): r for r in records}
    expert, out = by["-", "expert"]["return_mean"], []
    for dataset in DATASETS:
        pct = [by[dataset, m] for m in METHODS if m.startswith("pct_bc") and (dataset, m) in by]
        if (dataset, "ilql") not in by or (dataset, "bc") not in by or not pct:
            continue
        ilql, bc, best = by[dataset, "ilql"], by[dataset, "bc"], max(pct, key=lambda r: r["return_mean"])
        seeds = sorted(set(ilql["seeds"]) & set(best["seeds"]))
        diffs = np.array(
            [
                results["runs"][f"{dataset}/ilql/{s}"]["return_mean"]
                - results["runs"][f"{dataset}/{best['method']}/{s}"]["return_mean"]
                for s in seeds
            ]
        )
        out.append(
            {
                "dataset": dataset,
                "best_pct_bc": best["method"],
                "difference": ilql["return_mean"] - best["return_mean"],
                "combined_se": float(np.hypot(ilql["return_se"], best["return_se"])),
                **dict(zip(("paired_difference", "paired_se"), mean_se(diffs), strict=True)),
                "ilql_wins": int((diffs > 0).sum()),
                "seeds": seeds,
                # None when BC already plays at the expert's level: there is no gap to close
                "gap_closed": (ilql["return_mean"] - bc["return_mean"]) / (expert - bc["return_mean"])
                if bc["return_mean"] < expert
                else None,
            }
        )
    return out


def claims_table(rows: list[dict]) -> str:
    lines = [
        "| dataset | ILQL - best %BC | combined s.e. | paired difference over seeds | ILQL ahead on | "
        "share of the BC-to-expert gap ILQL closes |",
        "|---|---|---|---|---|---|",
    ]
    for c in rows:
        gap = "none: BC is at the expert" if c["gap_closed"] is None else f"{100 * c['gap_closed']:.0f}%"
        lines.append(
            f"| {c['dataset']} | {c['difference']:+.3f} (vs {c['best_pct_bc']}) | {c['combined_se']:.3f} | "
            f"{c['paired_difference']:+.3f} +- {c['paired_se']:.3f} | {c['ilql_wins']}/{len(c['seeds'])} "
            f"seeds | {gap} |"
        )
    return "\n".join(lines)


def mean_of(values: list) -> float | None:
    """The mean of the values a run recorded (a run imported from before a metric existed has None)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[dict]) -> str:
    lines = [
        "| dataset | method | return (mean +- s.e. over seeds) | win rate | repeat rate | non-word rate | "
        "seeds | steps | wall s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        seconds = f"{r['seconds_per_run']:.0f}" if "seconds_per_run" in r else "-"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['return_mean']:+.3f} +- {r['return_se']:.3f} | "
            f"{r['win_rate']:.3f} | {number(r['repeat_rate'], '.3f')} | {r['nonword_rate']:.3f} | "
            f"{','.join(map(str, r['seeds'])) or '-'} | {r['steps'] or '-'} | {seconds} |"
        )
    return "\n".join(lines)


def openers(opts) -> None:
    """Per dataset and seed: the share of games that open with the most common first guess, the next most common
    first guess's count, and how many of the games with that opener repeat a guess (the repeat player's move). On
    `per_game` data the expert's deterministic opener starts half the games and the repeat player's random first
    guess almost never matches it, so the states after it hold expert moves only (docs/ilql.md)."""
    wordle.use_words(opts.vocab or None)
    for dataset in opts.datasets:
        for seed in opts.seeds:
            games = wordle.offline_games(DATASETS[dataset], 4096, seed)
            (opener, count), (_, runner_up) = Counter(g.guesses[0] for g in games).most_common(2)
            opened = [g for g in games if g.guesses[0] == opener]
            repeats = sum(any(w in g.guesses[:i] for i, w in enumerate(g.guesses)) for g in opened)
            print(
                f"{dataset} seed {seed}: {opener!r} opens {count}/{len(games)} games ({count / len(games):.1%}), the "
                f"next most common first guess {runner_up}; {repeats}/{len(opened)} games it opens hold a repeat"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=12000, help="gradient steps of every run (the same for all)")
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between evaluations (the curves)")
    parser.add_argument("--eval-episodes", type=int, default=200, help="evaluation games: each word in play once")
    parser.add_argument("--vocab", type=int, default=200, help="words in play (ilql.py --wordle-vocab)")
    parser.add_argument("--openers", action="store_true", help="train nothing: who opens the datasets' games")
    add_queue_arguments(
        parser,
        "ilql.py",
        os.path.join(ROOT, "runs", "ilql_wordle"),
        os.path.join(ROOT, "benchmarks", "results", "ilql_wordle.json"),
        DOC,
        ROOT,
    )
    opts = parser.parse_args()
    if opts.openers:
        return openers(opts)

    results = load(opts.results)
    if not opts.table_only:
        train(opts, results)
    results["records"] = aggregate(opts, results)
    results["claims"] = claims(results["records"], results)
    save(opts.results, results)
    text = table(results["records"]) + ("\n\n" + claims_table(results["claims"]) if results["claims"] else "")
    print(text)
    if opts.page:
        write_region(opts.page, text, START, END)


if __name__ == "__main__":
    main()
