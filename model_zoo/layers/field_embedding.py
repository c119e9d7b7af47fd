"""FuxiCTR feature embeddings, split by side (user / item) for matching models."""
import torch
from torch import nn
from fuxictr.pytorch.layers import FeatureEmbeddingDict

from ..config import HISTORY_FEATURES as HISTORY_MODES
from ..data.feature_processor import HISTORY_FEATURE


class FieldEmbedding(nn.Module):
    """One FuxiCTR `FeatureEmbeddingDict` for both sides (the history shares the item id table).

    Args:
        feature_map: FuxiCTR FeatureMap of the dataset.
        embedding_dim: size D of every field embedding.
        init_std: standard deviation of the normal initialiser (FuxiCTR's default 1e-4).
        history_features: how a history position is embedded. "id" (default): the item id embedding
            (the table shared with the item side). "item": the mean of the item's own field embeddings
            (id, category, tags, ...: what the item side reads), looked up through `item_source`, which
            the model sets when its item corpus is attached.
    """

    def __init__(self, feature_map, embedding_dim=64, init_std=1.e-4, history_features="id"):
        super().__init__()
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0:
            raise ValueError(f"FieldEmbedding: init_std={init_std!r}; expected a number > 0")
        if history_features not in HISTORY_MODES:
            raise ValueError(f"history_features={history_features!r}; expected one of {list(HISTORY_MODES)}")
        self.feature_map = feature_map
        self.embedding_dim = embedding_dim
        self.history_features = history_features
        self.item_source = None    # item index LongTensor [n] -> item feature inputs; set with the corpus
        # FuxiCTR takes the initialiser as a string it evaluates; only a formatted float goes in.
        initializer = f"partial(nn.init.normal_, std={float(init_std)!r})"
        self.embeddings = FeatureEmbeddingDict(feature_map, embedding_dim, embedding_initializer=initializer)

    def field_names(self, source, exclude=()):
        return [name for name, spec in self.feature_map.features.items()
                if spec.get("source") == source and name not in exclude]

    def num_fields(self, source, exclude=()):
        return len(self.field_names(source, exclude))

    def fields(self, inputs, source, exclude=(), history=None):
        """Field embeddings of one side: [B, F, D]; sequences are mean-pooled over non-padding.

        history: the history embeddings [B, L, D] from `sequence`, when the caller already has them
        (then they are pooled instead of being embedded a second time).
        """
        names = [n for n in self.field_names(source, exclude) if n in inputs]
        own_history = HISTORY_FEATURE in names and (history is not None or self.history_features == "item")
        embedded = self.embeddings({n: inputs[n] for n in names if not (own_history and n == HISTORY_FEATURE)})
        if own_history:                                                  # no id lookup that would be discarded
            embedded[HISTORY_FEATURE] = self.sequence(inputs)[0] if history is None else history   # [B, L, D]
        out = []
        for name in names:
            emb = embedded[name]
            if self.feature_map.features[name]["type"] == "sequence":   # [B, L, D] -> [B, D]
                mask = (inputs[name] != 0).unsqueeze(-1).float()
                emb = (emb * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(emb)
        return torch.stack(out, dim=1)                                   # [B, F, D]

    def sequence(self, inputs, name=HISTORY_FEATURE):
        """A sequence feature unpooled: (embeddings [B, L, D], valid mask [B, L] bool)."""
        ids = inputs[name]
        if name != HISTORY_FEATURE or self.history_features == "id":
            return self.embeddings({name: ids})[name], ids != 0
        if self.item_source is None:
            raise RuntimeError("FieldEmbedding: history_features='item' needs the item corpus "
                               "(MatchModel.set_item_corpus) before the history can be embedded")
        unique, inverse = torch.unique(ids, return_inverse=True)                 # item codes, 0 = padding
        items = self.fields(self.item_source((unique - 1).clamp_min(0)), "item").mean(1)   # [U, D]
        items = items * (unique != 0).unsqueeze(-1).to(items.dtype)
        return items[inverse], ids != 0                                         # [B, L, D], [B, L]
