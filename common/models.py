"""Policies behind one interface: causal LMs (GPT-2) and seq2seq LMs (T5).

Every method sees the same layout (built by common/batches.py): a batch of token ids `[B, T]` whose first
`response_start` columns are the prompt (left-padded) and whose remaining columns are the response (right-padded).
`Policy.forward` returns, for each response column t, the logits of the distribution that produced
token t and the hidden state that produced them, so `logits[:, j]` scores `input_ids[:, start + j]`.

- causal LM: prompt and response are one sequence; position ids come from the attention mask (as in
  `generate`), and the output at column t-1 predicts column t.
- seq2seq LM: the prompt columns go to the encoder, the response columns are the decoder's labels
  (the decoder input is the response shifted right behind `decoder_start_token_id`).

`model_name` is a hub id, a local directory saved with `save_pretrained`, or `tiny-gpt2` / `tiny-t5`:
the built-in model of an embedded task, trained on that task's corpus on first use and cached
(common/builtin_models.py).
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers import logging as hf_logging

from common.batches import left_pad_with_mask, prompt_then_response, right_pad_with_mask
from common.builtin_models import BUILTIN_MODELS, ensure_builtin_model


# ----------------------------------------------------------------------------------------------
# Token-level helpers shared by every method
# ----------------------------------------------------------------------------------------------
def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position: [B, T, V], [B, T] -> [B, T]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def top_k_top_p_keep(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_tokens_to_keep: int = 1
) -> torch.Tensor:
    """The tokens top-k, then top-p (nucleus) sampling may draw: logits [..., V] -> bool keep-mask [..., V].

    As transformers' `TopKLogitsWarper` then `TopPLogitsWarper` (Holtzman et al., 2020): top-k keeps every token
    scoring at least the k-th largest (ties included); top-p then keeps the most probable tokens of the top-k
    distribution until their mass reaches p (the token that crosses p is kept, so the set is never empty), and at
    least its `min_tokens_to_keep` most probable tokens. A token already at -inf is never kept. 0 and 1.0 turn each
    cut off. Pass temperature-scaled logits: sampling applies the temperature before the warpers, so the nucleus is
    the scaled distribution's."""
    logits = logits.float()
    keep = logits > float("-inf")
    if top_k and top_k < logits.shape[-1]:
        keep &= logits >= torch.topk(logits, top_k, dim=-1).values[..., -1:]
    if top_p < 1.0:
        probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
        keep_sorted = mass_before < top_p
        keep_sorted[..., :min_tokens_to_keep] = True
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    return keep


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position: [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class SayOnce:
    """Prints each notice the first time only. A policy's copies (its frozen reference, the critic's trunk) share
    their policy's: `deepcopy` keeps this object, so a run says each notice once."""

    def __init__(self):
        self.said: set[str] = set()

    def __deepcopy__(self, memo) -> "SayOnce":
        return self

    def __call__(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            print(message, flush=True)


def response_mask_from(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on every response token up to and including the first EOS, 0 after it."""
    is_eos = (response_ids == eos_token_id).long()
    eos_seen_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_seen_before == 0).long()


def disable_dropout(model: nn.Module) -> None:
    """RL on LMs runs without dropout (TRL sets p = 0; RL4LMs never re-enables train mode): with
    dropout the first PPO ratio is not 1 and the log-probs of a rollout are not reproducible."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen reference copy (the KL anchor): same weights, eval mode, no gradients."""
    ref = copy.deepcopy(module).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class FP32OutputLayer(nn.Linear):
    """The LM's output layer, computed in fp32 also inside a bf16 autocast region.

    Under autocast the output layer would return bf16 logits (3 significant digits): log-probs off by
    up to 0.04 nats, and a sampled token's log-prob in generation (KV cache) differing from the scoring
    pass, so rollouts would not come from the distribution PPO's ratio measures. `Policy` gives the
    model's `nn.Linear` output layer this class in place (same parameters and state dict, so
    `save_pretrained` and `from_pretrained` are unchanged), so generation and scoring both use it."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(hidden.float(), self.weight.float(), bias)


# ----------------------------------------------------------------------------------------------
# The policy wrapper
# ----------------------------------------------------------------------------------------------
class Policy(nn.Module):
    """A HF language model and its tokenizer, with the few operations RL needs."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        output_layer = model.get_output_embeddings()
        if type(output_layer) is nn.Linear:  # GPT-2, T5 and most LMs; any other keeps its own forward
            output_layer.__class__ = FP32OutputLayer
        self.is_seq2seq = bool(model.config.is_encoder_decoder)
        self.cut_reason = ""  # why long prompts are cut where they are, for the notice (`prompt_budget`)
        self.say_once = SayOnce()
        # `generate` fills every setting we leave unset from the model's saved generation config, which
        # may carry repetition penalties, n-gram blocking or beams: processors that `forward` does not
        # apply. Keep only the special token ids, so rollouts come from exactly the scored distribution.
        config = model.config
        model.generation_config = GenerationConfig(
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            decoder_start_token_id=getattr(config, "decoder_start_token_id", None),
        )

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return getattr(config, "n_embd", None) or getattr(config, "d_model", None) or config.hidden_size

    @property
    def output_layer_tied(self) -> bool:
        """Whether the output layer is the input embedding matrix (GPT-2, the built-in models): then a pass without
        the logits (a value trunk) still reaches every parameter, which DDP's `find_unused_parameters` depends on."""
        return self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight

    @property
    def context_size(self) -> Optional[int]:
        """Positions a causal LM's sequence may span (its position embeddings end there); None for seq2seq models,
        whose prompts go to the encoder on their own."""
        if self.is_seq2seq:
            return None
        config = self.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    def prompt_budget(self, task_limit: int, response_length: int) -> int:
        """How many prompt tokens rollouts keep: the task's limit and, for a causal LM, no more than its context leaves
        for `response_length` new tokens, so that no prompt, however long, runs past the position embeddings.
        A ValueError if the response alone fills the context."""
        context = self.context_size
        if context is None or task_limit + response_length <= context:
            self.cut_reason = " (the task's limit)"
            return task_limit
        if response_length >= context:
            raise ValueError(
                f"--response-length {response_length} leaves no room for a prompt in the model's {context} positions"
            )
        self.cut_reason = f" (the model's {context} positions less {response_length} for the response)"
        return context - response_length

    def encode_prompts(self, prompts: list[str], max_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask; long prompts keep their last `max_tokens` tokens (GRUE), which the run
        is told once."""
        tok = self.tokenizer
        rows = [tok(p, add_special_tokens=self.is_seq2seq)["input_ids"] for p in prompts]
        if any(len(r) > max_tokens for r in rows):
            self.say_once(
                f"note: prompts longer than {max_tokens} tokens keep their last {max_tokens}"
                f"{self.cut_reason}; said once"
            )
        ids, mask = left_pad_with_mask([r[-max_tokens:] or [tok.eos_token_id] for r in rows], tok.pad_token_id)
        if torch.device(device).type == "cuda":  # page-locked host memory: the copy runs without a host sync
            return ids.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)
        return ids.to(device), mask.to(device)

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """Response texts without special tokens (EOS and padding dropped)."""
        return [
            self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
            for ids, m in zip(response_ids.cpu(), response_mask.cpu(), strict=True)
        ]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int, with_logits: bool = True
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Logits `[B, R, V]` (or None) and last hidden states `[B, R, H]` for the R = T - start
        response columns, aligned so that position j scores token `input_ids[:, start + j]`."""
        if self.is_seq2seq:
            prompt_ids, prompt_mask = input_ids[:, :response_start], attention_mask[:, :response_start]
            labels, label_mask = input_ids[:, response_start:], attention_mask[:, response_start:]
            start = torch.full_like(labels[:, :1], self.model.config.decoder_start_token_id)
            out = self.model(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                decoder_input_ids=torch.cat([start, labels[:, :-1]], 1),
                decoder_attention_mask=torch.cat([torch.ones_like(start), label_mask[:, :-1]], 1),
                output_hidden_states=True,
                use_cache=False,
            )
            return (out.logits if with_logits else None), out.decoder_hidden_states[-1]
        # Same position ids as `generate` computes for left-padded prompts.
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        hidden = hidden[:, response_start - 1 : -1]  # the state before token t predicts token t
        logits = self.model.get_output_embeddings()(hidden) if with_logits else None
        return logits, hidden

    @torch.no_grad()
    def text_nll(
        self, prompts: list[str], continuations: list[str], max_prompt_tokens: int, batch_size: int = 32, logits_fn=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced negative log-likelihood of each continuation after its prompt, in fp32 at
        temperature 1: (summed NLL, token count) per text. The continuation is tokenized on its own (no
        special tokens) and kept to what fits the model's context after the prompt; an empty one has 0
        tokens. Evaluation's `eval/perplexity` and `eval/ref_nll` are built from it. `logits_fn(input_ids,
        attention_mask, response_start) -> logits` scores with another distribution than the model's own
        (ilql.py: the Q-perturbed policy it deploys)."""
        device = next(self.parameters()).device
        tok, context = self.tokenizer, self.context_size
        nll, count = np.zeros(len(prompts)), np.zeros(len(prompts))
        for i in range(0, len(prompts), batch_size):
            prompt_ids, prompt_mask = self.encode_prompts(prompts[i : i + batch_size], max_prompt_tokens, device)
            rows = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations[i : i + batch_size]]
            if context is not None:
                rows = [r[: max(context - prompt_ids.shape[1], 0)] for r in rows]
            ids, mask = (t.to(device) for t in right_pad_with_mask(rows, tok.pad_token_id, min_width=1))
            batch = prompt_then_response(prompt_ids, prompt_mask, ids, mask)
            logits = logits_fn(*batch) if logits_fn is not None else self(*batch)[0]
            token_nll = torch.where(mask.bool(), -logprobs_of(logits, ids), 0.0)  # padding may be -inf under top-k
            nll[i : i + len(rows)] = token_nll.sum(1).double().cpu().numpy()
            count[i : i + len(rows)] = mask.sum(1).cpu().numpy()
        return nll, count

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        logits_processor=None,
        seeds: Optional[list[int]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched, KV-cached generation. Returns response ids `[B, R]` (pad after the first EOS)
        and their mask (1 up to and including EOS). Sampling settings are always passed explicitly:
        a hidden default (transformers' top_k=50) would make rollouts come from another
        distribution than the one PPO's ratio uses, a known flaw of RL4LMs' NLPO/PPO rollouts.

        With `seeds` (one per row), each row samples from its own random stream (`SeededSampling`), so
        a response does not depend on the rest of the batch, the process it runs in, or the global RNG."""
        tok = self.tokenizer
        if seeds is not None and do_sample:
            if len(seeds) != len(prompt_ids):
                raise ValueError(f"generate: {len(seeds)} seeds for {len(prompt_ids)} prompts")
            logits_processor = list(logits_processor or [])
            if top_k or top_p < 1.0:  # applied before the noise, exactly as sampling would
                logits_processor += [TopKLogitsWarper(top_k)] if top_k else []
                logits_processor += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
            logits_processor.append(SeededSampling(seeds, temperature, prompt_ids.device))
            do_sample = False  # the argmax of the noised scores is the sample
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=getattr(self.model.config, "bos_token_id", None),
            decoder_start_token_id=getattr(self.model.config, "decoder_start_token_id", None),
        )
        was_training = self.model.training
        self.model.eval()
        sequences = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            logits_processor=logits_processor,
        )
        self.model.train(was_training)
        response = sequences[:, 1:] if self.is_seq2seq else sequences[:, prompt_ids.shape[1] :]
        mask = response_mask_from(response, tok.eos_token_id)
        return response.masked_fill(mask == 0, tok.pad_token_id), mask


class SeededSampling(LogitsProcessor):
    """Sampling as a logits processor, one random stream per row: the Gumbel-max trick.

    argmax_v(scores_v / T + g_v) with g_v = -log(-log u_v), u_v ~ U(0, 1) iid, is an exact sample from
    softmax(scores / T). Drawing u from a generator seeded per row makes each row's tokens a function
    of its seed alone. Runs last, after every processor that shapes the distribution (masks, min length)."""

    def __init__(self, seeds: list[int], temperature: float, device):
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
        return scores.float() / self.temperature + gumbel


class IncrementalLM:
    """A second model's next-token logits alongside `generate`, one call per step: the first call reads the whole
    (left-padded) prompt, later calls the newest token only, on the model's own KV cache (nlpo.py's masking
    policy). For a seq2seq model, `input_ids` are the decoder's and the prompt is encoded once."""

    def __init__(self, policy: Policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.policy, self.prompt_ids, self.prompt_mask = policy, prompt_ids, prompt_mask
        self.cache, self.encoder_outputs, self.attention_mask = None, None, prompt_mask

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.policy.model
        if self.policy.is_seq2seq:
            if self.encoder_outputs is None:
                self.encoder_outputs = model.get_encoder()(input_ids=self.prompt_ids, attention_mask=self.prompt_mask)
            out = model(
                encoder_outputs=self.encoder_outputs,
                attention_mask=self.prompt_mask,
                decoder_input_ids=input_ids if self.cache is None else input_ids[:, -1:],
                past_key_values=self.cache,
                use_cache=True,
            )
        else:
            new = input_ids if self.cache is None else input_ids[:, -1:]
            if self.cache is not None:
                self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(new)], 1)
            # Left padding: positions count real tokens only, as `generate` and `Policy.forward` do.
            position_ids = (self.attention_mask.cumsum(1) - 1).clamp(min=0)[:, -new.shape[1] :]
            out = model(
                input_ids=new,
                attention_mask=self.attention_mask,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        return out.logits[:, -1]


class ValueHead(nn.Module):
    """A scalar value per position from a hidden state (RL4LMs: Linear(hidden, 1, bias=False))."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.linear.weight)  # start at V = 0: no made-up baseline at step 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 values, also inside bf16 autocast
            return self.linear(hidden.float()).squeeze(-1)


@torch.no_grad()
def prompt_hidden_states(policy: Policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """The last-layer hidden states of the prompt tokens `[B, T, H]` (the encoder's for a seq2seq model); position ids
    as in `Policy.forward`, so left-padding does not shift the real tokens' states."""
    if policy.is_seq2seq:
        return policy.model.get_encoder()(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
    position_ids = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    return policy.model.base_model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def prompt_features(
    policy: Policy, prompts: list[str], max_tokens: int, batch_size: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompt_hidden_states` of many prompts in fp32, `batch_size` at a time, left-padded to one width, and their
    mask (padding is 0)."""
    ids, mask = policy.encode_prompts(prompts, max_tokens, device)
    hidden = [
        prompt_hidden_states(policy, ids[i : i + batch_size], mask[i : i + batch_size]).float()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(hidden), mask


# ----------------------------------------------------------------------------------------------
# Loading: hub id, local directory, or built-in tiny model (built by common/builtin_models.py)
# ----------------------------------------------------------------------------------------------
def resolve_model_path(model_name: str, task) -> str:
    """A directory or hub id `from_pretrained` can open; builds the built-in model if needed."""
    if model_name in BUILTIN_MODELS:
        return ensure_builtin_model(task, model_name)
    path = os.path.expanduser(model_name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"model directory {model_name!r} has no config.json (a `save_pretrained` directory has one)"
            )
        return path
    if os.path.isfile(path):
        raise ValueError(f"model path {model_name!r} is a file; pass the directory `save_pretrained` wrote")
    if model_name.startswith((".", "/", "~")) or os.sep in model_name.strip("/").replace("/", "", 1):
        raise FileNotFoundError(f"model path {model_name!r} does not exist")
    return model_name  # a hub id such as "gpt2" or "lvwerra/gpt2-imdb"


def load_policy(model_name: str, task, device="cpu") -> Policy:
    """Load a policy (causal or seq2seq, chosen by the config) and its tokenizer, dropout off."""
    path = resolve_model_path(model_name, task)
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in every run's output
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.float32)  # fp32 weights whatever the checkpoint's dtype:
    # transformers 5 defaults to the saved dtype, and AdamW steps of lr 1e-6 round away in bf16 weights
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # GPT-2 has none; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(model)
    return Policy(model, tokenizer).to(device)


def load_causal_lm(model_name: str, new_words: list[str], device="cpu"):
    """(model, tokenizer) of a local directory or hub causal LM, for a script that trains it on a vocabulary of its
    own (reward_lm.py): each of `new_words` the tokenizer lacks becomes a new token with a new embedding row."""
    if model_name in BUILTIN_MODELS:  # the built-ins belong to the text tasks, whose builder needs a task
        raise ValueError(f"{model_name!r} is a built-in model of the text tasks; pass a causal LM directory or hub id")
    policy = load_policy(model_name, None, device)
    if policy.is_seq2seq:
        raise ValueError(f"{model_name!r} is a seq2seq model; a causal LM is needed")
    if missing := [w for w in new_words if w not in policy.tokenizer.get_vocab()]:
        policy.tokenizer.add_tokens(missing, special_tokens=True)
        policy.model.resize_token_embeddings(len(policy.tokenizer))
    return policy.model, policy.tokenizer
