"""All-to-All SA (SparCode paper, Sec. 4.1.2): the early-fusion self-attention oracle.

Tokens: the user's [user field tokens; history items] (type embeddings, recency positions on the history) and
the candidate's [[CLS]; item field tokens]. The candidate's tokens attend to the user's tokens and to each
other through `num_layers` self-attention blocks (layers/joint_attention.py); the pooled candidate output goes
through an MLP to the score. The item's representation depends on the user, so nothing can be indexed.

- `attention_form: cached_user` (default): the user tokens attend to each other only, are encoded once per
  user, and their per-layer keys / values are cached; a candidate then costs its own few tokens, in training
  (the shared negatives of a batch) and in the exact full ranking (every user x every item, in blocks).
- `attention_form: full`: the paper's joint encoder, one sequence [user; candidate] per pair, the user tokens
  attending to the candidate too (`user_attends_items: false` masks that: the same scores as cached_user).
"""
import math

import torch
from fuxictr.pytorch.layers import MLP_Block
from torch import nn

from ..base import MatchModel
from ..data.feature_processor import HISTORY_FEATURE
from ..layers.field_embedding import FieldEmbedding
from ..layers.joint_attention import JointAttentionEncoder

POOLINGS = ("cls", "mean", "item")
ATTENTION_FORMS = ("cached_user", "full")
CLS_TYPE, USER_TYPE, HISTORY_TYPE, ITEM_TYPE = range(4)


