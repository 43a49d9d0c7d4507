"""Token batches, built in one place: the layout every `Policy` method reads, and the padding it is made of.

A batch is token ids `[B, T]` and their attention mask: the first `response_start` columns are the prompt, padded
on the left (so every prompt ends where the response begins), and the remaining columns are the response, padded on
the right. `Policy.encode_prompts` makes the prompt part (`left_pad_with_mask`), the response part is
`Policy.generate`'s output or a method's token rows (`right_pad_with_mask`), and `prompt_then_response` joins them.

The offline scripts' per-token MDP layout (ilql.py) is defined here too, after the prompt + response one: a row per
episode with its action mask, per-token rewards and dones (`sentiment_layout`, `collate_layouts`).
"""

from __future__ import annotations

import torch


def right_pad(rows: list[list], value, min_width: int = 0, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Rows (token ids, or per-token values of `dtype`) as one right-padded `[N, max(longest row, min_width)]`
    tensor."""
    out = torch.full((len(rows), max([min_width, *map(len, rows)])), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def right_pad_with_mask(rows: list[list[int]], pad_id: int, min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Response rows right-padded with `pad_id`, and their mask (1 on each row's own tokens): the response part."""
    return right_pad(rows, pad_id, min_width), right_pad([[1] * len(r) for r in rows], 0, min_width)


def left_pad_with_mask(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt rows left-padded with `pad_id` to the longest, and their mask: the prompt part."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def prompt_then_response(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, response_start): the prompt columns, then the response columns."""
    return torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1), prompt_ids.shape[1]


def response_rows(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Logged responses as token rows: tokenized without special tokens, EOS appended, then cut from the right to
    `max_tokens` (the layout of LoL-RL, `utils/rl_utils.py` L115-124)."""
    return [
        (tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_tokens] for t in texts
    ]


def prompt_response_batch(policy, prompts: list[str], responses: list[list[int]], max_prompt_tokens: int, device):
    """Prompts (`policy.encode_prompts`: left-padded, the last `max_prompt_tokens` kept) and response token rows
    (right-padded) -> (input_ids, attention_mask, response_start, response_mask), on `device`."""
    prompt_ids, prompt_mask = policy.encode_prompts(prompts, max_prompt_tokens, device)
    response_ids, response_mask = (t.to(device) for t in right_pad_with_mask(responses, policy.tokenizer.pad_token_id))
    return (*prompt_then_response(prompt_ids, prompt_mask, response_ids, response_mask), response_mask)


# The offline per-token MDP layout (ilql.py; docs/ilql.md, detail 1): one row per episode, one entry per token:
# `input_ids`, `action_mask` (1 on the agent's tokens), `rewards` (a turn's reward on its last action token) and
# `dones` (1 on the last action token of a finished episode). Wordle games write theirs with `wordle.Game.layout`.
def sentiment_layout(tokenizer, prompt: str, response: str, reward: float, max_prompt: int, max_new: int) -> dict:
    """A logged (prompt, response, reward): the prompt's last `max_prompt` tokens (no action), then the response
    with EOS (`response_rows`: actions), the reward and done on its last token."""
    prompt_ids = tokenizer(prompt)["input_ids"][-max_prompt:] or [tokenizer.eos_token_id]
    response_ids = response_rows(tokenizer, [response], max_new)[0]
    n, m = len(prompt_ids), len(response_ids)
    return {
        "input_ids": prompt_ids + response_ids,
        "action_mask": [0] * n + [1] * m,
        "rewards": [0.0] * (n + m - 1) + [reward],
        "dones": [0] * (n + m - 1) + [1],
    }


def collate_layouts(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Per-token MDP layouts right-padded into `[N, T]` tensors, with their `attention_mask`."""
    ids, attention = right_pad_with_mask([r["input_ids"] for r in rows], pad_id)
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "action_mask": right_pad([r["action_mask"] for r in rows], 0),
        "rewards": right_pad([r["rewards"] for r in rows], 0.0, dtype=torch.float32),
        "dones": right_pad([r["dones"] for r in rows], 0),
    }
