"""ILQL: offline implicit language Q-learning.

Paper: Snell, Kostrikov, Su, Yang, Levine, "Offline RL for Natural Language Generation with Implicit
Language Q Learning" (ICLR 2023). Reference code: the authors' `Implicit-Language-Q-Learning`
(`src/models/iql_model.py::PerTokenIQL`) and trlX (`trlx/models/modeling_ilql.py`).
Docs: docs/ilql.md (implementation details, deviations, the Wordle results table).

Learn from a fixed dataset of episodes with their rewards, never sampling during training. Every
token the agent wrote is an action; the state is everything before it. The networks:
  pi_beta   the data's language model, trained by plain next-token cross-entropy on action tokens (BC);
  Q, V      a second copy of the transformer (or pi_beta's own, --shared-trunk) with a V head and two Q
            heads (one Q per vocabulary token), fitted by IQL: V is an expectile (tau) of the target Q
            over the data's actions, Q regresses to r + gamma * V(next state); a CQL term keeps Q low
            on tokens the data never chose;
  target    Polyak averages of the two Q heads, which supply V's regression targets.
Deployed policy: pi(a|s) ~ pi_beta(a|s) * exp(beta * (min_k Q_target_k(s, a) - V(s))), inside cached
generation. With beta = 0 it is pi_beta, the BC baseline; with --top-fraction it is %BC.

Run:  python ilql.py --task wordle                        # multi-turn Wordle from offline games
      python ilql.py --task wordle --beta 0               # the BC baseline (Q/V not trained)
      python ilql.py --task wordle --beta 0 --top-fraction 0.3   # %BC on the best 30% of games
      python ilql.py --task sentiment                     # offline reviews with their VADER scores
      torchrun --nproc_per_node 2 ilql.py --task wordle   # data parallel: each process its slice of a batch
      python ilql.py --resume runs/<run dir>              # continue a stopped run from its last checkpoint
      python ilql.py --help                               # every flag
"""

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from transformers import LogitsProcessor

from common import wordle
from common.batches import collate_layouts
from common.models import Policy, entropy_of, frozen_copy, load_policy
from common.offline import best_fraction, evaluate_decoding, log_steps, offline_episodes, rank_batch
from common.tasks import eval_line, make_task
from common.training import (
    finish_run,
    guard_training,
    record_eval,
    restore_training_state,
    training_state,
)
from common.utils import (
    Run,
    RunArgs,
    TaskArgs,
    TrainArgs,
    bf16_autocast,
    data_parallel,
    error_line,
    exact_div,
    init_distributed,
    masked_mean,
    refill_order,
    resume_args,
    save_checkpoint,
    seed_everything,
    validate_args,
    write_atomically,
)


