"""The A-LoL table of docs/alol.md: the four A-LoL variants, the four baselines and the negative-advantage ablation,
seeds 1-5, with fluency beside the return; resumable.

    python benchmarks/alol_variants.py --jobs 2                 # every variant and seed, two runs at a time
    python benchmarks/alol_variants.py --table-only --page      # the table from the JSON, into docs/alol.md

Each (variant, seed) is one `alol.py` run with the script's defaults (task `sentiment_grammar`, pi_ref fine-tuned
on the log for one epoch, 400 steps) in a subprocess, recorded in `--results` (benchmarks/results/alol.json) the
moment it ends, so an interrupted benchmark resumes where it stopped.

`records` in the JSON: one per variant, the mean over seeds of each run's final evaluation and the standard error
over seeds, plus the model as loaded and pi_ref (the fine-tuned model every variant starts from). `claims`: the
paper's claims as paired differences over seeds (same seed = same pi_ref, V and evaluation prompts).
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# E402 on purpose: resumable.py imports only once benchmarks/ is on sys.path
from resumable import add_queue_arguments, load, mean_se, run_queue, save, summary_of, write_region  # noqa: E402

VARIANTS = {
    "a_lol": [],
    "a_lol_ref_free": ["--algorithm", "a_lol_ref_free"],
    "a_lol_seq": ["--algorithm", "a_lol_seq"],
    "a_lol_kl": ["--algorithm", "a_lol_kl"],
    "nll": ["--algorithm", "nll"],
    "wbc": ["--algorithm", "wbc"],
    "r_gold": ["--algorithm", "r_gold"],
    "r_lol": ["--algorithm", "r_lol"],
    "a_lol_with_negatives": ["--keep-negative"],
}
BASELINES = ("nll", "wbc", "r_gold", "r_lol")
METRICS = ("return_mean", "grammatical", "perplexity", "ref_nll", "distinct_2")
DOC = os.path.join(ROOT, "docs", "alol.md")
START, END = "<!-- alol table: start -->", "<!-- alol table: end -->"


def command(variant: str, seed: int, opts) -> list[str]:
    return [
        sys.executable,
        os.path.join(ROOT, "alol.py"),
        "--seed",
        str(seed),
        "--exp-name",
        f"{variant}_{seed}",
        "--no-save-model",
        "--output-dir",
        os.path.join(opts.output_dir, f"{variant}_{seed}"),
        *VARIANTS[variant],
        *opts.extra,
    ]


def record_run(variant: str, seed: int, opts, seconds: float) -> dict:
    summary = summary_of(os.path.join(opts.output_dir, f"{variant}_{seed}"))
    return {
        "variant": variant,
        "seed": seed,
        "flags": VARIANTS[variant] + opts.extra,
        "seconds": round(seconds),
        **{m: summary["final"][f"eval/{m}"] for m in METRICS},
        "pi_ref": {m: summary["initial"][f"eval/{m}"] for m in METRICS},
        "loaded": {m: summary["loaded_eval"][f"eval/{m}"] for m in METRICS} if "loaded_eval" in summary else None,
        "positive_fraction": summary.get("positive_fraction"),
        "value_heldout_mse": summary.get("value_heldout_mse"),
        "value_constant_mse": summary.get("value_constant_mse"),
    }


def row(name: str, flags: list[str], runs: list[dict]) -> dict:
    record = {"variant": name, "flags": flags, "seeds": [r["seed"] for r in runs]}
    for metric in METRICS:
        key = "return" if metric == "return_mean" else metric
        record[f"{key}_mean"], record[f"{key}_se"] = mean_se([r[metric] for r in runs])
    record["returns"] = [round(r["return_mean"], 4) for r in runs]
    return record


def aggregate(results: dict, variants: list[str], seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """The table's records, and the paper's claims as paired differences (mean and s.e. over seeds), over the seeds
    on which every one of `variants` finished (so that every row averages the same seeds)."""
    by = {(r["variant"], r["seed"]): r for r in results["runs"].values()}
    complete = [s for s in seeds if all((v, s) in by for v in variants)]
    if not complete:
        return [], []
    first = [by[variants[0], s] for s in complete]
    records = []
    if first[0]["loaded"] is not None:
        records.append(row("model as loaded", [], [{"seed": r["seed"], **r["loaded"]} for r in first]))
    records.append(row("pi_ref (fine-tuned on the log)", [], [{"seed": r["seed"], **r["pi_ref"]} for r in first]))
    records += [row(v, VARIANTS[v], [by[v, s] for s in complete]) for v in variants]

    def paired(a: str, b: str, metric: str = "return_mean") -> dict:
        mean, se = mean_se([by[a, s][metric] - by[b, s][metric] for s in complete])
        return {
            "a": a,
            "b": b,
            "metric": metric,
            "difference_mean": mean,
            "difference_se": se,
            "a_wins": sum(by[a, s][metric] > by[b, s][metric] for s in complete),
            "seeds": complete,
        }

    wanted = [(f"A-LoL beats {b}", "a_lol", b, "return_mean") for b in BASELINES]
    wanted.append(("the importance weight helps (A-LoL vs A-LoL ref-free)", "a_lol", "a_lol_ref_free", "return_mean"))
    wanted += [
        (f"A-LoL seq is the best variant (vs {v})", "a_lol_seq", v, "return_mean")
        for v in ("a_lol", "a_lol_ref_free", "a_lol_kl", "a_lol_with_negatives")
    ]
    wanted.append(("keeping only positive advantages helps", "a_lol", "a_lol_with_negatives", "return_mean"))
    wanted += [(f"A-LoL beats {b} on grammar", "a_lol", b, "grammatical") for b in BASELINES]
    claims = [
        {"claim": claim, **paired(a, b, metric)} for claim, a, b, metric in wanted if a in variants and b in variants
    ]
    return records, claims


def table(records: list[dict]) -> str:
    lines = [
        "| variant | flags | return | grammatical | perplexity | ref_nll | distinct-2 | seeds | return per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        flags = f"`{' '.join(r['flags'])}`" if r["flags"] else ""
        lines.append(
            f"| {r['variant']} | {flags} | "
            f"{r['return_mean']:+.3f} ± {r['return_se']:.3f} | {r['grammatical_mean']:.3f} ± "
            f"{r['grammatical_se']:.3f} | {r['perplexity_mean']:.2f} | {r['ref_nll_mean']:.2f} | "
            f"{r['distinct_2_mean']:.3f} | {','.join(map(str, r['seeds']))} | "
            f"{', '.join(f'{x:+.3f}' for x in r['returns'])} |"
        )
    return "\n".join(lines)


def claims_table(claims: list[dict]) -> str:
    lines = ["| claim | metric | difference (mean ± s.e. over seeds) | seeds where it holds |", "|---|---|---|---|"]
    for c in claims:
        lines.append(
            f"| {c['claim']} | {c['metric']} | {c['difference_mean']:+.3f} ± {c['difference_se']:.3f} | "
            f"{c['a_wins']}/{len(c['seeds'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    add_queue_arguments(
        parser,
        "alol.py",
        os.path.join(ROOT, "runs", "alol_variants"),
        os.path.join(ROOT, "benchmarks", "results", "alol.json"),
        DOC,
        ROOT,
    )
    opts = parser.parse_args()

    results = load(opts.results)
    if not opts.table_only:
        todo = [(f"{v}/{s}", command(v, s, opts)) for s in opts.seeds for v in opts.variants]  # whole seeds first
        run_queue(
            todo,
            lambda key, log, seconds: record_run(key.split("/")[0], int(key.split("/")[1]), opts, seconds),
            results,
            opts.results,
            opts.output_dir,
            ROOT,
            opts.jobs,
            opts.threads,
        )
    records, claims = aggregate(results, opts.variants, opts.seeds)
    results["records"], results["claims"] = records, claims
    save(opts.results, results)
    text = table(records) + "\n\n" + claims_table(claims) if records else "(no seed has every variant yet)"
    print(text)
    if opts.page:
        write_region(opts.page, text, START, END)


if __name__ == "__main__":
    main()
