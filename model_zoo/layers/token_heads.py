"""Token heads: turn a tokenizer's output into K token vectors (SparCode Eq. 6, Sec. 4.1.3).

- ``linear``: K linear heads over a feature vector. Input [B, input_dim] (or [B, num_fields, input_dim],
  flattened first when ``num_fields`` is given) -> [B, K, token_dim]. Implemented as one Linear layer
  with K * token_dim outputs, which is exactly K independent linear heads.
- ``senet``: input field (or sequence-position) embeddings [B, num_fields, input_dim]. Every token k has
  its own squeeze-excitation (fuxictr ``SqueezeExcitation``: mean over the embedding axis, bottleneck
  MLP, one weight per field) that reweights the fields, followed by its own linear head over the
  flattened reweighted fields. Different tokens can thus attend to different fields or history
  positions (different interests), which a shared reweighting followed by linear heads could not.
- ``attention`` (``InterestHeads``): multi-interest attention over a variable-length set of slots (the
  history items), in the spirit of ComiRec-SA (Cen et al., KDD'20). Token k pools the slots with its own
  attention query, softmax_l(q_k . tanh(W x_l)) over the valid slots only, and adds a linear map of a
  summary vector (the profile). Unlike ``senet`` the weights depend on what a slot contains, not on its
  position, so each token can gather the history items of one interest.
"""
import torch
from torch import nn
from fuxictr.pytorch.layers import SqueezeExcitation

HEAD_TYPES = ("linear", "senet", "attention")
_FIXED_SLOT_TYPES = ("linear", "senet")


