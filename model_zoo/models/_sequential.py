"""Shared part of the sequential two-tower models GRU4Rec and SASRec.

`SequentialTwoTower` is a mixin, not a MatchModel subclass, so the registry of
models/__init__.py (which registers every MatchModel subclass it finds) does not list it as a
model. A model combines it with MatchModel: `class GRU4Rec(SequentialTwoTower, MatchModel)`,
builds its history encoder and calls `_build_towers` in its constructor.
"""
from ..base import VectorServable
from ..data.feature_processor import HISTORY_FEATURE
from ..layers.field_embedding import FieldEmbedding
from ..layers.towers import FieldMLPTower, SequenceUserTower, VectorNormalizer


class SequentialTwoTower(VectorServable):
    """User tower = history encoder (+ static user fields) -> MLP; item tower = MLP over the item
    fields; score = <user vector, item vector> (their cosine with `similarity="cosine"`).

    Serving follows DSSM's convention: `encode_users -> [B, d]`, `encode_items -> [C, d]`, and
    `score_matrix` is a matrix product, so the vectors can go into a faiss inner-product index.
    """

    def _build_towers(self, feature_map, embedding_dim, encoder, encoder_dim, output_dim, user_hidden_units,
                      item_hidden_units, hidden_activations, net_dropout, batch_norm, use_user_features,
                      input_scale=1.0, similarity="dot"):
        """Create the field embeddings (history shares the item id table), both towers and their output
        normalisation (`similarity`: dot or cosine)."""
        if HISTORY_FEATURE not in feature_map.features:
            raise ValueError(f"{type(self).__name__} needs the history feature {HISTORY_FEATURE!r}; "
                             f"the feature map has {sorted(feature_map.features)}")
        self.embedding = FieldEmbedding(feature_map, embedding_dim, self.embedding_init_std,
                                        self.history_features)
        self.user_field_names = (self.embedding.field_names("user", exclude=(HISTORY_FEATURE,))
                                 if use_user_features else [])
        self.user_tower = SequenceUserTower(
            encoder, encoder_dim=encoder_dim, num_user_fields=len(self.user_field_names),
            embedding_dim=embedding_dim, output_dim=output_dim, hidden_units=user_hidden_units,
            hidden_activations=hidden_activations, dropout=net_dropout, batch_norm=batch_norm,
            input_scale=input_scale)
        self.item_tower = FieldMLPTower(
            num_fields=self.embedding.num_fields("item"), embedding_dim=embedding_dim, output_dim=output_dim,
            hidden_units=item_hidden_units, hidden_activations=hidden_activations, dropout=net_dropout,
            batch_norm=batch_norm)
        self.normalize = VectorNormalizer(similarity)
        self.similarity = similarity

    def _user_tower_inputs(self, inputs):
        seq_emb, mask = self.embedding.sequence(inputs, HISTORY_FEATURE)             # [B, L, D], [B, L]
        if not self.user_field_names:
            return seq_emb, mask, None
        missing = [name for name in self.user_field_names if name not in inputs]
        if missing:
            raise ValueError(f"{type(self).__name__}: user input(s) {missing} missing from the batch")
        user_fields = self.embedding.fields(inputs, "user", exclude=(HISTORY_FEATURE,))   # [B, F, D]
        return seq_emb, mask, user_fields

    def encode_users(self, inputs):
        return self.normalize(self.user_tower(*self._user_tower_inputs(inputs)))       # [B, d]

    def user_vectors_per_position(self, inputs):
        """User vector after each prefix of the history window: [B, L, d] (zero at padding)."""
        return self.normalize(self.user_tower.per_position(*self._user_tower_inputs(inputs)))  # [B, L, d]

    def encode_items(self, inputs):
        return self.normalize(self.item_tower(self.embedding.fields(inputs, "item")))  # [C, d]

    def score_pairs(self, user_repr, item_repr):
        return (user_repr.unsqueeze(1) * item_repr).sum(-1)                           # [B, C]

    def score_matrix(self, user_repr, item_repr):
        return user_repr @ item_repr.T                                                 # [B, C]
