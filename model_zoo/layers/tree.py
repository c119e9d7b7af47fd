"""The balanced item tree of TDM (Zhu et al., KDD 2018): every leaf is one item, every item one leaf.

Shape. A tree over n items with branching b has depth D = ceil(log_b n) (at least 1): level 0 is the
root, level D the n leaves. A node covering m leaves splits them into min(m, b) children whose leaf
counts differ by at most one (the larger ones first), so every leaf is at depth D and sibling subtrees
are balanced. The shape depends on (n, b) only; nodes of a level are numbered left to right, the
children of a node are consecutive, and leaf slot j holds the item ``leaf_items[j]``.

Assignment. ``random`` puts the items on the leaves in a random order. ``from_vectors`` orders them by
recursive balanced k-means over item vectors (e.g. a trained two-tower model's): the items under a node
are split into its children's sizes, each cluster filled by the items that lose most by going elsewhere.

File. ``save`` writes one .npz (the leaf order, JSON metadata and a sha256 over both) atomically;
``load`` refuses a missing, corrupt, tampered or foreign file, or one written for another checkpoint,
with an error naming the file.
"""
import json
import os
import threading
import zipfile

import numpy as np

from ..retrieval.index_io import _checksum

FORMAT_NAME = "tdm-tree"
FORMAT_VERSION = 1
KMEANS_ITERATIONS = 10


class TreeFileError(ValueError):
    """A tree file is corrupt, tampered with, of another format, or written for another checkpoint."""


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"BalancedTree: {name}={value!r}; expected an int >= {minimum}")
    return int(value)


def tree_file(checkpoint):
    """Where a model's tree is written: `<model_root>/<dataset_id>/<expid>.tree.npz` for `.../<expid>.model`."""
    return os.path.splitext(os.fspath(checkpoint))[0] + ".tree.npz"


def tree_depth(num_items, branching):
    """D = ceil(log_b n), at least 1 (computed on integers)."""
    depth, capacity = 1, branching
    while capacity < num_items:
        depth, capacity = depth + 1, capacity * branching
    return depth


