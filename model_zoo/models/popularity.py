"""Popularity: every user gets the most frequent training items (a sanity floor)."""
import torch

from ..base import MatchModel


class Popularity(MatchModel):
    """Scores an item by its interaction count in the training split; nothing to learn.

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        **kwargs: MatchModel arguments (training keys are accepted and unused).
    """
    trainable = False

    def __init__(self, feature_map, model_id="Popularity", **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        self.register_buffer("item_counts", torch.zeros(feature_map.features["item_id"]["vocab_size"] - 1))
        self.model_to_device()

    def set_item_corpus(self, corpus, item_counts=None):
        super().set_item_corpus(corpus, item_counts)
        if item_counts is not None:
            self.item_counts.copy_(torch.as_tensor(item_counts, dtype=torch.float32))

    def encode_users(self, inputs):
        return torch.ones(next(iter(inputs.values())).shape[0], 1, device=self.device)   # [B, 1]

    def encode_items(self, inputs):
        return self.item_counts[inputs["item_id"] - 1].unsqueeze(-1)                      # [C, 1]

    def score_pairs(self, user_repr, item_repr):
        return (user_repr.unsqueeze(1) * item_repr).sum(-1)                               # [B, C]
