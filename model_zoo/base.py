"""MatchModel: FuxiCTR's BaseModel turned into a candidate-matching model.

A subclass defines how users and items are encoded and how a (user, item) pair is scored:

- `encode_users(inputs) -> user_repr`          user-side inputs of a batch
- `encode_items(inputs) -> item_repr [C, ...]` item-side inputs of C items
- `score_pairs(user_repr, item_repr [B, C, ...]) -> [B, C]`
- optionally `score_matrix(user_repr, item_repr [C, ...]) -> [B, C]` (faster for two towers),
  `auxiliary_loss()` (e.g. the commitment loss) and `epoch_stats()` (logged every epoch).

MatchModel owns the rest: the sampled softmax of Eq. 12 over one positive and shared
negatives (uniform, popularity or in-batch with logQ correction), `fit` with early stopping
on a monitored metric and atomic checkpoints, a log line per epoch, and `evaluate` by full
ranking over the whole item corpus with the user's history items masked.
"""
import logging
import os
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import get_optimizer
from tqdm import tqdm

from .config import DATASET_DEFAULTS, TRAINING_DEFAULTS
from .layers.field_embedding import HISTORY_MODES, FieldEmbedding
from .data.samplers import NegativeSampler
from .retrieval.exact import masked_topk
from .retrieval.metrics import format_metrics, parse_metric_name, topk_metrics

# Keys of the merged config that are not model hyperparameters; a model ignores them.
NON_MODEL_KEYS = set(DATASET_DEFAULTS) | set(TRAINING_DEFAULTS) | {"_config_file", "_dataset_config_file"}


