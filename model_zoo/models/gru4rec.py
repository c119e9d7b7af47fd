"""GRU4Rec (Hidasi et al. 2016) as the user tower of a two-tower model."""
from ..base import MatchModel
from ..layers.sequence_encoders import GRUEncoder
from ._sequential import SequentialTwoTower


class GRU4Rec(SequentialTwoTower, MatchModel):
    """User vector = MLP([last GRU hidden state over the history ; user field embeddings]);
    item vector = MLP(item field embeddings); score = dot product.

    The history embeddings are rows of the item tower's `item_id` table (shared).

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        embedding_dim: field embedding size D (also the GRU input size).
        output_dim: size d of the user and item vectors (default: embedding_dim).
        gru_hidden_dim: GRU hidden size H (default: embedding_dim).
        num_layers: stacked GRU layers. Default 1.
        encoder_dropout: dropout between stacked GRU layers (only when num_layers > 1). Default 0.0.
        user_hidden_units: hidden layers of the user MLP ([] = one linear map).
        item_hidden_units: hidden layers of the item MLP ([] = one linear map).
        hidden_activations: activation of the hidden layers.
        net_dropout: dropout rate of both MLPs.
        batch_norm: batch normalisation in both MLPs.
        use_user_features: concatenate the static user fields to the GRU state (False: history only).
        similarity: `dot` or `cosine` (both vectors L2-normalised; use a temperature < 1).
        **kwargs: MatchModel arguments.
    """

    def __init__(self, feature_map, model_id="GRU4Rec", embedding_dim=64, output_dim=None, gru_hidden_dim=None,
                 num_layers=1, encoder_dropout=0.0, user_hidden_units=(256,), item_hidden_units=(256,),
                 hidden_activations="ReLU", net_dropout=0.1, batch_norm=False, use_user_features=True, similarity="dot",
                 **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        gru_hidden_dim = gru_hidden_dim or embedding_dim
        encoder = GRUEncoder(input_dim=embedding_dim, hidden_dim=gru_hidden_dim, num_layers=num_layers,
                             dropout=encoder_dropout)
        self._build_towers(feature_map, embedding_dim, encoder, gru_hidden_dim, output_dim or embedding_dim,
                           user_hidden_units, item_hidden_units, hidden_activations, net_dropout, batch_norm,
                           use_user_features, similarity=similarity)
        self.reset_parameters()
        self.model_to_device()
