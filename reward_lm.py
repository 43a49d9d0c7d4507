"""Reward-LM: one language model is the policy, the transition function and the reward at once.

Paper: Xu, Dong, Arumugam, Van Roy, "Shattering the Agent-Environment Interface for Fine-Tuning
Inclusive Language Models" (arXiv 2305.11455), reconstructed from its abstract and Dwaracherla et al. 2024,
"Efficient Exploration for LLMs" (docs/reward_lm.md says what is ours).

A response y to a prompt x is followed, in the same token stream, by a rater's feedback token <+>
or <->. So one GPT-2 over [<bos>, x, y, f] is
  - the policy:      pi(y | x), its next-token distribution at the response positions;
  - the transition:  p(f | x, y), its next-token distribution at the feedback position;
  - the reward:      r(x, y) = log p(<+> | x, y), the log-probability that a rater approves.
Reward learning is fine-tuning the LM on the feedback tokens it receives, with the pretrained LM's belief as
the prior; the improved policy is read off the same model by Bayes' rule, with no PPO:
pi_beta(y | x) ~ pi_ref(y | x) * p(<+> | x, y) ** beta (beta = 1: the LM conditioned on approval; beta = inf:
argmax). Epistemic uncertainty comes from an ensemble of heads with randomized priors, one offset per response
around the LM's belief; Thompson sampling queries the response that is best under one sampled head.
The built-in didactic task (common/inclusive.py): rater groups whose deployed mix differs from the historical
mix the LM was pretrained on, so the response the pretrained LM undervalues ("inclusive") is in fact the best
for the whole population. Agents differ only in which response they query.

Run:  python reward_lm.py                 # ts, greedy, passive on seeds 101-120
      python reward_lm.py --help          # every flag
"""

import copy
import datetime
import math
import os
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import inclusive
from common.models import load_causal_lm
from common.utils import (
    Run,
    RunArgs,
    ScalarRecorder,
    all_gather_objects,
    close_distributed,
    error_line,
    exact_div,
    init_distributed,
    map_in_waves,
    resume_args,
    seed_everything,
    stop_on_sigterm,
    validate_args,
    writing_dir,
)

AGENTS = ("ts", "greedy", "passive", "boltzmann", "infomax", "ts_rm")


