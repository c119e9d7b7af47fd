"""DSSM (Huang et al. 2013) as a two-tower matching model: DNN towers, dot or cosine score."""
from fuxictr.pytorch.layers import MLP_Block

from ..base import MatchModel, VectorServable
from ..layers.field_embedding import FieldEmbedding
from ..layers.towers import VectorNormalizer


class DSSM(MatchModel, VectorServable):
    """Two DNN towers over each side's FuxiCTR field embeddings; score = <u, v> (or cosine).

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        embedding_dim: field embedding size D.
        output_dim: size of the user and item vectors (default: embedding_dim).
        user_hidden_units: hidden layers of the user tower.
        item_hidden_units: hidden layers of the item tower.
        hidden_activations: activation of the hidden layers.
        net_dropout: dropout rate of the towers.
        batch_norm: batch normalisation in the towers.
        similarity: `dot` or `cosine`.
        **kwargs: MatchModel arguments.
    """

    def __init__(self, feature_map, model_id="DSSM", embedding_dim=64, output_dim=None,
                 user_hidden_units=(256, 256, 256), item_hidden_units=(256, 256, 256), hidden_activations="ReLU",
                 net_dropout=0.1, batch_norm=False, similarity="dot", **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        self.normalize = VectorNormalizer(similarity)
        self.similarity = similarity
        output_dim = output_dim or embedding_dim
        self.embedding = FieldEmbedding(feature_map, embedding_dim, self.embedding_init_std,
                                        self.history_features)
        self.user_tower = MLP_Block(self.embedding.num_fields("user") * embedding_dim, list(user_hidden_units),
                                    hidden_activations, output_dim, dropout_rates=net_dropout, batch_norm=batch_norm)
        self.item_tower = MLP_Block(self.embedding.num_fields("item") * embedding_dim, list(item_hidden_units),
                                    hidden_activations, output_dim, dropout_rates=net_dropout, batch_norm=batch_norm)
        self.reset_parameters()
        self.model_to_device()

    def encode_users(self, inputs):
        return self.normalize(self.user_tower(self.embedding.fields(inputs, "user").flatten(1)))  # [B, d]

    def encode_items(self, inputs):
        return self.normalize(self.item_tower(self.embedding.fields(inputs, "item").flatten(1)))  # [C, d]

    def score_pairs(self, user_repr, item_repr):
        return (user_repr.unsqueeze(1) * item_repr).sum(-1)            # [B, C]

    def score_matrix(self, user_repr, item_repr):
        return user_repr @ item_repr.T                                   # [B, C]