@dataclass
class Args(wordle.WordleArgs, TrainArgs, TaskArgs, RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    eval_every: int = 1000
    """evaluate every this many gradient steps (and before the first and after the last)"""
    eval_episodes: int = 256
    """held-out prompts (sentiment) or evaluation games (Wordle) per evaluation"""

    # Algorithm specific arguments
    total_steps: int = 3000
    """gradient steps (one minibatch each) over the offline dataset"""
    batch_size: int = 32
    """episodes per gradient step (original Wordle: 64 x 16 accumulation; trlX: 128)"""
    learning_rate: Optional[float] = None
    """AdamW learning rate of every network; None: the task's (docs/ilql.md, Hyperparameters)"""
    weight_decay: float = 0.0
    """AdamW weight decay (original: 0.0)"""
    gamma: float = 0.99
    """discount per token (original and trlX: 0.99)"""
    tau: float = 0.7
    """expectile of V over the target Q (original Wordle and trlX: 0.7)"""
    cql_weight: Optional[float] = None
    """weight of the CQL term; None: 1e-4 on Wordle (the original's), 0.1 elsewhere (trlX; original Reddit 0.25)"""
    bc_weight: float = 1.0
    """weight of the pi_beta language-model (BC/AWAC) term (original `awac_weight`: 1.0)"""
    awac_beta: float = 0.0
    """training-time AWAC weights exp(awac_beta * (Q - V)) on the BC term; 0: plain BC (docs/ilql.md, detail 8)"""
    shared_trunk: bool = False
    """put the Q and V heads on pi_beta's own transformer (trlX) instead of a copy (docs/ilql.md, detail 3)"""
    polyak_alpha: float = 0.1
    """target Q heads <- alpha * online + (1 - alpha) * target (docs/ilql.md, detail 4)"""
    target_update_every: int = 1
    """Polyak-update the target every this many gradient steps (trlX `steps_for_target_q_sync`)"""
    beta: float = 16.0
    """inference weight of the advantage in the decoding logits; 0 decodes pi_beta alone (BC)"""
    top_k: int = 0
    """keep only the k most likely tokens of pi_beta before adding the advantage (0: all)"""
    eval_betas: tuple[float, ...] = ()
    """after training, also evaluate the same networks at each of these inference betas (summary.json `beta_sweep`)"""
    adv_clip: Optional[float] = None
    """clip beta * advantage from above at this value; None: the task's (docs/ilql.md, detail 10)"""
    greedy: Optional[bool] = None
    """greedy decoding instead of sampling; None: the task's (docs/ilql.md, detail 10)"""
    temperature: float = 1.0
    """temperature on pi_beta's logits before the advantage is added, when sampling"""
    top_fraction: float = 1.0
    """train on the best fraction of episodes by return only; with --beta 0 this is %BC"""
    print_every: int = 100
    """print a progress line, and check the losses are finite, every this many steps"""


# The allowed values of the numeric flags, checked before any work (common/utils.py `validate_args`; a bound "inf]"
# admits infinity; float flags not named here must be finite): positive, except the few listed after.
LIMITS = dict.fromkeys(
    "total_steps batch_size learning_rate target_update_every temperature print_every".split(), "(0, inf)"
) | {
    **dict.fromkeys(["weight_decay", "cql_weight", "bc_weight", "beta", "top_k"], "[0, inf)"),
    **dict.fromkeys(["gamma", "polyak_alpha", "top_fraction"], "(0, 1]"),
    "tau": "(0, 1)",
    "adv_clip": "(-inf, inf]",
}


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: the method's pieces as small pure functions (each unit-tested in tests/test_ilql.py).
# Tensors are aligned to the batch columns 1..T-1: index j holds the decision that produced token j+1,
# made from the state tokens[0..j]. `mask` is 1 where that token is an action.
# ----------------------------------------------------------------------------------------------
def next_action_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the index of the next action after it, and whether there is one. After a
    turn's last token the next action is the first token of the agent's next turn, so its state
    already holds the environment's reply (original `state_idxs`, `src/data/rl_data.py`)."""
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    actions = torch.where(mask.bool(), positions, torch.full_like(positions, length))
    later = torch.cat([actions[:, 1:], torch.full_like(actions[:, :1], length)], 1)  # strictly after j
    nxt = torch.flip(torch.cummin(torch.flip(later, [1]), 1).values, [1])
    return nxt.clamp(max=length - 1), nxt < length


def bootstrap_values(v: torch.Tensor, mask: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
    """V(s') for every action: V at the next action's state, 0 after a terminal action (or the last one)."""
    nxt, has_next = next_action_index(mask)
    return v.gather(1, nxt) * has_next * (1 - dones.to(v.dtype))


def q_loss(
    q_taken: list[torch.Tensor], rewards: torch.Tensor, v_next: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Sum over the Q heads of the mean squared error to r + gamma * V(s'), with V(s') detached
    (original `PerTokenIQL.get_q_loss`; trlX `ILQLConfig.loss`)."""
    target = (rewards + gamma * v_next).detach()
    return sum(masked_mean((q - target) ** 2, mask) for q in q_taken)


def expectile_loss(v: torch.Tensor, target_q: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """IQL's expectile regression of V on the (detached) min target Q: weight tau where Q >= V, else 1 - tau."""
    diff = target_q.detach() - v
    weight = torch.where(diff >= 0, tau, 1 - tau)
    return masked_mean(weight * diff**2, mask)


def cql_loss(q_logits: list[torch.Tensor], actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CQL over the vocabulary: sum over heads of logsumexp_a' Q(s, a') - Q(s, a), i.e. cross-entropy of
    softmax(Q) at the data token (original `get_cql_loss` with cql_temp 1)."""
    return sum(
        masked_mean(F.cross_entropy(q.flatten(0, 1), actions.flatten(), reduction="none").view_as(actions), mask)
        for q in q_logits
    )


def bc_loss(
    logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """pi_beta's cross-entropy on action tokens, optionally AWAC-weighted, averaged over action tokens
    (as trlX; the original divides by every non-pad token, environment tokens included)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), actions.flatten(), reduction="none").view_as(actions)
    return masked_mean(ce if weights is None else ce * weights, mask)


def perturbed_logits(
    pi_logits: torch.Tensor,
    target_q: torch.Tensor,
    v: torch.Tensor,
    beta: float,
    top_k: int = 0,
    adv_clip: Optional[float] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi_beta (temperature, then top-k, as the original `IQL_Policy`; trlX takes top-k after adding
    the advantage, which can pick tokens pi_beta finds unlikely) + beta * (Q_target - V), clipped above."""
    logp = F.log_softmax(pi_logits.float() / temperature, dim=-1)
    if top_k > 0:
        kth = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    advantage = beta * (target_q.float() - v.float().unsqueeze(-1))
    if adv_clip is not None:
        advantage = advantage.clamp(max=adv_clip)
    return logp + advantage


def ilql_loss(
    pi_logits: torch.Tensor,
    q_logits: list[torch.Tensor],
    v: torch.Tensor,
    target_q_logits: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    args: "Args",
    token_share: float = 1.0,
) -> tuple[torch.Tensor, dict, dict]:
    """One step's loss: Q + V + cql_weight * CQL + bc_weight * BC (original `PerTokenIQL.get_loss`), with Q of the
    data tokens, the min over the *target* heads for V's expectile and AWAC, and V(s') from the *online* V,
    detached. `token_share` rescales a rank's token means to exact global means (torchrun). Returns (loss, the
    four terms unweighted, value statistics)."""
    q_taken = [q.gather(2, actions.unsqueeze(-1)).squeeze(-1) for q in q_logits]
    target_q = target_q_logits.gather(2, actions.unsqueeze(-1)).squeeze(-1)
    v_next = bootstrap_values(v.detach(), mask, dones)
    losses = {
        "q_loss": q_loss(q_taken, rewards, v_next, mask, args.gamma),
        "v_loss": expectile_loss(v, target_q, mask, args.tau),
        "cql_loss": cql_loss(q_logits, actions, mask),
    }
    weights = torch.exp(args.awac_beta * (target_q - v)).detach() if args.awac_beta != 0 else None
    losses["bc_loss"] = bc_loss(pi_logits, actions, mask, weights)
    losses = {k: value * token_share for k, value in losses.items()}
    loss = (
        losses["q_loss"] + losses["v_loss"] + args.cql_weight * losses["cql_loss"] + args.bc_weight * losses["bc_loss"]
    )
    stats = {
        "values/q": masked_mean(q_taken[0], mask),
        "values/v": masked_mean(v, mask),
        "values/target_q": masked_mean(target_q, mask),
        "values/advantage": masked_mean(target_q - v, mask),
    }
    return loss, losses, stats


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, alpha: float) -> None:
    """target <- alpha * online + (1 - alpha) * target, parameter by parameter (original `soft_update`)."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o, alpha)


