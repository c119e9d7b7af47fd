"""Read built H5 files: shuffled training batches, evaluation users, the item corpus."""
import os

import numpy as np
import torch
from fuxictr.features import FeatureMap

from ..errors import DataError
from .feature_processor import HISTORY_FEATURE
from .h5 import h5_columns, h5_num_rows, open_h5, read_h5

EVAL_COLUMNS = ("gt_indptr", "gt_items", "mask_indptr", "mask_items")
META_COLUMNS = ("user_row", "raw_user_id", "raw_item_id", "item_index") + EVAL_COLUMNS


def load_feature_map(data_dir, dataset_id):
    path = os.path.join(data_dir, "feature_map.json")
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (the dataset is not built)")
    feature_map = FeatureMap(dataset_id, data_dir)
    try:
        feature_map.load(path, params={})
    except (ValueError, KeyError) as exc:        # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: corrupt feature map ({exc})") from None
    return feature_map


def feature_columns(feature_map, source):
    return [name for name, spec in feature_map.features.items() if spec.get("source") == source]


def _check_range(path, name, values, feature_map):
    spec = feature_map.features.get(name)
    if spec is None or spec["type"] not in ("categorical", "sequence") or values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= spec["vocab_size"]:
        raise DataError(f"{path}: column {name} has ids in [{low}, {high}], outside the vocabulary "
                        f"[0, {spec['vocab_size'] - 1}] of feature_map.json")


def to_tensors(columns, names):
    return {name: torch.from_numpy(np.ascontiguousarray(columns[name])) for name in names}


class ItemCorpus:
    """All item-side columns of `item_corpus.h5` as tensors; row index = item index.

    Args:
        path: the item corpus file.
        feature_map: FuxiCTR feature map of the dataset.
    """

    def __init__(self, path, feature_map):
        names = feature_columns(feature_map, "item")
        columns = read_h5(path, required=names)
        for name in names:
            _check_range(path, name, columns[name], feature_map)
        self.num_items = len(columns["item_id"])
        self.features = to_tensors(columns, names)
        self.raw_ids = columns.get("raw_item_id")

    def gather(self, item_index):
        """Item-side inputs of `item_index` (any shape [...]) -> name -> tensor [..., *feature]."""
        return {name: values[item_index] for name, values in self.features.items()}


