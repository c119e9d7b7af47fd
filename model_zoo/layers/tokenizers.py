"""User-side tokenizer of SparCode (Eq. 4-6): field embeddings and history -> K_u token vectors.

The tokenizer works on embeddings (it owns no embedding table), so it can be fed by any
``FieldEmbedding``:

- ``dnn``: ``fields [B, F, D]`` are all user-side fields (the history mean-pooled as one field).
  f = MLP(flatten(fields)).
- ``gru`` / ``sa``: ``fields [B, F_p, D]`` are the profile fields (F_p may be 0) and
  ``history [B, L, D]`` with ``mask [B, L]`` the left-padded history. The history is encoded by
  ``GRUEncoder`` or ``SelfAttentionEncoder`` (causal, SASRec style; the same modules GRU4Rec and
  SASRec use); f = MLP([last output; flatten(fields)]).

Token heads (``layers.token_heads.TokenHeads``):
- ``linear``: K_u linear heads over f.
- ``senet``: every token reweights a set of D-dim slots with its own squeeze-excitation and applies
  its own linear head. The slots are the field embeddings (dnn) or the encoder outputs at every
  history position plus the profile fields (gru / sa), and in both cases f projected to D as one
  more slot. So different tokens can weigh different fields / history positions (different interests).
- ``attention``: multi-interest attention (``InterestHeads``): every token pools the history with its own
  content-based attention (the raw history item embeddings for dnn, the encoder outputs for gru / sa;
  padding masked) and adds a linear map of f. Needs the history for every tokenizer, dnn included.
"""
import torch
from torch import nn
from fuxictr.pytorch.layers import MLP_Block

from .sequence_encoders import GRUEncoder, SelfAttentionEncoder
from .token_heads import HEAD_TYPES, InterestHeads, TokenHeads

TOKENIZERS = ("dnn", "gru", "sa")
HISTORY_HEADS = ("attention",)  # token heads that read the history slots


class UserTokenizer(nn.Module):
    """Encode one user into ``num_tokens`` token vectors.

    Args:
        tokenizer: "dnn" (default) | "gru" | "sa".
        embedding_dim: D, size of every field / history embedding.
        num_fields: F, number of field embeddings given to ``forward`` (all user fields for "dnn",
            the profile fields without the history for "gru" / "sa"; may be 0 for those).
        num_tokens: K_u, tokens produced.
        token_dim: D_T, size of every token.
        token_heads: "linear" (default) | "senet" | "attention".
        hidden_units: hidden layers of the MLP that produces f. Empty: f is its input as it is.
        hidden_activations: activation of that MLP. Default "ReLU".
        dropout: dropout of the MLP and of the self-attention encoder. Default 0.0.
        history_len: L, length of the history (position table of "sa"; slot count of "senet").
        num_layers: self-attention blocks ("sa"). Default 2.
        num_heads: attention heads ("sa"); must divide ``embedding_dim``. Default 1.
    """

    def __init__(self,
                 tokenizer="dnn",
                 embedding_dim=64,
                 num_fields=1,
                 num_tokens=2,
                 token_dim=64,
                 token_heads="linear",
                 hidden_units=(256,),
                 hidden_activations="ReLU",
                 dropout=0.0,
                 history_len=20,
                 num_layers=2,
                 num_heads=1):
        super().__init__()
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"UserTokenizer: tokenizer={tokenizer!r}, expected one of {TOKENIZERS}")
        if token_heads not in HEAD_TYPES:
            raise ValueError(f"UserTokenizer: token_heads={token_heads!r}, expected one of {HEAD_TYPES}")
        for name, value, low in (("embedding_dim", embedding_dim, 1), ("num_fields", num_fields, 0),
                                 ("num_tokens", num_tokens, 1), ("token_dim", token_dim, 1),
                                 ("history_len", history_len, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"UserTokenizer: {name} must be an int >= {low}, got {value!r}")
        if tokenizer == "dnn" and num_fields < 1:
            raise ValueError("UserTokenizer: tokenizer='dnn' needs num_fields >= 1, got 0")
        hidden_units = list(hidden_units or [])
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_units):
            raise ValueError(f"UserTokenizer: hidden_units must be positive ints, got {hidden_units!r}")
        self.tokenizer = tokenizer
        self.head_type = token_heads
        self.embedding_dim = embedding_dim
        self.num_fields = num_fields
        self.history_len = history_len
        self.token_dim = token_dim
        self.needs_history = tokenizer != "dnn" or token_heads in HISTORY_HEADS

        if tokenizer == "gru":
            self.encoder = GRUEncoder(embedding_dim, embedding_dim)
        elif tokenizer == "sa":
            self.encoder = SelfAttentionEncoder(embedding_dim, num_layers=num_layers, num_heads=num_heads,
                                                dropout=dropout, max_len=history_len, causal=True)
        else:
            self.encoder = None
        mlp_input_dim = num_fields * embedding_dim + (0 if self.encoder is None else embedding_dim)
        self.mlp = MLP_Block(mlp_input_dim, hidden_units, hidden_activations, output_dim=None,
                             dropout_rates=dropout) if hidden_units else nn.Identity()
        summary_dim = hidden_units[-1] if hidden_units else mlp_input_dim
        self.summary_slot = None
        if token_heads == "linear":
            self.heads = TokenHeads(summary_dim, num_tokens, token_dim, "linear")
        elif token_heads == "attention":
            self.heads = InterestHeads(embedding_dim, summary_dim, num_tokens, token_dim)
        else:
            num_slots = num_fields + 1 + (history_len if self.encoder is not None else 0)
            self.summary_slot = nn.Linear(summary_dim, embedding_dim)
            self.heads = TokenHeads(embedding_dim, num_tokens, token_dim, "senet", num_fields=num_slots)

    def forward(self, fields, history=None, mask=None):
        """fields [B, F, D]; history [B, L, D] and mask [B, L] (gru / sa / attention heads) -> [B, K_u, D_T]."""
        if fields.dim() != 3 or tuple(fields.shape[1:]) != (self.num_fields, self.embedding_dim):
            raise ValueError(f"UserTokenizer: fields shape {tuple(fields.shape)}, expected "
                             f"[B, {self.num_fields}, {self.embedding_dim}]")
        slots = [fields]                                                               # [B, F, D]
        features = fields.flatten(1)                                                   # [B, F * D]
        if self.needs_history:
            if history is None or mask is None:
                raise ValueError(f"UserTokenizer: tokenizer={self.tokenizer!r} with token_heads="
                                 f"{self.head_type!r} needs the history and its mask")
            if history.shape[1] != self.history_len:
                raise ValueError(f"UserTokenizer: history length {history.shape[1]}, expected "
                                 f"history_len={self.history_len}")
        sequence = history                                                             # [B, L, D]
        if self.encoder is not None:
            sequence, last = self.encoder(history, mask)                               # [B, L, D], [B, D]
            features = torch.cat([last, features], dim=1)                              # [B, D + F * D]
            slots.insert(0, sequence)
        summary = self.mlp(features)                                                   # [B, H]
        if self.head_type in HISTORY_HEADS:
            return self.heads(sequence, mask, summary)                                 # [B, K_u, D_T]
        if self.summary_slot is None:
            return self.heads(summary)                                                 # [B, K_u, D_T]
        slots.append(self.summary_slot(summary).unsqueeze(1))                          # [B, 1, D]
        return self.heads(torch.cat(slots, dim=1))                                     # [B, K_u, D_T]

    def extra_repr(self):
        return f"tokenizer={self.tokenizer!r}, token_heads={self.head_type!r}"