# ----------------------------------------------------------------------------------------------
# Model pieces: the Q/V heads, and the policy deployed (pi_beta perturbed by them inside cached generation)
# ----------------------------------------------------------------------------------------------
def mlp_head(hidden: int, out: int) -> nn.Module:
    """h -> 2h -> out, the original's and trlX's head shape. The last layer starts at zero, so before
    training every advantage is 0 and the step-0 evaluation decodes pi_beta itself, not the noise of
    random heads times beta (trlX's sentiment notebook starts from degenerate text this way)."""
    head = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


class ValueHeads(nn.Module):
    """V head, twin Q heads (one value per vocabulary token) and their Polyak target copies, all reading
    a transformer's last hidden state (trlX `ILQLHeads`; original `v`, `q`, `q2`, `target_q`, `target_q2`)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.v_head = mlp_head(hidden, 1)
        self.q_heads = nn.ModuleList([mlp_head(hidden, vocab) for _ in range(2)])
        self.target_q_heads = frozen_copy(self.q_heads)

    def forward(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(Q of each head over the vocabulary, V, min over the target heads), one per position, in fp32
        even under bf16 autocast: values are regressed to small differences of returns."""
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.float()
            with torch.no_grad():
                target_q = torch.minimum(*[q(hidden) for q in self.target_q_heads])
            return [q(hidden) for q in self.q_heads], self.v_head(hidden).squeeze(-1), target_q