class TrainLoader:
    """Shuffled mini-batches of `train.h5`, read block by block.

    Sharded (``num_shards`` > 1, one shard per training process): every shard draws the same shuffled
    order as one process and keeps batch i of that order when i mod num_shards == shard, so the shards'
    batches at a step are together the one-process batches of that step. Only full batches are used, and
    the same number in every shard (the last num_rows mod (batch_size * num_shards) rows of an epoch's order
    are left out); every shard reads every block and draws the random histories of every batch, so the
    random state stays the same in all shards and equal to one process's after a whole epoch.

    Args:
        path: the training file.
        feature_map: the dataset's feature map (user-side columns are returned).
        batch_size: rows per batch.
        block_size: rows read from disk at a time; blocks are visited in random order and
            shuffled inside.
        shuffle: shuffle blocks and rows.
        seed: seed of the shuffling; each epoch draws a new order from it.
        num_items: size of the item corpus, to check `item_index` ranges.
        num_shards: training processes sharing the epoch (1 = this process reads every batch).
        shard: which of them this loader serves, in [0, num_shards).
    """

    def __init__(self, path, feature_map, batch_size=256, block_size=1_000_000, shuffle=True, seed=2023,
                 num_items=None, num_shards=1, shard=0):
        self.path = path
        self.user_columns = feature_columns(feature_map, "user")
        present = h5_columns(path)
        # train_user_table layout: user columns absent from train.h5 are gathered from users.h5 by user_row
        self.gathered = [c for c in self.user_columns if c not in present]
        self.user_table = None
        if self.gathered and "user_row" in present:
            users_path = os.path.join(os.path.dirname(path), "users.h5")
            self.user_table = read_h5(users_path, required=self.gathered)
        row_columns = [c for c in self.user_columns if c not in self.gathered or self.user_table is None]
        self.columns = row_columns + ["item_index"] + (["user_row"] if self.user_table is not None else [])
        # train_history: user_sample (the build wrote every training user's timeline): fresh histories
        self.timelines = None
        if "timeline_indptr" in present:
            self.timelines = read_h5(path, required=("timeline_indptr", "timeline_items"))
            self.columns.append("timeline_row")
        self.num_rows = h5_num_rows(path, "item_index")
        if self.num_rows == 0:
            raise DataError(f"{path}: the training split is empty")
        self.batch_size, self.block_size, self.shuffle = batch_size, block_size, shuffle
        self.rng = np.random.RandomState(seed)
        self.feature_map, self.num_items = feature_map, num_items
        missing = [c for c in self.columns if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}")
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"TrainLoader: num_shards={num_shards!r}; expected an int >= 1")
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
            raise ValueError(f"TrainLoader: shard={shard!r}; expected an int in [0, {num_shards})")
        self.num_shards, self.shard = num_shards, shard
        if num_shards > 1 and len(self) == 0:
            raise DataError(f"{path}: {self.num_rows} training rows make {self.num_rows // batch_size} full "
                            f"batch(es) of {batch_size}, fewer than the {num_shards} training processes")

    @property
    def output_columns(self):
        return self.user_columns + ["item_index"]

    def __len__(self):
        if self.num_shards > 1:
            return self.num_rows // self.batch_size // self.num_shards
        return (self.num_rows + self.batch_size - 1) // self.batch_size

    def _read_block(self, start, stop):
        with open_h5(self.path) as fd:
            block = {name: fd[name][start:stop] for name in self.columns}
        if self.user_table is not None:
            rows = block.pop("user_row")
            for name in self.gathered:
                block[name] = self.user_table[name][rows]
        for name in self.user_columns:
            _check_range(self.path, name, block[name], self.feature_map)
            if block[name].dtype.kind == "f" and np.isnan(block[name]).any():
                raise DataError(f"{self.path}: column {name} contains NaN")
        targets = block["item_index"]
        if self.num_items is not None and (targets.min() < 0 or targets.max() >= self.num_items):
            raise DataError(f"{self.path}: column item_index has ids outside [0, {self.num_items - 1}]")
        if self.timelines is not None:
            rows = block["timeline_row"]
            if rows.size and (rows.min() < 0 or rows.max() >= len(self.timelines["timeline_indptr"]) - 1):
                raise DataError(f"{self.path}: column timeline_row points outside timeline_indptr")
        return block

    def sample_histories(self, timeline_rows, targets, max_len):
        """[rows, max_len] histories: for each row, up to `max_len` of its user's training items other
        than the target, drawn uniformly without replacement, kept in time order and left-padded with 0."""
        indptr, items = self.timelines["timeline_indptr"], self.timelines["timeline_items"]
        starts, sizes = indptr[timeline_rows], indptr[timeline_rows + 1] - indptr[timeline_rows]   # [B]
        width = max(int(sizes.max()), 1)
        position = np.arange(width)[None, :]                                                     # [1, W]
        codes = items[np.minimum(starts[:, None] + position, len(items) - 1)]                     # [B, W]
        usable = (position < sizes[:, None]) & (codes != targets[:, None] + 1)
        keys = np.where(usable, self.rng.random_sample(codes.shape), 2.0)                         # [B, W]
        if width > max_len:                               # the max_len smallest keys, in any order
            chosen = np.argpartition(keys, max_len - 1, axis=1)[:, :max_len]                       # [B, L]
        else:
            chosen = np.broadcast_to(np.arange(width), keys.shape)                                 # [B, W]
        chosen = np.where(np.take_along_axis(usable, chosen, 1), chosen, -1)
        chosen = np.sort(chosen, axis=1)                           # padding (-1) first, then time order
        hist = np.where(chosen >= 0, np.take_along_axis(codes, np.maximum(chosen, 0), 1), 0)
        return np.pad(hist, ((0, 0), (max_len - hist.shape[1], 0)))                              # [B, L]

    def __iter__(self):
        if self.num_shards == 1:
            for columns in self._row_batches():
                yield self._batch(columns)
            return
        shards, used = self.num_shards, len(self) * self.num_shards       # batches of the order that are used
        mine = None
        for index, columns in enumerate(self._row_batches()):
            if index < used and index % shards == self.shard:
                mine = self._batch(columns)
            else:
                self._skip(columns)
            # A step's batch is handed out once the step's batches of every shard are drawn (all shards stop
            # at the same random state); the last one once the rest of the epoch is drawn.
            if index % shards == shards - 1 and index < used - 1:
                yield mine
        if used:
            yield mine

    def _row_batches(self):
        """The batches of one epoch in the one-process order, as column dicts (histories not yet drawn)."""
        starts = np.arange(0, self.num_rows, self.block_size)
        if self.shuffle:
            starts = self.rng.permutation(starts)
        carry = None
        for start in starts:
            block = self._read_block(start, min(start + self.block_size, self.num_rows))
            order = self.rng.permutation(len(block["item_index"])) if self.shuffle else None
            if order is not None:
                block = {k: v[order] for k, v in block.items()}
            if carry is not None:
                block = {k: np.concatenate([carry[k], block[k]]) for k in block}
            n_full = len(block["item_index"]) // self.batch_size * self.batch_size
            for lo in range(0, n_full, self.batch_size):
                yield {k: v[lo:lo + self.batch_size] for k, v in block.items()}
            carry = {k: v[n_full:] for k, v in block.items()} if n_full < len(block["item_index"]) else None
        if carry is not None:
            yield carry

    def _batch(self, columns):
        if self.timelines is not None:
            columns[HISTORY_FEATURE] = self.sample_histories(columns["timeline_row"], columns["item_index"],
                                                             columns[HISTORY_FEATURE].shape[1])
        return to_tensors(columns, self.output_columns)

    def _skip(self, columns):
        """Another shard's batch: only its random histories are drawn (and dropped), as one process would."""
        if self.timelines is not None:
            self.sample_histories(columns["timeline_row"], columns["item_index"], columns[HISTORY_FEATURE].shape[1])

    def item_counts(self, num_items):
        """Training frequency of every item (for popularity sampling and the Popularity model)."""
        with open_h5(self.path) as fd:
            return np.bincount(fd["item_index"][()], minlength=num_items)


