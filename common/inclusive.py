"""The inclusive-population task of reward_lm.py (Xu, Dong, Arumugam, Van Roy, arXiv 2305.11455; docs/reward_lm.md,
detail 13): rater groups whose deployed mix differs from the historical mix the LM was pretrained on, the
word-level vocabulary and tiny GPT-2 that read it (detail 1), and the exact measurements and reports that a task
enumerating every (prompt, response) allows (Metrics, detail 12). `args` is reward_lm.py's `Args`.
"""

import copy
import csv
import io
import math
import os

import numpy as np
import torch

from common.utils import write_atomically


# ---- The didactic data-generating process: rater groups, historical vs deployed mix ----
class InclusivePopulationEnv:
    """Prompts x in 0..P-1, responses r = K*i + j for answer tokens (a_i, a_j), G rater groups.
    For every prompt, G+1 "special" responses use disjoint tokens: fav_g is group g's favourite
    (0.9 from g, 0.1 from the others) and `inc` is approved by every minority (0.95) and half the
    majority; it ends with the "inclusive word" a_{K-1}, which minorities like anywhere (U(0.5, 0.8))
    and which no other logged response uses. Every other response gets U(0.05, 0.35) per group.
    Historically only the majority rated and the logs rarely hit `inc`: the pretrained LM learns
    inc < fav_0, while for today's mix inc is the best response."""

    def __init__(
        self,
        seed: int,
        n_prompts: int,
        n_answers: int,
        deployed_mix,
        historical_mix,
        inclusive_majority_approval: float,
        inclusive_pretrain_mass: float,
    ):
        rng = np.random.default_rng([seed, 0])
        G, K = len(deployed_mix), n_answers
        self.P, self.K, self.R, self.G = n_prompts, K, K * K, G
        self.deployed, self.historical = np.asarray(deployed_mix, float), np.asarray(historical_mix, float)
        self.approval = rng.uniform(0.05, 0.35, size=(G, n_prompts, self.R))
        self.special = np.zeros((n_prompts, G + 1), dtype=int)  # columns: fav_0 .. fav_{G-1}, inc
        self.pi0 = np.zeros((n_prompts, self.R))  # the historical response distribution
        for x in range(n_prompts):
            # the last answer token is the "inclusive word": it ends inc and no historical response uses it
            tokens = rng.permutation(K - 1)
            special = [K * tokens[2 * s] + tokens[2 * s + 1] for s in range(G)] + [K * tokens[2 * G] + K - 1]
            self.special[x] = special
            self.approval[:, x, special] = 0.1 + 0.8 * np.eye(G, G + 1) + 0.85 * (np.arange(G + 1) == G)
            self.approval[0, x, special[G]] = inclusive_majority_approval
            # minorities like the inclusive word wherever it appears, so what is learned about it transfers
            uses_word = [r for r in range(self.R) if K - 1 in divmod(r, K) and r != special[G]]
            self.approval[1:, x, uses_word] = rng.uniform(0.5, 0.8, size=(G - 1, len(uses_word)))
            # the majority's favourite dominates the logs; inc is almost never written
            others = rng.permutation(
                [r for r in range(self.R) if r not in special and r % K != K - 1 and r // K != K - 1]
            )
            self.pi0[x, special] = [0.40] + [0.05] * (G - 1) + [inclusive_pretrain_mass]
            zipf = 1.0 / np.arange(1, len(others) + 1)
            self.pi0[x, others] = (1.0 - self.pi0[x].sum()) * zipf / zipf.sum()
        self.theta = np.tensordot(self.deployed, self.approval, 1)  # true population approval [P, R]
        self.theta_historical = np.tensordot(self.historical, self.approval, 1)
        self.best = self.theta.argmax(1)
        self.opt_value = float(self.theta.max(1).mean())

    @classmethod
    def from_args(cls, seed: int, args) -> "InclusivePopulationEnv":
        return cls(
            seed,
            args.n_prompts,
            args.n_answer_tokens,
            args.deployed_mix,
            args.historical_mix,
            args.inclusive_majority_approval,
            args.inclusive_pretrain_mass,
        )

    def feedback(self, x: np.ndarray, r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One rater from today's population per query: 1 (<+>) with that group's approval."""
        groups = rng.choice(self.G, size=len(x), p=self.deployed)
        return (rng.random(len(x)) < self.approval[groups, x, r]).astype(np.float32)

    def pretrain_corpus(self, n: int, rng: np.random.Generator):
        """Historical logs: x uniform, y ~ pi0(.|x), feedback from the historical mix of raters."""
        x = rng.integers(self.P, size=n)
        r = np.array([rng.choice(self.R, p=self.pi0[xi]) for xi in x])
        groups = rng.choice(self.G, size=n, p=self.historical)
        f = (rng.random(n) < self.approval[groups, x, r]).astype(np.float32)
        return x, r, f


def check_args(args) -> None:
    """Refuse a population the environment cannot build, with one ValueError naming the flags."""
    mixes = (args.deployed_mix, args.historical_mix)
    if len(mixes[0]) != len(mixes[1]) or not all(abs(sum(m) - 1) < 1e-6 and min(m) >= 0 for m in mixes):
        raise ValueError("--deployed-mix and --historical-mix must be distributions over the same groups")
    if 2 * len(args.deployed_mix) + 2 > args.n_answer_tokens:
        raise ValueError(
            f"--n-answer-tokens must be >= {2 * len(args.deployed_mix) + 2} for disjoint special responses"
        )


# ---- The LM's vocabulary and the built-in tiny GPT-2 (docs/reward_lm.md, detail 1) ----
def task_tokens(args) -> list[str]:
    """The task's words: specials, prompts q0.. and answer tokens a0.."""
    return (
        ["<pad>", "<unk>", "<bos>", "<+>", "<->"]
        + [f"q{i}" for i in range(args.n_prompts)]
        + [f"a{k}" for k in range(args.n_answer_tokens)]
    )


def build_lm(args, base=None):
    """(GPT-2, tokenizer, token ids): a fresh tiny GPT-2 with a word-level tokenizer trained by
    `tokenizers`, or a loaded (model, tokenizer) with any missing task tokens added."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if base is None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(task_tokens(args))}
        word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=word_level, bos_token="<bos>", eos_token="<pad>", pad_token="<pad>", unk_token="<unk>"
        )
        lm = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(vocab),
                n_positions=8,
                n_embd=args.n_embd,
                n_layer=args.n_layer,
                n_head=args.n_head,
                n_inner=2 * args.n_embd,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=vocab["<bos>"],
                eos_token_id=vocab["<pad>"],
                pad_token_id=vocab["<pad>"],
            )
        )
    else:
        lm, tokenizer = copy.deepcopy(base[0]), base[1]
    vocab = tokenizer.get_vocab()
    ids = {
        "bos": vocab["<bos>"],
        "plus": vocab["<+>"],
        "minus": vocab["<->"],
        "prompts": [vocab[f"q{i}"] for i in range(args.n_prompts)],
        "answers": [vocab[f"a{k}"] for k in range(args.n_answer_tokens)],
    }
    return lm, tokenizer, ids


# ---- Measurements and reports: exact, because the task enumerates every (prompt, response) ----
def fit_error(p_mean: torch.Tensor, n: torch.Tensor, k: torch.Tensor, min_labels: int = 50) -> tuple[float, float]:
    """How far the posterior-mean approval sits from the labels the agent received, in binomial standard errors:
    |p_mean - k / n| / sqrt(p_mean (1 - p_mean) / n) over the (prompt, response) cells with n >= min_labels labels,
    k of them <+>; returns its mean and max over those cells (NaN while no cell has enough labels). A model that
    knew the true approval would score about sqrt(2 / pi) = 0.8 (the labels' own noise); an exact posterior, which
    follows the label mean, less; a fit that lags its data, more."""
    cells = n >= min_labels
    if not cells.any():
        return math.nan, math.nan
    p, n, k = p_mean[cells].double(), n[cells].double(), k[cells].double()
    z = (p - k / n).abs() / (p * (1 - p) / n).sqrt()
    return z.mean().item(), z.max().item()


def queries_to_target(n_queries: np.ndarray, values: np.ndarray, target: float) -> float:
    """First query count from which the value stays >= target until the end; inf if never."""
    below = np.nonzero(values < target)[0]
    last = below[-1] if len(below) else -1
    return float(n_queries[last + 1]) if last + 1 < len(values) else math.inf


def summarise(curves: dict, opt_values: dict, target_fraction: float) -> dict:
    """Per agent: queries to target on each seed (inf if never), median and range, final value and regret."""
    out, value = {}, lambda curve, key="eval/return_mean": np.array([c[key] for c in curve])
    for agent, by_seed in curves.items():
        q = {
            s: queries_to_target(value(c, "n_queries"), value(c), target_fraction * opt_values[s])
            for s, c in by_seed.items()
        }
        out[agent] = {
            "queries_to_target": {str(s): (v if math.isfinite(v) else None) for s, v in q.items()},
            "median": float(np.median(list(q.values()))),
            "min": min(q.values()),
            "max": max(q.values()),
            "seeds_reached": sum(math.isfinite(v) for v in q.values()),
            "num_seeds": len(q),
            "final_value": float(np.mean([value(c)[-1] for c in by_seed.values()])),
            "final_value_beta1": float(np.mean([value(c, "eval/value_beta1")[-1] for c in by_seed.values()])),
            "final_cum_regret": float(np.mean([c[-2]["objective/cum_regret"] for c in by_seed.values()])),
            "value_auc": float(np.mean([value(c).mean() for c in by_seed.values()])),
        }
    return out


def format_table(summary: dict, opt_value: float, queries: int, target: float) -> str:
    """The end-of-run table. The final values are true approvals: `beta=inf` of the exploit policy (the headline:
    per prompt, the response with the highest posterior-mean approval among all enumerated ones), `beta=1` of the
    LM's own policy conditioned on approval, pi_ref * p_mean / Z."""

    def fmt(v: float) -> str:
        return f"{v:.0f}" if math.isfinite(v) else f">{queries}"

    def share(v: float) -> str:
        return f"{v:.3f} ({v / opt_value:.0%})"

    return "\n".join(
        [
            f"queries until the exploit policy stays >= {target:.0%} of the optimum ({opt_value:.3f}):",
            f"{'agent':10s} | {'median':>7s} | {'range over seeds':>16s} | reached | final value, beta=inf | "
            f"{'beta=1':12s} | cum regret",
            "-" * 103,
        ]
        + [
            f"{agent:10s} | {fmt(s['median']):>7s} | {fmt(s['min']) + ' - ' + fmt(s['max']):>16s} | "
            f"{s['seeds_reached']}/{s['num_seeds']:<5d} | {share(s['final_value']):21s} | "
            f"{share(s['final_value_beta1']):12s} | {s['final_cum_regret']:.1f}"
            for agent, s in summary.items()
        ]
    )


def samples(env: InclusivePopulationEnv, seed: int, exploit: str) -> list[tuple[str, str, float]]:
    """TensorBoard's sample table: per prompt, the exploit policy's response ("3 17 ..."), the best, its true value."""
    return [
        (f"q{x} (seed {seed})", f"response {y} (best {env.best[x]})", float(env.theta[x, int(y)]))
        for x, y in enumerate(exploit.split())
    ]


def write_curves(path: str, rows: list[dict]) -> None:
    """`curves.csv`: one row per seed, agent and evaluation, whole or not at all."""
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, lambda file: file.write(table.getvalue().encode()))


def write_scalars(run, results: dict) -> None:
    """Rank 0 writes each simulation's recorded scalars (`results[seed]["scalars"][agent]`) to its own TensorBoard
    run `{agent}__seed{seed}`; purge_step=0: a redone simulation replaces a half-written one."""
    from torch.utils.tensorboard import SummaryWriter

    for seed, result in results.items() if run.is_main else []:
        for agent, scalars in result["scalars"].items():
            with SummaryWriter(os.path.join(run.dir, f"{agent}__seed{seed}"), purge_step=0) as writer:
                for tag, value, step in scalars:
                    writer.add_scalar(tag, value, step)
