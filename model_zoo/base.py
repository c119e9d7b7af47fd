"""MatchModel: FuxiCTR's BaseModel turned into a candidate-matching model.

A subclass defines how users and items are encoded and how a (user, item) pair is scored:

- `encode_users(inputs) -> user_repr`          user-side inputs of a batch
- `encode_items(inputs) -> item_repr [C, ...]` item-side inputs of C items
- `score_pairs(user_repr, item_repr [B, C, ...]) -> [B, C]`
- optionally `score_matrix(user_repr, item_repr [C, ...]) -> [B, C]` (faster for two towers) and
  `auxiliary_loss()` (e.g. the commitment loss).

MatchModel owns the loss: the sampled softmax of Eq. 12 over one positive and shared negatives
(uniform, popularity or in-batch with logQ correction), plus the auxiliary and regularization
terms. Training, evaluation and serving live in the engine (model_zoo/engine/), which asks a model
what it can serve through the capability classes below, never by probing attributes.
"""
import os

import torch
import torch.nn.functional as F
from fuxictr.pytorch.models import BaseModel

from .config import NON_MODEL_KEYS
from .layers.field_embedding import HISTORY_MODES, FieldEmbedding
from .data.samplers import NegativeSampler

class VectorServable:
    """Capability: a two-tower model served by nearest-neighbour search (faiss).

    `encode_users(inputs) -> [B, d]` and `encode_items(inputs) -> [C, d]` are plain vectors and the
    score is their dot product, so the item vectors can be put in an ANN index.
    """


class CodeIndexable:
    """Capability: a model served from a sparse inverted index code key -> (item, score) (SparCode).

    A subclass provides `quantizer` (num_codebooks, codebook_size), `sparse_bias` (b of Eq. 10),
    `query_codes(user_inputs) -> keys [n, K_u]` and `score_codes(keys, item_index=None) -> S [n_keys, n_items]`.
    """

    def query_codes(self, user_inputs):
        raise NotImplementedError

    def score_codes(self, keys, item_index=None):
        raise NotImplementedError


class TreeRetrievable:
    """Capability: a model served by layer-wise beam search over a tree whose leaves are the items (TDM).

    A subclass provides `tree` (a layers/tree.py BalancedTree: `children` per level, `leaf_items`,
    `item_leaf`, `depth`) and `score_nodes(user_repr, level, nodes [B, C], item_repr=None) -> [B, C]`, the
    scores of level-`level` nodes (ids within the level; 1 = the root's children, tree.depth = the leaves)
    for the users of `encode_users`. The score of a leaf is the model's score of its item; `item_repr`
    (all_item_repr) spares encoding the leaves' items again.
    """

    def score_nodes(self, user_repr, level, nodes, item_repr=None):
        raise NotImplementedError


class ClosedForm:
    """Capability: a model fitted in closed form on the training split (no gradient steps).

    The Trainer calls `fit_closed_form(train_loader)` once instead of a training loop, then saves the
    weights (buffers) as the checkpoint.
    """

    def fit_closed_form(self, train_loader):
        raise NotImplementedError