@dataclass
class Deployed:
    """The ILQL policy as deployed: pi_beta's logits perturbed by the heads at `beta` (pi_beta alone at beta = 0, and
    for BC, whose heads and value trunk are None), with its decoding settings."""

    policy: Policy
    heads: Optional[ValueHeads]
    value_trunk: Optional[Policy]
    beta: float
    greedy: bool
    top_k: int
    adv_clip: Optional[float]
    temperature: float
    autocast: Any

    def generate(self, context, mask, max_new: int, min_new: int, rules: list, seeds: list[int]):
        """pi_beta's cached generation after the logits processors `rules`; with beta > 0 its logits go through the
        ILQL processor. When sampling, each row draws from its own seed, so the text does not depend on batch or
        process."""
        decode = functools.partial(
            self.policy.generate, context, mask, max_new, min_new, do_sample=not self.greedy, seeds=seeds
        )
        if self.beta == 0:  # pi_beta alone, with the same temperature and top-k the ILQL processor applies
            with self.autocast:
                return decode(logits_processor=rules, temperature=self.temperature, top_k=self.top_k)
        with ILQLLogitsProcessor(self, mask) as ilql, self.autocast:
            return decode(logits_processor=rules + [ilql])

    def logits(self, input_ids, attention_mask, start: int) -> torch.Tensor:
        """The deployed logits teacher-forced over a whole batch, for eval/perplexity: log pi_beta + beta * (Q_target -
        V), clipped as at decoding. Like every script's perplexity it is the model's distribution at temperature 1
        without top-k (GRUE scores the model, not the decoding settings)."""
        logits, hidden = self.policy(input_ids, attention_mask, start)
        if self.heads is None or self.beta == 0:  # BC, %BC: pi_beta itself
            return logits
        if self.value_trunk is not None:
            _, hidden = self.value_trunk(input_ids, attention_mask, start, with_logits=False)
        _, v, target_q = self.heads(hidden)
        return perturbed_logits(logits, target_q, v, self.beta, 0, self.adv_clip, 1.0)


class ILQLLogitsProcessor(LogitsProcessor):
    """Turns pi_beta's next-token logits inside `generate` into the logits of the ILQL policy `deployed`.

    Shared trunk: a forward hook on pi_beta's transformer keeps the last hidden state of each step, so
    the heads cost no extra transformer pass. Separate trunk: the value transformer runs alongside with
    its own KV cache, fed only the new tokens each step. Use as a context manager (removes the hook)."""

    def __init__(self, deployed: Deployed, context_mask: torch.Tensor):
        self.deployed, self.mask = deployed, context_mask
        self.seen, self.past, self.hidden = 0, None, None
        self.hook = None
        if deployed.value_trunk is None:
            self.hook = deployed.policy.model.base_model.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, inputs, output):
        self.hidden = output.last_hidden_state[:, -1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.hook is not None:
            self.hook.remove()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        d = self.deployed
        if d.value_trunk is not None:
            grow = input_ids.shape[1] - self.mask.shape[1]  # generated tokens always attend, as in `generate`
            mask = torch.cat([self.mask, self.mask.new_ones(len(input_ids), grow)], 1)
            out = d.value_trunk.model.base_model(
                input_ids=input_ids[:, self.seen :],
                attention_mask=mask,
                past_key_values=self.past,
                use_cache=True,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, self.seen :],
            )
            self.seen, self.past, self.hidden = input_ids.shape[1], out.past_key_values, out.last_hidden_state[:, -1]
        _, v, target_q = d.heads(self.hidden)
        return perturbed_logits(scores, target_q, v, d.beta, d.top_k, d.adv_clip, d.temperature)