def _check_positive_ints(owner, **values):
    """Raise ValueError naming the first argument that is not a positive int."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


class TokenHeads(nn.Module):
    """Map a feature vector or field embeddings to ``num_tokens`` token vectors.

    Args:
        input_dim: size of the last input axis (feature vector size for "linear", per-field embedding
            size for "senet").
        num_tokens: K, number of tokens produced.
        token_dim: D_T, size of every token.
        head_type: "linear" (default) or "senet".
        num_fields: number of fields of a [B, num_fields, input_dim] input; required for "senet",
            optional for "linear" (then the input is flattened). Default None.
        reduction_ratio: bottleneck ratio of the squeeze-excitation ("senet"). Default 3. Every
            excitation ends with a sigmoid, as in the SENet paper.
    """

    def __init__(self,
                 input_dim=64,
                 num_tokens=2,
                 token_dim=64,
                 head_type="linear",
                 num_fields=None,
                 reduction_ratio=3):
        super().__init__()
        if head_type not in _FIXED_SLOT_TYPES:
            hint = " (use InterestHeads for 'attention')" if head_type == "attention" else ""
            raise ValueError(f"TokenHeads: head_type={head_type!r}, expected one of {_FIXED_SLOT_TYPES}{hint}")
        _check_positive_ints("TokenHeads", input_dim=input_dim, num_tokens=num_tokens, token_dim=token_dim,
                             reduction_ratio=reduction_ratio)
        if num_fields is not None and (isinstance(num_fields, bool) or not isinstance(num_fields, int)
                                       or num_fields < 1):
            raise ValueError(f"TokenHeads: num_fields must be a positive int or None, got {num_fields!r}")
        if head_type == "senet" and num_fields is None:
            raise ValueError("TokenHeads: head_type='senet' needs num_fields (input [B, num_fields, input_dim])")
        self.input_dim = input_dim
        self.num_tokens = num_tokens
        self.token_dim = token_dim
        self.head_type = head_type
        self.num_fields = num_fields
        flat_dim = input_dim * (num_fields or 1)
        if head_type == "linear":
            self.heads = nn.Linear(flat_dim, num_tokens * token_dim)
        else:
            self.excitations = nn.ModuleList(
                SqueezeExcitation(num_fields, reduction_ratio, "Sigmoid") for _ in range(num_tokens))
            self.heads = nn.ModuleList(nn.Linear(flat_dim, token_dim) for _ in range(num_tokens))

    def forward(self, inputs):
        """inputs [B, input_dim] or [B, num_fields, input_dim] -> tokens [B, num_tokens, token_dim]."""
        expected = (self.num_fields, self.input_dim) if self.num_fields else (self.input_dim,)
        if tuple(inputs.shape[1:]) != expected:
            raise ValueError(f"TokenHeads: input shape {tuple(inputs.shape)}, expected [B, "
                             f"{', '.join(map(str, expected))}]")
        if self.head_type == "linear":
            return self.heads(inputs.flatten(1)).view(-1, self.num_tokens, self.token_dim)
        tokens = [head(excitation(inputs).flatten(1))                                 # each [B, token_dim]
                  for excitation, head in zip(self.excitations, self.heads)]
        return torch.stack(tokens, dim=1)                                              # [B, K, token_dim]

    def extra_repr(self):
        return (f"head_type={self.head_type!r}, input_dim={self.input_dim}, num_fields={self.num_fields}, "
                f"num_tokens={self.num_tokens}, token_dim={self.token_dim}")


class InterestHeads(nn.Module):
    """Multi-interest attention heads: slots [B, L, D] with a mask and a summary [B, H] -> [B, K, D_T].

    token_k = P_k (sum_l a_kl x_l) + Q_k summary + c_k, with a_k = softmax over the valid slots of
    q_k . tanh(W x_l). A user without a valid slot gets a zero pooled vector (token = Q_k summary + c_k).

    Args:
        input_dim: D, size of every slot.
        summary_dim: H, size of the summary vector.
        num_tokens: K, tokens (interests) produced.
        token_dim: D_T, size of every token.
        attention_dim: size of the attention key space (W: D -> attention_dim). Default: input_dim.
    """

    def __init__(self, input_dim=64, summary_dim=64, num_tokens=2, token_dim=64, attention_dim=None):
        super().__init__()
        attention_dim = input_dim if attention_dim is None else attention_dim
        _check_positive_ints("InterestHeads", input_dim=input_dim, summary_dim=summary_dim, num_tokens=num_tokens,
                             token_dim=token_dim, attention_dim=attention_dim)
        self.input_dim, self.num_tokens, self.token_dim = input_dim, num_tokens, token_dim
        self.key = nn.Linear(input_dim, attention_dim, bias=False)
        self.queries = nn.Parameter(torch.empty(num_tokens, attention_dim))
        self.pool_heads = nn.Parameter(torch.empty(num_tokens, input_dim, token_dim))
        self.summary_heads = nn.Linear(summary_dim, num_tokens * token_dim)
        self.init_weights()

    def init_weights(self):
        """Initialise the raw parameters (FuxiCTR's reset_parameters calls this after its Linear init)."""
        # Distinct random queries make the tokens attend differently from the first step.
        nn.init.normal_(self.queries, std=1.0)
        nn.init.xavier_uniform_(self.pool_heads)

    def attention(self, slots, mask):
        """Attention weights [B, K, L]; rows sum to 1 over valid slots (0 where no slot is valid)."""
        logits = torch.tanh(self.key(slots)) @ self.queries.t()                       # [B, L, K]
        logits = logits.masked_fill(~mask.unsqueeze(-1), -1e4).transpose(1, 2)       # [B, K, L]
        # Finite fill then zeroing (not -inf): an all-padding row gives 0 weights, not NaN, in both passes.
        return torch.softmax(logits, dim=-1) * mask.unsqueeze(1)

    def forward(self, slots, mask, summary):
        if slots.dim() != 3 or slots.shape[2] != self.input_dim or tuple(mask.shape) != tuple(slots.shape[:2]):
            raise ValueError(f"InterestHeads: slots {tuple(slots.shape)} and mask {tuple(mask.shape)}, expected "
                             f"[B, L, {self.input_dim}] and [B, L]")
        pooled = self.attention(slots, mask.bool()) @ slots                             # [B, K, D]
        tokens = torch.einsum("bkd,kdt->bkt", pooled, self.pool_heads)                 # [B, K, D_T]
        return tokens + self.summary_heads(summary).view(-1, self.num_tokens, self.token_dim)

    def extra_repr(self):
        return f"input_dim={self.input_dim}, num_tokens={self.num_tokens}, token_dim={self.token_dim}"