class BalancedTree:
    """A balanced tree whose leaves are the items.

    Args:
        num_items: n, number of items (leaves), >= 1.
        branching: b, most children per node, >= 2.
        leaf_items: int [n], the item on each leaf slot (a permutation of 0..n-1); None = identity.

    Attributes:
        depth: D; levels 1..D are scored, level D holds the leaves.
        level_sizes: int [D + 1], nodes per level (level 0: the root).
        children: list of D int64 arrays; children[l] [level_sizes[l], b] are the level-(l + 1) ids of the
            children of each level-l node, -1 where a node has fewer than b children.
        leaf_ranges: list of D + 1 int64 arrays [level_sizes[l], 2], the leaf slots [start, stop) under each node.
        leaf_items: int64 [n], item of each leaf slot; item_leaf: int64 [n], its inverse.
    """

    def __init__(self, num_items, branching=2, leaf_items=None):
        self.num_items = _check_int("num_items", num_items, 1)
        self.branching = _check_int("branching", branching, 2)
        self.depth = tree_depth(self.num_items, self.branching)
        ranges, self.children = [np.array([[0, self.num_items]], dtype=np.int64)], []
        slots = np.arange(self.branching)
        for _ in range(self.depth):
            start, stop = ranges[-1][:, 0], ranges[-1][:, 1]
            quotient, remainder = np.divmod(stop - start, self.branching)
            sizes = quotient[:, None] + (slots[None, :] < remainder[:, None])            # [n_l, b]
            present = sizes > 0
            child_start = start[:, None] + np.cumsum(sizes, axis=1) - sizes             # [n_l, b]
            ranges.append(np.stack([child_start[present], (child_start + sizes)[present]], axis=1))
            ids = np.full(sizes.shape, -1, dtype=np.int64)
            ids[present] = np.arange(int(present.sum()))
            self.children.append(ids)
        self.leaf_ranges = ranges
        self.level_sizes = np.array([len(r) for r in ranges], dtype=np.int64)
        slot = np.arange(self.num_items)
        self.leaf_ancestors = np.stack([np.searchsorted(ranges[level][:, 0], slot, side="right") - 1
                                        for level in range(1, self.depth + 1)], axis=1)   # [n, D]
        self.set_leaf_items(np.arange(self.num_items) if leaf_items is None else leaf_items)

    # ---- the assignment of items to leaves ------------------------------------------------
    def set_leaf_items(self, leaf_items):
        """Put item leaf_items[j] on leaf slot j; ValueError unless it is a permutation of 0..n-1."""
        leaf_items = np.asarray(leaf_items)
        if (leaf_items.shape != (self.num_items,) or not np.issubdtype(leaf_items.dtype, np.integer)
                or not np.array_equal(np.sort(leaf_items), np.arange(self.num_items))):
            raise ValueError(f"BalancedTree: leaf_items must be a permutation of the {self.num_items} item "
                             f"indices, got shape {leaf_items.shape} dtype {leaf_items.dtype}")
        self.leaf_items = leaf_items.astype(np.int64)
        self.item_leaf = np.empty_like(self.leaf_items)
        self.item_leaf[self.leaf_items] = np.arange(self.num_items)
        return self

    def item_paths(self):
        """Ancestors of every item at levels 1..D (node ids within each level): int64 [n, D]."""
        return self.leaf_ancestors[self.item_leaf]

    def internal_means(self, vectors):
        """Mean of the item vectors [n, d] under every internal node, levels 1..D-1 in order: [n_internal, d]."""
        vectors = np.asarray(vectors, dtype=np.float64)
        sums = np.concatenate([np.zeros((1, vectors.shape[1])), np.cumsum(vectors[self.leaf_items], axis=0)])
        parts = [(sums[ranges[:, 1]] - sums[ranges[:, 0]]) / (ranges[:, 1] - ranges[:, 0])[:, None]
                 for ranges in self.leaf_ranges[1:-1]]                                     # [n_l, d] per level
        return np.concatenate(parts) if parts else np.zeros((0, vectors.shape[1]))

    @classmethod
    def random(cls, num_items, branching=2, seed=2023):
        """Items on the leaves in a random order."""
        return cls(num_items, branching, np.random.RandomState(seed).permutation(num_items))

    @classmethod
    def from_vectors(cls, vectors, branching=2, seed=2023, iterations=KMEANS_ITERATIONS):
        """Items ordered by recursive balanced k-means over their vectors [n, d] (row i: item i)."""
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or not np.isfinite(vectors).all():
            raise ValueError(f"BalancedTree.from_vectors: vectors must be a finite [n_items, d] array, "
                             f"got shape {vectors.shape}")
        tree = cls(len(vectors), branching)
        rng, order = np.random.RandomState(seed), np.arange(tree.num_items)
        for level in range(tree.depth):
            below = tree.leaf_ranges[level + 1]
            for node, (start, stop) in enumerate(tree.leaf_ranges[level]):
                kids = tree.children[level][node]
                kids = kids[kids >= 0]
                if stop - start <= len(kids):           # one item per child: any order is the same tree
                    continue
                sizes = below[kids, 1] - below[kids, 0]
                items = order[start:stop]
                groups = balanced_kmeans(vectors[items], sizes, rng, iterations)
                order[start:stop] = items[np.argsort(groups, kind="stable")]
        return tree.set_leaf_items(order)

    # ---- file ---------------------------------------------------------------------------
    def save(self, path, checkpoint_hash=None, metadata=None):
        """Write the tree to `path` (.npz) atomically; returns the path."""
        path = os.fspath(path)
        meta = {**(metadata or {}), "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "num_items": self.num_items, "branching": self.branching, "depth": self.depth,
                "checkpoint_hash": checkpoint_hash}
        meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
        arrays = {"leaf_items": self.leaf_items}
        digest = _checksum(arrays, meta_bytes)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, metadata=np.frombuffer(meta_bytes, dtype=np.uint8),
                         sha256=np.frombuffer(digest.encode("ascii"), dtype=np.uint8), **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path, expected_checkpoint_hash=None):
        """(tree, metadata) of a file written by `save`; FileNotFoundError or TreeFileError naming it."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tree file {path!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as archive:
                contents = {name: archive[name] for name in archive.files}
            meta_bytes, stored = contents.pop("metadata").tobytes(), contents.pop("sha256").tobytes().decode("ascii")
            arrays = {"leaf_items": contents.pop("leaf_items")}
        except (OSError, ValueError, EOFError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as err:
            raise TreeFileError(f"tree file {path!r} is corrupt or not a tree file: {type(err).__name__}: "
                                f"{err}") from None
        if contents or _checksum(arrays, meta_bytes) != stored:
            raise TreeFileError(f"tree file {path!r} failed its sha256 check: the file is corrupt or was modified")
        meta = json.loads(meta_bytes.decode("utf-8"))
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
            raise TreeFileError(f"tree file {path!r} has format {meta.get('format')!r} "
                                f"v{meta.get('format_version')}, expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
        if expected_checkpoint_hash is not None and meta.get("checkpoint_hash") != expected_checkpoint_hash:
            raise TreeFileError(f"tree file {path!r} was written for checkpoint {meta.get('checkpoint_hash')!r}, "
                                f"expected {expected_checkpoint_hash!r}")
        return cls(meta["num_items"], meta["branching"], arrays["leaf_items"]), meta


def balanced_kmeans(vectors, sizes, rng, iterations=KMEANS_ITERATIONS):
    """Cluster of each of m vectors [m, d] into len(sizes) clusters of exactly `sizes` members (sum m)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    centroids = vectors[rng.choice(len(vectors), len(sizes), replace=False)]          # [c, d]
    groups = None
    for _ in range(iterations):
        distances = ((vectors[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)      # [m, c]
        new_groups = capacity_assign(distances, sizes)
        if groups is not None and np.array_equal(new_groups, groups):
            break
        groups = new_groups
        centroids = np.stack([vectors[groups == j].mean(0) for j in range(len(sizes))])
    return groups


def capacity_assign(distances, sizes):
    """Assign each row of distances [m, c] to a column, column j taking exactly sizes[j] rows.

    Every free row goes to its nearest open column; a column offered more rows than it has room for keeps
    those whose distance to it is smallest relative to their next open column, and the others try again.
    Each round fills a column or places every row, so at most c rounds.
    """
    m, c = distances.shape
    groups, room = np.full(m, -1, dtype=np.int64), np.array(sizes, dtype=np.int64)
    while (groups < 0).any():
        free = np.flatnonzero(groups < 0)
        open_distances = np.where(room[None, :] > 0, distances[free], np.inf)          # [f, c]
        best = open_distances.argmin(1)
        for column in np.unique(best):
            rows = free[best == column]
            if len(rows) > room[column]:
                others = open_distances[best == column].copy()
                others[:, column] = np.inf
                margin = distances[rows, column] - others.min(1)          # -inf: no other open column
                rows = rows[np.argsort(margin, kind="stable")[:room[column]]]
            groups[rows] = column
            room[column] -= len(rows)
    return groups