class AllToAllSA(MatchModel):
    """Self-attention of the candidate item's tokens over the user's tokens (and themselves) -> MLP -> score.

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        embedding_dim: D, size of the field embeddings and of the attention.
        num_layers: self-attention blocks. Default 2.
        num_heads: attention heads (must divide embedding_dim). Default 1.
        encoder_dropout: dropout on the inputs, attention weights and sub-layer outputs. Default 0.1.
        ffn_dim: inner size of the feed-forward network (default: embedding_dim).
        attention_form: "cached_user" (user tokens encoded once per user, candidates attend to their cached
            states; default) or "full" (one joint sequence per (user, item) pair, the paper's form).
        user_attends_items: whether the user tokens attend to the candidate's tokens; null = the form's own
            (full: true, cached_user: false); cached_user accepts only false.
        pooling: "cls" (output at the candidate's learned [CLS] token, default), "mean" (mean over every
            valid token, user's and candidate's) or "item" (mean over the candidate item's field tokens).
        scale_embeddings: multiply the field and history embeddings by sqrt(D) (as SASRec). Default True.
        use_user_features: include the static user field tokens (False: history and item only).
        hidden_units: hidden layers of the scoring MLP. Default [256].
        hidden_activations: activation of the MLP. Default "ReLU".
        net_dropout: dropout of the MLP. Default 0.1.
        mixed_precision: run the encoder and the MLP under bfloat16 autocast while training (about 1.7x faster
            on a CPU with AVX512-BF16; the loss and the weights stay float32; evaluation is float32). Default False.
        pair_chunk: most (user, item) pairs encoded at once; bounds the memory of scoring many pairs
            (scores do not depend on it). Default 16384.
        eval_pairs_per_block: (user, item) pairs per ranking block: evaluation takes
            min(eval_batch_size, eval_pairs_per_block // num_items) users at a time (the user states once per
            block, then every item in chunks of pair_chunk pairs). Default 262144.
        **kwargs: MatchModel arguments.
    """
    ranking_log_seconds = 30.0      # engine/evaluator.py logs ranking progress and remaining time this often

    def __init__(self, feature_map, model_id="AllToAllSA", embedding_dim=64, num_layers=2, num_heads=1,
                 encoder_dropout=0.1, ffn_dim=None, attention_form="cached_user", user_attends_items=None,
                 pooling="cls", scale_embeddings=True, use_user_features=True, hidden_units=(256,),
                 hidden_activations="ReLU", net_dropout=0.1, mixed_precision=False, pair_chunk=16384,
                 eval_pairs_per_block=262144, **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"AllToAllSA: pooling={pooling!r}; expected one of {list(POOLINGS)}")
        if attention_form not in ATTENTION_FORMS:
            raise ValueError(f"AllToAllSA: attention_form={attention_form!r}; expected one of {list(ATTENTION_FORMS)}")
        if not (user_attends_items is None or isinstance(user_attends_items, bool)) or \
                (attention_form == "cached_user" and user_attends_items):
            raise ValueError(f"AllToAllSA: user_attends_items={user_attends_items!r} with attention_form="
                             f"{attention_form!r}; expected null or false (true needs attention_form 'full')")
        if not isinstance(mixed_precision, bool):
            raise ValueError(f"AllToAllSA: mixed_precision={mixed_precision!r}; expected true or false")
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
        self.attention_form, self.pooling = attention_form, pooling
        self.user_attends_items = attention_form == "full" and user_attends_items is not False
        self.pair_chunk, self.eval_pairs_per_block = pair_chunk, eval_pairs_per_block
        self.mixed_precision = mixed_precision
        self.input_scale = math.sqrt(embedding_dim) if scale_embeddings else 1.0
        self.type_embedding = nn.Embedding(4, embedding_dim)
        self.position_embedding = nn.Embedding(int(history_len), embedding_dim)     # recency: 0 = most recent
        self.cls_token = nn.Parameter(torch.zeros(embedding_dim)) if pooling == "cls" else None
        self.encoder = JointAttentionEncoder(embedding_dim, num_layers, num_heads, encoder_dropout, ffn_dim)
        self.head = MLP_Block(embedding_dim, list(hidden_units), hidden_activations, output_dim=1,
                              dropout_rates=net_dropout)
        self.reset_parameters()
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.model_to_device()

    def _autocast(self):
        """bfloat16 autocast while training with mixed_precision, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision and self.training)

    def _typed(self, tokens, type_id):
        return tokens * self.input_scale + self.type_embedding.weight[type_id]

    def user_tokens(self, inputs):
        """(tokens [B, T_u, D], valid mask [B, T_u]) with T_u = user fields + history length."""
        history, history_mask = self.embedding.sequence(inputs, HISTORY_FEATURE)     # [B, L, D], [B, L]
        recency = torch.arange(history.shape[1] - 1, -1, -1, device=history.device)  # [L]: L-1 .. 0
        parts = [self._typed(history, HISTORY_TYPE) + self.position_embedding(recency)]
        masks = [history_mask]
        if self.user_field_names:
            missing = [name for name in self.user_field_names if name not in inputs]
            if missing:
                raise ValueError(f"AllToAllSA: user input(s) {missing} missing from the batch")
            fields = self.embedding.fields(inputs, "user", exclude=(HISTORY_FEATURE,))  # [B, F_u, D]
            parts.insert(0, self._typed(fields, USER_TYPE))
            masks.insert(0, history_mask.new_ones(fields.shape[:2]))
        return torch.cat(parts, 1), torch.cat(masks, 1)                                  # [B, T_u, D], [B, T_u]

    def encode_users(self, inputs):
        """cached_user: the UserCache of the batch; full: the user tokens and their mask."""
        tokens, mask = self.user_tokens(inputs)
        if self.attention_form == "full":
            return tokens, mask
        with self._autocast():
            return self.encoder.encode_user(tokens, mask)

    def encode_items(self, inputs):
        return self._typed(self.embedding.fields(inputs, "item"), ITEM_TYPE)            # [C, F_i, D]

    def _candidates(self, item_repr):
        """item_repr [b, c, F_i, D] -> candidate tokens [b, c, T_c, D] ([CLS] first when pooling is cls)."""
        if self.cls_token is None:
            return item_repr
        cls = (self.cls_token + self.type_embedding.weight[CLS_TYPE]).expand(*item_repr.shape[:2], 1, -1)
        return torch.cat([cls, item_repr], 2)

    def _pool(self, candidate_out, user_sum, user_count):
        """Candidate outputs [B, c, T_c, D] (+ the user outputs' sum [B, 1, D] and count [B, 1, 1]) -> [B, c]."""
        if self.pooling == "cls":
            pooled = candidate_out[:, :, 0]                                              # [B, c, D]
        elif self.pooling == "item":
            pooled = candidate_out[:, :, -self.num_item_fields:].mean(2)                 # [B, c, D]
        else:   # user padding outputs are zero
            pooled = (candidate_out.sum(2) + user_sum) / (user_count + candidate_out.shape[2])
        return self.head(pooled).squeeze(-1)                                             # [B, c]

    def _score_chunk(self, user_repr, item_repr):
        """Scores of item_repr [B or 1, c, F_i, D] (each user's own, or shared) -> [B, c]."""
        candidates = self._candidates(item_repr)                                         # [b, c, T_c, D]
        if self.attention_form == "cached_user":
            out = self.encoder.encode_candidates(user_repr, candidates)                  # [B, c, T_c, D]
            mask = user_repr.mask
            return self._pool(out, user_repr.outputs.sum(1, keepdim=True), mask.sum(1)[:, None, None].to(out.dtype))
        tokens, mask = user_repr                                                         # [B, T_u, D], [B, T_u]
        batch_size, num_candidates = tokens.shape[0], candidates.shape[1]
        candidates = candidates.expand(batch_size, -1, -1, -1)
        user_out, out = self.encoder.full(tokens.unsqueeze(1).expand(-1, num_candidates, -1, -1).flatten(0, 1),
                                          mask.unsqueeze(1).expand(-1, num_candidates, -1).flatten(0, 1),
                                          candidates.flatten(0, 1), self.user_attends_items)
        user_sum = user_out.sum(1).view(batch_size, num_candidates, -1)                  # [B, c, D]
        count = mask.sum(1)[:, None, None].to(out.dtype)
        return self._pool(out.view(*candidates.shape), user_sum, count)

    def score_pairs(self, user_repr, item_repr):
        """item_repr [B, C, F_i, D] (or [1, C, F_i, D]: shared) -> [B, C], at most `pair_chunk` pairs at once."""
        batch_size, num_candidates = user_repr[-1].shape[0], item_repr.shape[1]
        step = max(1, self.pair_chunk // max(batch_size, 1))
        with self._autocast():
            return torch.cat([self._score_chunk(user_repr, item_repr[:, start:start + step]).float()
                              for start in range(0, num_candidates, step)], 1)           # [B, C]

    def score_matrix(self, user_repr, item_repr):
        """Every user against shared items [C, F_i, D] -> [B, C] (the items' first-layer projections once)."""
        return self.score_pairs(user_repr, item_repr.unsqueeze(0))
