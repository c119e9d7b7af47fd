"""Sequence encoders shared by SparCode's gru/sa tokenizers and the GRU4Rec/SASRec user towers.

Convention (team contract): histories are LEFT-padded, the most recent item is at the last position,
padding (item code 0) on the left. ``mask`` is a bool tensor [B, L], True at valid positions. Both
encoders return ``(outputs [B, L, H], last [B, H])`` with ``outputs`` zero at padding positions and
``last`` the output at the most recent item (zeros for an empty history). Neither the amount of
left padding nor the content of the padding embeddings changes any valid output.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def _check_mask(seq_emb, mask):
    """Default mask (all valid) and shape checks. Returns a bool mask [B, L]."""
    if seq_emb.dim() != 3:
        raise ValueError(f"seq_emb must be [B, L, D], got shape {tuple(seq_emb.shape)}")
    if mask is None:
        return torch.ones(seq_emb.shape[:2], dtype=torch.bool, device=seq_emb.device)
    if mask.shape != seq_emb.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match seq_emb [B, L] = "
                         f"{tuple(seq_emb.shape[:2])}")
    return mask.bool()


class GRUEncoder(nn.Module):
    """GRU over a left-padded history (GRU4Rec, Hidasi et al. 2016).

    Each sequence is shifted so that its valid items come first, packed with its length, run through
    the GRU and shifted back, so padding never enters the recurrence.

    Args:
        input_dim: size of the item embeddings.
        hidden_dim: GRU hidden size H.
        num_layers: stacked GRU layers. Default 1.
        dropout: dropout between stacked GRU layers (only used when num_layers > 1). Default 0.0.
    """

    def __init__(self, input_dim=64, hidden_dim=64, num_layers=1, dropout=0.0):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GRUEncoder: {name} must be a positive int, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"GRUEncoder: dropout must be in [0, 1), got {dropout!r}")
        self.hidden_dim = hidden_dim
        self.gru = nn.GRU(input_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, seq_emb, mask=None):
        """seq_emb [B, L, D], mask [B, L] bool valid (left padded) -> (outputs [B, L, H], last [B, H])."""
        mask = _check_mask(seq_emb, mask)
        if mask.shape[1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("GRUEncoder: mask must be left padded (False... then True... per row)")
        batch_size, seq_len = mask.shape
        lengths = mask.sum(dim=1)                                                      # [B]
        offset = (seq_len - lengths).unsqueeze(1)                                      # [B, 1] padding count
        positions = torch.arange(seq_len, device=mask.device).unsqueeze(0)             # [1, L]
        to_left_aligned = (positions + offset) % seq_len                               # [B, L]
        aligned = seq_emb.gather(1, to_left_aligned.unsqueeze(-1).expand_as(seq_emb))  # valid first
        outputs = seq_emb.new_zeros(batch_size, seq_len, self.hidden_dim)              # [B, L, H]
        last = seq_emb.new_zeros(batch_size, self.hidden_dim)                          # [B, H]
        nonempty = lengths > 0
        if bool(nonempty.any()):
            packed = pack_padded_sequence(aligned[nonempty], lengths[nonempty].cpu(), batch_first=True,
                                          enforce_sorted=False)
            packed_out, hidden = self.gru(packed)
            aligned_out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=seq_len)
            back = (positions - offset[nonempty]) % seq_len                            # [B', L]
            restored = aligned_out.gather(1, back.unsqueeze(-1).expand_as(aligned_out))
            outputs[nonempty] = restored * mask[nonempty].unsqueeze(-1)
            last[nonempty] = hidden[-1]
        return outputs, last


class SelfAttentionBlock(nn.Module):
    """Pre-LN block as in SASRec: x + Dropout(Attn(LN(x))), then x + Dropout(FFN(LN(x))).

    `project` and `finish` are the two halves around the attention, for callers that attend
    differently (layers/joint_attention.py: candidate tokens attending to cached user states).
    """

    def __init__(self, dim, num_heads, dropout, ffn_dim):
        super().__init__()
        self.num_heads = num_heads
        self.dropout_rate = dropout
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def project(self, x):
        """x [..., L, D] -> (query, key, value), each [..., h, L, D/h]."""
        *lead, seq_len, dim = x.shape
        qkv = self.qkv(self.attention_norm(x)).view(*lead, seq_len, 3, self.num_heads, dim // self.num_heads)
        return qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)                          # each [..., h, L, D/h]

    def finish(self, x, attended):
        """x [..., L, D] and the attention output [..., h, L, D/h] -> the block's output [..., L, D]."""
        attended = attended.transpose(-3, -2).flatten(-2)                              # [..., L, D]
        x = x + self.dropout(self.attention_out(attended))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def forward(self, x, allowed):
        """x [B, L, D], allowed [B, 1, L, L] bool (query t may attend key s) -> [B, L, D]."""
        query, key, value = self.project(x)                                            # each [B, h, L, D/h]
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed,
                                                  dropout_p=self.dropout_rate if self.training else 0.0)
        return self.finish(x, attended)


