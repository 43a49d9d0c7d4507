"""NLPO: PPO whose action space, at every token, is the nucleus of a periodically refreshed masking policy.

Paper: Ramamurthy et al., "Is Reinforcement Learning (Not) for Natural Language Processing?" (ICLR 2023).
Reference code: RL4LMs (`algorithms/nlpo/nlpo.py`, `policy/causal_policy.py::MaskedCausalLMActorCriticPolicy`,
`algorithms/common/maskable/{logits_processor,distributions}.py`).
Docs: docs/nlpo.md (implementation details, every metric, deviations from the reference code, results).

The policy writes a response to a prompt one token at a time; each token is an action, the state is
the prompt plus the tokens so far. The task's score arrives on the last response token, and every
token pays a KL penalty to a frozen copy of the starting model, so the policy improves the score
without drifting into text the starting model would never write:

    r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))  + [t == last] * score

Advantages come from GAE over the response tokens with a learned value function (a separate copy of
the LM with a scalar head, as in RL4LMs), and the policy follows PPO's clipped surrogate for a few
epochs over minibatches of each rollout. beta follows an adaptive controller toward a KL target.

NLPO changes one thing, and `diff ppo.py nlpo.py` shows it. At every token it cuts the vocabulary, a huge action
space mostly irrelevant in context, to the top-p tokens of a *masking policy* pi_mask, a copy of the policy that
is refreshed only every `mask_update_every` updates:

    K_t       = the fewest tokens whose pi_mask(.|s_t) probability reaches p  (+ special tokens, >= a minimum)
    pi_K(a|s) = pi(a|s) / sum_{b in K_t} pi(b|s)  for a in K_t,  0 elsewhere

Rollouts sample from pi_K; the PPO ratio is pi_K,new / pi_K,old under the rollout's K_t; the KL penalty stays on
pi vs pi_ref without the mask, as in RL4LMs. Because pi_mask lags the policy, the action set moves slowly: a trust
region on *which* tokens may be explored, beside PPO's on how their probabilities move.

Run:  python nlpo.py                          # embedded sentiment task, tiny GPT-2, a few CPU minutes
      python nlpo.py --model-name tiny-t5     # the same with a seq2seq policy
      python nlpo.py --help                   # every flag
"""

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
from transformers import LogitsProcessor, LogitsProcessorList

from common.batches import prompt_then_response
from common.models import IncrementalLM, Policy, ValueHead, frozen_copy, load_policy, top_k_top_p_keep
from common.tasks import evaluate, make_task
from common.training import (
    finish_run,
    guard_training,
    log_throughput,
    record_eval,
    reduce_steps,
    response_lengths,
    restore_training_state,
    training_state,
)
from common.utils import (
    Run,
    RunArgs,
    TaskArgs,
    TrainArgs,
    all_reduce,
    bf16_autocast,
    data_parallel,
    episode_seeds,
    error_line,
    exact_div,
    init_distributed,
    masked_mean,
    masked_whiten,
    refill_order,
    resume_args,
    save_checkpoint,
    seed_everything,
    validate_args,
)