def peak_rss_mb():
    """Peak resident memory of this process in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MatchModel(BaseModel):
    """Base class of every matching model.

    Args:
        feature_map: FuxiCTR FeatureMap of the dataset.
        model_id: experiment id; names the checkpoint `<model_root>/<dataset_id>/<model_id>.model`.
        gpu: GPU index, -1 for CPU.
        learning_rate: Adam learning rate.
        optimizer: optimizer name understood by FuxiCTR (`adam`, `sgd`, ...).
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
        metrics: metric names like `Recall(k=20)` computed at evaluation.
        monitor: metric used for early stopping and checkpointing.
        monitor_mode: `max` or `min`.
        early_stop_patience: epochs without improvement before stopping.
        epochs: maximum number of epochs.
        max_steps_per_epoch: cap on training steps per epoch (None = the whole split).
        eval_batch_size: users scored at once at evaluation.
        model_root: checkpoint folder root.
        seed: seed of the negative sampler.
        verbose: 0 hides progress bars.
        **kwargs: the rest of the merged config; a key that is neither a dataset nor a
            training key raises ValueError naming it.
    """
    trainable = True
    # Ranking: (user, item) pairs per block of users (None: eval_batch_size users per block), and
    # seconds between log lines with progress and remaining time (None: only the tqdm bar, if verbose).
    eval_pairs_per_block = None
    ranking_log_seconds = None

    def __init__(self, feature_map, model_id="MatchModel", gpu=-1, learning_rate=1.e-3, optimizer="adam",
                 temperature=1.0, num_negatives=100, negative_sampler="uniform", sampler_alpha=0.75,
                 embedding_init_std=1.e-4, history_features="id", embedding_regularizer=0.0, net_regularizer=0.0,
                 metrics=TRAINING_DEFAULTS["metrics"],
                 monitor="Recall(k=20)", monitor_mode="max", early_stop_patience=2, epochs=10,
                 max_steps_per_epoch=None, eval_batch_size=512, model_root="./checkpoints/", seed=2023,
                 verbose=1, **kwargs):
        unknown = sorted(set(kwargs) - NON_MODEL_KEYS)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown hyperparameter(s) {unknown}; "
                             f"see the README's configuration reference")
        if monitor_mode not in ("max", "min"):
            raise ValueError(f"monitor_mode={monitor_mode!r}; expected 'max' or 'min'")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}; expected > 0")
        if isinstance(embedding_init_std, bool) or not isinstance(embedding_init_std, (int, float)) \
                or not embedding_init_std > 0:
            raise ValueError(f"embedding_init_std={embedding_init_std!r}; expected a number > 0")
        if history_features not in HISTORY_MODES:
            raise ValueError(f"history_features={history_features!r}; expected one of {list(HISTORY_MODES)}")
        self.metric_names = list(metrics)
        parsed = [parse_metric_name(m) for m in self.metric_names]
        if monitor not in self.metric_names:
            raise ValueError(f"monitor={monitor!r} is not among metrics={self.metric_names}")
        super().__init__(feature_map, model_id=model_id, task="regression", gpu=gpu, monitor=monitor,
                         monitor_mode=monitor_mode, early_stop_patience=early_stop_patience,
                         embedding_regularizer=embedding_regularizer or None,
                         net_regularizer=net_regularizer or None, reduce_lr_on_plateau=False,
                         verbose=verbose, model_root=model_root, metrics=self.metric_names)
        self.metric_kinds = sorted({name for name, _ in parsed})
        self.metric_ks = sorted({k for _, k in parsed})
        self.monitor_name = monitor
        self.learning_rate, self.optimizer_name = learning_rate, optimizer
        self.temperature, self.epochs, self.max_steps_per_epoch = temperature, epochs, max_steps_per_epoch
        self.num_negatives, self.negative_sampler, self.sampler_alpha = num_negatives, negative_sampler, sampler_alpha
        self.eval_batch_size, self.seed = eval_batch_size, seed
        self.embedding_init_std = float(embedding_init_std)
        self.history_features = history_features
        self.precision_denominator = kwargs.get("precision_denominator", "k")
        self.item_corpus, self.sampler, self.history = None, None, []

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

    def auxiliary_loss(self):
        return 0.0

    def epoch_stats(self):
        return {}

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

    # ---- training -----------------------------------------------------------------
    def compile(self, optimizer=None, loss="sampled_softmax", lr=None):
        """Adam (or `optimizer`) over the trainable parameters; the loss is always Eq. 12."""
        if loss != "sampled_softmax":
            raise ValueError(f"loss={loss!r}; MatchModel trains with 'sampled_softmax'")
        params = [p for p in self.parameters() if p.requires_grad]
        if params:
            self.optimizer = get_optimizer(optimizer or self.optimizer_name, params, lr or self.learning_rate)

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
        return F.cross_entropy(logits, labels) + self.auxiliary_loss()

    def train_epoch(self, train_loader):
        self.train()
        total, count, examples = 0.0, 0, 0
        steps = len(train_loader) if self.max_steps_per_epoch is None else min(len(train_loader),
                                                                              self.max_steps_per_epoch)
        progress = tqdm(train_loader, total=steps, disable=not self._verbose, desc="train", leave=False)
        for step, batch in enumerate(progress):
            if step >= steps:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            positives = batch.pop("item_index")
            self.optimizer.zero_grad()
            loss = self.sampled_softmax_loss(batch, positives)
            if self._embedding_regularizer or self._net_regularizer:
                loss = loss + self.regularization_loss()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.model_id}: loss is {loss.item()} at step {step}")
            loss.backward()
            self.optimizer.step()
            total += loss.item()
            count += 1
            examples += positives.shape[0]
            if count % 20 == 0:
                progress.set_postfix(loss=f"{total / count:.4f}")
        return total / max(count, 1), examples

    def fit(self, data_generator, epochs=None, validation_data=None, **kwargs):
        """Train with early stopping on `monitor`; keeps the best weights in the checkpoint."""
        epochs = self.epochs if epochs is None else epochs
        os.makedirs(self.model_dir, exist_ok=True)
        best, patience = None, 0
        self.history = []
        if not self.trainable:
            self.save_weights(self.checkpoint)
            return self.history
        for epoch in range(1, epochs + 1):
            started = time.time()
            loss, examples = self.train_epoch(data_generator)
            train_seconds = time.time() - started
            record = {"epoch": epoch, "loss": loss, "examples_per_second": examples / max(train_seconds, 1e-9),
                      "train_seconds": train_seconds, "peak_rss_mb": peak_rss_mb()}
            record.update(self.epoch_stats())
            if validation_data is not None:
                record["valid"] = self.evaluate(validation_data)
                value = record["valid"][self.monitor_name]
            else:
                value = -loss
            logging.info(f"[Epoch {epoch}/{epochs}] loss: {loss:.6f} - {record['examples_per_second']:.0f} "
                         f"examples/s - peak RSS {record['peak_rss_mb']:.0f} MB - " +
                         " - ".join(f"{k}: {v}" for k, v in record.items() if k not in
                                    ("epoch", "loss", "examples_per_second", "peak_rss_mb", "valid",
                                     "train_seconds")))
            if validation_data is not None:
                logging.info(f"[Metrics] {format_metrics(record['valid'])}")
            self.history.append(record)
            sign = 1 if self._monitor_mode == "max" or validation_data is None else -1
            if best is None or sign * value > sign * best + 1e-6:
                best, patience = value, 0
                self.save_weights(self.checkpoint)
                logging.info(f"Save best model: {self.monitor_name} = {value:.6f} -> {self.checkpoint}")
            else:
                patience += 1
                if patience >= self._early_stop_patience:
                    logging.info(f"Early stopping at epoch {epoch}")
                    break
        self.load_weights(self.checkpoint)
        return self.history

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

    # ---- evaluation -----------------------------------------------------------------
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

    @torch.no_grad()
    def retrieve(self, eval_users, k):
        """Exact top-k item indices of every evaluation user, history items masked."""
        self.eval()
        item_repr = self.all_item_repr()
        block = self.eval_batch_size
        if self.eval_pairs_per_block:
            block = max(1, min(block, self.eval_pairs_per_block // max(self.item_corpus.num_items, 1)))
        results, num_users = [], len(eval_users)
        progress = tqdm(total=num_users, unit="user", disable=not self._verbose, desc="rank", leave=False)
        started = last_log = time.time()
        for start in range(0, num_users, block):
            stop = min(start + block, num_users)
            inputs = {k_: v.to(self.device) for k_, v in eval_users.batch(start, stop).items()}
            scores = self.full_scores(inputs, item_repr)
            _, ids = masked_topk(scores, k, eval_users.mask_indptr, eval_users.mask_items, row_offset=start)
            results.append(ids.cpu().numpy() if torch.is_tensor(ids) else ids)
            progress.update(stop - start)
            if self.ranking_log_seconds is not None and time.time() - last_log >= self.ranking_log_seconds:
                last_log = time.time()
                elapsed = last_log - started
                logging.info(f"rank: {stop}/{num_users} users x {self.item_corpus.num_items} items, "
                             f"{elapsed:.0f} s elapsed, about {elapsed * (num_users - stop) / stop:.0f} s left")
        progress.close()
        return np.concatenate(results)

    def evaluate(self, data_generator, metrics=None):
        """Full-ranking metrics of `data_generator` (an EvalUsers)."""
        topk = self.retrieve(data_generator, max(self.metric_ks))
        scores = topk_metrics(topk, data_generator.gt_indptr, data_generator.gt_items, ks=self.metric_ks,
                              metrics=self.metric_kinds, precision_denominator=self.precision_denominator)
        return {name: scores[name] for name in (metrics or self.metric_names)}


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