class SelfAttentionEncoder(nn.Module):
    """Multi-layer self-attention encoder, SASRec style (Kang & McAuley 2018).

    Learned position embeddings are added to the inputs, then dropout; every block is
    ``x + Dropout(MultiHeadAttention(LayerNorm(x)))`` followed by a point-wise feed-forward network
    ``x + Dropout(FFN(LayerNorm(x)))`` (the residual / layer-norm / dropout scheme of the SASRec paper);
    a final LayerNorm closes the stack. Padding positions are zeroed after every block (timeline mask)
    and never used as keys.

    Positions are counted from the END of the sequence (the most recent item has position 0), so
    a left-padded history gets the same encoding whatever its padded length. Input embeddings are
    used as given; SASRec's scaling of item embeddings by sqrt(D) is the caller's choice.

    Args:
        dim: model size D (input and output).
        num_layers: number of blocks. Default 3 (paper's setting).
        num_heads: attention heads; must divide ``dim``. Default 1.
        dropout: dropout on inputs, attention weights, sub-layer outputs and inside the FFN. Default 0.1.
        max_len: largest sequence length (size of the position table). Default 50.
        causal: if True, the output at t depends only on positions <= t (SASRec). False gives
            all-to-all attention (field tokens, All-to-All SA).
        use_positions: add learned position embeddings. Default True.
        ffn_dim: inner size of the feed-forward network; None -> ``dim`` (as in SASRec).
    """

    def __init__(self, dim=64, num_layers=3, num_heads=1, dropout=0.1, max_len=50, causal=True,
                 use_positions=True, ffn_dim=None):
        super().__init__()
        for name, value in (("dim", dim), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SelfAttentionEncoder: {name} must be a positive int, got {value!r}")
        if dim % num_heads != 0:
            raise ValueError(f"SelfAttentionEncoder: dim={dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"SelfAttentionEncoder: dropout must be in [0, 1), got {dropout!r}")
        ffn_dim = dim if ffn_dim is None else ffn_dim
        self.dim = dim
        self.max_len = max_len
        self.causal = bool(causal)
        self.position_embedding = nn.Embedding(max_len, dim) if use_positions else None
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, num_heads, dropout, ffn_dim)
                                    for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, seq_emb, mask=None):
        """seq_emb [B, L, D], mask [B, L] bool valid (None: all valid) -> (outputs [B, L, D], last [B, D]).

        ``last`` is the output at position L - 1 (the most recent item of a left-padded history).
        """
        mask = _check_mask(seq_emb, mask)
        seq_len = seq_emb.shape[1]
        if seq_emb.shape[2] != self.dim:
            raise ValueError(f"SelfAttentionEncoder: embedding size {seq_emb.shape[2]}, expected dim={self.dim}")
        if seq_len > self.max_len:
            raise ValueError(f"SelfAttentionEncoder: sequence length {seq_len} exceeds max_len={self.max_len}")
        valid = mask.unsqueeze(-1).to(seq_emb.dtype)                                   # [B, L, 1]
        x = seq_emb
        if self.position_embedding is not None:
            recency = torch.arange(seq_len - 1, -1, -1, device=seq_emb.device)        # [L]: L-1 .. 0
            x = x + self.position_embedding(recency).unsqueeze(0)
        x = self.input_dropout(x) * valid
        allowed = mask.unsqueeze(1).expand(-1, seq_len, -1)                            # [B, L(query), L(key)]
        if self.causal:
            allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril()
        # A query with no allowed key (a padding position) attends to itself: avoids NaN; its output
        # is zeroed below and never used as a key by a valid position.
        allowed = (allowed | torch.eye(seq_len, dtype=torch.bool, device=mask.device)).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * valid
        outputs = self.final_norm(x) * valid                                           # [B, L, D]
        return outputs, outputs[:, -1]