class MatchModel(BaseModel):
    """Base class of every matching model.

    Args:
        feature_map: FuxiCTR FeatureMap of the dataset.
        model_id: experiment id; names the checkpoint `<model_root>/<dataset_id>/<model_id>.model`.
        gpu: GPU index, -1 for CPU.
        temperature: logits are divided by it in the sampled softmax.
        num_negatives: negatives per batch for `uniform` / `popularity` sampling.
        negative_sampler: `uniform`, `popularity` or `in_batch`.
        sampler_alpha: exponent of popularity sampling.
        embedding_init_std: standard deviation of the normal initialiser of the feature embeddings
            (FuxiCTR's default 1e-4; matching losses on dot products often train faster from ~1e-2).
        history_features: "id" (default) embeds a history position by the item id embedding; "item" by
            the mean of that item's field embeddings (id, category, tags...), as the item side sees it
            (layers/field_embedding.py).
        embedding_regularizer: L2 weight on FuxiCTR feature embeddings (0 = off).
        net_regularizer: L2 weight on the other parameters (0 = off).
        model_root: checkpoint folder root.
        seed: seed of the negative sampler.
        **kwargs: the rest of the merged config (dataset, training and serving keys, which the model
            ignores); any other key raises ValueError naming it.
    """
    trainable = True
    # Ranking: (user, item) pairs per block of users (None: the evaluator's batch of users), and seconds
    # between log lines with ranking progress (None: none); read by engine/evaluator.py.
    eval_pairs_per_block = None
    ranking_log_seconds = None
    # Trainer callbacks every run of this model gets (name -> kwargs; engine/callbacks.py).
    default_callbacks = {}

    def __init__(self, feature_map, model_id="MatchModel", gpu=-1, temperature=1.0, num_negatives=100,
                 negative_sampler="uniform", sampler_alpha=0.75, embedding_init_std=1.e-4, history_features="id",
                 embedding_regularizer=0.0, net_regularizer=0.0, model_root="./checkpoints/", seed=2023, **kwargs):
        unknown = sorted(set(kwargs) - NON_MODEL_KEYS)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown hyperparameter(s) {unknown}; "
                             f"see the README's configuration reference")
        super().__init__(feature_map, model_id=model_id, task="regression", gpu=gpu,
                         embedding_regularizer=embedding_regularizer or None,
                         net_regularizer=net_regularizer or None, reduce_lr_on_plateau=False,
                         model_root=model_root, verbose=0, metrics=[])
        self.temperature = temperature
        self.num_negatives, self.negative_sampler, self.sampler_alpha = num_negatives, negative_sampler, sampler_alpha
        self.seed = seed
        self.embedding_init_std = float(embedding_init_std)
        self.history_features = history_features
        self.item_corpus, self.sampler = None, None

    # ---- hooks for subclasses -------------------------------------------------------
    def encode_users(self, inputs):
        raise NotImplementedError

    def encode_items(self, inputs):
        raise NotImplementedError

    def score_pairs(self, user_repr, item_repr):
        raise NotImplementedError

    def score_matrix(self, user_repr, item_repr):
        """Scores of every user against shared items: [B, C]. Default: broadcast to pairs."""
        batch = _leading_dim(user_repr)
        expanded = _map(lambda t: t.unsqueeze(0).expand(batch, *t.shape), item_repr)
        return self.score_pairs(user_repr, expanded)

    def auxiliary_loss(self, columns=None, excluded=None):
        """Loss added to the sampled softmax of a training step (default 0).

        Args:
            columns: [n] LongTensor, the item of each negative logit column as a row of the items the step's
                score_matrix call scored (its unique items).
            excluded: [B, 1 + n] bool, the masked logits (a negative equal to the row's positive); for
                in_batch, [B, B] with the positives on the diagonal.
        """
        return 0.0

    # ---- data ---------------------------------------------------------------------
    def set_item_corpus(self, corpus, item_counts=None):
        """Attach the item corpus (and training counts for popularity-based sampling)."""
        self.item_corpus = corpus
        for module in self.modules():
            if isinstance(module, FieldEmbedding):     # history_features="item" reads item features
                module.item_source = self.items
        if self.trainable:
            self.sampler = NegativeSampler(self.negative_sampler, corpus.num_items, self.num_negatives,
                                           item_counts, self.sampler_alpha, self.seed)

    def items(self, item_index):
        if self.item_corpus is None:
            raise RuntimeError("call set_item_corpus(corpus) before scoring items")
        return {k: v.to(self.device) for k, v in self.item_corpus.gather(item_index).items()}

    def forward(self, user_inputs, item_index):
        """Scores `[B, C]` of each user against its own candidates `item_index [B, C]`."""
        flat, inverse = torch.unique(item_index.reshape(-1), return_inverse=True)
        item_repr = self.encode_items(self.items(flat))
        paired = _map(lambda t: t[inverse.view(item_index.shape)], item_repr)
        return self.score_pairs(self.encode_users(user_inputs), paired)

    # ---- loss -----------------------------------------------------------------------
    def compile(self, *args, **kwargs):
        """FuxiCTR's compile resolves only its own losses; a MatchModel is trained by engine.Trainer."""
        raise NotImplementedError(f"{type(self).__name__} is trained by model_zoo.engine.trainer.Trainer "
                                  f"(it owns the optimizer); the loss is MatchModel.loss")

    def loss(self, batch):
        """Training loss of a batch (user-side columns + `item_index`, the positives): Eq. 12 + regularization."""
        user_inputs = dict(batch)
        positives = user_inputs.pop("item_index")
        loss = self.sampled_softmax_loss(user_inputs, positives)
        if self._embedding_regularizer or self._net_regularizer:
            loss = loss + self.regularization_loss()
        return loss

    def sampled_softmax_loss(self, user_inputs, positives):
        """Eq. 12: softmax over the positive and negatives, plus the model's auxiliary loss.

        `uniform` / `popularity`: one shared draw of negatives per batch, the positive in
        column 0; a negative equal to the row's positive is masked out. `in_batch`: the
        other positives of the batch are the negatives, logits corrected by -log Q(item).
        """
        user_repr = self.encode_users(user_inputs)
        negatives = self.sampler.sample()
        if negatives is None:
            unique, inverse = torch.unique(positives, return_inverse=True)
            logits = self.score_matrix(user_repr, self.encode_items(self.items(unique)))[:, inverse]  # [B, B]
            logits = logits / self.temperature - self.sampler.log_probs.to(self.device)[positives].unsqueeze(0)
            labels = torch.arange(positives.shape[0], device=self.device)
            duplicate = positives.unsqueeze(0) == positives.unsqueeze(1)                          # [B, B]
            duplicate[labels, labels] = False
        else:
            negatives = negatives.to(self.device)
            pos_repr = _map(lambda t: t.unsqueeze(1), self.encode_items(self.items(positives)))   # [B, 1, ...]
            unique, inverse = torch.unique(negatives, return_inverse=True)
            neg_logits = self.score_matrix(user_repr, self.encode_items(self.items(unique)))[:, inverse]
            logits = torch.cat([self.score_pairs(user_repr, pos_repr), neg_logits], 1) / self.temperature
            labels = torch.zeros(positives.shape[0], dtype=torch.long, device=self.device)
            duplicate = torch.cat([torch.zeros_like(positives, dtype=torch.bool).unsqueeze(1),
                                   negatives.unsqueeze(0) == positives.unsqueeze(1)], 1)          # [B, 1+n]
        logits = logits.masked_fill(duplicate, float("-inf"))
        return F.cross_entropy(logits, labels) + self.auxiliary_loss(columns=inverse, excluded=duplicate)

    # ---- checkpoints ----------------------------------------------------------------
    def save_weights(self, checkpoint):
        """Atomic checkpoint: written to a temp name, then renamed."""
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        tmp = f"{checkpoint}.tmp.{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, checkpoint)

    def load_weights(self, checkpoint):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a corrupt file
            raise ValueError(f"{checkpoint}: not a readable checkpoint ({exc})") from None
        self.load_state_dict(state)
        self.to(self.device)

    # ---- scoring every item -----------------------------------------------------------
    @torch.no_grad()
    def all_item_repr(self, chunk=4096):
        """Representations of every item of the corpus, computed in chunks."""
        parts = []
        for start in range(0, self.item_corpus.num_items, chunk):
            index = torch.arange(start, min(start + chunk, self.item_corpus.num_items))
            parts.append(self.encode_items(self.items(index)))
        return _cat(parts)

    @torch.no_grad()
    def full_scores(self, user_inputs, item_repr, item_chunk=2048):
        """Scores of a user batch against every item: [B, num_items]."""
        user_repr = self.encode_users(user_inputs)
        n = _leading_dim(item_repr)
        return torch.cat([self.score_matrix(user_repr, _map(lambda t: t[s:s + item_chunk], item_repr))
                          for s in range(0, n, item_chunk)], dim=1)


def _leading_dim(repr_):
    return (repr_[0] if isinstance(repr_, (tuple, list)) else repr_).shape[0]


def _map(fn, repr_):
    if isinstance(repr_, (tuple, list)):
        return type(repr_)(fn(t) for t in repr_)
    return fn(repr_)


def _cat(parts):
    if isinstance(parts[0], (tuple, list)):
        return type(parts[0])(torch.cat(group) for group in zip(*parts))
    return torch.cat(parts)
