"""ItemItemModel: the shared base of the closed-form item-item anchors (EASE, ItemKNN).

Both score a user by `x_u W`: `x_u` the user's known items as a binary vector over the corpus, `W` an
[items x items] matrix fitted once on the training split (`fit_closed_form`) and kept as a buffer, so the
checkpoint holds it. Subclasses only say how `W` is computed from the training matrix and how much memory
that takes.
"""
import logging

import numpy as np
import torch

from ..base import ClosedForm, MatchModel
from ..data.feature_processor import HISTORY_FEATURE
from ..data.interactions import training_interactions
from ..errors import DataError
from ..retrieval.sparsity import available_memory_bytes

# The user-side categorical feature that identifies a user (given splits: pairs, BARS).
USER_KEY_FEATURE = "user_id"
# Bytes of the sparse product blocks of `cooccurrence_counts` (a block of item rows at a time).
GRAM_BLOCK_BYTES = 2 ** 28


def check_item_item_fits(model_name, num_items, bytes_per_entry, available_bytes=None):
    """ValueError, before anything is allocated, when an [items x items] fit would not fit in memory.

    Args:
        model_name: named in the message.
        num_items: size of the item corpus.
        bytes_per_entry: peak bytes the model needs per entry of the item-item matrix.
        available_bytes: free memory; None reads it from the OS (no check where the OS does not tell).
    Returns:
        the bytes needed.
    """
    needed = bytes_per_entry * num_items ** 2
    available = available_memory_bytes() if available_bytes is None else available_bytes
    if available is not None and needed > available:
        raise ValueError(f"{model_name}: the item-item matrix of {num_items} items needs about "
                         f"{needed / 2 ** 30:.2f} GiB ({num_items}^2 entries x {bytes_per_entry} bytes) but only "
                         f"{available / 2 ** 30:.2f} GiB of memory is free; use a machine with at least that "
                         f"much free memory or a dataset with fewer items")
    return needed