@dataclass
class Args(TrainArgs, TaskArgs, RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""

    # Algorithm specific arguments
    total_updates: int = 40
    """number of updates; each is one rollout followed by `ppo_epochs` passes over it"""
    rollout_batch_size: int = 64
    """prompts (episodes) per rollout"""
    minibatch_size: int = 16
    """episodes per gradient step; must divide `rollout_batch_size`"""
    ppo_epochs: int = 4
    """passes over each rollout (RL4LMs IMDB: 5; lm-human-preferences: 4)"""
    learning_rate: float = 1e-4
    """AdamW learning rate, constant (RL4LMs IMDB with GPT-2: 1e-6)"""
    weight_decay: float = 1e-6
    """AdamW weight decay (RL4LMs' value)"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip (RL4LMs/SB3: 0.5)"""
    response_length: Optional[int] = None
    """maximum new tokens per response; None takes the task's (sentiment: 24, GRUE IMDB: 48)"""
    min_response_length: Optional[int] = None
    """EOS is forbidden before this many tokens; None takes the task's (GRUE IMDB: 48)"""
    temperature: float = 1.0
    """sampling temperature, also in the ratio and the KL (docs/ppo.md, detail 2)"""
    top_k: int = 0
    """sample from the k most probable tokens only, also in the ratio and the KL (0: off; docs/ppo.md, detail 2)"""
    top_p: float = 1.0
    """sample from the nucleus of this probability only, after --top-k (1.0: off; docs/ppo.md, detail 2)"""
    gamma: float = 0.99
    """discount over response tokens (RL4LMs: 0.99; lm-human-preferences: 1.0)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_range: float = 0.2
    """PPO policy clip epsilon"""
    clip_range_value: Optional[float] = 0.2
    """value clip around the rollout's values; None for the plain squared error (RL4LMs/SB3 default)"""
    vf_coef: float = 0.5
    """value-loss weight (RL4LMs: 0.5)"""
    ent_coef: float = 0.0
    """entropy-bonus weight (RL4LMs: 0.0); entropy is logged either way"""
    whiten_advantages: bool = True
    """normalise advantages over each rollout's response tokens"""
    whiten_rewards: bool = False
    """scale the shaped per-token rewards to unit variance before GAE (lm-human-preferences option)"""
    init_kl_coef: float = 0.1
    """initial beta of the per-token KL penalty (RL4LMs IMDB: 0.1)"""
    adaptive_kl: bool = True
    """adapt beta toward `target_kl`; if off, beta stays at `init_kl_coef`"""
    target_kl: float = 0.1
    """target of the mean per-token KL to the reference (RL4LMs IMDB: 0.1)"""
    kl_horizon: int = 640
    """adaptive-KL horizon in episodes (docs/ppo.md, detail 7)"""
    non_eos_penalty: bool = False
    """replace the score of responses that never emit EOS by `penalty_reward_value` (lm-human-preferences)"""
    penalty_reward_value: float = -1.0
    """the score given to responses without EOS when `non_eos_penalty` is on"""

    # NLPO's own arguments
    top_mask: float = 0.9
    """p of the masking policy's nucleus (1.0 keeps every token: NLPO is PPO; docs/nlpo.md, detail 2)"""
    min_tokens_to_keep: Optional[int] = None
    """the mask keeps at least this many tokens (None: ceil(100 * V / 50257); docs/nlpo.md, detail 3)"""
    mask_update_every: int = 5
    """mu: refresh the masking policy from the policy every this many updates (docs/nlpo.md, detail 13)"""


# The allowed values of the numeric flags, checked before any work (common/utils.py `validate_args`; "inf]" admits
# infinity; float flags not named here must be finite). The response lengths depend on the task: checked in main.
LIMITS = (
    dict.fromkeys(
        "total_updates rollout_batch_size minibatch_size ppo_epochs learning_rate temperature clip_range"
        " clip_range_value target_kl kl_horizon".split(),
        "(0, inf)",
    )
    | dict.fromkeys("weight_decay top_k vf_coef init_kl_coef".split(), "[0, inf)")
    | dict.fromkeys("gamma gae_lambda".split(), "[0, 1]")
    | {"max_grad_norm": "(0, inf]", "top_p": "(0, 1]"}
    | {"top_mask": "(0, 1]", "min_tokens_to_keep": "(0, inf)", "mask_update_every": "(0, inf)"}
)


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: the method's pieces as small pure functions (each unit-tested in tests/test_ppo.py)
# ----------------------------------------------------------------------------------------------
def shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL on every response token, plus the task score on the last one.

    KL is the single-sample (k1) estimate log pi - log pi_ref at the sampled token, as in RL4LMs
    (alg_wrappers.py) and lm-human-preferences. Returns (rewards, kl), both zero after the response.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long().clamp(min=1) - 1  # index of the last response token (EOS or truncation)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al., 2016).

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1}.
    The episode ends after the last masked-in token, so V beyond it is 0 (the score is terminal).
    Returns (advantages, returns = advantages + values), zero outside the mask.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, averaged over response tokens:
    L = E[max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))], ratio = pi / pi_old."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "ratio": masked_mean(ratio, mask),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),  # k3, http://joschu.net/blog/kl-approx.html
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: Optional[float],
) -> tuple[torch.Tensor, dict]:
    """Squared error to the GAE returns; with a clip range, PPO2's pessimistic clipped form
    max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) as in lm-human-preferences."""
    loss = (values - returns) ** 2
    clipfrac = values.new_zeros(())  # on the values' device: it is stacked with the other statistics
    if clip_range_value is not None:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        clipped_loss = (clipped_values - returns) ** 2
        clipfrac = masked_mean((clipped_loss > loss).float(), mask).detach()
        loss = torch.max(loss, clipped_loss)
    return masked_mean(loss, mask), {"value_clipfrac": clipfrac}


