"""All-to-All SA (SparCode paper, Sec. 4.1.2): the early-fusion self-attention oracle.

One sequence per (user, candidate) pair, [CLS] [user field tokens] [history items] [candidate item field
tokens], plus type and position embeddings, goes through `num_layers` non-causal self-attention blocks;
the pooled output goes through an MLP to the score. Every user token attends to the candidate's tokens
(and back), so nothing can be precomputed per side: evaluation scores every (user, item) pair, in chunks
of at most `pair_chunk` sequences. It cannot be indexed; it shows how much SparCode gives up for speed.
"""
import math

import torch
from fuxictr.pytorch.layers import MLP_Block
from torch import nn

from ..base import MatchModel
from ..data.feature_processor import HISTORY_FEATURE
from ..layers.field_embedding import FieldEmbedding
from ..layers.sequence_encoders import SelfAttentionEncoder

POOLINGS = ("cls", "mean", "item")
CLS_TYPE, USER_TYPE, HISTORY_TYPE, ITEM_TYPE = range(4)


class AllToAllSA(MatchModel):
    """Joint self-attention over the user's tokens and the candidate item's tokens -> MLP -> score.

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        embedding_dim: D, size of the field embeddings and of the attention.
        num_layers: self-attention blocks. Default 3.
        num_heads: attention heads (must divide embedding_dim). Default 1.
        encoder_dropout: dropout on the inputs, attention weights and sub-layer outputs. Default 0.1.
        ffn_dim: inner size of the feed-forward network (default: embedding_dim).
        pooling: "cls" (output at a learned [CLS] token, default), "mean" (mean over the valid tokens) or
            "item" (mean over the candidate item's tokens, which attended to the user's).
        scale_embeddings: multiply the field and history embeddings by sqrt(D) (as SASRec). Default True.
        use_user_features: include the static user field tokens (False: history and item only).
        hidden_units: hidden layers of the scoring MLP. Default [256].
        hidden_activations: activation of the MLP. Default "ReLU".
        net_dropout: dropout of the MLP. Default 0.1.
        pair_chunk: most (user, item) sequences encoded at once; bounds memory of training and
            brute-force evaluation (scores do not depend on it). Default 4096.
        eval_pairs_per_block: (user, item) pairs per ranking block: evaluation takes
            min(eval_batch_size, eval_pairs_per_block // num_items) users at a time, so the ranking
            progress bar (and its time estimate) advances often. Default 65536.
        **kwargs: MatchModel arguments.
    """
    ranking_log_seconds = 30.0      # MatchModel.retrieve logs progress and remaining time this often

    def __init__(self, feature_map, model_id="AllToAllSA", embedding_dim=64, num_layers=3, num_heads=1,
                 encoder_dropout=0.1, ffn_dim=None, pooling="cls", scale_embeddings=True, use_user_features=True,
                 hidden_units=(256,), hidden_activations="ReLU", net_dropout=0.1, pair_chunk=4096,
                 eval_pairs_per_block=65536, **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"AllToAllSA: pooling={pooling!r}; expected one of {list(POOLINGS)}")
        for name, value in (("pair_chunk", pair_chunk), ("eval_pairs_per_block", eval_pairs_per_block)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AllToAllSA: {name}={value!r}; expected a positive int")
        history_len = feature_map.features.get(HISTORY_FEATURE, {}).get("max_len")
        if not history_len:
            raise ValueError(f"AllToAllSA: the feature map has no max_len for {HISTORY_FEATURE!r}; "
                             f"features are {sorted(feature_map.features)}")
        self.embedding = FieldEmbedding(feature_map, embedding_dim, self.embedding_init_std,
                                        self.history_features)
        self.user_field_names = (self.embedding.field_names("user", exclude=(HISTORY_FEATURE,))
                                 if use_user_features else [])
        self.num_item_fields = self.embedding.num_fields("item")
        self.pooling, self.pair_chunk, self.eval_pairs_per_block = pooling, pair_chunk, eval_pairs_per_block
        self.input_scale = math.sqrt(embedding_dim) if scale_embeddings else 1.0
        num_cls = 1 if pooling == "cls" else 0
        self.seq_len = num_cls + len(self.user_field_names) + int(history_len) + self.num_item_fields
        self.type_embedding = nn.Embedding(4, embedding_dim)
        self.cls_token = nn.Parameter(torch.zeros(embedding_dim)) if num_cls else None
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        self.encoder = SelfAttentionEncoder(dim=embedding_dim, num_layers=num_layers, num_heads=num_heads,
                                            dropout=encoder_dropout, max_len=self.seq_len, causal=False,
                                            use_positions=True, ffn_dim=ffn_dim)
        self.head = MLP_Block(embedding_dim, list(hidden_units), hidden_activations, output_dim=1,
                              dropout_rates=net_dropout)
        self.reset_parameters()
        self.model_to_device()

    def _typed(self, tokens, type_id):
        return tokens * self.input_scale + self.type_embedding.weight[type_id]

    def encode_users(self, inputs):
        """(tokens [B, T_u, D], valid mask [B, T_u]) with T_u = [CLS] + user fields + history length."""
        history, history_mask = self.embedding.sequence(inputs, HISTORY_FEATURE)     # [B, L, D], [B, L]
        parts, masks = [self._typed(history, HISTORY_TYPE)], [history_mask]
        if self.user_field_names:
            missing = [name for name in self.user_field_names if name not in inputs]
            if missing:
                raise ValueError(f"AllToAllSA: user input(s) {missing} missing from the batch")
            fields = self.embedding.fields(inputs, "user", exclude=(HISTORY_FEATURE,))  # [B, F_u, D]
            parts.insert(0, self._typed(fields, USER_TYPE))
            masks.insert(0, history_mask.new_ones(fields.shape[:2]))
        if self.cls_token is not None:
            cls = (self.cls_token + self.type_embedding.weight[CLS_TYPE]).expand(history.shape[0], 1, -1)
            parts.insert(0, cls)                                                          # [B, 1, D]
            masks.insert(0, history_mask.new_ones(history.shape[0], 1))
        return torch.cat(parts, 1), torch.cat(masks, 1)                                  # [B, T_u, D], [B, T_u]

    def encode_items(self, inputs):
        return self._typed(self.embedding.fields(inputs, "item"), ITEM_TYPE)            # [C, F_i, D]

    def joint_outputs(self, user_repr, item_repr):
        """Encoder outputs of every (user, candidate) sequence: ([B, c, T, D], valid mask [B, c, T]).

        item_repr [B, c, F_i, D] (each user's own candidates). No chunking: use score_pairs for many pairs.
        """
        tokens, mask = user_repr                                                         # [B, T_u, D], [B, T_u]
        batch_size, num_candidates = item_repr.shape[:2]
        sequences = torch.cat([tokens.unsqueeze(1).expand(-1, num_candidates, -1, -1), item_repr], 2)
        valid = torch.cat([mask.unsqueeze(1).expand(-1, num_candidates, -1),
                           mask.new_ones(batch_size, num_candidates, item_repr.shape[2])], 2)  # [B, c, T]
        outputs, _ = self.encoder(sequences.flatten(0, 1), valid.flatten(0, 1))         # [B * c, T, D]
        return outputs.view(batch_size, num_candidates, *outputs.shape[1:]), valid

    def _score_chunk(self, user_repr, item_repr):
        outputs, valid = self.joint_outputs(user_repr, item_repr)                        # [B, c, T, D]
        if self.pooling == "cls":
            pooled = outputs[:, :, 0]                                                    # [B, c, D]
        elif self.pooling == "item":
            pooled = outputs[:, :, -self.num_item_fields:].mean(2)                       # [B, c, D]
        else:   # padding outputs are zero
            pooled = outputs.sum(2) / valid.sum(2, keepdim=True).to(outputs.dtype)
        return self.head(pooled).squeeze(-1)                                             # [B, c]

    def score_pairs(self, user_repr, item_repr):
        """item_repr [B, C, F_i, D] -> [B, C], encoding at most `pair_chunk` sequences at a time."""
        batch_size, num_candidates = item_repr.shape[:2]
        step = max(1, self.pair_chunk // max(batch_size, 1))
        return torch.cat([self._score_chunk(user_repr, item_repr[:, start:start + step])
                          for start in range(0, num_candidates, step)], 1)               # [B, C]

    def score_matrix(self, user_repr, item_repr):
        """Every user against shared items [C, F_i, D] -> [B, C] (expanded views, no copy)."""
        batch_size = user_repr[0].shape[0]
        return self.score_pairs(user_repr, item_repr.unsqueeze(0).expand(batch_size, -1, -1, -1))