def save_heads(run: Run, heads: Optional[ValueHeads], value_trunk: Optional[Policy]) -> None:
    """`<run dir>/ilql_heads.pt`: the heads (and value trunk), to decode with beta > 0; rank 0, when trained."""
    if run.is_main and heads is not None:
        state = {"heads": heads.state_dict(), "value_trunk": value_trunk.state_dict() if value_trunk else None}
        write_atomically(os.path.join(run.dir, "ilql_heads.pt"), lambda file: torch.save(state, file))


def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: check the arguments before any heavy work; a bad one exits with one line
    try:
        args, checkpoint = resume_args(args, Args, os.path.basename(__file__))
        validate_args(args, LIMITS)
        _, world_size, device = init_distributed(args.cuda)
        exact_div(args.batch_size, world_size, "--batch-size / number of processes")
        task = make_task(args.task, args)
        is_wordle = task.name == "wordle"
        if is_wordle:
            wordle.use_words(args.wordle_vocab or None)
            wordle.offline_games(args.wordle_data, 1, args.seed)  # a bad --wordle-data spec fails here
        elif task.offline_data is None:
            raise ValueError(f"task {task.name!r} has no offline dataset; ILQL learns from one")
        from_scratch = is_wordle and args.model_name == "tiny-gpt2"  # a fresh character-level GPT-2, as the original's
        if from_scratch:
            policy = wordle.char_policy(args.seed, args.wordle_layers, args.wordle_width, device=device)
        else:
            policy = load_policy(args.model_name, task, device)
        if policy.is_seq2seq:
            raise ValueError("ilql.py trains causal LMs (GPT-2 style); seq2seq models are not supported")
        if not is_wordle:  # prompts keep what fits the model's context beside the response
            task.max_prompt_tokens = policy.prompt_budget(task.max_prompt_tokens, task.max_new_tokens)
        if args.cql_weight is None:  # docs/ilql.md, "Results: Wordle": a sweep gave no reason to leave the original's
            args = dataclasses.replace(args, cql_weight=1e-4 if is_wordle else 0.1)
        run = Run(args, os.path.basename(__file__), checkpoint)
    except (ValueError, OSError) as error:
        raise SystemExit(error_line(error)) from error
    seed_everything(args.seed, args.torch_deterministic)  # the same seed on every rank: identical heads
    autocast = bf16_autocast(device, args.bf16)  # a no-op on CPU unless --bf16
    greedy = is_wordle if args.greedy is None else args.greedy
    adv_clip = (0.0 if is_wordle else None) if args.adv_clip is None else args.adv_clip
    # beta = 0 and no AWAC weights: Q and V cannot change the deployed policy, so the BC baseline skips them
    learn_values = args.beta > 0 or args.awac_beta != 0

    # ALGO LOGIC: 1. the data: every offline episode in the one layout, filtered to the best fraction for %BC. Every
    # rank holds all of it (on the device: no copy per step); token counts stay on the host for bookkeeping.
    rows, returns = offline_episodes(task, policy.tokenizer, args)
    keep = best_fraction(returns, args.top_fraction, args.seed)  # fewer episodes than a batch wrap around
    data = collate_layouts([rows[i] for i in keep], policy.tokenizer.pad_token_id)
    lengths, n_actions = data["attention_mask"].sum(1).numpy(), data["action_mask"][:, 1:].sum(1).numpy()
    data = {k: v.to(device) for k, v in data.items()}
    print(
        f"offline data: {len(rows)} episodes, mean return {returns.mean():+.3f}; training on {len(keep)} "
        f"(mean return {returns[keep].mean():+.3f})" + ("" if learn_values else "; beta = 0: BC of pi_beta only")
    )

    # ALGO LOGIC: 2. the networks: pi_beta (the policy), the V/Q heads with their target Q heads, and, unless the trunk
    # is shared, a second copy of the transformer for the heads (the original's separate value network)
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    heads = ValueHeads(policy.hidden_size, vocab).to(device) if learn_values else None
    value_trunk = frozen_copy(policy).requires_grad_(True).train() if learn_values and not args.shared_trunk else None
    start_model = None if is_wordle else frozen_copy(policy)  # the model as loaded, for eval/ref_nll
    nets = {"policy": policy, "heads": heads, "value_trunk": value_trunk}  # heads, value trunk: None for BC
    params = [p for m in nets.values() if m is not None for p in m.parameters() if p.requires_grad]
    lr = args.learning_rate if args.learning_rate is not None else (3e-3 if from_scratch else 5e-4)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, fused=True)
    policy.train()
    # The episode order is drawn by every rank alike; each rank takes its slice of every global batch.
    rng = np.random.default_rng(args.seed)
    order, cursor, syncs, first_step = None, 0, 0, 1
    if checkpoint is not None:  # --resume: weights, targets, optimizer, data position, RNG states
        first_step = restore_training_state(checkpoint, run, "step", **nets, optimizer=optimizer, data_rng=rng)
        order, cursor, syncs = checkpoint["order"], checkpoint["cursor"], checkpoint["target_syncs"]
    # torchrun: the training step calls these wrappers, whose backward averages gradients over ranks (DDP); the loss
    # never reads the value trunk's logits, so an output layer not tied to the input embeddings gets no gradient
    ddp_policy = data_parallel(policy)
    ddp_heads = data_parallel(heads) if heads is not None else None
    ddp_trunk = None
    if value_trunk is not None:
        ddp_trunk = data_parallel(value_trunk, find_unused_parameters=not value_trunk.output_layer_tied)
    deployed = Deployed(policy, heads, value_trunk, args.beta, greedy, args.top_k, adv_clip, args.temperature, autocast)
    # evaluate_at(deployed) -> (metrics, samples)
    evaluate_at = functools.partial(
        evaluate_decoding, task, args.seed, args.eval_episodes, args.batch_size, device, start_model
    )

    def run_eval(step: int) -> dict:  # the deployed decoding (--beta), logged
        return record_eval(run, *evaluate_at(deployed), step, "step")

    step, pending, since = first_step - 1, [], time.time()
    # Ctrl-C, SIGTERM: the steps since the last sync are logged (nothing non-finite is evaluated or saved), then on to
    # the final evaluation; a fault: one line
    with guard_training(
        run, "step", lambda: step, lambda: log_steps(run, pending, since, optimizer, args, learn_values)
    ):
        if checkpoint is None:
            run_eval(0)
            order, cursor = refill_order(rng, len(keep), np.zeros(0, int), 0, args.batch_size)
        order_on_device = torch.as_tensor(order, device=device)
        for step in range(first_step, args.total_steps + 1):
            # ALGO LOGIC: 3. the next global batch, order[cursor:cursor + batch_size]; this rank trains on its slice,
            # whose token means, rescaled by its share of the batch's action tokens, average to the global means
            if cursor + args.batch_size > len(order):
                order, cursor = refill_order(rng, len(keep), order, cursor, args.batch_size)
                order_on_device = torch.as_tensor(order, device=device)
            batch, token_share, n_tokens = rank_batch(
                data, order, order_on_device, cursor, args.batch_size, lengths, n_actions
            )
            cursor += args.batch_size
            ids, attention = batch["input_ids"], batch["attention_mask"]
            # ALGO LOGIC: 4. align to the decision columns 1..T-1 (index j chose token j+1); pi_beta's logits and,
            # unless BC, the Q/V heads on the value trunk's (or pi_beta's own) last hidden state
            actions, mask = ids[:, 1:], batch["action_mask"][:, 1:].float()
            rewards, dones = batch["rewards"][:, 1:], batch["dones"][:, 1:]
            with autocast:
                pi_logits, hidden = ddp_policy(ids, attention, 1)
                if learn_values:
                    if value_trunk is not None:
                        _, hidden = ddp_trunk(ids, attention, 1, with_logits=False)
                    q_logits, v, target_q_logits = ddp_heads(hidden)

            # ALGO LOGIC: 5. the ILQL loss (BC alone for the baseline), one gradient step
            if learn_values:
                loss, losses, stats = ilql_loss(
                    pi_logits, q_logits, v, target_q_logits, actions, mask, rewards, dones, args, token_share
                )
            else:
                losses, stats = {"bc_loss": bc_loss(pi_logits, actions, mask) * token_share}, {}
                loss = args.bc_weight * losses["bc_loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # ALGO LOGIC: 6. Polyak-average the target at the configured rate, inside the step loop: trlX's
            # callback runs once per epoch since its 2023 refactor, so its targets are almost never synced
            if learn_values and step % args.target_update_every == 0:
                polyak_update(heads.target_q_heads, heads.q_heads, args.polyak_alpha)
                syncs += 1

            # TRY NOT TO MODIFY: keep this step's statistics on the device (no host sync per step), token means over
            # all ranks, as the losses
            with torch.no_grad():
                stats["objective/entropy"] = masked_mean(entropy_of(pi_logits), mask)
            record = {
                "losses/total_loss": loss,
                **{f"losses/{k}": v for k, v in losses.items()},
                **{k: v * token_share for k, v in stats.items()},
            }
            pending.append((step, {k: v.detach().float() for k, v in record.items()}, syncs, n_tokens))
            if not (
                any(step % every == 0 for every in (args.print_every, args.eval_every, args.checkpoint_every))
                or step == args.total_steps
            ):
                continue
            log_steps(run, pending, since, optimizer, args, learn_values)
            pending = []
            if step % args.eval_every == 0 and step != args.total_steps:
                run_eval(step)
            if step % args.checkpoint_every == 0 and step != args.total_steps:
                state = training_state(
                    step, **nets, optimizer=optimizer, target_syncs=syncs, data_rng=rng, order=order, cursor=cursor
                )
                save_checkpoint(run, state)
            since = time.time()

    # TRY NOT TO MODIFY: final evaluation (and the --eval-betas sweep), model and heads, summary
    extra = {"steps": step, "target_syncs": syncs, "beta_sweep": {}, "no_repeat_oracle": {}}
    # the DDP wrappers go before finish_run closes the process group (common/utils.py `data_parallel`)
    del ddp_policy, ddp_heads, ddp_trunk

    def final_eval(step: int) -> dict:
        """The last evaluation; then, into summary.json, the same networks at each --eval-betas and, on Wordle, pi_beta
        with repeats forbidden (the ceiling of vetoing pi_beta's repeats)."""
        metrics = run_eval(step)
        for beta in args.eval_betas if heads is not None else []:
            extra["beta_sweep"][str(beta)] = beta_metrics = evaluate_at(dataclasses.replace(deployed, beta=beta))[0]
            print(f"beta {beta:g}: {eval_line(beta_metrics)}", flush=True)
        if is_wordle:
            extra["no_repeat_oracle"] = evaluate_at(dataclasses.replace(deployed, beta=0.0), no_repeat=True)[0]
            print(f"pi_beta without repeats (oracle): {eval_line(extra['no_repeat_oracle'])}", flush=True)
        return metrics

    return finish_run(
        run, policy, final_eval, step, extra, "step", save_more=lambda: save_heads(run, heads, value_trunk)
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