@dataclass
class Args(RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    task: str = "inclusive"
    """the task: only the built-in rater-population task `inclusive`"""
    model_name: str = "tiny-gpt2"
    """`tiny-gpt2` (built here), or a local GPT-2 directory; either is pretrained on the historical corpus"""

    # The didactic data-generating process
    n_prompts: int = 4
    """number of distinct prompts x"""
    n_answer_tokens: int = 8
    """answer tokens; a response is two of them"""
    deployed_mix: tuple[float, ...] = (0.60, 0.25, 0.15)
    """share of each rater group among today's users (group 0 is the majority)"""
    historical_mix: tuple[float, ...] = (1.0, 0.0, 0.0)
    """share of each rater group in the historical feedback the LM was pretrained on"""
    inclusive_majority_approval: float = 0.5
    """how often the majority approves the inclusive response; lower = deeper trap"""
    inclusive_pretrain_mass: float = 0.005
    """probability of the inclusive response in the historical logs"""
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
    """epochs of next-token pretraining on the historical corpus (0 keeps a loaded model as it is)"""
    pretrain_batch_size: int = 256
    """sequences per pretraining step"""
    pretrain_lr: float = 3e-3
    """AdamW learning rate of pretraining"""

    # The prior about today's approval, and the ensemble that carries the uncertainty
    prior_scale: float = 0.67
    """alpha: prior std in logits of a response's approval today (docs/reward_lm.md, detail 4)"""
    ensemble_size: int = 10
    """M: the number of epistemic heads"""
    bootstrap: bool = True
    """each head counts each label 0 or 2 times; off: once"""

    # Online phase: queries, joint reward learning and fine-tuning
    agents: tuple[str, ...] = ("ts", "greedy", "passive")
    """agents to compare (ts, greedy, passive, boltzmann, infomax, ts_rm); the first is reported in eval/*"""
    seed: int = 101
    """the first seed (settings were chosen on seeds 21-31, never on 101-120)"""
    num_seeds: int = 20
    """seeds seed, seed+1, ...; every agent runs on the same seeds"""
    queries: int = 4096
    """feedback queries per agent and seed"""
    queries_per_round: int = 64
    """queries between two updates; must divide `queries`"""
    max_fit_steps: int = 200
    """at most this many full-batch steps of reward learning after each round"""
    fit_tol: float = 1e-4
    """a round's fit stops once 5 steps bring the buffer's loss no more than this below its lowest"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LM in the online phase"""
    replay_batch_size: int = 64
    """replayed historical sequences per online step"""
    buffer_size: int = 4096
    """FIFO capacity of the online feedback buffer"""
    replay_coef: float = 0.1
    """kappa: weight of the replayed historical policy tokens' NLL, which keeps the LM's policy"""
    beta: float = float("inf")
    """exploit policy pi_ref * p(<+>)**beta / Z; inf = argmax of predicted approval"""
    boltzmann_temperature: float = 0.05
    """boltzmann agent: queries y with probability ~ exp(p(<+>|x,y) / T)"""
    target_fraction: float = 0.95
    """share of the optimum that queries-to-target asks the exploit policy to keep"""
    progress_every: int = 16
    """print a progress line every this many rounds"""
    threads: int = 1
    """torch CPU threads (this tiny model gains nothing from more)"""


# The allowed values of the numeric flags, checked before any work (common/utils.py `validate_args`; a bound "inf]"
# admits infinity; float flags not named here must be finite): positive, except the few listed after.
LIMITS = dict.fromkeys(
    "n_prompts n_answer_tokens pretrain_size n_embd n_layer n_head pretrain_batch_size pretrain_lr ensemble_size"
    " prior_scale num_seeds queries queries_per_round max_fit_steps learning_rate replay_batch_size buffer_size"
    " boltzmann_temperature progress_every threads".split(),
    "(0, inf)",
) | {
    "inclusive_majority_approval": "[0, 1]",
    "inclusive_pretrain_mass": "(0, 1)",
    "pretrain_epochs": "[0, inf)",
    "fit_tol": "[0, inf)",
    "replay_coef": "[0, inf)",
    "beta": "[0, inf]",
    "target_fraction": "(0, 1]",
}


# ---- ALGO LOGIC: pure pieces of the method (each unit-tested in tests/test_reward_lm.py) ----
def conditioned_policy(log_pi_ref: torch.Tensor, p_approve: torch.Tensor, beta: float) -> torch.Tensor:
    """pi_beta(y|x) = pi_ref(y|x) p(<+>|x,y)^beta / Z(x) over the last dim; beta = inf is the argmax
    of p (first one on ties): the policy improvement is Bayes' rule on the LM, no optimisation."""
    if math.isinf(beta):
        return F.one_hot(p_approve.argmax(-1), p_approve.shape[-1]).to(p_approve.dtype)
    return torch.softmax(log_pi_ref + beta * torch.log(p_approve.clamp_min(1e-12)), -1)


def select_queries(
    agent: str, ell_z: torch.Tensor, log_pi_ref: torch.Tensor, x: torch.Tensor, gen: torch.Generator, temperature: float
) -> torch.Tensor:
    """The only thing agents differ in: which response to query for each prompt in `x`.
    ell_z: [M, P, R] approval logits of the M heads; log_pi_ref: [P, R]."""
    probs = torch.sigmoid(ell_z)
    if agent in ("ts", "ts_rm"):  # Thompson sampling: act greedily w.r.t. one sampled reward model per query
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


def cell_counts(x: torch.Tensor, r: torch.Tensor, f: torch.Tensor, w: torch.Tensor, n_cells: int, R: int):
    """The feedback buffer as sufficient statistics per (prompt, response) cell c = x * R + r: labels n [C] and
    approvals k [C], and each head's bootstrapped counts n_z, k_z [M, C] (w [N, M]: how often head z counts a label).
    A loss that is a sum over labels of a function of their cell is a sum over cells of these counts."""
    cell = x * R + r
    n = torch.zeros(n_cells, device=x.device).index_add_(0, cell, torch.ones_like(f))
    k = torch.zeros(n_cells, device=x.device).index_add_(0, cell, f)
    n_z = torch.zeros(w.shape[1], n_cells, device=x.device).index_add_(1, cell, w.T)
    k_z = torch.zeros(w.shape[1], n_cells, device=x.device).index_add_(1, cell, (w * f[:, None]).T)
    return n, k, n_z, k_z


def feedback_loss(ell0, ell_prior, n, k, prior_scale: float) -> torch.Tensor:
    """The LM's approval logits' negative log-posterior per label, over every cell:
    [sum_c n_c BCE(ell0_c, k_c / n_c) + sum_c (ell0_c - ell_prior_c)^2 / (2 alpha^2)] / sum_c n_c: the buffer's
    mean BCE (fine-tuning the transition on feedback tokens) plus an independent Gaussian prior per response around
    the pretrained LM's belief, which keeps unqueried responses where pretraining put them (docs/reward_lm.md,
    detail 5)."""
    bce = F.binary_cross_entropy_with_logits(ell0, k / n.clamp_min(1), weight=n, reduction="sum")
    return (bce + (ell0 - ell_prior).pow(2).sum() / (2 * prior_scale**2)) / n.sum().clamp_min(1)


def fit_head_offsets(ell0, prior, n_z, k_z, prior_scale: float, offsets, newton_steps: int = 25) -> torch.Tensor:
    """Each head's offset per cell, exactly: head z's approval logit is ell_z = ell0 + prior_z + offset_z, and
    offset_z = argmin_o n_z BCE(ell0 + prior_z + o, k_z / n_z) + o^2 / (2 alpha^2), the MAP of its bootstrapped
    labels under a prior centred on its own prior sample (randomized prior functions, Osband et al. 2018).
    Each cell's problem is one-dimensional and convex: Newton's method from the last round's offsets.
    All tensors [M, C] except ell0 [C]."""
    precision = 1.0 / prior_scale**2
    target = k_z / n_z.clamp_min(1)
    for _ in range(newton_steps):
        p = torch.sigmoid(ell0 + prior + offsets)
        offsets = offsets - (n_z * (p - target) + precision * offsets) / (n_z * p * (1 - p) + precision)
    return offsets


# ---- Model pieces: the one LM that plays all three roles, and the epistemic heads around its belief ----
class EpistemicHeads(nn.Module):
    """M heads, each an offset per (prompt, response) to the LM's approval logit: ell_z = ell0 + prior_z + offset_z.
    prior_z ~ N(0, alpha^2) is frozen and centred over the heads, so the ensemble starts at the LM's belief;
    offset_z is fitted to head z's bootstrapped labels (`fit_head_offsets`). Why not a network on the LM's
    features: docs/reward_lm.md, detail 6."""

    def __init__(self, size: int, n_cells: int, prior_scale: float, gen: torch.Generator):
        super().__init__()
        prior = torch.randn(size, n_cells, generator=gen) * prior_scale
        self.register_buffer("prior", prior - prior.mean(0, keepdim=True))
        self.register_buffer("offsets", torch.zeros(size, n_cells))


class RewardLM(nn.Module):
    """A causal LM over [<bos>, x, a_i, a_j] plus epistemic heads; one forward gives all three roles."""

    def __init__(self, lm: nn.Module, ids: dict, heads: EpistemicHeads):
        super().__init__()
        self.lm, self.heads = lm, heads
        self.bos, self.plus, self.minus = ids["bos"], ids["plus"], ids["minus"]
        self.register_buffer("prompt_ids", torch.tensor(ids["prompts"]))
        self.register_buffer("answer_ids", torch.tensor(ids["answers"]))

    def forward(self, x: torch.Tensor, r: torch.Tensor):
        """-> log pi(y|x) [N] (response positions, renormalised over answer tokens), approval logit
        ell0 = logit<+> - logit<-> [N] (feedback position), logits [N, 4, V], input ids [N, 4]."""
        K = len(self.answer_ids)
        i, j = r // K, r % K
        ids = torch.stack([torch.full_like(x, self.bos), self.prompt_ids[x], self.answer_ids[i], self.answer_ids[j]], 1)
        logits = self.lm(input_ids=ids).logits
        answer_logp = logits[:, 1:3][..., self.answer_ids].float().log_softmax(-1)  # [N, 2, K]
        log_pi = answer_logp[:, 0].gather(1, i[:, None]).squeeze(1) + answer_logp[:, 1].gather(1, j[:, None]).squeeze(1)
        ell0 = (logits[:, 3, self.plus] - logits[:, 3, self.minus]).float()
        return log_pi, ell0, logits, ids

    def cells(self, P: int, R: int):
        """Every (prompt, response), cell c = x * R + r: x [P * R], r [P * R]."""
        x = torch.arange(P, device=self.answer_ids.device).repeat_interleave(R)
        return x, torch.arange(R, device=x.device).repeat(P)

    @torch.no_grad()
    def table(self, P: int, R: int):
        """Every (prompt, response): log pi [P, R], ell0 [P, R], ell_z [M, P, R] in one batched forward."""
        log_pi, ell0, _, _ = self(*self.cells(P, R))
        ell_z = ell0 + self.heads.prior + self.heads.offsets
        return log_pi.view(P, R), ell0.view(P, R), ell_z.view(-1, P, R)


def fit_feedback(model: RewardLM, optimizer, n, k, ell_prior, corpus, replay_coef: float, args: Args, gen) -> dict:
    """Reward learning after a round: full-batch AdamW steps on the buffer's loss over every cell (`feedback_loss`)
    plus kappa * next-token NLL on replayed historical sequences with their feedback token masked (historical
    raters are not today's), until the buffer's loss stops falling (docs/reward_lm.md, details 5 and 7)."""
    x_cells, r_cells = model.cells(*ell_prior.shape)
    ell_prior, C, history = ell_prior.flatten(), len(x_cells), []
    replay_nll = torch.zeros(())
    for _ in range(args.max_fit_steps):
        c = torch.randint(len(corpus[0]), (args.replay_batch_size if replay_coef > 0 else 0,), generator=gen)
        c = c.to(x_cells.device)
        _, ell0, logits, ids = model(torch.cat([x_cells, corpus[0][c]]), torch.cat([r_cells, corpus[1][c]]))
        buffer_loss = feedback_loss(ell0[:C], ell_prior, n, k, args.prior_scale)
        loss = buffer_loss
        if replay_coef > 0:  # the policy tokens x, a_i, a_j are predicted at positions 0-2; the feedback token masked
            replay_nll = F.cross_entropy(logits[C:, :3].flatten(0, 1).float(), ids[C:, 1:].flatten())
            loss = loss + replay_coef * replay_nll
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss: buffer {buffer_loss.item()}, replay {replay_nll.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(buffer_loss.item())
        if len(history) > 5 and min(history[-5:]) > min(history[:-5]) - args.fit_tol:
            break  # no new lowest loss, by fit_tol, in the last 5 steps
    return {"buffer_loss": history[-1], "replay_nll": replay_nll.item(), "fit_steps": len(history)}


# ---- Pretraining: the LM learns the historical policy and raters, the prior of the online phase ----
def pretrain_step(model: RewardLM, optimizer, x, r, f) -> float:
    """One AdamW step of next-token NLL over [x, a_i, a_j, f]: the LM learns policy and transition together."""
    _, _, logits, ids = model(x, r)
    targets = torch.cat([ids[:, 1:], torch.where(f > 0.5, model.plus, model.minus)[:, None]], 1)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss during pretraining: {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def pretrain(model: RewardLM, env: inclusive.InclusivePopulationEnv, args: Args, seed: int, device):
    """Next-token pretraining of the LM on historical logs (the heads are not fitted on them: other raters)."""
    corpus = env.pretrain_corpus(args.pretrain_size, np.random.default_rng([seed, 1]))
    x, r, f = (torch.as_tensor(a, device=device) for a in corpus)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0, fused=True)
    # warm-up then cosine decay: at a constant rate the rare responses' feedback never settles
    total_steps = max(1, args.pretrain_epochs * -(-len(x) // args.pretrain_batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.pretrain_lr, pct_start=0.1, total_steps=total_steps)
    for epoch in range(args.pretrain_epochs):
        order, stats = torch.randperm(len(x), generator=gen).to(device), []
        for b in order.split(args.pretrain_batch_size):
            stats.append(pretrain_step(model, optimizer, x[b], r[b], f[b]))
            scheduler.step()
        print(f"  pretrain epoch {epoch + 1}/{args.pretrain_epochs} | lm_nll {np.mean(stats):.3f}", flush=True)
    return x, r  # kept for the online replay term (its feedback tokens are masked)


# ---- Metrics: everything is exact, because the task enumerates every (prompt, response) ----
def evaluate(model: RewardLM, env, log_pi_ref: torch.Tensor, args: Args, labels: torch.Tensor, policy_is_model=True):
    """eval/* metrics of the exploit policy read off the model, plus the per-head logits agents select from.
    labels [2, P, R]: how many labels each cell has received so far, and how many of them were <+>."""
    log_pi, ell0, ell_z = model.table(env.P, env.R)
    log_pi = log_pi if policy_is_model else log_pi_ref  # ts_rm: the policy is the untouched pretrained LM
    p_mean, p_std = torch.sigmoid(ell_z).mean(0), torch.sigmoid(ell_z).std(0)
    theta = torch.as_tensor(env.theta, dtype=torch.float32, device=p_mean.device)
    exploit, beta1 = conditioned_policy(log_pi_ref, p_mean, args.beta), conditioned_policy(log_pi_ref, p_mean, 1.0)
    per_prompt = (exploit * theta).sum(1)
    best, rows = torch.as_tensor(env.best, device=p_mean.device), torch.arange(env.P, device=p_mean.device)
    metrics = {
        "eval/return_mean": per_prompt.mean().item(),
        "eval/return_std": per_prompt.std(unbiased=False).item(),
        "eval/regret": env.opt_value - per_prompt.mean().item(),
        "eval/value_beta1": (beta1 * theta).sum(1).mean().item(),
        "eval/frac_optimal": (p_mean.argmax(1) == best).float().mean().item(),
        "eval/kl_beta1_ref": (beta1 * (beta1.clamp_min(1e-30).log() - log_pi_ref)).sum(1).mean().item(),
        "eval/policy_drift_kl": (log_pi_ref.exp() * (log_pi_ref - log_pi)).sum(1).mean().item(),
        "eval/reward_err": (p_mean - theta).abs().mean().item(),
        "eval/std_best": p_std[rows, best].mean().item(),
        "eval/exploit_err": (p_mean - theta).abs()[rows, p_mean.argmax(1)].mean().item(),
        "eval/favourite_approval": p_mean[rows, torch.as_tensor(env.special[:, 0], device=p_mean.device)].mean().item(),
    }
    metrics["eval/fit_error"], metrics["eval/fit_error_max"] = inclusive.fit_error(p_mean.cpu(), labels[0], labels[1])
    return metrics, ell_z.cpu(), " ".join(str(int(y)) for y in p_mean.argmax(1))


def run_agent(
    agent: str, model: RewardLM, env, log_pi_ref: torch.Tensor, corpus, args: Args, seed: int, writer, device, run: Run
) -> list[dict]:
    """One agent's online phase: query, receive feedback, update the one LM jointly; evaluate every round.
    Returns one row per round: the evaluation before the round's update and what the round queried."""
    gen = torch.Generator().manual_seed(seed)
    # ts_rm: the copy of the pretrained LM is the reward model alone; the policy stays pi_ref, so no replay (detail 10)
    one_lm = agent != "ts_rm"
    replay_coef = args.replay_coef if one_lm else 0.0
    # the same prompts and raters for every agent
    prompt_rng, rater_rng = np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3])
    optimizer = torch.optim.AdamW(model.lm.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    with torch.no_grad():  # the prior mean of every response's approval logit: the pretrained LM's belief
        ell_prior = model.table(env.P, env.R)[1]
    buffer = {k: torch.empty(0, device=device) for k in ("x", "r", "f", "w")}
    labels = torch.zeros(2, env.P, env.R, dtype=torch.float64)  # per cell: labels received, <+> among them
    n_rounds, cum_regret, curve, start = args.queries // args.queries_per_round, 0.0, [], time.time()
    for rnd in range(n_rounds + 1):
        n_queries = rnd * args.queries_per_round
        metrics, ell_z, exploit = evaluate(model, env, log_pi_ref, args, labels, policy_is_model=one_lm)
        curve.append({"n_queries": n_queries, **metrics, "exploit": exploit})
        for k, v in metrics.items():
            writer.add_scalar(k, v, n_queries)
        if rnd == n_rounds:
            break
        # ALGO LOGIC: 1. pick the responses to query (the only difference between agents)
        x = torch.as_tensor(prompt_rng.integers(env.P, size=args.queries_per_round))
        r = select_queries(agent, ell_z, log_pi_ref.cpu(), x, gen, args.boltzmann_temperature)
        # ALGO LOGIC: 2. today's raters answer; append to the FIFO buffer with per-head bootstrap weights 0 or 2
        f = torch.as_tensor(env.feedback(x.numpy(), r.numpy(), rater_rng))
        labels.index_put_((torch.zeros_like(x), x, r), torch.ones(len(x), dtype=labels.dtype), accumulate=True)
        labels.index_put_((torch.ones_like(x), x, r), f.to(labels.dtype), accumulate=True)
        w = 2.0 * (torch.rand(len(x), args.ensemble_size, generator=gen) < 0.5).float()
        for k, v in (("x", x), ("r", r), ("f", f), ("w", w if args.bootstrap else torch.ones_like(w))):
            buffer[k] = torch.cat([buffer[k].to(v.dtype), v.to(device)])[-args.buffer_size :]
        # ALGO LOGIC: 3. reward learning = fine-tuning the one LM on the feedback tokens, until the buffer's loss
        # stops falling; then each head's offsets, exactly, around the LM's new belief
        n, k, n_z, k_z = cell_counts(buffer["x"], buffer["r"], buffer["f"], buffer["w"], env.P * env.R, env.R)
        try:
            stats = fit_feedback(model, optimizer, n, k, ell_prior, corpus, replay_coef, args, gen)
        except FloatingPointError as error:  # say where it happened
            raise FloatingPointError(f"{error} at update {rnd + 1} (seed {seed}, agent {agent})") from None
        with torch.no_grad():
            ell0 = model.table(env.P, env.R)[1].flatten()
            model.heads.offsets = fit_head_offsets(
                ell0, model.heads.prior, n_z, k_z, args.prior_scale, model.heads.offsets
            )
        n_seen = n_queries + args.queries_per_round
        run.tokens += 4 * stats["fit_steps"] * (env.P * env.R + (args.replay_batch_size if replay_coef > 0 else 0))
        # TRY NOT TO MODIFY: what this round queried, and the cost of exploring (regret of the queries)
        inst_regret = float((env.theta.max(1)[x.numpy()] - env.theta[x.numpy(), r.numpy()]).mean())
        cum_regret += inst_regret * len(x)
        std_chosen = torch.sigmoid(ell_z).std(0)[x, r].mean().item()
        objective = {
            "objective/inst_regret": inst_regret,
            "objective/cum_regret": cum_regret,
            "objective/approval_rate": f.mean().item(),
            "objective/std_chosen": std_chosen,
            "objective/frac_queried_best": float((r.numpy() == env.best[x.numpy()]).mean()),
        }
        curve[-1].update(objective)
        logged = {**objective, **{f"losses/{k}": v for k, v in stats.items()}, "charts/seconds": time.time() - start}
        for k, v in logged.items():
            writer.add_scalar(k, v, n_seen)
        if (rnd + 1) % args.progress_every == 0 or rnd + 1 == n_rounds:
            value = metrics["eval/return_mean"]
            print(
                f"  seed {seed} {agent:9s} | queries {n_seen:5d}/{args.queries} | exploit value {value:.3f} "
                f"({value / env.opt_value:.0%} of opt) | optimal on {metrics['eval/frac_optimal']:.0%} of prompts | "
                f"std chosen {std_chosen:.3f} best {metrics['eval/std_best']:.3f} | cum regret {cum_regret:.1f} | "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
    return curve


def simulate(seed: int, envs: dict, args: Args, base, device, run: Run) -> dict:
    """One seed: pretrain one LM on its historical data, then run every agent from a copy of it."""
    env, out = envs[seed], {"curves": {}, "scalars": {}}
    torch.manual_seed(seed)
    lm, tokenizer, ids = inclusive.build_lm(args, base)
    prior_gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 4]).integers(2**62)))
    heads = EpistemicHeads(args.ensemble_size, env.P * env.R, args.prior_scale, prior_gen)
    model = RewardLM(lm, ids, heads).to(device)
    print(f"seed {seed}: pretraining on {args.pretrain_size} historical sequences (optimum {env.opt_value:.3f})")
    corpus = pretrain(model, env, args, seed, device)
    with torch.no_grad():  # pi_ref: the pretrained LM's policy, frozen as a table (the task enumerates it)
        log_pi_ref = model.table(env.P, env.R)[0]
    for agent in args.agents:
        writer = ScalarRecorder()  # written to TensorBoard by rank 0 once the wave is checkpointed
        agent_model = copy.deepcopy(model)
        out["curves"][agent] = run_agent(agent, agent_model, env, log_pi_ref, corpus, args, seed, writer, device, run)
        out["scalars"][agent] = writer.scalars
        if args.save_model and seed == args.seed and agent == args.agents[0]:  # rank 0's; from_pretrained loads it
            with writing_dir(os.path.join(run.dir, "model")) as path:  # whole or not at all
                for part in (agent_model.lm, tokenizer):
                    part.save_pretrained(path)
                torch.save(agent_model.heads.state_dict(), os.path.join(path, "epistemic_heads.pt"))
    return out


