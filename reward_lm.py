"""Reward-LM: one language model is the policy, the transition function and the reward at once.

Paper: Xu, Dong, Arumugam, Van Roy, "Shattering the Agent-Environment Interface for Fine-Tuning
Inclusive Language Models" (arXiv 2305.11455). Its body could not be read; this file follows the
reconstruction in docs/reward_lm.md (abstract + Dwaracherla et al. 2024, "Efficient Exploration for LLMs").

A response y to a prompt x is followed, in the same token stream, by a rater's feedback token <+>
or <->. So one GPT-2 over [<bos>, x, y, f] is
  - the policy:      pi(y | x), its next-token distribution at the response positions;
  - the transition:  p(f | x, y), its next-token distribution at the feedback position;
  - the reward:      r(x, y) = log p(<+> | x, y), the log-probability that a rater approves.
Reward learning is fine-tuning the LM on the feedback tokens it receives; the improved policy is read
off the same model by Bayes' rule, with no PPO: pi_beta(y | x) ~ pi_ref(y | x) * p(<+> | x, y) ** beta
(beta = 1: the LM conditioned on approval; beta = inf: argmax). Epistemic uncertainty about the
feedback comes from an ensemble of small heads with randomized priors on the LM's features; Thompson
sampling queries the response that is best under one sampled head.
The built-in didactic task: rater groups whose deployed mix differs from the historical mix the LM
was pretrained on, so the response the pretrained LM undervalues ("inclusive") is in fact the best
for the whole population. Agents differ only in which response they query.

Run:  python reward_lm.py                 # ts, greedy, passive x 5 seeds, about 6 CPU minutes
      python reward_lm.py --help          # every flag
Settings that were tried and dropped (the epinet, heads fitted on the historical labels, replayed historical
feedback, an uncalibrated prior) are in docs/reward_lm_notes.md and in git history.
"""

import copy
import csv
import datetime
import io
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

from common.models import load_causal_lm
from common.utils import (CommonArgs, Run, ScalarRecorder, all_gather_objects, close_distributed, error_line,
                          init_distributed, map_in_waves, resume_args, seed_everything, stop_on_sigterm, validate_args,
                          write_atomically, writing_dir)

AGENTS = ("ts", "greedy", "passive", "boltzmann", "infomax")