def cooccurrence_counts(matrix, out):
    """out[i, j] = number of users having both item i and item j (X^T X of a binary matrix X).

    Args:
        matrix: csr [n_users, n_items] binary float32.
        out: [n_items, n_items] numpy array (float32 or float64) written in place, a block of rows at a time
            so the sparse product never holds more than about GRAM_BLOCK_BYTES.
    """
    num_items = matrix.shape[1]
    transposed = matrix.T.tocsr()                                                   # [I, U]
    block = max(1, GRAM_BLOCK_BYTES // (16 * max(num_items, 1)))
    for start in range(0, num_items, block):
        stop = min(start + block, num_items)
        out[start:stop] = (transposed[start:stop] @ matrix).toarray()              # [b, I]


class ItemItemModel(MatchModel, ClosedForm):
    """Base of the models scored by `x_u W` with a closed-form item-item matrix `W` (not registered).

    How a user's known items `x_u` reach the model (`encode_users`): when the feature map has a categorical
    user feature `user_id` (given splits: `ml1m_pairs`, BARS), `fit_closed_form` keeps every training user's
    full training row keyed by its `user_id` code, and an evaluated user whose code has a training row is
    scored from that row: all its training items, not only the last `max_len` of `hist_item_id`, and not the
    validation pairs that a test user's `hist_item_id` may hold (those are masked by the evaluator, as X
    holds the training split only). Every other user (held-out users of the sequential protocol, e.g.
    `ml100k_recbole` and `demo`; a code without a training row or shared by several training users) is
    scored from its `hist_item_id` sequence, the history every model sees. The evaluator masks the known
    items afterwards.

    The fit needs `bytes_per_entry` bytes per item pair at its peak; the constructor checks that against the
    free memory before allocating W and raises ValueError naming the item count and the size otherwise.

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        **kwargs: MatchModel arguments (training keys are accepted and unused).
    """
    trainable = False
    # Peak bytes of the fit per entry of the [items x items] matrix (checked against free memory).
    bytes_per_entry = 4

    def __init__(self, feature_map, model_id="ItemItemModel", **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        self.num_items = feature_map.features["item_id"]["vocab_size"] - 1
        check_item_item_fits(type(self).__name__, self.num_items, self.bytes_per_entry)
        self.register_buffer("item_item", torch.zeros(self.num_items, self.num_items))   # W [I, I]
        spec = feature_map.features.get(USER_KEY_FEATURE, {})
        self.user_key = USER_KEY_FEATURE if (spec.get("source") == "user" and spec.get("type") == "categorical") \
            else None
        if self.user_key is not None:      # training rows by user code (CSR): code c -> items[indptr[c]:indptr[c+1]]
            self.register_buffer("known_indptr", torch.zeros(spec["vocab_size"] + 1, dtype=torch.long))
            self.register_buffer("known_items", torch.zeros(0, dtype=torch.long))
        self.model_to_device()

    # ---- fit --------------------------------------------------------------------------
    def fit_item_item(self, matrix, out):
        """Write W for the binary training matrix `matrix` (csr [U, I]) into `out` ([I, I] float32 numpy)."""
        raise NotImplementedError

    @torch.no_grad()
    def fit_closed_form(self, train_loader):
        """Fit W on the training split (`train_loader.path`, a built train.h5) and keep the training rows."""
        data = training_interactions(train_loader.path, self.num_items, key_column=self.user_key)
        logging.info(f"{type(self).__name__}: training matrix of {data.matrix.shape[0]} users x {self.num_items} "
                     f"items, {data.matrix.nnz} interactions")
        on_cpu = self.item_item.device.type == "cpu"
        target = self.item_item if on_cpu else torch.zeros(self.num_items, self.num_items)
        self.fit_item_item(data.matrix, target.numpy())
        if not on_cpu:
            self.item_item.copy_(target)
        if self.user_key is not None:
            self._keep_training_rows(data.matrix, data.keys)

    def _keep_training_rows(self, matrix, codes):
        """known_indptr / known_items := the training row of every user code held by exactly one training user."""
        vocab = self.known_indptr.numel() - 1
        if codes.size and (codes.min() < 0 or codes.max() >= vocab):
            raise DataError(f"{self.user_key} codes in [{codes.min()}, {codes.max()}], outside the vocabulary "
                            f"[0, {vocab - 1}] of the feature map")
        unique = np.bincount(codes, minlength=vocab)[codes] == 1                       # [U]
        order = np.flatnonzero(unique)[np.argsort(codes[unique], kind="stable")]       # rows by code
        rows = matrix[order]
        lengths = np.zeros(vocab, dtype=np.int64)
        lengths[codes[order]] = np.diff(rows.indptr)
        self.known_indptr.copy_(torch.from_numpy(np.r_[0, np.cumsum(lengths)]))
        self.known_items = torch.from_numpy(rows.indices.astype(np.int64)).to(self.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """known_items has one entry per training interaction: take the checkpoint's size before loading."""
        saved = state_dict.get(prefix + "known_items")
        if self.user_key is not None and saved is not None:
            self.known_items = torch.zeros_like(saved, device=self.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- scoring ----------------------------------------------------------------------
    def encode_users(self, inputs):
        """x_u: [B, I] binary, the training row of a known user code, else the `hist_item_id` items."""
        history = inputs[HISTORY_FEATURE]                                              # [B, L] codes, 0 = pad
        known = torch.zeros(history.shape[0], self.num_items, device=self.device)     # [B, I]
        users, positions = torch.nonzero(history, as_tuple=True)
        known[users, history[users, positions] - 1] = 1.0
        if self.user_key is None:
            return known
        codes = inputs[self.user_key].reshape(-1).long()                               # [B]
        starts = self.known_indptr[codes]                                              # [B]
        lengths = self.known_indptr[codes + 1] - starts                                # [B]
        known[lengths > 0] = 0.0
        owners = torch.repeat_interleave(torch.arange(len(codes), device=self.device), lengths)   # [n]
        first = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths)           # [n]
        positions = first + torch.arange(len(owners), device=self.device)              # into known_items
        known[owners, self.known_items[positions]] = 1.0
        return known

    def encode_items(self, inputs):
        return self.item_item.T[inputs["item_id"] - 1]                                 # [..., I]: column of W

    def all_item_repr(self, chunk=4096):
        """Every item's column of W, without a copy: W^T [I, I] (`chunk` is not needed)."""
        return self.item_item.T

    def score_pairs(self, user_repr, item_repr):
        return torch.einsum("bi,bci->bc", user_repr, item_repr)                         # [B, C]

    def score_matrix(self, user_repr, item_repr):
        return user_repr @ item_repr.T                                                 # [B, C]
