"""The exact-posterior control of docs/reward_lm.md: how many queries does Thompson sampling need in
reward_lm.py's environment when its beliefs are exact, with no language model in the way?

    python benchmarks/reward_lm_tabular.py                      # 20 seeds, both priors, two budgets
    python benchmarks/reward_lm_tabular.py --seeds 5 --budgets 1024:16

Each (prompt, response) gets its own Beta belief about today's approval (Beta-Bernoulli, updated exactly
on every label), built from the same historical logs the LM is pretrained on (`env.pretrain_corpus`, same
seeds). Two priors, both from the population model that sets reward_lm.py's `--prior-scale`: a share
rho ~ U(0, 1) of today's raters are new, and their approval u ~ U(0, 1) of a response is unknown, so
today's approval is T = (1 - rho) h + rho u given the historical approval h:
  `centred`:    mean h, std 1/6 (T's std at h = 1/2): what reward_lm.py's heads express around the LM;
  `population`: T's exact mean (h + 1/2) / 2 and std sqrt(E[rho^2] E[(u - h)^2] - E[rho]^2 (1/2 - h)^2).
h is the Laplace estimate (approvals + 1) / (ratings + 2) of each response's historical logs.
The agents, the prompt and rater streams, the target (the exploit argmax stays >= 95% of the optimum)
and the batch schedule are reward_lm.py's. The output is a markdown table of queries-to-target.
"""

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.inclusive import InclusivePopulationEnv, queries_to_target
from reward_lm import Args


def beta_prior(approvals: np.ndarray, ratings: np.ndarray, prior: str):
    """Beta(a, b) moment-matched to the population model's belief about today's approval (see the docstring)."""
    h = (approvals + 1) / (ratings + 2)
    if prior == "centred":
        mean, var = h, np.full_like(h, 1 / 36)
    elif prior == "population":  # E[rho] = 1/2, E[rho^2] = 1/3, E[(u - h)^2] = 1/12 + (1/2 - h)^2
        mean, var = (h + 0.5) / 2, (1 / 12 + (0.5 - h) ** 2) / 3 - (0.5 - h) ** 2 / 4
    else:
        raise ValueError(f"unknown prior {prior!r}")
    var = np.minimum(var, 0.99 * mean * (1 - mean))  # a Beta's variance is below mean (1 - mean)
    concentration = mean * (1 - mean) / var - 1
    return mean * concentration, (1 - mean) * concentration


def simulate(seed: int, agent: str, prior: str, queries: int, per_round: int, args: Args) -> float:
    """One agent on one seed with exact Beta posteriors; returns queries to target (inf if never)."""
    env = InclusivePopulationEnv.from_args(seed, args)
    x, r, f = env.pretrain_corpus(args.pretrain_size, np.random.default_rng([seed, 1]))
    ratings, approvals = np.zeros((env.P, env.R)), np.zeros((env.P, env.R))
    np.add.at(ratings, (x, r), 1)
    np.add.at(approvals, (x, r), f)
    a, b = beta_prior(approvals, ratings, prior)
    prompt_rng, rater_rng, agent_rng = (
        np.random.default_rng([seed, 2]),
        np.random.default_rng([seed, 3]),
        np.random.default_rng(seed),
    )
    values = []
    for rnd in range(queries // per_round + 1):
        mean = a / (a + b)
        values.append(env.theta[np.arange(env.P), mean.argmax(1)].mean())  # the exploit argmax's true value
        if rnd == queries // per_round:
            break
        xs = prompt_rng.integers(env.P, size=per_round)
        ys = agent_rng.beta(a[xs], b[xs]).argmax(1) if agent == "ts" else mean[xs].argmax(1)
        fs = env.feedback(xs, ys, rater_rng)
        np.add.at(a, (xs, ys), fs)
        np.add.at(b, (xs, ys), 1 - fs)
    n_queries = np.arange(len(values)) * per_round
    return queries_to_target(n_queries, np.array(values), args.target_fraction * env.opt_value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=20, help="seeds 1..N (reward_lm.py's environments)")
    parser.add_argument(
        "--budgets",
        nargs="+",
        default=["1024:16", "4096:64"],
        help="QUERIES:PER_ROUND pairs; 1024:16 was reward_lm.py's first default, 4096:64 today's",
    )
    parser.add_argument("--priors", nargs="+", default=["centred", "population"], choices=["centred", "population"])
    cli = parser.parse_args()
    try:
        budgets = [tuple(int(v) for v in b.split(":")) for b in cli.budgets]
    except ValueError:
        budgets = [(0, 0)]
    if cli.seeds <= 0 or any(len(b) != 2 or min(b) <= 0 or b[0] % b[1] for b in budgets):
        raise SystemExit("error: need --seeds > 0 and budgets QUERIES:PER_ROUND with PER_ROUND dividing QUERIES")
    args = Args()
    print("| prior | budget (queries, per round) | agent | seeds reaching 95% | queries to 95%: median [min, max] |")
    print("|---|---|---|---|---|")
    for prior in cli.priors:
        for queries, per_round in budgets:
            for agent in ("ts", "greedy"):
                q = [simulate(s, agent, prior, queries, per_round, args) for s in range(1, cli.seeds + 1)]

                def fmt(v: float, queries: int = queries) -> str:
                    return f"{v:.0f}" if math.isfinite(v) else f"> {queries}"

                print(
                    f"| `{prior}` | {queries}, {per_round} | {agent} | {sum(map(math.isfinite, q))}/{cli.seeds} | "
                    f"{fmt(np.median(q))} [{fmt(min(q))}, {fmt(max(q))}] |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
