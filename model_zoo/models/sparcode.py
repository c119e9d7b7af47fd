"""SparCode (Su et al., SIGIR'23, Sec. 3.2): tokenizer, product quantizer, all-to-all scorer, sparse score.

user -> UserTokenizer -> K_u tokens [B, K_u, D_T] -> ProductQuantizer -> quantized tokens (codes);
item -> FieldEmbedding -> K_c linear heads -> item tokens [C, K_c, D_T];
S = InteractionScorer(quantized token, item tokens) [B, C, K_u]; score = sum_k relu(S_k + b) (Eq. 10-11).
The loss is MatchModel's sampled softmax (Eq. 12) plus the commitment loss (Eq. 13-14, already
weighted by lambda inside the quantizer). A user's score depends on the user only through its K_u
codes, so evaluation scores each distinct code once, and an index can be built from
`score_codes` without running the tokenizer.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from fuxictr.pytorch.layers import MLP_Block

from ..base import CodeIndexable, MatchModel
from ..data.feature_processor import HISTORY_FEATURE
from ..layers.field_embedding import FieldEmbedding
from ..layers.interaction import INTERACTIONS, InteractionScorer
from ..layers.quantizer import GRADIENT_MODES, ProductQuantizer
from ..layers.token_heads import HEAD_TYPES, TokenHeads
from ..layers.tokenizers import HISTORY_HEADS, TOKENIZERS, UserTokenizer

TOKEN_NORMS = ("none", "l2")


class SparCode(MatchModel, CodeIndexable):
    """SparCode with an exact full-ranking evaluation (the index is built by engine/serving.py).

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        embedding_dim: D, size of the field embeddings.
        tokenizer: user encoder, "dnn" (default) | "gru" | "sa".
        token_heads: "linear" (default) | "senet" | "attention" (multi-interest attention over the history),
            how the K_u user tokens are produced (layers/token_heads.py).
        num_query_tokens: K_u, tokens (codes) per user. Default 2.
        num_item_tokens: K_c, tokens per item (linear heads). Default 2.
        token_dim: D_T, token size (default: embedding_dim); divisible by num_codebooks.
        num_codebooks: M, codebooks of the product quantizer. Default 2.
        codebook_size: N, codewords per codebook. Default 256.
        codebook_decay: gamma of the EMA codebook update. Default 0.99.
        commitment_weight: lambda of Eq. 14. Default 0.25.
        quantizer_grad: "straight_through" (default; the matching loss reaches the tokenizer) or
            "commitment_only" (the literal sg[] reading: only the commitment loss trains the tokenizer).
        interaction: scorer, "dot" | "maxsim" | "crossnet" | "dnn" | "innerp_dnn" (default, Eq. 9).
        hidden_units: MLP of the "dnn" / "innerp_dnn" scorer. Default [256, 256, 256] (paper).
        tokenizer_hidden_units: MLP of the tokenizer. Default [256].
        item_hidden_units: MLP over the item field embeddings before the K_c linear item heads (the item
            encoder E_2 of Eq. 3). Default [] (the heads read the field embeddings directly).
        hidden_activations: activation of the tokenizer, item encoder and scorer MLPs. Default "ReLU".
        sparse_bias_init: initial b of Eq. 10. Positive so that relu(S + b) starts in its linear part: at
            initialisation S is about 0 for every pair, and with b = 0 half the pairs would start at the
            kink and sampled softmax can push b down until every score is 0 (no gradient left). While every
            pair is active, b gets no gradient (it shifts all logits alike). Default 1.0.
        token_norm: "none" (default) | "l2": user and item tokens scaled to unit length before the quantizer
            and the scorer (cosine scores with the dot scorer). Bounds the commitment loss, which otherwise
            grows with the token norms over training.
        train_sparsity: None (default: b is learned) or the share of (code, item) scores that relu(S + b)
            sets to 0 during training, in (0, 1). Every training step sets b to minus that quantile of the
            scores of the user tokens against the sampled negatives (uniform sampler: an unbiased sample of
            the corpus), so the model learns to rank with the sparse scores it is served with; b then is a
            buffer holding the EMA of those thresholds (the trained b of the index). Needs token_norm "l2"
            and negative_sampler "uniform".
        dense_loss_weight: with train_sparsity, weight of a second sampled softmax over the scores before the
            threshold (max over the K_u tokens). The thresholded softmax alone only pushes away the few
            negatives above the threshold, which moves with them, so nothing keeps items and tokens apart and
            they collapse into one direction; the dense term keeps every negative pushed away. Default 4.0.
        sparse_grad_leak: with train_sparsity, gradient slope of relu(S + b) below 0 in training (the forward
            value is unchanged, so training scores stay the served ones). Most pairs sit below the threshold,
            the positives at first among them, and would get no gradient through the thresholded softmax.
            In [0, 1]. Default 0.0: on ML-100K 0.1 lowers validation Recall@50 and the index's Sparsity at
            the trained b, on demo_50k it doubles Recall@50 (benchmarks/results/sparcode_leak_*/).
        flops_weight: with b learned (no train_sparsity), weight of SPLADE's FLOPS penalty on the training
            scores: the mean over the batch's user tokens of (mean over the sampled items of relu(S + b))^2,
            which pushes each key's expected posting-list length down. Default 0.0 (off).
        net_dropout: dropout of the tokenizer and the scorer MLP. Default 0.1.
        num_layers: self-attention blocks of the "sa" tokenizer. Default 2.
        num_heads: attention heads of the "sa" tokenizer. Default 1.
        **kwargs: MatchModel arguments.
    """

    default_callbacks = {"codebook_stats": {}}

    def __init__(self, feature_map, model_id="SparCode", embedding_dim=64, tokenizer="dnn", token_heads="linear",
                 num_query_tokens=2, num_item_tokens=2, token_dim=None, num_codebooks=2, codebook_size=256,
                 codebook_decay=0.99, commitment_weight=0.25, quantizer_grad="straight_through",
                 interaction="innerp_dnn",
                 hidden_units=(256, 256, 256), tokenizer_hidden_units=(256,),
                 item_hidden_units=(), hidden_activations="ReLU", sparse_bias_init=1.0, token_norm="none",
                 train_sparsity=None, dense_loss_weight=4.0, sparse_grad_leak=0.0,
                 flops_weight=0.0, net_dropout=0.1, num_layers=2, num_heads=1, **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        for name, value, allowed in (("tokenizer", tokenizer, TOKENIZERS), ("token_heads", token_heads, HEAD_TYPES),
                                     ("interaction", interaction, INTERACTIONS),
                                     ("quantizer_grad", quantizer_grad, GRADIENT_MODES),
                                     ("token_norm", token_norm, TOKEN_NORMS)):
            if value not in allowed:
                raise ValueError(f"SparCode: {name}={value!r}; expected one of {list(allowed)}")
        token_dim = embedding_dim if token_dim is None else token_dim
        for name, value in (("num_query_tokens", num_query_tokens), ("num_item_tokens", num_item_tokens),
                            ("token_dim", token_dim), ("num_codebooks", num_codebooks),
                            ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SparCode: {name}={value!r}; expected a positive int")
        if train_sparsity is not None and (isinstance(train_sparsity, bool) or
                                           not isinstance(train_sparsity, (int, float)) or
                                           not 0.0 < train_sparsity < 1.0):
            raise ValueError(f"SparCode: train_sparsity={train_sparsity!r}; expected None or a float in (0, 1)")
        if train_sparsity is not None and token_norm != "l2":
            raise ValueError(f"SparCode: train_sparsity needs token_norm='l2', got {token_norm!r} (unbounded tokens "
                             f"let the threshold and the scores grow without limit)")
        if train_sparsity is not None and self.negative_sampler != "uniform":
            raise ValueError(f"SparCode: train_sparsity needs negative_sampler='uniform' (the threshold is a "
                             f"quantile over the sampled items), got {self.negative_sampler!r}")
        for name, value, upper in (("dense_loss_weight", dense_loss_weight, float("inf")),
                                   ("sparse_grad_leak", sparse_grad_leak, 1.0),
                                   ("flops_weight", flops_weight, float("inf"))):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= upper:
                raise ValueError(f"SparCode: {name}={value!r}; expected a number in [0, {upper}]")
        if flops_weight and train_sparsity is not None:
            raise ValueError(f"SparCode: flops_weight={flops_weight!r} needs a learned b; got "
                             f"train_sparsity={train_sparsity!r} (use one of the two)")
        if token_dim % num_codebooks:
            raise ValueError(f"SparCode: token_dim={token_dim} must be divisible by num_codebooks={num_codebooks}")
        self.embedding = FieldEmbedding(feature_map, embedding_dim, self.embedding_init_std,
                                        self.history_features)
        self.sequence_tokenizer = tokenizer != "dnn"
        if (self.sequence_tokenizer or token_heads in HISTORY_HEADS) and HISTORY_FEATURE not in feature_map.features:
            raise ValueError(f"SparCode: tokenizer={tokenizer!r} with token_heads={token_heads!r} needs the "
                             f"history feature {HISTORY_FEATURE!r}")
        exclude = (HISTORY_FEATURE,) if self.sequence_tokenizer else ()
        self.user_exclude = exclude
        history_len = feature_map.features.get(HISTORY_FEATURE, {}).get("max_len", 1)
        self.tokenizer = UserTokenizer(tokenizer, embedding_dim, self.embedding.num_fields("user", exclude),
                                       num_query_tokens, token_dim, token_heads, tokenizer_hidden_units,
                                       hidden_activations, net_dropout, history_len, num_layers, num_heads)
        item_input_dim = self.embedding.num_fields("item") * embedding_dim
        if not isinstance(item_hidden_units, (list, tuple)) or any(
                isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in item_hidden_units):
            raise ValueError(f"SparCode: item_hidden_units={item_hidden_units!r}; expected a list of positive ints")
        item_hidden_units = list(item_hidden_units)
        self.item_encoder = MLP_Block(item_input_dim, item_hidden_units, hidden_activations, output_dim=None,
                                      dropout_rates=net_dropout) if item_hidden_units else nn.Identity()
        self.item_heads = TokenHeads(item_hidden_units[-1] if item_hidden_units else item_input_dim,
                                     num_item_tokens, token_dim)
        self.quantizer = ProductQuantizer(token_dim, num_codebooks, codebook_size, decay=codebook_decay,
                                          commitment_weight=commitment_weight, gradient_mode=quantizer_grad)
        self.scorer = InteractionScorer(token_dim, num_item_tokens, interaction, hidden_units, hidden_activations,
                                        dropout=net_dropout)
        self.normalize_tokens = token_norm == "l2"
        self.train_sparsity, self.sparse_grad_leak = train_sparsity, float(sparse_grad_leak)
        self.flops_weight = float(flops_weight)
        self.dense_loss_weight = float(dense_loss_weight) if train_sparsity is not None else 0.0
        # The share of scores zeroed at the current step; the sparsity_warmup callback ramps it up to
        # train_sparsity.
        self.current_sparsity = train_sparsity
        if train_sparsity is None:
            self.bias = nn.Parameter(torch.tensor(float(sparse_bias_init)))    # b of Eq. 10
        else:                                                                # b set from the score quantile
            self.register_buffer("bias", torch.tensor(float(sparse_bias_init)))
            self.register_buffer("bias_initialized", torch.tensor(False))
        # Set by the Trainer's callbacks (engine/callbacks.py): quantizer_warmup, freeze_codes.
        self.feed_unquantized_tokens, self.codes_frozen = False, False
        self._commit_loss, self.step_stats, self._step_threshold = None, None, None
        self._flops = None          # training step: FLOPS penalty of the sampled scores (flops_weight)
        self._dense_scores = {}     # training step: max over tokens of S, "negatives" [B, U] and "positives" [B, 1]
        self.reset_parameters()
        self.model_to_device()

    # ---- towers ---------------------------------------------------------------------
    def user_tokens(self, inputs):
        """Tokens before quantization: [B, K_u, D_T]."""
        history, mask = (self.embedding.sequence(inputs) if self.tokenizer.needs_history   # [B, L, D], [B, L]
                         else (None, None))
        if self.tokenizer.num_fields:                                                       # [B, F, D]
            fields = self.embedding.fields(inputs, "user", exclude=self.user_exclude, history=history)
        else:
            fields = torch.zeros(inputs[HISTORY_FEATURE].shape[0], 0, self.embedding.embedding_dim,
                                 device=self.device)
        tokens = self.tokenizer(fields, history, mask)                                      # [B, K_u, D_T]
        return F.normalize(tokens, dim=-1) if self.normalize_tokens else tokens

    def encode_users(self, inputs):
        """(quantized tokens [B, K_u, D_T], keys [B, K_u] int64).

        With `feed_unquantized_tokens` (the quantizer warm-up) a training call gives the scorer the tokens
        themselves (detached under commitment_only) while the quantizer still runs and its codebooks track
        them. With `codes_frozen` the user side runs without autograd.
        """
        with torch.no_grad() if self.codes_frozen else contextlib.nullcontext():
            tokens = self.user_tokens(inputs)                                               # [B, K_u, D_T]
        quantized, codes, commit_loss = self.quantizer(tokens)
        keys = self.quantizer.pack_keys(codes)                                              # [B, K_u]
        if self.training:
            if self.feed_unquantized_tokens:
                quantized = tokens if self.quantizer.gradient_mode != "commitment_only" else tokens.detach()
            self._commit_loss = None if self.codes_frozen else commit_loss                # frozen: a constant
            self.step_stats = {"keys": keys, "commitment": float(self.quantizer.last_raw_commitment),
                               "zero_scores": 0, "scores": 0}
            self._step_threshold, self._dense_scores, self._flops = None, {}, None
        return quantized, keys

    def freeze_user_side(self):
        """Freeze the field embeddings, the tokenizer (eval mode: no dropout) and the codebooks; idempotent."""
        if self.codes_frozen:
            return
        for module in (self.embedding, self.tokenizer):
            module.requires_grad_(False)
        self.quantizer.freeze_codebooks = self.codes_frozen = True
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if getattr(self, "codes_frozen", False):
            self.embedding.eval()
            self.tokenizer.eval()
        return self

    def encode_items(self, inputs):
        encoded = self.item_encoder(self.embedding.fields(inputs, "item").flatten(1))      # [C, H_item]
        tokens = self.item_heads(encoded)                                                   # [C, K_c, D_T]
        return F.normalize(tokens, dim=-1) if self.normalize_tokens else tokens

    # ---- scores ---------------------------------------------------------------------
    def _sparse_sum(self, scores, sampled=False):
        """Eq. 10-11: [..., K_u] raw scores S -> sum_k relu(S_k + b) [...].

        With train_sparsity, a training call on the sampled negatives (`sampled`, the first scoring call of
        a step in MatchModel.sampled_softmax_loss) sets this step's b from their scores; the positives'
        call then uses the same b."""
        bias = self.bias
        if self.training and self.train_sparsity is not None:
            if self.dense_loss_weight:
                self._dense_scores["negatives" if sampled else "positives"] = scores.amax(-1)
            if sampled:
                self._step_threshold = self._sparsity_bias(scores.detach())
            if self._step_threshold is None:
                raise RuntimeError("SparCode: with train_sparsity the negatives are scored before the "
                                   "positives in a training step (MatchModel.sampled_softmax_loss)")
            bias = self._step_threshold
        shifted = scores + bias
        sparse = torch.relu(shifted)
        if self.training and self.train_sparsity is not None and self.sparse_grad_leak > 0:
            # value 0, gradient sparse_grad_leak where relu is flat
            sparse = sparse + self.sparse_grad_leak * (shifted - shifted.detach()) * (shifted <= 0)
        if self.training and sampled and self.flops_weight:
            self._flops = (sparse.mean(dim=-2) ** 2).mean()               # [B, C, K_u] -> per token, over items
        if self.training and self.step_stats is not None:
            self.step_stats["zero_scores"] += int((sparse == 0).sum())
            self.step_stats["scores"] += sparse.numel()
        return sparse.sum(-1)

    @torch.no_grad()
    def _sparsity_bias(self, scores):
        """b that zeroes a `current_sparsity` share of `scores` (any shape); updates the EMA of b (the served b)."""
        flat = scores.float().reshape(-1)
        rank = min(flat.numel(), max(1, int(round(self.current_sparsity * flat.numel()))))
        bias = -flat.kthvalue(rank).values                                                  # scalar
        if bool(self.bias_initialized):
            self.bias.mul_(self.quantizer.decay).add_(bias, alpha=1.0 - self.quantizer.decay)
        else:
            self.bias.copy_(bias)
            self.bias_initialized.fill_(True)
        return bias

    def score_pairs(self, user_repr, item_repr):
        quantized, _ = user_repr                                                            # [B, K_u, D_T]
        raw = self.scorer(quantized.unsqueeze(1), item_repr.unsqueeze(2))                   # [B, C, K_u]
        return self._sparse_sum(raw)                                                        # [B, C]

    def score_matrix(self, user_repr, item_repr):
        """[B, C]. Without autograd every distinct code is scored once (codes are shared by users)."""
        quantized, keys = user_repr
        batch, num_tokens, _ = quantized.shape
        if torch.is_grad_enabled():
            return self.score_tokens(quantized, item_repr, sampled=True)                    # [B, C]
        unique, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        raw = self.scorer.all_pairs(self.code_vectors(unique), item_repr)[inverse]              # [B * K_u, C]
        return self._sparse_sum(raw.view(batch, num_tokens, -1).transpose(1, 2))            # [B, C]

    def score_tokens(self, tokens, item_repr, sampled=False):
        """Eq. 10-11 for any token vectors (quantized or not): tokens [B, K_u, D_T], items [C, K_c, D_T] -> [B, C]."""
        batch, num_tokens, dim = tokens.shape
        raw = self.scorer.all_pairs(tokens.reshape(-1, dim), item_repr)                         # [B * K_u, C]
        return self._sparse_sum(raw.view(batch, num_tokens, -1).transpose(1, 2), sampled)   # [B, C]

    def auxiliary_loss(self, columns=None, excluded=None):
        """Commitment loss (x lambda) of the last encode_users call in training mode, plus the FLOPS penalty
        (x flops_weight), plus with train_sparsity the dense sampled softmax (x dense_loss_weight) over the same
        positives and negatives."""
        loss = 0.0 if self._commit_loss is None else self._commit_loss
        if self._flops is not None:
            loss = loss + self.flops_weight * self._flops
        if self.dense_loss_weight and "positives" in self._dense_scores:
            logits = torch.cat([self._dense_scores["positives"], self._dense_scores["negatives"][:, columns]], 1)
            logits = (logits / self.temperature).masked_fill(excluded, float("-inf"))         # [B, 1 + n]
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            loss = loss + self.dense_loss_weight * F.cross_entropy(logits, labels)
        return loss

    # ---- serving hooks (CodeIndexable) ------------------------------------------------
    @contextlib.contextmanager
    def _inference(self):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    @property
    def sparse_bias(self):
        """b of Eq. 10 (a float): learned, or with train_sparsity the EMA of the training thresholds."""
        return float(self.bias.detach())

    def query_codes(self, user_inputs):
        """Packed keys of users: LongTensor [n, K_u] (eval mode; no codebook update)."""
        with self._inference():
            inputs = {k: v.to(self.device) for k, v in user_inputs.items()}
            return self.quantizer.pack_keys(self.quantizer.encode(self.user_tokens(inputs)))

    def code_vectors(self, keys):
        """Quantized token vectors of packed keys: [...] -> [..., D_T]."""
        keys = torch.as_tensor(keys, dtype=torch.long, device=self.device)
        return self.quantizer.decode(self.quantizer.unpack_keys(keys))

    def score_codes(self, keys, item_index=None):
        """S before relu of every key against every item: [n_keys, n_items] (all items if None)."""
        with self._inference():
            if item_index is None:
                items = self.all_item_repr()                                                # [n_items, K_c, D_T]
            else:
                index = torch.as_tensor(item_index, dtype=torch.long).reshape(-1)
                if index.numel() == 0:
                    return torch.zeros(torch.as_tensor(keys).numel(), 0, device=self.device)
                items = torch.cat([self.encode_items(self.items(index[s:s + 4096]))
                                   for s in range(0, index.numel(), 4096)])                # [n_items, K_c, D_T]
            return self.scorer.all_pairs(self.code_vectors(keys).reshape(-1, self.quantizer.token_dim), items)
