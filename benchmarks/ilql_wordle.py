"""The Wordle results table of docs/ilql.md: scripted players, BC, %BC and ILQL on the same games.

    python benchmarks/ilql_wordle.py                    # 1,000 evaluation games, seed 1
    python benchmarks/ilql_wordle.py --games 1000 --seed 1 --output-dir runs/ilql_wordle
    python benchmarks/ilql_wordle.py --reuse      # keep finished runs in --output-dir, train the rest

Trains BC (`--beta 0`), %BC (`--beta 0 --top-fraction 0.25`) and ILQL (defaults) with `ilql.py --task
wordle` as subprocesses (side by side, one CPU thread each), plays the scripted players on the same
hidden words, and prints a markdown table: mean return +- standard error, win rate, mean guesses.

Standard errors: the hidden words cycle through the words in play (200 by default), so a deterministic
player (the expert, any greedy decoding) plays each distinct game several times with the same result;
its standard error divides by the number of distinct games, not by the number played. The random
players' repeated games are independent draws and divide by the number played.
"""

import argparse
import json
import os
import random
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import wordle  # noqa: E402

METHODS = {"BC": ["--beta", "0"], "%BC (best 25% of games)": ["--beta", "0", "--top-fraction", "0.25"], "ILQL": []}


def row(name: str, metrics: dict, n_se: int) -> str:
    se = metrics["eval/return_std"] / np.sqrt(n_se)
    return (f"| {name} | {metrics['eval/return_mean']:+.3f} +- {se:.3f} | {metrics['eval/win_rate']:.3f} "
            f"| {metrics['eval/mean_guesses']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=1000, help="evaluation games per method")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=200, help="words in play (ilql.py --wordle-vocab)")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "ilql_wordle"))
    parser.add_argument("--reuse", action="store_true", help="keep a method's finished run in --output-dir instead of retraining it")
    parser.add_argument("extra", nargs="*", help="more ilql.py flags for every trained method, after --")
    opts = parser.parse_args()

    procs = {}
    for name, flags in METHODS.items():
        exp = {"BC": "bc", "ILQL": "ilql"}.get(name, "pct_bc")
        done = os.path.join(opts.output_dir, exp)
        if opts.reuse and os.path.isdir(done) and any(os.path.exists(os.path.join(done, d, "summary.json"))
                                                     for d in os.listdir(done)):
            print(f"reusing {done}", flush=True)
            procs[name] = (None, exp)
            continue
        cmd = [sys.executable, os.path.join(ROOT, "ilql.py"), "--task", "wordle", "--seed", str(opts.seed),
               "--exp-name", exp, "--eval-episodes", str(opts.games), "--wordle-vocab", str(opts.vocab),
               "--output-dir", os.path.join(opts.output_dir, exp), "--no-save-model", *flags, *opts.extra]
        print(" ".join(cmd[1:]), flush=True)
        os.makedirs(opts.output_dir, exist_ok=True)
        log = open(os.path.join(opts.output_dir, f"{exp}.log"), "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}), exp)

    wordle.use_words(opts.vocab)
    answers = wordle.eval_answers(opts.games)
    distinct = len(set(answers))
    lines = ["| method | return (mean +- s.e.) | win rate | mean guesses |", "|---|---|---|---|"]
    data = wordle.offline_games(wordle.DEFAULT_DATA, 4096, opts.seed)  # what ilql.py trains on by default
    returns = np.array([g.ret for g in data])
    lines.append(f"| offline data ({wordle.DEFAULT_DATA}, {len(data)} games) | {returns.mean():+.3f} +- "
                 f"{returns.std() / np.sqrt(len(data)):.3f} | {np.mean([g.solved for g in data]):.3f} "
                 f"| {np.mean([len(g.guesses) for g in data]):.2f} |")
    for name, deterministic in (("random", False), ("random_consistent", False)):
        rng = random.Random(opts.seed)
        games = wordle.play(answers, lambda gs: [wordle.PLAYERS[name](g, rng) for g in gs])
        lines.append(row(f"scripted: {name}", wordle.game_metrics(games), opts.games))
    for name, (proc, exp) in procs.items():
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"{name} failed; see {os.path.join(opts.output_dir, exp + '.log')}")
        (run_dir,) = os.listdir(os.path.join(opts.output_dir, exp))
        with open(os.path.join(opts.output_dir, exp, run_dir, "summary.json")) as f:
            lines.append(row(name, json.load(f)["final"], distinct))
    rng = random.Random(opts.seed)
    games = wordle.play(answers, lambda gs: [wordle.expert(g, rng) for g in gs])
    lines.append(row("scripted: expert (ceiling)", wordle.game_metrics(games), distinct))
    print(f"\n{opts.games} games over {distinct} distinct hidden words ({opts.vocab} in play), seed {opts.seed}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
