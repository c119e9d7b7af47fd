"""Joint self-attention over a user's tokens and a candidate's tokens (the All-to-All SA encoder).

Two computations share the same blocks (layers/sequence_encoders.py `SelfAttentionBlock`) and weights:

- `full`: one sequence [user tokens; candidate tokens] per (user, candidate) pair, every token attending to
  every valid token (or, with `user_attends_items=False`, the user tokens only to the user tokens).
- `cached`: the user tokens are encoded once per user (they attend only to each other), and the key / value
  of every layer is kept (`UserCache`); each candidate's tokens then attend to the cached user keys of their
  layer and to their own tokens. This is exactly `full` with `user_attends_items=False`, at the cost of the
  candidate's few tokens per pair instead of the whole sequence. Candidates may be shared by every user
  ([1, C, T_c, D]: their first-layer projections are computed once) or each user's own ([B, C, T_c, D]).

Padding user tokens (mask False) are never keys and their outputs are zero; candidate tokens are all valid.
Inputs are used as given (type and position embeddings are the caller's).
"""
import math
from typing import List, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .sequence_encoders import SelfAttentionBlock


class UserCache(NamedTuple):
    """What the candidates need of a user batch: final outputs, per-layer keys / values and the mask."""
    outputs: torch.Tensor          # [B, T_u, D], zero at padding
    keys: List[torch.Tensor]       # per layer [B, h, T_u, D/h]
    values: List[torch.Tensor]     # per layer [B, h, T_u, D/h]
    mask: torch.Tensor             # [B, T_u] bool, True at valid tokens


class JointAttentionEncoder(nn.Module):
    """Pre-LN self-attention blocks over [user tokens; candidate tokens], full or with a user cache.

    Args:
        dim: model size D.
        num_layers: self-attention blocks. Default 2.
        num_heads: attention heads; must divide ``dim``. Default 1.
        dropout: dropout on the inputs, attention weights and sub-layer outputs. Default 0.1.
        ffn_dim: inner size of the feed-forward network; None -> ``dim``.
    """

    def __init__(self, dim=64, num_layers=2, num_heads=1, dropout=0.1, ffn_dim=None):
        super().__init__()
        for name, value in (("dim", dim), ("num_layers", num_layers), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"JointAttentionEncoder: {name}={value!r}; expected a positive int")
        if dim % num_heads != 0:
            raise ValueError(f"JointAttentionEncoder: dim={dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"JointAttentionEncoder: dropout={dropout!r}; expected a number in [0, 1)")
        self.num_heads, self.dropout_rate = num_heads, float(dropout)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, num_heads, dropout, dim if ffn_dim is None else ffn_dim)
                                    for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)

    # ---- full form ------------------------------------------------------------------------
    def full(self, user, user_mask, candidate, user_attends_items=True):
        """One sequence per pair: user [N, T_u, D], user_mask [N, T_u], candidate [N, T_c, D]
        -> (user outputs [N, T_u, D] zero at padding, candidate outputs [N, T_c, D])."""
        num_user = user.shape[1]
        valid = torch.cat([user_mask, user_mask.new_ones(candidate.shape[:2])], 1)          # [N, T]
        seq_len = valid.shape[1]
        allowed = valid.unsqueeze(1).expand(-1, seq_len, -1).clone()                        # [N, T(query), T(key)]
        if not user_attends_items:
            allowed[:, :num_user, num_user:] = False
        # a padding query attends to itself (no NaN); its output is zeroed and it is never a key
        allowed = (allowed | torch.eye(seq_len, dtype=torch.bool, device=valid.device)).unsqueeze(1)
        keep = valid.unsqueeze(-1).to(user.dtype)                                           # [N, T, 1]
        x = self.input_dropout(torch.cat([user, candidate], 1)) * keep                      # [N, T, D]
        for block in self.blocks:
            x = block(x, allowed) * keep
        x = self.final_norm(x) * keep
        return x[:, :num_user], x[:, num_user:]

    # ---- cached form ----------------------------------------------------------------------
    def encode_user(self, user, user_mask):
        """user [B, T_u, D], user_mask [B, T_u] bool -> UserCache (the user tokens attend to each other only)."""
        num_user = user.shape[1]
        allowed = (user_mask.unsqueeze(1).expand(-1, num_user, -1) |
                   torch.eye(num_user, dtype=torch.bool, device=user.device)).unsqueeze(1)  # [B, 1, T_u, T_u]
        keep = user_mask.unsqueeze(-1).to(user.dtype)                                       # [B, T_u, 1]
        x = self.input_dropout(user) * keep
        keys, values = [], []
        for block in self.blocks:
            query, key, value = block.project(x)                                            # each [B, h, T_u, d]
            keys.append(key)
            values.append(value)
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed,
                                                      dropout_p=self.dropout_rate if self.training else 0.0)
            x = block.finish(x, attended) * keep
        return UserCache(self.final_norm(x) * keep, keys, values, user_mask)

    def encode_candidates(self, cache, candidate):
        """candidate [B or 1, C, T_c, D] (each user's own, or shared by every user) -> outputs [B, C, T_c, D]."""
        x = self.input_dropout(candidate)
        key_bias = torch.zeros(cache.mask.shape, dtype=candidate.dtype, device=candidate.device)
        key_bias = key_bias.masked_fill(~cache.mask, float("-inf"))[:, None, None, None]   # [B, 1, 1, 1, T_u]
        for block, user_key, user_value in zip(self.blocks, cache.keys, cache.values):
            query, key, value = block.project(x)                                            # each [b, C, h, T_c, d]
            x = block.finish(x, self._attend(query, key, value, user_key, user_value, key_bias))
        return self.final_norm(x)                                                           # [B, C, T_c, D]

    def _attend(self, query, key, value, user_key, user_value, key_bias):
        """Candidate queries over [cached user keys; the candidate's own keys] -> [B, C, h, T_c, d]."""
        batch_size, heads, num_user, head_dim = user_key.shape
        lead, num_candidates, _, num_tokens, _ = query.shape                                # lead: B or 1
        scale = 1.0 / math.sqrt(head_dim)
        flat_query = query.transpose(1, 2).reshape(lead, heads, num_candidates * num_tokens, head_dim)
        to_user = (flat_query @ user_key.transpose(-1, -2)) * scale                         # [B, h, C * T_c, T_u]
        to_user = to_user.view(batch_size, heads, num_candidates, num_tokens, num_user).transpose(1, 2)
        to_user = to_user + key_bias                                                        # [B, C, h, T_c, T_u]
        to_self = (query @ key.transpose(-1, -2)) * scale                                   # [b, C, h, T_c, T_c]
        weights = torch.cat([to_user, to_self.expand(batch_size, -1, -1, -1, -1)], -1).softmax(-1)
        weights = F.dropout(weights, self.dropout_rate, self.training)                      # [B, C, h, T_c, T]
        user_weights = weights[..., :num_user].transpose(1, 2).reshape(batch_size, heads, -1, num_user)
        from_user = (user_weights @ user_value).view(batch_size, heads, num_candidates, num_tokens, head_dim)
        return from_user.transpose(1, 2) + weights[..., num_user:] @ value                  # [B, C, h, T_c, d]
