"""A value head V(x) on a frozen policy's prompt representation, as A-LoL's V_ref (Baheti et al. 2024; the reference
code's `ValueHeadAttention`, abaheti95/LoL-RL utils/rl_utils.py L452-505): the network, and its values of many
prompts with the work shared out over the ranks. alol.py fits it (common/training.py `fit_early_stopping`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from common.models import Policy, prompt_features
from common.training import map_distinct


class PromptValueHead(nn.Module):
    """V(x) in [0, max_value]: a learned query attends over the prompt's hidden states, then a linear layer and
    sigmoid * max_value, with padding masked out of the attention; used in eval mode (docs/alol.md, details 13, 14)."""

    def __init__(self, hidden_size: int, num_heads: int = 8, dropout: float = 0.1, max_value: float = 1.0):
        super().__init__()
        self.query = nn.Parameter(torch.randn(hidden_size))
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, 1)
        self.max_value = max_value

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden `[B, T, H]` of the prompt tokens, mask `[B, T]` (1 on real tokens) -> V `[B]`."""
        hidden = self.dropout(hidden.float())
        query = self.query.expand(hidden.shape[0], 1, -1)
        pooled, _ = self.attention(query, hidden, hidden, key_padding_mask=mask == 0, need_weights=False)
        return torch.sigmoid(self.linear(self.dropout(pooled[:, 0])).squeeze(-1)) * self.max_value


@torch.no_grad()
def prompt_values(
    head: PromptValueHead, policy: Policy, prompts: list[str], max_prompt_tokens: int, batch_size: int, device
) -> np.ndarray:
    """`head`'s V(x) of every prompt on `policy`'s prompt features, computed once per distinct prompt, the distinct
    prompts shared out over the ranks (`map_distinct`)."""

    def values(texts: list[str]) -> list[float]:
        hidden, mask = prompt_features(policy, texts, max_prompt_tokens, batch_size, device)
        batches = zip(hidden.split(batch_size), mask.split(batch_size), strict=True)
        return torch.cat([head(h, m) for h, m in batches]).tolist()

    return np.array(map_distinct(values, prompts))
