"""SASRec (Kang and McAuley 2018) as the user tower of a two-tower model."""
import math

from ..base import MatchModel
from ..data.feature_processor import HISTORY_FEATURE
from ..layers.sequence_encoders import SelfAttentionEncoder
from ._sequential import SequentialTwoTower


class SASRec(SequentialTwoTower, MatchModel):
    """User vector = MLP([causal self-attention output at the most recent item ; user field
    embeddings]); item vector = MLP(item field embeddings); score = dot product.

    As in SASRec: history embeddings (rows of the item tower's `item_id` table) scaled by sqrt(D),
    plus learned position embeddings, dropout, `num_layers` blocks of causal multi-head attention
    and a point-wise feed-forward network with residual connections, layer norm and dropout, and a
    final layer norm (layers/sequence_encoders.py `SelfAttentionEncoder`). The position table has
    one row per slot of the dataset's history window (`max_len` of the feature map).

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        embedding_dim: field embedding size D (also the attention size).
        output_dim: size d of the user and item vectors (default: embedding_dim).
        num_layers: self-attention blocks. Default 3.
        num_heads: attention heads (must divide embedding_dim). Default 1.
        encoder_dropout: dropout on the inputs, attention weights and sub-layer outputs. Default 0.2.
        ffn_dim: inner size of the feed-forward network (default: embedding_dim).
        scale_embeddings: multiply the history embeddings by sqrt(D) before adding positions.
        user_hidden_units: hidden layers of the user MLP ([] = one linear map).
        item_hidden_units: hidden layers of the item MLP ([] = one linear map).
        hidden_activations: activation of the hidden layers.
        net_dropout: dropout rate of both MLPs.
        batch_norm: batch normalisation in both MLPs.
        use_user_features: concatenate the static user fields to the attention output (False: history only).
        similarity: `dot` or `cosine` (both vectors L2-normalised; use a temperature < 1).
        **kwargs: MatchModel arguments.
    """

    def __init__(self, feature_map, model_id="SASRec", embedding_dim=64, output_dim=None, num_layers=3, num_heads=1,
                 encoder_dropout=0.2, ffn_dim=None, scale_embeddings=True, user_hidden_units=(256,),
                 item_hidden_units=(256,), hidden_activations="ReLU", net_dropout=0.1, batch_norm=False,
                 use_user_features=True, similarity="dot", **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        history_len = feature_map.features.get(HISTORY_FEATURE, {}).get("max_len")
        if not history_len:
            raise ValueError(f"SASRec: the feature map has no max_len for {HISTORY_FEATURE!r}; rebuild the dataset")
        encoder = SelfAttentionEncoder(dim=embedding_dim, num_layers=num_layers, num_heads=num_heads,
                                       dropout=encoder_dropout, max_len=int(history_len), causal=True,
                                       use_positions=True, ffn_dim=ffn_dim)
        self._build_towers(feature_map, embedding_dim, encoder, embedding_dim, output_dim or embedding_dim,
                           user_hidden_units, item_hidden_units, hidden_activations, net_dropout, batch_norm,
                           use_user_features, input_scale=math.sqrt(embedding_dim) if scale_embeddings else 1.0,
                           similarity=similarity)
        self.reset_parameters()
        self.model_to_device()