class KLController:
    """beta, the KL penalty's coefficient. Adaptive (Ziegler et al., 2019): beta <- beta * (1 + clip(KL / target - 1,
    -0.2, 0.2) * n / horizon) after a rollout of n episodes; RL4LMs is the special case n / horizon = 0.1 with KL the
    mean per-token KL, which is what we use. Not adaptive: beta stays where it started."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = init_kl_coef, target, horizon, adaptive

    def update(self, current_kl: float, n_episodes: int) -> None:
        if self.adaptive:
            proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
            self.value *= 1 + proportional_error * n_episodes / self.horizon


def forward_logprobs(
    policy: Policy,
    input_ids,
    attention_mask,
    start: int,
    temperature: float,
    min_length: int = 0,
    keep: Optional[torch.Tensor] = None,
    entropy_grad: bool = True,
    forward: Optional[nn.Module] = None,
    logits: Optional[torch.Tensor] = None,
):
    """Log-probs and entropies of the response tokens under the temperature-scaled policy.

    The ratio must measure the distribution the rollout sampled from, or it optimises another one: no EOS in the
    first `min_length` response tokens, and only the tokens of the keep-mask `keep` `[B, R, V]` (--top-k/--top-p;
    nlpo.py's action sets), renormalised. One log-softmax serves both outputs; with `entropy_grad=False` the entropy
    stays out of the autograd graph, which saves a [B, T, V] backward (benchmarks/ppo_step.py). `forward` runs the
    pass: `policy`, or in the minibatch step its DDP wrapper (common/utils.py `data_parallel`); given `logits`, the
    pass's output already at hand, none runs (nlpo.py scores one pass under two masks)."""
    if logits is None:
        logits, _ = (forward or policy)(input_ids, attention_mask, start)
    logits = logits / temperature  # a new tensor: the EOS ban below leaves the caller's logits as they were
    if min_length > 0:  # a large finite value, not -inf, so entropy stays finite (0 * log 0 -> 0)
        logits[:, :min_length, policy.tokenizer.eos_token_id] = -1e9
    if keep is not None:  # the same large finite value for the tokens `keep` leaves out (they get no gradient)
        logits = logits.masked_fill(~keep, -1e9)
    logp = F.log_softmax(logits.float(), dim=-1)
    logprobs = torch.gather(logp, 2, input_ids[:, start:].unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


class TopKTopPProcessor(LogitsProcessor):
    """--top-k/--top-p inside the policy's `generate`, recording each step's keep-mask `[B, V]`, so that the old
    log-probs, the ratio and the KL use exactly the truncated, renormalised distribution the rollout sampled from.
    RL4LMs' rollouts sample with transformers' top-k 50 while its ratio uses the full softmax (two different
    distributions); transformers' warpers keep no record, and recomputing the set from the teacher-forced logits
    could put a sampled token at the edge outside it (probability 0 under the ratio). As in transformers' sampler,
    the set is cut from the temperature-scaled scores; what it keeps is then sampled at the temperature."""

    def __init__(self, top_k: int, top_p: float, temperature: float):
        self.top_k, self.top_p, self.temperature = top_k, top_p, temperature
        self.masks: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = top_k_top_p_keep(scores / self.temperature, self.top_k, self.top_p)
        self.masks.append(keep)
        return scores.masked_fill(~keep, float("-inf"))


class Critic(nn.Module):
    """V(s_t) for every response token: a separate copy of the LM trunk with a scalar head (RL4LMs
    `_value_model` + `_value_head`), so value regression never disturbs the policy's features."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.trunk = frozen_copy(policy).requires_grad_(True).train()
        self.head = ValueHead(policy.hidden_size)

    def forward(self, input_ids, attention_mask, start: int) -> torch.Tensor:
        _, hidden = self.trunk(input_ids, attention_mask, start, with_logits=False)
        return self.head(hidden)


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: what NLPO adds, the masking policy and its action sets (each unit-tested in tests/test_nlpo.py)
# ----------------------------------------------------------------------------------------------
def top_p_keep_mask(
    logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1, always_keep: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The NLPO action set K_t from the masking policy's logits `[..., V]` -> bool keep-mask `[..., V]`: its nucleus,
    at least `min_tokens_to_keep` tokens, and the ids in `always_keep` (RL4LMs unmasks every special token, so EOS
    stays reachable; docs/nlpo.md, details 2-3)."""
    keep = top_k_top_p_keep(logits, 0, top_p, min_tokens_to_keep)
    if always_keep is not None:
        keep[..., always_keep] = True
    return keep


def refresh_mask_policy(mask_policy: nn.Module, policy: nn.Module, update: int, every: int) -> bool:
    """After every `every`-th update, copy the policy's weights into the masking policy (RL4LMs `NLPO.learn`), in
    place, so the next rollout samples under the new nucleus (RL4LMs' fresh deepcopy never reaches its logits
    processor: docs/nlpo.md, detail 5)."""
    if update % every != 0:
        return False
    mask_policy.load_state_dict(policy.state_dict())
    return True


class NLPOLogitsProcessor(LogitsProcessor):
    """The NLPO mask inside the policy's cached `generate`: at each step the masking policy reads the newest token on
    its own KV cache (`IncrementalLM`; RL4LMs re-runs the whole sequence, O(T^2)), `action_set` cuts K_t from its
    logits and every other token's score becomes -inf. `masks` keeps each step's K_t for the ratio."""

    def __init__(self, mask_policy: Policy, prompt_ids, prompt_mask, action_set):
        self.next_token_logits, self.action_set = IncrementalLM(mask_policy, prompt_ids, prompt_mask), action_set
        self.masks: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = self.action_set(self.next_token_logits(input_ids))
        self.masks.append(keep)
        return scores.masked_fill(~keep, float("-inf"))


def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: check the arguments before any heavy work (a bad one exits with one line)
    try:
        args, checkpoint = resume_args(args, Args, os.path.basename(__file__))
        validate_args(args, LIMITS)
        exact_div(args.rollout_batch_size, args.minibatch_size, "--rollout-batch-size / --minibatch-size")
        rank, world_size, device = init_distributed(args.cuda)
        local_batch = exact_div(args.rollout_batch_size, world_size, "--rollout-batch-size / number of processes")
        local_minibatch = exact_div(args.minibatch_size, world_size, "--minibatch-size / number of processes")
        seed_everything(args.seed, args.torch_deterministic)  # the same seed on every rank (see init_distributed)
        task = make_task(args.task, args)
        if task.extra.get("multi_turn"):
            raise ValueError(
                f"task {task.name!r} is multi-turn; this script runs single-turn tasks (try ilql.py --task {task.name})"
            )
        response_length, min_response_length = response_lengths(task, args.response_length, args.min_response_length)
        policy = load_policy(args.model_name, task, device)
        # prompts keep what fits the model's context beside the response (a long line in a --prompts-file)
        task.max_prompt_tokens = policy.prompt_budget(task.max_prompt_tokens, response_length)
        run = Run(args, os.path.basename(__file__), checkpoint)
    except (ValueError, OSError) as error:
        raise SystemExit(error_line(error)) from error
    autocast = bf16_autocast(device, args.bf16)  # a no-op on CPU unless --bf16

    # Models: the policy, its frozen reference (KL anchor), and the critic (a second trunk + head).
    ref_policy = frozen_copy(policy)  # always the starting model, also when resuming
    critic = Critic(policy).to(device)
    # NLPO's masking policy: a frozen copy of the starting policy (RL4LMs `mask_type: learned_top_p` deep-copies it)
    mask_policy = frozen_copy(policy)
    vocab_size = policy.model.get_output_embeddings().weight.shape[0]
    min_tokens_to_keep = args.min_tokens_to_keep or math.ceil(100 * vocab_size / 50257)
    special_ids = torch.tensor(sorted(set(policy.tokenizer.all_special_ids)), device=device)

    def action_set(mask_logits: torch.Tensor) -> torch.Tensor:  # K_t, from the masking policy's logits
        return top_p_keep_mask(mask_logits, args.top_mask, min_tokens_to_keep, special_ids)

    parameters = list(policy.parameters()) + list(critic.parameters())
    # fused: one kernel steps every tensor (the default per-tensor loop is ~12x slower at GPT-2 size on CPU)
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    kl_ctl = KLController(args.init_kl_coef, args.target_kl, args.kl_horizon, args.adaptive_kl)
    # The prompt order is drawn by every rank alike; each rank takes its slice of every global batch.
    rng = np.random.default_rng(args.seed)
    prompt_order, prompt_cursor = np.zeros(0, int), 0  # the first update draws the first order
    # What a checkpoint holds (besides the KL coefficient, the data position and the RNG states) and --resume restores
    parts = dict(policy=policy, critic=critic, optimizer=optimizer, data_rng=rng, mask_policy=mask_policy)
    first_update = 1
    if checkpoint is not None:
        first_update = restore_training_state(checkpoint, run, **parts)
        kl_ctl.value = checkpoint["kl_coef"]
        prompt_order, prompt_cursor = checkpoint["prompt_order"], checkpoint["prompt_cursor"]

    # torchrun: the minibatch step calls these wrappers, whose backward averages gradients over ranks (DDP); the
    # critic's loss never reads its trunk's logits, so an output layer not tied to the input embeddings gets no gradient
    ddp_policy = data_parallel(policy)
    ddp_critic = data_parallel(critic, find_unused_parameters=not policy.output_layer_tied)

    def sample(prompts: list[str], seeds: list[int]) -> tuple:
        """Prompts -> (response texts, input_ids, attention_mask, response_start, response_mask, top-k/top-p masks
        `[B, R, V]` or None, K_t `[B, R, V]`) from the masked policy, NLPO's mask before top-k/top-p (RL4LMs' order);
        each episode samples from its own seed, so the text does not depend on the number of processes."""
        prompt_ids, prompt_mask = policy.encode_prompts(prompts, task.max_prompt_tokens, device)
        masker = NLPOLogitsProcessor(mask_policy, prompt_ids, prompt_mask, action_set)
        truncation = (
            [TopKTopPProcessor(args.top_k, args.top_p, args.temperature)] if args.top_k or args.top_p < 1 else []
        )
        with autocast:
            response_ids, response_mask = policy.generate(
                prompt_ids,
                prompt_mask,
                response_length,
                min_response_length,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                logits_processor=LogitsProcessorList([masker, *truncation]),
                seeds=seeds,
            )
        truncation_keep = torch.stack(truncation[0].masks, 1) if truncation else None
        keep = torch.stack(masker.masks, 1)
        return (
            policy.decode(response_ids, response_mask),
            *prompt_then_response(prompt_ids, prompt_mask, response_ids, response_mask),
            response_mask,
            truncation_keep,
            keep,
        )

    def run_eval(step: int) -> dict:
        """Held-out prompts, sampled as in training with the same per-prompt seeds at every evaluation."""
        metrics, samples = evaluate(
            task,
            lambda prompts, indices: sample(prompts, episode_seeds(args.seed, 1, 0, indices))[0],  # the responses
            args.eval_episodes,
            local_batch,
            policy=policy,
            start_model=ref_policy,
            response_length=response_length,
        )
        return record_eval(run, metrics, samples, step)

    update = first_update - 1
    # Ctrl-C, SIGTERM: on to the final evaluation; the reward, the disk or a diverged loss: one line, the last
    # checkpoint kept, nothing new saved
    with guard_training(run, "update", lambda: update):
        if checkpoint is None:
            run_eval(0)
        for update in range(first_update, args.total_updates + 1):
            update_start = time.time()
            # ALGO LOGIC: 1. rollout: sample responses to a batch of training prompts (this rank's slice)
            prompt_order, prompt_cursor = refill_order(
                rng, len(task.train_prompts), prompt_order, prompt_cursor, args.rollout_batch_size
            )
            mine = range(prompt_cursor + rank * local_batch, prompt_cursor + (rank + 1) * local_batch)
            prompts = [task.train_prompts[prompt_order[i]] for i in mine]
            prompt_cursor += args.rollout_batch_size
            responses, input_ids, attention_mask, start, mask, truncation_keep, keep = sample(
                prompts, episode_seeds(args.seed, 0, update, mine)
            )
            scores = torch.tensor(task.score(prompts, responses), dtype=torch.float32, device=device)
            ends_with_eos = ((input_ids[:, start:] == policy.tokenizer.eos_token_id) & (mask == 1)).any(1)
            if args.non_eos_penalty:
                scores = torch.where(ends_with_eos, scores, torch.full_like(scores, args.penalty_reward_value))

            # ALGO LOGIC: 2. score the rollout under the policy, the reference and the critic, both models under the
            # rollout's decoding: no EOS before the minimum length, top-k/top-p cut by the rollout's own masks, every
            # token allowed after the response (nothing was sampled there; docs/ppo.md, detail 2)
            if truncation_keep is not None:
                truncation_keep[mask == 0] = True
            # NLPO: the ratio's action set is the rollout's own mask K_t, cut by top-k/top-p when on, so the ratio's old
            # log-probs (and the logged entropy) are pi_K's. The KL keeps the tokens K_t removed: RL4LMs leaves the
            # method's mask out of it, while decoding's own cuts stay on both models (docs/nlpo.md, detail 11).
            keep[mask == 0] = True
            action_keep = keep.clone() if truncation_keep is None else keep & truncation_keep
            action_keep[:, :min_response_length, policy.tokenizer.eos_token_id] = False  # as generate forbade it
            if truncation_keep is not None:  # top-k/top-p cut the masked scores: what K_t removed is not their cut
                truncation_keep = truncation_keep | ~keep
            with torch.no_grad(), autocast:
                policy_logits, _ = policy(input_ids, attention_mask, start)  # one pass, scored under both masks
                rollout = (input_ids, attention_mask, start, args.temperature, min_response_length)
                logprobs, _ = forward_logprobs(policy, *rollout, truncation_keep, logits=policy_logits)
                ref_logprobs, _ = forward_logprobs(
                    ref_policy, input_ids, attention_mask, start, args.temperature, min_response_length, truncation_keep
                )
                values = critic(input_ids, attention_mask, start).float()
                old_logprobs, rollout_entropy = forward_logprobs(policy, *rollout, action_keep, logits=policy_logits)
                mask_logits, _ = mask_policy(input_ids, attention_mask, start)
            mask = mask.float()
            if not action_keep.gather(-1, input_ids[:, start:, None])[mask == 1].all():
                raise RuntimeError(f"update {update}: a sampled token lies outside its stored mask (a sampler bug)")
            # Diagnostics: the action set's size; the decoding distribution's mass inside it, which is the ratio of the
            # two log-probs above at any token of K_t (pi(a) / pi_K(a) = sum_{b in K_t} pi(b)); and the fraction of
            # positions where a teacher-forced recompute of the mask differs from the one generation recorded
            mask_tokens = masked_mean(action_keep.sum(-1).float(), mask, across_ranks=True).item()
            mask_policy_mass = masked_mean((logprobs - old_logprobs).exp(), mask, across_ranks=True).item()
            recomputed = action_set(mask_logits)
            mask_mismatch = masked_mean((recomputed != keep).any(-1).float(), mask, across_ranks=True).item()

            # ALGO LOGIC: 3. KL-shaped rewards, then GAE advantages and returns (statistics over all ranks)
            rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.value)
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False, across_ranks=True)
            advantages, returns = compute_gae(rewards, values, mask, args.gamma, args.gae_lambda)
            if args.whiten_advantages:
                advantages = masked_whiten(advantages, mask, across_ranks=True)

            # ALGO LOGIC: 4. several epochs of clipped PPO over minibatches of the rollout
            stats: dict[str, list] = {}
            for _ in range(args.ppo_epochs):
                for mb in torch.randperm(local_batch, device=device).split(local_minibatch):
                    mb_keep = action_keep[mb]  # NLPO: the new log-probs under the rollout's action sets too
                    with autocast:
                        new_logprobs, entropy = forward_logprobs(
                            policy,
                            input_ids[mb],
                            attention_mask[mb],
                            start,
                            args.temperature,
                            min_response_length,
                            mb_keep,
                            entropy_grad=args.ent_coef != 0,
                            forward=ddp_policy,
                        )
                        new_values = ddp_critic(input_ids[mb], attention_mask[mb], start).float()
                    pg_loss, pg_stats = ppo_policy_loss(
                        new_logprobs, old_logprobs[mb], advantages[mb], mask[mb], args.clip_range
                    )
                    vf_loss, vf_stats = ppo_value_loss(
                        new_values, values[mb], returns[mb], mask[mb], args.clip_range_value
                    )
                    entropy_mean = masked_mean(entropy, mask[mb])
                    loss = pg_loss + args.vf_coef * vf_loss - args.ent_coef * entropy_mean
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
                    optimizer.step()
                    for key, value in {
                        "loss": loss,
                        "policy_loss": pg_loss,
                        "value_loss": vf_loss,
                        "entropy": entropy_mean,
                        **pg_stats,
                        **vf_stats,
                    }.items():
                        stats.setdefault(key, []).append(value.detach())  # kept on device: no sync per step

            # One host sync per update: stop on a non-finite loss (every rank together), then average stats.
            losses = torch.stack(stats.pop("loss"))
            if all_reduce((~torch.isfinite(losses)).any().float(), "max").item():
                raise FloatingPointError(f"non-finite loss at update {update} (per-step losses {losses.tolist()})")
            (mean,) = reduce_steps([{key: torch.stack(values).mean() for key, values in stats.items()}], "mean")

            # ALGO LOGIC: 5. adapt beta to the KL this rollout actually had (mean per token over all ranks, RL4LMs)
            mean_kl = masked_mean(kl, mask, across_ranks=True).item()
            kl_ctl.update(mean_kl, args.rollout_batch_size)

            # ALGO LOGIC: 6. every mu updates the masking policy becomes a copy of the policy (RL4LMs NLPO.learn)
            refresh_mask_policy(mask_policy, policy, update, args.mask_update_every)

            # TRY NOT TO MODIFY: record metrics
            n_tokens = int(all_reduce(mask.sum()))
            speed = log_throughput(run, n_tokens, args.rollout_batch_size, time.time() - update_start, update)
            mean_score = all_reduce(scores.mean(), "mean").item()
            run.log(
                {
                    "objective/scores": mean_score,
                    "objective/kl": mean_kl,
                    "objective/kl_sequence": all_reduce(kl.sum(1).mean(), "mean").item(),
                    "objective/kl_coef": kl_ctl.value,
                    "objective/entropy": masked_mean(rollout_entropy, mask, across_ranks=True).item(),
                    "objective/non_score_reward": (
                        all_reduce((rewards.sum(1) - scores).mean(), "mean").item() if not args.whiten_rewards else 0.0
                    ),
                    "objective/mask_tokens": mask_tokens,
                    "objective/mask_policy_mass": mask_policy_mass,
                    **{f"losses/{key}": value for key, value in mean.items()},  # the minibatch statistics, averaged
                    "charts/learning_rate": optimizer.param_groups[0]["lr"],
                    "charts/response_length": all_reduce(mask.sum(1).mean(), "mean").item(),
                    "charts/eos_fraction": all_reduce(ends_with_eos.float().mean(), "mean").item(),
                    "charts/mask_age": (update - 1) % args.mask_update_every,  # updates since the masking policy's copy
                    "charts/mask_mismatch": mask_mismatch,
                },
                update,
            )
            print(
                f"update {update}/{args.total_updates} | score {mean_score:+.3f} | kl {mean_kl:.4f} "
                f"| beta {kl_ctl.value:.4f} | approx_kl {mean['approx_kl']:.4f} | clipfrac {mean['clipfrac']:.3f} "
                f"| mask {mask_tokens:.1f} tok {mask_policy_mass:.3f} mass | {speed:.0f} tok/s",
                flush=True,
            )
            if update % args.eval_every == 0 and update != args.total_updates:
                run_eval(update)
            if update % args.checkpoint_every == 0 and update != args.total_updates:
                position = {"kl_coef": kl_ctl.value, "prompt_order": prompt_order, "prompt_cursor": prompt_cursor}
                save_checkpoint(run, training_state(update, **parts, **position))

    # TRY NOT TO MODIFY: final evaluation, model, summary
    # the DDP wrappers go before finish_run closes the process group (common/utils.py `data_parallel`)
    del ddp_policy, ddp_critic
    return finish_run(run, policy, run_eval, update, {"updates": update, "min_tokens_to_keep": min_tokens_to_keep})


if __name__ == "__main__":
    main(tyro.cli(Args))
