"""Towers of two-tower models: an MLP over field embeddings, and a sequential user tower.

`FieldMLPTower` maps a side's field embeddings [B, F, D] to one vector [B, d] (the DSSM item
tower; the item tower of GRU4Rec and SASRec). `SequenceUserTower` combines a history encoder
(`GRUEncoder`, `SelfAttentionEncoder` or any module with their interface) with the user's static
field embeddings through an MLP. Neither owns the embedding table: the model embeds and passes
the embeddings in, so the history shares the item tower's `item_id` table. `VectorNormalizer` is
the last step of both towers: it makes the score a dot product or a cosine.
"""
import torch
from fuxictr.pytorch.layers import MLP_Block
from torch import nn
from torch.nn import functional as F

SIMILARITIES = ("dot", "cosine")


def _check_positive_int(owner, name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")


class FieldMLPTower(MLP_Block):
    """MLP over the flattened field embeddings of one side: [..., F, D] -> [..., d].

    The parameters are those of FuxiCTR's `MLP_Block` (same state-dict keys), so a model that
    used a plain `MLP_Block` on `fields.flatten(1)` can switch to this class and keep its
    checkpoints.

    Args:
        num_fields: number of fields F.
        embedding_dim: size D of each field embedding.
        output_dim: size d of the output vector.
        hidden_units: hidden layer sizes; () gives a single linear map F * D -> d.
        hidden_activations: activation of the hidden layers.
        dropout: dropout rate after every hidden layer.
        batch_norm: batch normalisation after every hidden layer.
    """

    def __init__(self, num_fields=1, embedding_dim=64, output_dim=64, hidden_units=(256,),
                 hidden_activations="ReLU", dropout=0.0, batch_norm=False):
        _check_positive_int("FieldMLPTower", "num_fields", num_fields)
        _check_positive_int("FieldMLPTower", "embedding_dim", embedding_dim)
        _check_positive_int("FieldMLPTower", "output_dim", output_dim)
        super().__init__(num_fields * embedding_dim, list(hidden_units), hidden_activations, output_dim,
                         dropout_rates=dropout, batch_norm=batch_norm)
        self.num_fields, self.embedding_dim = num_fields, embedding_dim

    def forward(self, fields):
        """fields [..., F, D] -> [..., d]."""
        if tuple(fields.shape[-2:]) != (self.num_fields, self.embedding_dim):
            raise ValueError(f"FieldMLPTower: fields of shape {tuple(fields.shape)}, expected "
                             f"[..., F={self.num_fields}, D={self.embedding_dim}]")
        lead = fields.shape[:-2]
        flat = fields.reshape(-1, self.num_fields * self.embedding_dim)            # [N, F * D]
        return self.mlp(flat).reshape(*lead, -1)                                    # [..., d]


class SequenceUserTower(nn.Module):
    """User tower of a sequential two-tower model (GRU4Rec, SASRec).

    The history embeddings (times `input_scale`) go through `encoder`; its state at the most
    recent item, concatenated with the flattened user field embeddings, goes through an MLP to
    the user vector. An empty history gives a zero encoder state (then only the user fields
    speak).

    Args:
        encoder: module `(seq_emb [B, L, D], mask [B, L] bool) -> (outputs [B, L, H], last [B, H])`
            with left-padded histories (see layers/sequence_encoders.py).
        encoder_dim: H, the encoder's output size.
        num_user_fields: number F of static user fields concatenated to the encoder state
            (0: the history alone).
        embedding_dim: size D of a user field embedding.
        output_dim: size d of the user vector.
        hidden_units: hidden layers of the MLP; () gives a linear map H + F * D -> d.
        hidden_activations: activation of the hidden layers.
        dropout: dropout rate after every hidden layer.
        batch_norm: batch normalisation after every hidden layer.
        input_scale: factor applied to the history embeddings before the encoder
            (SASRec multiplies them by sqrt(D)). Default 1.0.
    """

    def __init__(self, encoder, encoder_dim=64, num_user_fields=0, embedding_dim=64, output_dim=64,
                 hidden_units=(256,), hidden_activations="ReLU", dropout=0.0, batch_norm=False,
                 input_scale=1.0):
        super().__init__()
        _check_positive_int("SequenceUserTower", "encoder_dim", encoder_dim)
        _check_positive_int("SequenceUserTower", "num_user_fields", num_user_fields, minimum=0)
        _check_positive_int("SequenceUserTower", "embedding_dim", embedding_dim)
        _check_positive_int("SequenceUserTower", "output_dim", output_dim)
        if not float(input_scale) > 0:
            raise ValueError(f"SequenceUserTower: input_scale must be > 0, got {input_scale!r}")
        self.encoder = encoder
        self.encoder_dim, self.num_user_fields, self.embedding_dim = encoder_dim, num_user_fields, embedding_dim
        self.input_scale = float(input_scale)
        self.mlp = MLP_Block(encoder_dim + num_user_fields * embedding_dim, list(hidden_units), hidden_activations,
                             output_dim, dropout_rates=dropout, batch_norm=batch_norm)

    def _check_fields(self, user_fields, batch_size):
        if self.num_user_fields == 0:
            if user_fields is not None:
                raise ValueError("SequenceUserTower: built with num_user_fields=0 but user_fields were given")
            return
        expected = (batch_size, self.num_user_fields, self.embedding_dim)
        if user_fields is None or tuple(user_fields.shape) != expected:
            got = None if user_fields is None else tuple(user_fields.shape)
            raise ValueError(f"SequenceUserTower: user_fields of shape {got}, expected [B, F, D] = {expected}")

    def _combine(self, state, user_fields):
        """state [..., H] (+ user_fields [..., F, D]) -> MLP -> [..., d]."""
        if user_fields is not None:
            state = torch.cat([state, user_fields.flatten(-2)], dim=-1)              # [..., H + F * D]
        lead = state.shape[:-1]
        return self.mlp(state.reshape(-1, state.shape[-1])).reshape(*lead, -1)     # [..., d]

    def forward(self, seq_emb, mask, user_fields=None):
        """seq_emb [B, L, D], mask [B, L] bool (left padded), user_fields [B, F, D] -> user vector [B, d]."""
        self._check_fields(user_fields, seq_emb.shape[0])
        _, last = self.encoder(seq_emb * self.input_scale, mask)                    # [B, H]
        return self._combine(last, user_fields)

    def per_position(self, seq_emb, mask, user_fields=None):
        """The MLP applied to the encoder output at every position: [B, L, d], zero at padding.

        The last row is what `forward` returns. With a causal encoder row t depends only on the
        items up to t (used to check causality); it is not the vector of the history truncated
        after t when the encoder counts positions from the end (SelfAttentionEncoder does).
        """
        self._check_fields(user_fields, seq_emb.shape[0])
        outputs, _ = self.encoder(seq_emb * self.input_scale, mask)                 # [B, L, H]
        if user_fields is not None:
            user_fields = user_fields.unsqueeze(1).expand(-1, seq_emb.shape[1], -1, -1)   # [B, L, F, D]
        return self._combine(outputs, user_fields) * mask.unsqueeze(-1)             # [B, L, d]


class VectorNormalizer(nn.Module):
    """Last step of the towers of a two-tower model: identity for `dot`, unit L2 norm for `cosine`.

    The score stays the dot product of the two vectors (the cosine, for unit vectors), so both
    similarities are served by the same inner-product index. No parameters.

    Args:
        similarity: `dot` or `cosine`.
    """

    def __init__(self, similarity="dot"):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}; expected 'dot' or 'cosine'")
        self.similarity = similarity

    def forward(self, vectors):
        """vectors [..., d] -> [..., d] (unit norm for `cosine`)."""
        return F.normalize(vectors, dim=-1) if self.similarity == "cosine" else vectors