@dataclass
class Args(CommonArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    task: str = "inclusive"
    """the task: only the built-in didactic rater-population task `inclusive` exists for this method"""
    model_name: str = "tiny-gpt2"
    """`tiny-gpt2`: a fresh tiny GPT-2 with the task's word-level tokenizer; or a local `save_pretrained` GPT-2
    directory / hub id (missing task tokens are added). Either is pretrained on the historical corpus for
    `pretrain_epochs`"""

    # The didactic data-generating process
    n_prompts: int = 4
    """number of distinct prompts x"""
    n_answer_tokens: int = 8
    """answer tokens; a response is two of them, so there are n_answer_tokens**2 responses per prompt"""
    deployed_mix: tuple[float, ...] = (0.60, 0.25, 0.15)
    """share of each rater group among today's users (group 0 is the majority)"""
    historical_mix: tuple[float, ...] = (1.0, 0.0, 0.0)
    """share of each rater group in the historical feedback the LM was pretrained on"""
    inclusive_majority_approval: float = 0.5
    """how often the majority approves the inclusive response (minorities: 0.95); lower = deeper trap"""
    inclusive_pretrain_mass: float = 0.005
    """probability of the inclusive response under the historical (pretraining) response distribution"""
    pretrain_size: int = 20000
    """sequences [<bos>, x, y, f] in the historical corpus"""

    # Model and pretraining
    n_embd: int = 64
    """width of the built-in tiny GPT-2"""
    n_layer: int = 2
    """layers of the built-in tiny GPT-2"""
    n_head: int = 2
    """attention heads of the built-in tiny GPT-2"""
    pretrain_epochs: int = 10
    """epochs of next-token pretraining on the historical corpus, enough to reach its entropy (0 keeps a loaded
    model as it is)"""
    pretrain_batch_size: int = 256
    """sequences per pretraining step"""
    pretrain_lr: float = 3e-3
    """AdamW learning rate of pretraining"""

    # Epistemic uncertainty about today's approval: an ensemble of heads with randomized priors, not fitted on the
    # historical labels (they come from other raters)
    ensemble_size: int = 10
    """M: the number of epistemic heads"""
    head_hidden: int = 32
    """hidden units of each head"""
    prior_scale: float = 0.67
    """alpha: prior std in logits of a response's approval today around the LM's belief, measured on its offset
    relative to the prompt's other responses, which is what TS's argmax sees (2/3: a share rho ~ U(0, 1) of raters
    with unknown approval u ~ U(0, 1) gives std 1/6 in probability)"""
    bootstrap: bool = True
    """each head sees each data point with probability 1/2 (fixed per point and head)"""
    anchor_coef: float = 1.0
    """lambda of the L2 pull of head weights to their init, divided by the number of data points"""

    # Online phase: queries, joint reward learning and fine-tuning
    agents: tuple[str, ...] = ("ts", "greedy", "passive")
    """agents to compare, from ts, greedy, passive, boltzmann, infomax; the first is the method reported in eval/*"""
    num_seeds: int = 5
    """seeds seed, seed+1, ...; every agent runs on the same seeds (same environment, same pretrained LM)"""
    queries: int = 4096
    """feedback queries per agent and seed (an exact-posterior TS needs a median of 2016 here:
    benchmarks/reward_lm_tabular.py)"""
    queries_per_round: int = 64
    """queries between two updates; must divide `queries`"""
    updates_per_round: int = 25
    """at most this many AdamW steps on the feedback buffer after each round"""
    update_epochs: float = 1.0
    """passes over the feedback buffer per round (capped by `updates_per_round`)"""
    update_batch_size: int = 64
    """feedback examples per online step (sampled with replacement from the buffer)"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LM in the online phase (a fresh AdamW at 1e-3 moves every logit by ~2 in its
    first steps)"""
    head_learning_rate: float = 1e-3
    """AdamW learning rate of the heads in the online phase: their output starts at 0 and must cancel priors of ~1
    logit"""
    buffer_size: int = 4096
    """FIFO capacity of the online feedback buffer"""
    replay_coef: float = 0.1
    """kappa: weight of next-token NLL on replayed historical sequences, their feedback token masked (historical
    raters are not today's); it keeps the policy part of the LM the pretrained policy"""
    beta: float = float("inf")
    """exploit policy pi_ref * p(<+>)**beta / Z; inf = argmax of predicted approval"""
    boltzmann_temperature: float = 0.05
    """boltzmann agent: queries y with probability ~ exp(p(<+>|x,y) / T)"""
    target_fraction: float = 0.95
    """queries-to-target = first query count after which the exploit policy stays >= this share of the optimum"""
    progress_every: int = 16
    """print a progress line every this many rounds"""
    threads: int = 1
    """torch CPU threads: this tiny model gains nothing from more, and extra threads thrash when other processes
    share the cores"""

    # Flags of the other scripts that mean nothing here, hidden from --help (they keep these values)
    eval_every: tyro.conf.Suppress[int] = 1
    """unused here: the exploit policy is evaluated exactly after every round"""
    eval_episodes: tyro.conf.Suppress[int] = 0
    """unused here: evaluation is exact, over every prompt and every response"""
    checkpoint_every: tyro.conf.Suppress[int] = 1
    """unused here: the checkpoint is rewritten after every wave of simulations"""
    bf16: tyro.conf.Suppress[str] = "auto"
    """unused here: the script runs in fp32 (its LMs are small)"""
    prompts_file: tyro.conf.Suppress[Optional[str]] = None
    """unused here: hub and jsonl tasks only"""
    dataset: tyro.conf.Suppress[Optional[str]] = None
    """unused here: hub tasks only"""
    reward_model: tyro.conf.Suppress[Optional[str]] = None
    """unused here: hub tasks only"""
    reward_label: tyro.conf.Suppress[Optional[str]] = None
    """unused here: hub tasks only"""
    reward_fn: tyro.conf.Suppress[Optional[str]] = None
    """unused here: hub tasks only"""


# The allowed values of the numeric flags, checked before any work (common/utils.py `validate_args`: "(0, inf)" is
# positive, a bound "inf]" admits infinity; float flags not named here must be finite).
LIMITS = {
    "eval_episodes": "[0, inf)", "n_prompts": "(0, inf)", "n_answer_tokens": "(0, inf)",
    "inclusive_majority_approval": "[0, 1]", "inclusive_pretrain_mass": "(0, 1)", "pretrain_size": "(0, inf)",
    "n_embd": "(0, inf)", "n_layer": "(0, inf)", "n_head": "(0, inf)", "pretrain_epochs": "[0, inf)",
    "pretrain_batch_size": "(0, inf)", "pretrain_lr": "(0, inf)", "ensemble_size": "(0, inf)",
    "head_hidden": "(0, inf)", "prior_scale": "[0, inf)", "anchor_coef": "[0, inf)",
    "num_seeds": "(0, inf)", "queries": "(0, inf)", "queries_per_round": "(0, inf)",
    "updates_per_round": "(0, inf)", "update_epochs": "(0, inf)", "update_batch_size": "(0, inf)",
    "learning_rate": "(0, inf)", "head_learning_rate": "(0, inf)", "buffer_size": "(0, inf)",
    "replay_coef": "[0, inf)", "beta": "[0, inf]", "boltzmann_temperature": "(0, inf)", "target_fraction": "(0, 1]",
    "progress_every": "(0, inf)", "threads": "(0, inf)",
}

# ---- The didactic data-generating process: rater groups, historical vs deployed mix ----
class InclusivePopulationEnv:
    """Prompts x in 0..P-1, responses r = K*i + j for answer tokens (a_i, a_j), G rater groups.
    For every prompt, G+1 "special" responses use disjoint tokens: fav_g is group g's favourite
    (0.9 from g, 0.1 from the others) and `inc` is approved by every minority (0.95) and half the
    majority; it ends with the "inclusive word" a_{K-1}, which minorities like anywhere (U(0.5, 0.8))
    and which no other logged response uses. Every other response gets U(0.05, 0.35) per group.
    Historically only the majority rated and the logs rarely hit `inc`: the pretrained LM learns
    inc < fav_0, while for today's mix inc is the best response."""

    def __init__(self, seed: int, n_prompts: int, n_answers: int, deployed_mix, historical_mix,
                 inclusive_majority_approval: float, inclusive_pretrain_mass: float):
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
            others = rng.permutation([r for r in range(self.R)
                                      if r not in special and r % K != K - 1 and r // K != K - 1])
            self.pi0[x, special] = [0.40] + [0.05] * (G - 1) + [inclusive_pretrain_mass]
            zipf = 1.0 / np.arange(1, len(others) + 1)
            self.pi0[x, others] = (1.0 - self.pi0[x].sum()) * zipf / zipf.sum()
        self.theta = np.tensordot(self.deployed, self.approval, 1)  # true population approval [P, R]
        self.theta_historical = np.tensordot(self.historical, self.approval, 1)
        self.best = self.theta.argmax(1)
        self.opt_value = float(self.theta.max(1).mean())

    @classmethod
    def from_args(cls, seed: int, args: "Args") -> "InclusivePopulationEnv":
        return cls(seed, args.n_prompts, args.n_answer_tokens, args.deployed_mix, args.historical_mix,
                   args.inclusive_majority_approval, args.inclusive_pretrain_mass)

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


# ---- ALGO LOGIC: pure pieces of the method (each unit-tested in tests/test_reward_lm.py) ----
def conditioned_policy(log_pi_ref: torch.Tensor, p_approve: torch.Tensor, beta: float) -> torch.Tensor:
    """pi_beta(y|x) = pi_ref(y|x) p(<+>|x,y)^beta / Z(x) over the last dim; beta = inf is the argmax
    of p (first one on ties): the policy improvement is Bayes' rule on the LM, no optimisation."""
    if math.isinf(beta):
        return F.one_hot(p_approve.argmax(-1), p_approve.shape[-1]).to(p_approve.dtype)
    return torch.softmax(log_pi_ref + beta * torch.log(p_approve.clamp_min(1e-12)), -1)


def select_queries(agent: str, ell_z: torch.Tensor, log_pi_ref: torch.Tensor, x: torch.Tensor,
                   gen: torch.Generator, temperature: float) -> torch.Tensor:
    """The only thing agents differ in: which response to query for each prompt in `x`.
    ell_z: [M, P, R] approval logits of the M heads; log_pi_ref: [P, R]."""
    probs = torch.sigmoid(ell_z)
    if agent == "ts":  # Thompson sampling: act greedily w.r.t. one sampled reward model per query
        z = torch.randint(len(ell_z), (len(x),), generator=gen)
        return ell_z[z, x].argmax(-1)
    if agent == "greedy":  # the posterior-mean reward model, no exploration
        return probs.mean(0)[x].argmax(-1)
    if agent == "passive":  # sample from the pretrained policy, as RLHF data collection does
        return torch.multinomial(log_pi_ref[x].exp(), 1, generator=gen).squeeze(1)
    if agent == "boltzmann":  # exploration by point-estimate dithering
        return torch.multinomial(torch.softmax(probs.mean(0)[x] / temperature, -1), 1, generator=gen).squeeze(1)
    if agent == "infomax":  # pure information seeking: where the heads disagree most
        return probs.var(0)[x].argmax(-1)
    raise ValueError(f"unknown agent {agent!r}")


def head_loss(ell0: torch.Tensor, offsets: torch.Tensor, f: torch.Tensor, weights) -> torch.Tensor:
    """BCE of every head's approval logit ell_z = ell0 + offset_z, with optional bootstrap weights [M, N].
    ell0 is detached: the heads learn what the LM head leaves uncertain, not the LM's own fit."""
    bce = F.binary_cross_entropy_with_logits(ell0.detach() + offsets, f.expand_as(offsets), reduction="none")
    return bce.mean() if weights is None else (bce * weights).sum() / weights.sum().clamp_min(1.0)


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


# ---- Model pieces: the epistemic heads and the one LM that plays all three roles ----
class EpistemicHead(nn.Module):
    """M heads of offsets to the LM's approval logit, from its (detached) features h: head z adds
    offset_z(h) = g_z(h) + alpha * prior_z(h), with g_z and prior_z small MLPs (an ensemble with randomized prior
    functions: Osband, Aslanides, Cassirer 2018). Priors are frozen; the trainable output layers start at 0, so
    before training the heads differ by their priors alone."""

    def __init__(self, features: int, units: int, size: int, prior_scale: float):
        super().__init__()
        self.size, self.prior_scale = size, prior_scale
        def mlp(trainable: bool):  # He-style init: unit-scale outputs for unit-scale features
            w1 = torch.randn(size, features, units) / math.sqrt(features)
            w2 = torch.zeros(size, units, 1) if trainable else torch.randn(size, units, 1) * math.sqrt(2 / units)
            return [w1, torch.zeros(size, 1, units), w2]
        self.params = nn.ParameterList([nn.Parameter(t) for t in mlp(True)])
        for i, t in enumerate(mlp(False)): self.register_buffer(f"prior{i}", t)
        self.register_buffer("init", torch.cat([p.detach().flatten() for p in self.params]).clone())
        self.register_buffer("prior_norm", torch.ones(()))  # set by RewardLM.calibrate_prior

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, H] -> offsets [M, N], every head at once."""
        inputs = h.unsqueeze(0).expand(self.size, -1, -1)
        def run(w1, b1, w2):  # [M, N, H] -> [M, N, 1]
            return torch.relu(inputs @ w1 + b1) @ w2
        out = run(*self.params) + self.prior_scale * self.prior_norm * run(self.prior0, self.prior1, self.prior2)
        return out.squeeze(-1)

    def anchor(self) -> torch.Tensor:
        """||phi - phi_init||^2 over the trainable weights (Dwaracherla et al.'s ENN regulariser)."""
        return (torch.cat([p.flatten() for p in self.params]) - self.init).pow(2).sum()


class RewardLM(nn.Module):
    """A causal LM over [<bos>, x, a_i, a_j] plus epistemic heads; one forward gives all three roles."""

    def __init__(self, lm: nn.Module, ids: dict, head: EpistemicHead):
        super().__init__()
        self.lm, self.head = lm, head
        self.bos, self.plus, self.minus = ids["bos"], ids["plus"], ids["minus"]
        self.register_buffer("prompt_ids", torch.tensor(ids["prompts"]))
        self.register_buffer("answer_ids", torch.tensor(ids["answers"]))

    def forward(self, x: torch.Tensor, r: torch.Tensor):
        """-> log pi(y|x) [N] (response positions, renormalised over answer tokens), approval logit
        ell0 = logit<+> - logit<-> [N] (feedback position), hidden state there [N, H], logits [N, 4, V]."""
        K = len(self.answer_ids)
        i, j = r // K, r % K
        ids = torch.stack([torch.full_like(x, self.bos), self.prompt_ids[x], self.answer_ids[i], self.answer_ids[j]], 1)
        hidden = self.lm.base_model(input_ids=ids).last_hidden_state
        logits = self.lm.get_output_embeddings()(hidden)
        answer_logp = logits[:, 1:3][..., self.answer_ids].float().log_softmax(-1)  # [N, 2, K]
        log_pi = answer_logp[:, 0].gather(1, i[:, None]).squeeze(1) + answer_logp[:, 1].gather(1, j[:, None]).squeeze(1)
        ell0 = (logits[:, 3, self.plus] - logits[:, 3, self.minus]).float()
        # the heads see the sequence's input embeddings and the last hidden state (ENN "exposed" features):
        # the hidden state alone smooths a rare response into its neighbours, the tokens keep it apart
        features = torch.cat([self.lm.get_input_embeddings()(ids[:, 1:]), hidden[:, 3:4]], 1)
        # unit scale: prior_scale means the same for any LM
        features = F.layer_norm(features, features.shape[-1:]).flatten(1)
        return log_pi, ell0, features, logits, ids

    @torch.no_grad()
    def table(self, P: int, R: int):
        """Every (prompt, response): log pi [P, R], ell0 [P, R], ell_z [M, P, R] in one batched forward."""
        x = torch.arange(P, device=self.answer_ids.device).repeat_interleave(R)
        log_pi, ell0, h, _, _ = self(x, torch.arange(R, device=x.device).repeat(P))
        ell_z = ell0 + self.head(h)
        return log_pi.view(P, R), ell0.view(P, R), ell_z.view(-1, P, R)

    def calibrate_prior(self, P: int, R: int) -> None:
        """Rescale the prior so that a response's offset relative to the mean over the prompt's responses has
        std alpha; call it before the heads are fitted (offsets = prior alone). TS's argmax ignores what all
        responses of a prompt share, and a random ReLU net on these features shares most of its output
        across them (correlation ~0.7): measured on the raw offsets, alpha leaves only ~alpha/2 that matters."""
        _, ell0, ell_z = self.table(P, R)
        rel = (ell_z - ell0) - (ell_z - ell0).mean(-1, keepdim=True)
        self.head.prior_norm *= self.head.prior_scale / rel.std(0).mean().clamp_min(1e-8)


def train_step(model: RewardLM, optimizer, x, r, f, weights, n_data: int, args: Args, mode: str, replay=None):
    """One AdamW step of the joint objective.
    pretrain: next-token NLL over [x, a_i, a_j, f] (the LM learns policy and transition together);
    online:   BCE of the LM's own approval logit on deployed feedback (reward learning = fine-tuning
              the transition), plus kappa * NLL on historical sequences with the feedback masked,
              because historical raters are not today's raters but the policy should stay the LM's,
              plus the heads' bootstrapped BCE and their anchor scaled by 1/N (the prior washes out as data grows)."""
    n = len(x)
    if replay is not None:  # one batched forward for the feedback batch and the replay batch
        x, r = torch.cat([x, replay[0]]), torch.cat([r, replay[1]])
    (log_pi, ell0, h, logits, ids), stats = model(x, r), {}
    if mode == "pretrain":
        targets = torch.cat([ids[:, 1:], torch.where(f > 0.5, model.plus, model.minus)[:, None]], 1)
        loss = stats["lm_nll"] = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    else:
        loss = stats["feedback_bce"] = F.binary_cross_entropy_with_logits(ell0[:n], f)
        if replay is not None:  # the policy tokens x, a_i, a_j predicted at positions 0-2; the feedback token masked
            replay_nll = F.cross_entropy(logits[n:, :3].flatten(0, 1).float(), ids[n:, 1:].flatten())
            loss, stats["replay_nll"] = loss + args.replay_coef * replay_nll, replay_nll
        stats["head_bce"] = head_loss(ell0[:n], model.head(h[:n].detach()), f, None if weights is None else weights.T)
        loss = loss + stats["head_bce"] + args.anchor_coef / n_data * model.head.anchor()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss during {mode}: {({k: v.item() for k, v in stats.items()})}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {k: v.item() for k, v in stats.items()}


# ---- Building and pretraining the LM (the "pretrained language model" of the didactic task) ----
def task_tokens(args: Args) -> list[str]:
    return (["<pad>", "<unk>", "<bos>", "<+>", "<->"] + [f"q{i}" for i in range(args.n_prompts)]
            + [f"a{k}" for k in range(args.n_answer_tokens)])


def build_lm(args: Args, base=None):
    """(GPT-2, tokenizer, token ids): a fresh tiny GPT-2 with a word-level tokenizer trained by
    `tokenizers`, or a loaded (model, tokenizer) with any missing task tokens added."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    if base is None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        vocab = {t: i for i, t in enumerate(task_tokens(args))}
        word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<bos>", eos_token="<pad>",
                                            pad_token="<pad>", unk_token="<unk>")
        lm = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(vocab), n_positions=8, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
            n_inner=2 * args.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab["<bos>"],
            eos_token_id=vocab["<pad>"], pad_token_id=vocab["<pad>"]))
    else:
        lm, tokenizer = copy.deepcopy(base[0]), base[1]
    vocab = tokenizer.get_vocab()
    ids = {"bos": vocab["<bos>"], "plus": vocab["<+>"], "minus": vocab["<->"],
           "prompts": [vocab[f"q{i}"] for i in range(args.n_prompts)],
           "answers": [vocab[f"a{k}"] for k in range(args.n_answer_tokens)]}
    return lm, tokenizer, ids


def pretrain(model: RewardLM, env: InclusivePopulationEnv, args: Args, seed: int, device):
    """Next-token pretraining of the LM on historical logs (the heads are not fitted on them: other raters)."""
    corpus = env.pretrain_corpus(args.pretrain_size, np.random.default_rng([seed, 1]))
    x, r, f = (torch.as_tensor(a, device=device) for a in corpus)
    gen = torch.Generator().manual_seed(seed)
    # Bootstrap masks for this corpus, drawn and not used: the first design fitted the heads here too, and the
    # epoch shuffles below come from the same generator, so dropping the draw would change every published result
    if args.bootstrap:
        torch.rand(len(x), args.ensemble_size, generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    # warm-up then cosine decay: at a constant rate the rare responses' feedback never settles
    total_steps = max(1, args.pretrain_epochs * -(-len(x) // args.pretrain_batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.pretrain_lr, pct_start=0.1, total_steps=total_steps)
    for epoch in range(args.pretrain_epochs):
        order, stats = torch.randperm(len(x), generator=gen).to(device), []
        for b in order.split(args.pretrain_batch_size):
            stats.append(train_step(model, optimizer, x[b], r[b], f[b], None, len(x), args, "pretrain"))
            scheduler.step()
        print(f"  pretrain epoch {epoch + 1}/{args.pretrain_epochs} | " +
              " | ".join(f"{k} {np.mean([s[k] for s in stats]):.3f}" for k in stats[0]), flush=True)
    return x, r  # kept for the online replay term (its feedback tokens are masked)


# ---- Metrics: everything is exact, because the task enumerates every (prompt, response) ----
def evaluate(model: RewardLM, env: InclusivePopulationEnv, log_pi_ref: torch.Tensor, args: Args, labels: torch.Tensor):
    """eval/* metrics of the exploit policy read off the model, plus the per-head logits agents select from.
    labels [2, P, R]: how many labels each cell has received so far, and how many of them were <+>."""
    log_pi, ell0, ell_z = model.table(env.P, env.R)
    p_mean, p_std = torch.sigmoid(ell_z).mean(0), torch.sigmoid(ell_z).std(0)
    theta = torch.as_tensor(env.theta, dtype=torch.float32, device=p_mean.device)
    exploit, beta1 = conditioned_policy(log_pi_ref, p_mean, args.beta), conditioned_policy(log_pi_ref, p_mean, 1.0)
    per_prompt = (exploit * theta).sum(1)
    best, rows = torch.as_tensor(env.best, device=p_mean.device), torch.arange(env.P, device=p_mean.device)
    metrics = {
        "eval/return_mean": per_prompt.mean().item(), "eval/return_std": per_prompt.std(unbiased=False).item(),
        "eval/regret": env.opt_value - per_prompt.mean().item(),
        "eval/value_beta1": (beta1 * theta).sum(1).mean().item(),
        "eval/frac_optimal": (p_mean.argmax(1) == best).float().mean().item(),
        "eval/kl_beta1_ref": (beta1 * (beta1.clamp_min(1e-30).log() - log_pi_ref)).sum(1).mean().item(),
        "eval/policy_drift_kl": (log_pi_ref.exp() * (log_pi_ref - log_pi)).sum(1).mean().item(),
        "eval/reward_err": (p_mean - theta).abs().mean().item(), "eval/std_best": p_std[rows, best].mean().item(),
        "eval/exploit_err": (p_mean - theta).abs()[rows, p_mean.argmax(1)].mean().item(),
        "eval/favourite_approval": p_mean[rows, torch.as_tensor(env.special[:, 0], device=p_mean.device)].mean().item()}
    metrics["eval/fit_error"], metrics["eval/fit_error_max"] = fit_error(p_mean.cpu(), labels[0], labels[1])
    return metrics, ell_z.cpu(), " ".join(str(int(y)) for y in p_mean.argmax(1))


def run_agent(agent: str, model: RewardLM, env: InclusivePopulationEnv, log_pi_ref: torch.Tensor, corpus,
              args: Args, seed: int, writer: ScalarRecorder, device, run: Run) -> list[dict]:
    """One agent's online phase: query, receive feedback, update the one LM jointly; evaluate every round.
    Returns one row per round: the evaluation before the round's update and what the round queried."""
    gen = torch.Generator().manual_seed(seed)
    # the same prompts and raters for every agent
    prompt_rng, rater_rng = np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3])
    optimizer = torch.optim.AdamW([{"params": model.lm.parameters()}, {"params": model.head.parameters(),
                                   "lr": args.head_learning_rate}], lr=args.learning_rate, weight_decay=0.0)
    buffer = {k: torch.empty(0, device=device) for k in ("x", "r", "f", "w")}
    labels = torch.zeros(2, env.P, env.R, dtype=torch.float64)  # per cell: labels received, <+> among them
    n_rounds, cum_regret, curve, start = args.queries // args.queries_per_round, 0.0, [], time.time()
    for rnd in range(n_rounds + 1):
        n_queries = rnd * args.queries_per_round
        metrics, ell_z, exploit = evaluate(model, env, log_pi_ref, args, labels)
        curve.append({"n_queries": n_queries, **metrics, "exploit": exploit})
        for k, v in metrics.items(): writer.add_scalar(k, v, n_queries)
        if rnd == n_rounds: break
        # ALGO LOGIC: 1. pick the responses to query (the only difference between agents)
        x = torch.as_tensor(prompt_rng.integers(env.P, size=args.queries_per_round))
        r = select_queries(agent, ell_z, log_pi_ref.cpu(), x, gen, args.boltzmann_temperature)
        # ALGO LOGIC: 2. today's raters answer; append to the FIFO buffer with per-head bootstrap masks
        f = torch.as_tensor(env.feedback(x.numpy(), r.numpy(), rater_rng))
        labels.index_put_((torch.zeros_like(x), x, r), torch.ones(len(x), dtype=labels.dtype), accumulate=True)
        labels.index_put_((torch.ones_like(x), x, r), f.to(labels.dtype), accumulate=True)
        w = (torch.rand(len(x), args.ensemble_size, generator=gen) < 0.5).float()
        for k, v in (("x", x), ("r", r), ("f", f), ("w", w if args.bootstrap else torch.ones_like(w))):
            buffer[k] = torch.cat([buffer[k].to(v.dtype), v.to(device)])[-args.buffer_size:]
        # ALGO LOGIC: 3. joint reward learning and fine-tuning of the one LM on the queried feedback
        n_seen, stats = n_queries + args.queries_per_round, []
        # about `update_epochs` passes over the buffer: a fixed step count would memorise the first few labels
        n_steps = min(args.updates_per_round, math.ceil(args.update_epochs * len(buffer["x"]) / args.update_batch_size))
        for step in range(n_steps):
            b = torch.randint(len(buffer["x"]), (args.update_batch_size,), generator=gen).to(device)
            c = torch.randint(len(corpus[0]), (args.update_batch_size,), generator=gen).to(device)
            replay = tuple(t[c] for t in corpus) if args.replay_coef > 0 else None
            try:  # train_step refuses to step on a non-finite loss; say where it happened
                stats.append(train_step(model, optimizer, buffer["x"][b], buffer["r"][b], buffer["f"][b],
                                        buffer["w"][b] if args.bootstrap else None, n_seen, args, "online", replay))
            except FloatingPointError as error:
                raise FloatingPointError(f"non-finite loss at update {rnd + 1}, step {step + 1} (seed {seed}, agent "
                                         f"{agent}): {error}") from None
            run.tokens += 4 * args.update_batch_size * (1 if replay is None else 2)
        # TRY NOT TO MODIFY: what this round queried, and the cost of exploring (regret of the queries)
        inst_regret = float((env.theta.max(1)[x.numpy()] - env.theta[x.numpy(), r.numpy()]).mean())
        cum_regret += inst_regret * len(x)
        std_chosen = torch.sigmoid(ell_z).std(0)[x, r].mean().item()
        objective = {"objective/inst_regret": inst_regret, "objective/cum_regret": cum_regret,
                     "objective/approval_rate": f.mean().item(), "objective/std_chosen": std_chosen,
                     "objective/frac_queried_best": float((r.numpy() == env.best[x.numpy()]).mean())}
        curve[-1].update(objective)
        for k, v in {**objective, **{f"losses/{k}": float(np.mean([s[k] for s in stats])) for k in stats[0]},
                     "charts/seconds": time.time() - start}.items():
            writer.add_scalar(k, v, n_seen)
        if (rnd + 1) % args.progress_every == 0 or rnd + 1 == n_rounds:
            value = metrics["eval/return_mean"]
            print(f"  seed {seed} {agent:9s} | queries {n_seen:5d}/{args.queries} | exploit value {value:.3f} "
                  f"({value / env.opt_value:.0%} of opt) | optimal on {metrics['eval/frac_optimal']:.0%} of prompts | "
                  f"std chosen {std_chosen:.3f} best {metrics['eval/std_best']:.3f} | cum regret {cum_regret:.1f} | "
                  f"{time.time() - start:.0f}s", flush=True)
    return curve


def summarise(curves: dict, opt_values: dict, args: Args) -> dict:
    """Per agent: queries to target on each seed (inf if never), median and range, final value and regret."""
    out, value = {}, lambda curve, key="eval/return_mean": np.array([c[key] for c in curve])
    for agent, by_seed in curves.items():
        q = {s: queries_to_target(value(c, "n_queries"), value(c), args.target_fraction * opt_values[s])
             for s, c in by_seed.items()}
        out[agent] = {
            "queries_to_target": {str(s): (v if math.isfinite(v) else None) for s, v in q.items()},
            "median": float(np.median(list(q.values()))), "min": min(q.values()), "max": max(q.values()),
            "seeds_reached": sum(math.isfinite(v) for v in q.values()), "num_seeds": len(q),
            "final_value": float(np.mean([value(c)[-1] for c in by_seed.values()])),
            "final_value_beta1": float(np.mean([value(c, "eval/value_beta1")[-1] for c in by_seed.values()])),
            "final_cum_regret": float(np.mean([c[-2]["objective/cum_regret"] for c in by_seed.values()])),
            "value_auc": float(np.mean([value(c).mean() for c in by_seed.values()]))}
    return out


def format_table(summary: dict, opt_value: float, queries: int, target: float) -> str:
    """The end-of-run table. The final values are true approvals: `beta=inf` of the exploit policy (the headline:
    per prompt, the response with the highest posterior-mean approval among all enumerated ones), `beta=1` of the
    LM's own policy conditioned on approval, pi_ref * p_mean / Z."""
    fmt = lambda v: f"{v:.0f}" if math.isfinite(v) else f">{queries}"
    share = lambda v: f"{v:.3f} ({v / opt_value:.0%})"
    return "\n".join([f"queries until the exploit policy stays >= {target:.0%} of the optimum ({opt_value:.3f}):",
                      f"{'agent':10s} | {'median':>7s} | {'range over seeds':>16s} | reached | final value, beta=inf | "
                      f"{'beta=1':12s} | cum regret", "-" * 103] + [
        f"{agent:10s} | {fmt(s['median']):>7s} | {fmt(s['min']) + ' - ' + fmt(s['max']):>16s} | {s['seeds_reached']}/"
        f"{s['num_seeds']:<5d} | {share(s['final_value']):21s} | {share(s['final_value_beta1']):12s} | "
        f"{s['final_cum_regret']:.1f}" for agent, s in summary.items()])


def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: check the arguments before any heavy work; a bad one exits with one line
    try:
        args, checkpoint = resume_args(args, Args, "reward_lm.py")
        if args.task != "inclusive":
            raise ValueError(f"unknown task {args.task!r}: reward_lm.py runs on its built-in task 'inclusive'")
        validate_args(args, LIMITS)
        if args.n_embd % args.n_head:
            raise ValueError(f"--n-head {args.n_head} must divide --n-embd {args.n_embd}")
        if args.queries % args.queries_per_round:
            raise ValueError(f"--queries / --queries-per-round: {args.queries} is not divisible by "
                             f"{args.queries_per_round}")
        if unknown := [a for a in args.agents if a not in AGENTS]:
            raise ValueError(f"unknown agent(s) {unknown}; choose from {', '.join(AGENTS)}")
        mixes = (args.deployed_mix, args.historical_mix)
        if len(mixes[0]) != len(mixes[1]) or not all(abs(sum(m) - 1) < 1e-6 and min(m) >= 0 for m in mixes):
            raise ValueError("--deployed-mix and --historical-mix must be distributions over the same groups")
        if 2 * len(args.deployed_mix) + 2 > args.n_answer_tokens:
            raise ValueError(f"--n-answer-tokens must be >= {2 * len(args.deployed_mix) + 2} for disjoint special "
                             "responses")
        # ranks with fewer simulations wait in all_gather for the longest one: at hub scale, hours
        device = init_distributed(args.cuda, timeout=datetime.timedelta(hours=24))[2]
        # any other causal LM gets the task's words as new tokens, learned in pretraining
        base = None if args.model_name == "tiny-gpt2" else load_causal_lm(args.model_name, task_tokens(args), device)
        run = Run(args, "reward_lm.py", checkpoint)
    except (ValueError, OSError) as error:
        raise SystemExit(error_line(error))
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the run's output
    seed_everything(args.seed, args.torch_deterministic)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    envs = {seed: InclusivePopulationEnv.from_args(seed, args) for seed in seeds}

    def simulate(seed: int) -> dict:
        """Pretrain one LM on the seed's historical data, then run every agent from a copy of it."""
        env, out = envs[seed], {"curves": {}, "scalars": {}}
        torch.manual_seed(seed)
        lm, tokenizer, ids = build_lm(args, base)
        # the heads see the input embeddings of x, a_i, a_j and the last hidden state: 4 blocks of the LM's width
        head = EpistemicHead(4 * lm.config.hidden_size, args.head_hidden, args.ensemble_size, args.prior_scale)
        model = RewardLM(lm, ids, head).to(device)
        print(f"seed {seed}: pretraining on {args.pretrain_size} historical sequences (optimum {env.opt_value:.3f})")
        corpus = pretrain(model, env, args, seed, device)
        model.calibrate_prior(env.P, env.R)  # on the pretrained LM's features, before the heads see any label
        with torch.no_grad():  # pi_ref: the pretrained LM's policy, frozen as a table (the task enumerates it)
            log_pi_ref = model.table(env.P, env.R)[0]
        for agent in args.agents:
            writer = ScalarRecorder()  # written to TensorBoard by rank 0 once the wave is checkpointed
            agent_model = copy.deepcopy(model)
            out["curves"][agent] = run_agent(agent, agent_model, env, log_pi_ref, corpus, args, seed, writer, device,
                                             run)
            out["scalars"][agent] = writer.scalars
            if args.save_model and seed == seeds[0] and agent == args.agents[0]:  # rank 0's; from_pretrained loads it
                with writing_dir(os.path.join(run.dir, "model")) as path:  # whole or not at all
                    for part in (agent_model.lm, tokenizer): part.save_pretrained(path)
                    torch.save(agent_model.head.state_dict(), os.path.join(path, "epistemic_head.pt"))
        return out

    # Under torchrun the independent simulations are the batch: each rank runs one seed (all agents) per wave;
    # rank 0 checkpoints each wave's results (a killed run redoes at most one wave) and writes their TensorBoard
    # runs (purge_step=0: a redone simulation replaces a half-written one).
    def write_wave(results: dict) -> None:
        for seed, result in results.items() if run.is_main else []:
            for agent, scalars in result["scalars"].items():
                with SummaryWriter(os.path.join(run.dir, f"{agent}__seed{seed}"), purge_step=0) as writer:
                    for tag, value, step in scalars: writer.add_scalar(tag, value, step)

    stop_on_sigterm()
    try:
        done = map_in_waves(simulate, seeds, run, checkpoint, write_wave)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; the finished seeds are kept: python reward_lm.py --resume {run.dir}")
    except (FloatingPointError, OSError) as error:  # a diverged loss or the disk: one line, the last checkpoint kept
        raise run.fault(error)
    curves = {agent: {seed: done[seed]["curves"][agent] for seed in seeds} for agent in args.agents}
    rows = [{"seed": seed, "agent": agent, **c} for seed in seeds for agent in args.agents for c in curves[agent][seed]]
    # TRY NOT TO MODIFY: the method's seed-mean curve goes to eval/*, every row to curves.csv, the table last
    method, env = args.agents[0], envs[seeds[0]]
    for i, point in enumerate(curves[method][seeds[0]]):
        mean = {k: float(np.mean([curves[method][s][i][k] for s in seeds])) for k in point if k.startswith("eval/")}
        samples = [(f"q{x} (seed {seeds[0]})", f"response {y} (best {env.best[x]})", float(env.theta[x, int(y)]))
                   for x, y in enumerate(point["exploit"].split())]
        run.log_eval(mean, samples, point["n_queries"])
    run.tokens = sum(all_gather_objects(run.tokens))
    per_agent = summarise(curves, {s: e.opt_value for s, e in envs.items()}, args)
    opt_value = float(np.mean([e.opt_value for e in envs.values()]))
    try:
        if run.is_main:
            table = io.StringIO(newline="")
            writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)
            write_atomically(os.path.join(run.dir, "curves.csv"), lambda file: file.write(table.getvalue().encode()))
        summary = run.write_summary({"seeds": seeds, "opt_value": opt_value, "agents": per_agent})
    except OSError as error:
        raise run.fault(error)
    run.close()
    close_distributed()
    print(format_table(per_agent, opt_value, args.queries, args.target_fraction))
    print(f"{summary['wall_seconds']:.0f}s; run dir {run.dir}", flush=True)
    torch.set_num_threads(threads_before)
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