class EvalUsers:
    """Held-out users of `valid.h5` / `test.h5`: user-side inputs and ground truth CSR.

    Args:
        path: the split file.
        feature_map: the dataset's feature map.
        num_items: size of the item corpus, to check id ranges.
        max_users: evaluate a seeded random subset of this many users (None = all).
        seed: seed of that subset (identical across models for the same dataset and seed).
    """

    def __init__(self, path, feature_map, num_items, max_users=None, seed=2023):
        self.user_columns = feature_columns(feature_map, "user")
        columns = read_h5(path, required=self.user_columns + list(EVAL_COLUMNS))
        for name in self.user_columns:
            _check_range(path, name, columns[name], feature_map)
        for name in ("gt_items", "mask_items"):
            values = columns[name]
            if values.size and (values.min() < 0 or values.max() >= num_items):
                raise DataError(f"{path}: column {name} has item ids outside [0, {num_items - 1}]")
        n_users = len(columns["gt_indptr"]) - 1
        if n_users <= 0:
            raise DataError(f"{path}: no evaluation user")
        rows = np.arange(n_users)
        if max_users is not None and max_users < n_users:
            rows = np.sort(np.random.RandomState(seed).choice(n_users, max_users, replace=False))
        self.rows = rows
        self.inputs = {name: columns[name][rows] for name in self.user_columns}
        self.gt_indptr, self.gt_items = _take_csr(columns["gt_indptr"], columns["gt_items"], rows)
        self.mask_indptr, self.mask_items = _take_csr(columns["mask_indptr"], columns["mask_items"], rows)
        self.raw_user_ids = columns.get("raw_user_id", rows)[rows] if "raw_user_id" in columns else rows

    def __len__(self):
        return len(self.rows)

    def batch(self, start, stop):
        return to_tensors({k: v[start:stop] for k, v in self.inputs.items()}, self.user_columns)


def _take_csr(indptr, items, rows):
    lengths = indptr[rows + 1] - indptr[rows]
    new_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    new_indptr[1:] = np.cumsum(lengths)
    if len(rows) == len(indptr) - 1:
        return indptr.astype(np.int64), items.astype(np.int64)
    take = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows]) if len(rows) else []
    return new_indptr, items[np.asarray(take, dtype=np.int64)].astype(np.int64)