def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: check the arguments before any heavy work; a bad one exits with one line
    try:
        args, checkpoint = resume_args(args, Args, os.path.basename(__file__))
        if args.task != "inclusive":
            raise ValueError(f"unknown task {args.task!r}: reward_lm.py runs on its built-in task 'inclusive'")
        validate_args(args, LIMITS)
        if args.n_embd % args.n_head:
            raise ValueError(f"--n-head {args.n_head} must divide --n-embd {args.n_embd}")
        exact_div(args.queries, args.queries_per_round, "--queries / --queries-per-round")
        if unknown := [a for a in args.agents if a not in AGENTS]:
            raise ValueError(f"unknown agent(s) {unknown}; choose from {', '.join(AGENTS)}")
        inclusive.check_args(args)  # the rater population: common/inclusive.py
        # ranks with fewer simulations wait in all_gather for the longest one: at hub scale, hours
        device = init_distributed(args.cuda, timeout=datetime.timedelta(hours=24))[2]
        # any other causal LM gets the task's words as new tokens, learned in pretraining
        words = inclusive.task_tokens(args)
        base = None if args.model_name == "tiny-gpt2" else load_causal_lm(args.model_name, words, device)
        run = Run(args, os.path.basename(__file__), checkpoint)
    except (ValueError, OSError) as error:
        raise SystemExit(error_line(error)) from error
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the run's output
    seed_everything(args.seed, args.torch_deterministic)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    envs = {seed: inclusive.InclusivePopulationEnv.from_args(seed, args) for seed in seeds}

    stop_on_sigterm()
    try:
        # Under torchrun the independent simulations are the batch: each rank runs one seed (all agents) per wave;
        # rank 0 checkpoints each wave's results and writes their TensorBoard runs (docs/reward_lm.md, detail 16)
        one_seed = partial(simulate, envs=envs, args=args, base=base, device=device, run=run)
        done = map_in_waves(one_seed, seeds, run, checkpoint, partial(inclusive.write_scalars, run))
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; the finished seeds are kept: python reward_lm.py --resume {run.dir}") from None
    except (FloatingPointError, OSError) as error:  # a diverged loss or the disk: one line, the last checkpoint kept
        raise run.fault(error) from error
    curves = {agent: {seed: done[seed]["curves"][agent] for seed in seeds} for agent in args.agents}
    rows = [{"seed": seed, "agent": agent, **c} for seed in seeds for agent in args.agents for c in curves[agent][seed]]
    # TRY NOT TO MODIFY: the method's seed-mean curve goes to eval/*, every row to curves.csv, the table last
    method, env = args.agents[0], envs[seeds[0]]
    for i, point in enumerate(curves[method][seeds[0]]):
        mean = {k: float(np.mean([curves[method][s][i][k] for s in seeds])) for k in point if k.startswith("eval/")}
        run.log_eval(mean, inclusive.samples(env, seeds[0], point["exploit"]), point["n_queries"])
    run.tokens = sum(all_gather_objects(run.tokens))
    per_agent = inclusive.summarise(curves, {s: e.opt_value for s, e in envs.items()}, args.target_fraction)
    opt_value = float(np.mean([e.opt_value for e in envs.values()]))
    try:
        if run.is_main:
            inclusive.write_curves(os.path.join(run.dir, "curves.csv"), rows)
        summary = run.write_summary({"seeds": seeds, "opt_value": opt_value, "agents": per_agent})
    except OSError as error:
        raise run.fault(error) from error
    run.close()
    close_distributed()
    print(inclusive.format_table(per_agent, opt_value, args.queries, args.target_fraction))
    print(f"{summary['wall_seconds']:.0f}s; run dir {run.dir}", flush=True)
    torch.set_num_threads(threads_before)
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
