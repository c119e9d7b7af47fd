"""SparCode sparse inverted index: structure, build from a score function, query (paper Sec. 3.3, Eq. 11, 15).

The index sees the model only through a score function ``score_fn(keys, item_start, item_stop)``
returning the raw code-item scores S (before the ReLU) of a block of keys against a block of items
(model_zoo/retrieval/score_blocks.py). A key is a full code tuple (k_1, .., k_M) packed into one int64
(model_zoo/retrieval/code_keys.py).

Build: for every key of the key set, relu(S + b~) (Eq. 15, b~ = ``sparsity_bias``) is computed
against every item in [key_block, item_block] blocks; only positive entries are kept, optionally
capped at the top-L per key. Cost is linear in keys x items; memory holds one score block plus the
kept postings. b~ for a target sparsity and the size estimate are in sparsity.py.

Storage: CSR over the sorted key array: ``indptr`` int64 [n_keys + 1], ``items`` int32 [nnz]
(item_index space, ascending within a key), ``scores`` float16|float32 [nnz] (all > 0). ``write`` /
``read`` use the file format of index_io.py.

Query (Eq. 11 through the index): the user's K_u keys -> sum of their posting lists (a key that occurs
twice counts twice), masked items removed, top-k by score desc then item id asc. Items in none of the
K_u posting lists have score 0 and are never returned; unfilled slots are -inf / -1. With b~ = the
trained b, float32 storage and no top-L cap, the result is exactly the top-k of the model's Eq. 11
scores among items with a positive score. Kernels live in ``_merge.py``: ``backend="auto"`` uses numba
when it is installed (about 5x faster at batch 1, benchmarks/results/retrieval_latency.md), else numpy;
both return identical results.

A query key outside an "observed" key set is handled by the index's ``unseen_key`` policy
(UNSEEN_KEY_POLICIES, the one vocabulary of the config key ``unseen_key``):
- "nearest": replaced by the indexed key whose reconstructed token (concatenation of its M codewords)
  is nearest in squared L2 distance, i.e. the key minimising sum_m ||C_m[k_m] - C_m[k'_m]||^2 (ties:
  smallest key). Needs the codebooks [M, N, D/M] (passed to ``build`` / the constructor, stored in the file).
- "skip": the key contributes nothing (its token adds 0 to every item, like an empty list).
- "score": the key is scored with the model and its postings added before the query
  (``index.add(score_fn, keys)``: exact); a query that still meets an unindexed key is an error naming it.
With key set "all" every valid key is indexed; a key outside [0, N^M) is always an error.

Thread safety: queries reuse per-thread scratch buffers (threading.local), so one index can be
searched from several threads; ``add`` must not run while another thread searches the same index.
"""
import copy
import json
import math
import os
import threading
import time

import numpy as np
from tqdm import tqdm

from ..config import SCORE_DTYPES, UNSEEN_KEY_POLICIES
from . import _merge
from .code_keys import KEY_SET_KINDS, key_space, pack_codes, unpack_keys
from .index_io import SparseIndexFileError, read_index_file, write_index_file
from .score_blocks import TorchThreads, check_keys, iter_score_blocks

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_INT32_MAX = int(np.iinfo(np.int32).max)
_NEAREST_CACHE_SIZE = 100_000
_EMPTY_MASK = np.empty(0, dtype=np.int64)


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int{' or None' if allow_none else ''}")
    return int(value)


def _check_n_items(n_items):
    n_items = _positive_int("n_items", n_items)
    if n_items > _INT32_MAX:
        raise ValueError(f"n_items={n_items} exceeds the int32 item ids of the index; expected at most 2^31 - 1")
    return n_items


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}; expected a positive int")


def _postings_of_block(rows, cols, vals, n_rows, top_l, score_dtype):
    """Entries (row, item, score) of one key block -> per-key postings sorted by item.

    Returns (lengths int64 [n_rows], items int32 [nnz], scores score_dtype [nnz]).
    """
    if top_l is not None:
        order = np.lexsort((cols, -vals, rows))                                          # by key, score desc, item asc
        rows, cols, vals = rows[order], cols[order], vals[order]
        starts = np.searchsorted(rows, np.arange(n_rows))                                # first entry of each key
        keep = np.arange(rows.size) - starts[rows] < top_l
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, rows))                                                     # by key, item asc
    rows, cols, vals = rows[order], cols[order], vals[order]
    if score_dtype == "float16":
        if vals.size and vals.max() > _FLOAT16_MAX:
            raise ValueError(f"a sparse score {vals.max():.6g} exceeds the float16 range (max {_FLOAT16_MAX}); "
                             f"use score_dtype='float32'")
        vals = vals.astype(np.float16)
        nonzero = vals > 0                                                               # tiny scores round to 0
        rows, cols, vals = rows[nonzero], cols[nonzero], vals[nonzero]
    return np.bincount(rows, minlength=n_rows), cols.astype(np.int32), vals


class SparseCodeIndex:
    """Sparse inverted index from code keys to (item, relu(S + b~)) postings.

    Usually created by ``SparseCodeIndex.build`` or ``SparseCodeIndex.read``; the constructor takes
    ready CSR arrays and checks their structure.

    Args:
        keys: int64 [n_keys], sorted, unique packed keys (rows of the CSR).
        indptr: int64 [n_keys + 1] CSR row pointer.
        items: int32 [nnz] item ids (item_index space), ascending within each row.
        scores: float16|float32 [nnz] sparse scores, all > 0 and finite.
        num_codebooks: M.
        codebook_size: N.
        n_items: size of the item corpus the postings refer to.
        num_query_tokens: K_u of the model (None: not checked at query time).
        sparsity_bias: b~ used at build time.
        top_l: posting-list cap used at build time (None: no cap).
        key_set_kind: "all" (keys == all N^M keys) or "observed".
        checkpoint_hash: identifier of the model checkpoint the scores come from.
        build_seconds: wall time of the build.
        codebooks: optional float [M, N, D/M] codebooks, needed by unseen_key="nearest".
        unseen_key: one of UNSEEN_KEY_POLICIES (see the module docstring).
        backend: "auto" (numba if installed), "numpy" or "numba" merge kernel.
        extra_metadata: optional JSON-serialisable dict stored with the index (e.g. the model name).
    """

    def __init__(self, keys=None, indptr=None, items=None, scores=None, num_codebooks=None,
                 codebook_size=None, n_items=None, num_query_tokens=None, sparsity_bias=0.0,
                 top_l=None, key_set_kind="all", checkpoint_hash="", build_seconds=0.0,
                 codebooks=None, unseen_key="nearest", backend="auto", extra_metadata=None):
        if keys is None or indptr is None or items is None or scores is None:
            raise ValueError("keys, indptr, items and scores are required (use SparseCodeIndex.build or .read)")
        self.backend = backend  # property: resolved
        self.unseen_key = unseen_key  # property: one of UNSEEN_KEY_POLICIES
        self.num_key_space = key_space(num_codebooks, codebook_size)
        self.num_codebooks = int(num_codebooks)
        self.codebook_size = int(codebook_size)
        self.n_items = _check_n_items(n_items)
        self.num_query_tokens = _positive_int("num_query_tokens", num_query_tokens, allow_none=True)
        self.sparsity_bias = float(sparsity_bias)
        self.top_l = None if top_l is None else int(top_l)
        if key_set_kind not in KEY_SET_KINDS:
            raise ValueError(f"key_set_kind={key_set_kind!r}; expected one of {list(KEY_SET_KINDS)}")
        self.key_set_kind = key_set_kind
        self.checkpoint_hash = str(checkpoint_hash)
        self.build_seconds = float(build_seconds)
        self.extra_metadata = dict(extra_metadata or {})
        try:
            json.dumps(self.extra_metadata)
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra_metadata must be JSON-serialisable: {err}") from err
        for name, array in (("keys", keys), ("indptr", indptr), ("items", items)):
            if not np.issubdtype(np.asarray(array).dtype, np.integer):
                raise ValueError(f"{name} must be an integer array, got dtype {np.asarray(array).dtype}")
        items = np.asarray(items)
        if items.size and (items.min() < 0 or items.max() >= self.n_items):  # before the int32 cast
            raise ValueError(f"item ids must be in [0, n_items={self.n_items}), found range "
                             f"[{items.min()}, {items.max()}]")
        scores = np.asarray(scores)
        if scores.dtype.name not in SCORE_DTYPES:
            raise ValueError(f"scores dtype must be one of {list(SCORE_DTYPES)}, got {scores.dtype}")
        self._set_arrays(keys, indptr, items, scores)
        self.codebooks = None if codebooks is None else np.ascontiguousarray(codebooks, dtype=np.float32)
        self._validate_arrays()
        self._local = threading.local()
        self._nearest_lock = threading.Lock()
        self._distance_tables = None  # [M, N, N] squared codeword distances, built lazily

    def _set_arrays(self, keys, indptr, items, scores):
        """Install the CSR arrays and reset everything derived from them."""
        self.keys = np.ascontiguousarray(keys, dtype=np.int64)                          # [n_keys]
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)                      # [n_keys + 1]
        self.items = np.ascontiguousarray(items, dtype=np.int32)                        # [nnz]
        self.scores = np.ascontiguousarray(scores)                                      # [nnz]
        self.score_dtype = self.scores.dtype.name
        self._identity_rows = self.key_set_kind == "all"
        self._kernel_scores = _merge.kernel_scores_view(self.scores)
        self._nearest_cache = {}
        self._indexed_codes = None  # [n_keys, M], built lazily

    # ------------------------------------------------------------------ validation / properties

    def _validate_arrays(self):
        n_keys = self.keys.shape[0]
        if self.keys.ndim != 1 or n_keys == 0:
            raise ValueError(f"keys must be a non-empty 1-D array, got shape {self.keys.shape}")
        if n_keys > 1 and not (np.diff(self.keys) > 0).all():
            raise ValueError("keys must be sorted ascending and unique")
        if self.keys[0] < 0 or int(self.keys[-1]) >= self.num_key_space:
            raise ValueError(f"keys must be in [0, N^M = {self.num_key_space}), found range "
                             f"[{self.keys[0]}, {self.keys[-1]}]")
        if self.key_set_kind == "all" and (n_keys != self.num_key_space):
            raise ValueError(f"key_set_kind='all' needs all N^M = {self.num_key_space} keys, got {n_keys}")
        if self.indptr.shape != (n_keys + 1,):
            raise ValueError(f"indptr must have shape ({n_keys + 1},) for {n_keys} keys, got {self.indptr.shape}")
        nnz = self.items.shape[0]
        if self.indptr[0] != 0 or self.indptr[-1] != nnz or (np.diff(self.indptr) < 0).any():
            raise ValueError(f"indptr must start at 0, be non-decreasing and end at nnz={nnz}")
        if self.scores.shape != (nnz,) or self.items.ndim != 1:
            raise ValueError(f"items and scores must be 1-D of equal length, got {self.items.shape} "
                             f"and {self.scores.shape}")
        if nnz:
            if not (np.isfinite(self.scores).all() and (self.scores > 0).all()):
                raise ValueError("posting scores must be finite and > 0")
            ascending = np.diff(self.items) > 0                                          # [nnz - 1]
            row_starts = self.indptr[1:-1]
            row_starts = row_starts[(row_starts > 0) & (row_starts < nnz)]
            ascending[row_starts - 1] = True  # no order between the end of a row and the next row
            if not ascending.all():
                raise ValueError("item ids must be strictly ascending (unique) within each key's posting list")
        if self.codebooks is not None and (self.codebooks.ndim != 3 or self.codebooks.shape[:2] != (
                self.num_codebooks, self.codebook_size) or not np.isfinite(self.codebooks).all()):
            raise ValueError(f"codebooks must be a finite array [M={self.num_codebooks}, N={self.codebook_size}, "
                             f"D/M], got shape {self.codebooks.shape}")

    @property
    def unseen_key(self):
        return self._unseen_key

    @unseen_key.setter
    def unseen_key(self, policy):
        if policy not in UNSEEN_KEY_POLICIES:
            raise ValueError(f"unseen_key={policy!r}; expected one of {list(UNSEEN_KEY_POLICIES)}")
        self._unseen_key = policy

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, backend):
        self._backend = _merge.resolve_backend(backend)

    @property
    def n_keys(self):
        return int(self.keys.shape[0])

    @property
    def nnz(self):
        return int(self.items.shape[0])

    def __len__(self):
        return self.n_keys

    def __repr__(self):
        return (f"SparseCodeIndex(M={self.num_codebooks}, N={self.codebook_size}, n_keys={self.n_keys} "
                f"({self.key_set_kind}), n_items={self.n_items}, nnz={self.nnz}, b~={self.sparsity_bias:g}, "
                f"top_l={self.top_l}, dtype={self.score_dtype}, backend={self.backend})")

    def copy(self):
        """An independent index sharing the (never modified in place) arrays: ``add`` on it leaves self as is."""
        clone = copy.copy(self)
        clone.extra_metadata = dict(self.extra_metadata)
        clone._local = threading.local()
        clone._nearest_lock = threading.Lock()
        clone._nearest_cache = {}
        return clone

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, score_fn, keys, n_items, sparsity_bias, top_l=None, key_block=256, item_block=16384,
              score_dtype="float32", num_threads=None, progress=False, *, num_codebooks, codebook_size,
              num_query_tokens=None, key_set_kind=None, checkpoint_hash="", codebooks=None,
              unseen_key="nearest", backend="auto", extra_metadata=None):
        """Build the index: postings relu(S + b~) > 0 for every key x item, optional top-L per key.

        Args:
            score_fn: callable(keys_block int64 [kb], item_start, item_stop) -> torch or numpy float
                [kb, item_stop - item_start] raw scores S (before the ReLU). Called under
                torch.no_grad(), key blocks in ascending key order.
            keys: int [n_keys] packed keys to index (sorted and de-duplicated here).
            n_items: number of items (item ids 0..n_items-1).
            sparsity_bias: b~ of Eq. 15 (the trained b reproduces the model's scores exactly).
            top_l: keep at most this many items per key (largest scores, ties: smaller item id);
                None keeps every positive entry.
            key_block, item_block: score block shape; memory ~ 4 bytes x key_block x item_block.
            score_dtype: "float32" or "float16" storage of the posting scores. float16 entries that
                round to 0 are dropped; a score above the float16 range is an error. float32 keeps
                the model's relu(S + b~) exactly; float16 rounds it (relative error <= 2^-11).
            num_threads: torch.set_num_threads for scoring (restored afterwards); None: unchanged.
            progress: tqdm progress bar over blocks.
            num_codebooks, codebook_size: M and N of the quantizer.
            num_query_tokens: K_u (stored; checked at query time when set).
            key_set_kind: "all" / "observed"; None infers "all" iff keys are all N^M keys.
            checkpoint_hash: identifier of the model checkpoint (checked by ``read``).
            codebooks: optional float [M, N, D/M], used by unseen_key="nearest".
            unseen_key: one of UNSEEN_KEY_POLICIES.
            backend: query kernel, "auto" | "numpy" | "numba".
            extra_metadata: JSON-serialisable dict stored with the index.

        Returns:
            SparseCodeIndex.
        """
        started = time.perf_counter()
        n_all = key_space(num_codebooks, codebook_size)
        keys = np.unique(check_keys(keys))                                               # sorted unique [n_keys]
        if keys.size == 0:
            raise ValueError("keys is empty; expected at least one key to index")
        if keys[0] < 0 or int(keys[-1]) >= n_all:
            raise ValueError(f"keys must be in [0, N^M = {n_all}), found range [{keys[0]}, {keys[-1]}]")
        if key_set_kind is None:
            key_set_kind = "all" if keys.size == n_all else "observed"
        n_items = _check_n_items(n_items)
        if key_set_kind == "observed" and unseen_key == "nearest" and codebooks is None:
            raise ValueError("unseen_key='nearest' on an 'observed' key set needs the codebooks [M, N, D/M]; "
                             "pass codebooks= or use unseen_key='skip'")
        bias = np.float32(sparsity_bias)
        n_blocks = math.ceil(keys.size / key_block) * math.ceil(n_items / item_block)
        lengths = np.zeros(keys.size, dtype=np.int64)                                    # [n_keys] postings per key
        item_parts, score_parts = [], []
        block_rows, block_items, block_vals = [], [], []

        def flush(key_start):
            """Turn the entries collected for the key block starting at key_start into postings."""
            n_rows = min(key_block, keys.size - key_start)
            rows = np.concatenate(block_rows) if block_rows else np.empty(0, np.int64)
            cols = np.concatenate(block_items) if block_items else np.empty(0, np.int64)
            vals = np.concatenate(block_vals) if block_vals else np.empty(0, np.float32)
            block_rows.clear(), block_items.clear(), block_vals.clear()
            lengths[key_start:key_start + n_rows], items, scores = _postings_of_block(rows, cols, vals, n_rows,
                                                                                      top_l, score_dtype)
            item_parts.append(items)
            score_parts.append(scores)

        with TorchThreads(num_threads), tqdm(total=n_blocks, desc="sparse index", unit="block",
                                             disable=not progress) as bar:
            current_key_start = 0
            for key_start, item_start, block in iter_score_blocks(score_fn, keys, n_items, key_block,
                                                                  item_block, bar):
                if key_start != current_key_start:
                    flush(current_key_start)
                    current_key_start = key_start
                sparse = block + bias                                                    # [kb, ib] Eq. 15 before relu
                positive = sparse > 0                                                    # [kb, ib]
                if top_l is not None and block.shape[1] > top_l:
                    # keep entries >= the top_l-th largest of their row (ties kept; cut in flush)
                    kth = -np.partition(-sparse, top_l - 1, axis=1)[:, top_l - 1]        # [kb]
                    positive &= sparse >= kth[:, None]
                rows, cols = np.nonzero(positive)
                block_rows.append(rows.astype(np.int64))
                block_items.append(cols.astype(np.int64) + item_start)
                block_vals.append(sparse[rows, cols])
            flush(current_key_start)

        indptr = np.zeros(keys.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        items = np.concatenate(item_parts)
        scores = np.concatenate(score_parts).astype(score_dtype, copy=False)
        return cls(keys=keys, indptr=indptr, items=items, scores=scores, num_codebooks=num_codebooks,
                   codebook_size=codebook_size, n_items=n_items, num_query_tokens=num_query_tokens,
                   sparsity_bias=float(sparsity_bias), top_l=top_l, key_set_kind=key_set_kind,
                   checkpoint_hash=checkpoint_hash, build_seconds=time.perf_counter() - started,
                   codebooks=codebooks, unseen_key=unseen_key, backend=backend, extra_metadata=extra_metadata)

    def add(self, score_fn, keys, key_block=256, item_block=16384, num_threads=None, progress=False):
        """Score ``keys`` not yet indexed with the index's b~, top-L and dtype and merge their postings in.

        The index is changed in place (use ``copy()`` first to keep the original); the key set kind
        becomes "observed". Returns self.

        Args:
            score_fn: as in ``build``.
            keys: int [n] keys; indexed ones are ignored.
            key_block, item_block, num_threads, progress: as in ``build``.
        """
        new_keys = np.setdiff1d(check_keys(keys), self.keys)
        if new_keys.size == 0:
            return self
        extra = SparseCodeIndex.build(score_fn, new_keys, self.n_items, self.sparsity_bias, top_l=self.top_l,
                                      key_block=key_block, item_block=item_block, score_dtype=self.score_dtype,
                                      num_threads=num_threads, progress=progress, num_codebooks=self.num_codebooks,
                                      codebook_size=self.codebook_size, key_set_kind="observed", unseen_key="skip",
                                      backend="numpy")
        keys = np.concatenate([self.keys, extra.keys])                                   # [n1 + n2]
        order = np.argsort(keys, kind="stable")
        starts = np.concatenate([self.indptr[:-1], extra.indptr[:-1] + self.nnz])[order]  # [n1 + n2]
        lengths = np.concatenate([np.diff(self.indptr), np.diff(extra.indptr)])[order]
        indptr = np.zeros(keys.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])        # [nnz1 + nnz2]
        items = np.concatenate([self.items, extra.items])[gather]
        scores = np.concatenate([self.scores, extra.scores])[gather]
        self.key_set_kind = "observed"
        self._set_arrays(keys[order], indptr, items, scores)
        self.build_seconds += extra.build_seconds
        self._validate_arrays()
        return self

    # ------------------------------------------------------------------ statistics

    def stats(self):
        """Index statistics of paper Sec. 4.4 plus size and build time.

        The paper writes M^N in the denominators; it means the number of indexed codes, so here
        the denominator is n_keys (N^M for the key set "all", the observed keys otherwise):

            Sparsity      = 1 - nnz / (n_keys * n_items)   (share of code-item scores not cached)
            Average Items = nnz / n_keys                     (cached scores per code)

        Returns:
            dict with "Sparsity", "Average Items", "nnz", "n_keys", "n_items", "max_items",
            "empty_keys", "index_bytes" (the stored arrays: keys, indptr, items, scores, codebooks)
            and "build_seconds".
        """
        lengths = np.diff(self.indptr)                                                   # [n_keys]
        arrays = [self.keys, self.indptr, self.items, self.scores]
        if self.codebooks is not None:
            arrays.append(self.codebooks)
        return {
            "Sparsity": 1.0 - self.nnz / (self.n_keys * self.n_items),
            "Average Items": self.nnz / self.n_keys,
            "nnz": self.nnz,
            "n_keys": self.n_keys,
            "n_items": self.n_items,
            "max_items": int(lengths.max()),
            "empty_keys": int((lengths == 0).sum()),
            "index_bytes": int(sum(a.nbytes for a in arrays)),
            "build_seconds": self.build_seconds,
        }

    def postings(self, key):
        """(items int32 [L], scores [L]) of one indexed key (KeyError if not indexed)."""
        row = int(np.searchsorted(self.keys, key))
        if row >= self.n_keys or self.keys[row] != key:
            raise KeyError(f"key {key} is not in the index")
        start, stop = self.indptr[row], self.indptr[row + 1]
        return self.items[start:stop], self.scores[start:stop]

    # ------------------------------------------------------------------ key -> row

    def _nearest_rows(self, unseen):
        """Rows of the nearest indexed keys for an array of unseen keys (codeword distance)."""
        if self.codebooks is None:
            raise ValueError(f"key {int(unseen[0])} is not in the index and unseen_key='nearest' needs the "
                             f"codebooks, which this index does not hold; rebuild with codebooks= or set "
                             f"index.unseen_key = 'skip'")
        with self._nearest_lock:
            if self._distance_tables is None:
                cb = self.codebooks.astype(np.float64)  # [M, N, d]
                sq = (cb ** 2).sum(-1)  # [M, N]
                self._distance_tables = np.maximum(
                    sq[:, :, None] + sq[:, None, :] - 2 * np.einsum("mid,mjd->mij", cb, cb), 0.0)  # [M, N, N]
            if self._indexed_codes is None:  # reset by add()
                self._indexed_codes = unpack_keys(self.keys, self.codebook_size, self.num_codebooks)  # [n_keys, M]
            rows = np.empty(unseen.shape[0], dtype=np.int64)
            for t, key in enumerate(unseen.tolist()):
                row = self._nearest_cache.get(key)
                if row is None:
                    codes = unpack_keys(np.array([key]), self.codebook_size, self.num_codebooks)[0]  # [M]
                    dist = np.zeros(self.n_keys, dtype=np.float64)  # [n_keys]
                    for m in range(self.num_codebooks):
                        dist += self._distance_tables[m, codes[m]][self._indexed_codes[:, m]]
                    row = int(np.argmin(dist))  # keys are sorted: first minimum = smallest key
                    if len(self._nearest_cache) >= _NEAREST_CACHE_SIZE:
                        self._nearest_cache.clear()
                    self._nearest_cache[key] = row
                rows[t] = row
        return rows

    def _rows_for(self, query_keys):
        """CSR rows for int64 keys of any shape; -1 for skipped unseen keys."""
        flat = query_keys.reshape(-1)
        if flat.size and (flat.min() < 0 or int(flat.max()) >= self.num_key_space):
            bad = flat[(flat < 0) | (flat >= self.num_key_space)][0]
            raise ValueError(f"query key {bad} is outside [0, N^M = {self.num_key_space})")
        if self._identity_rows:
            return query_keys
        pos = np.searchsorted(self.keys, flat)
        found = self.keys[np.minimum(pos, self.n_keys - 1)] == flat
        rows = np.where(found, pos, -1).astype(np.int64)
        if not found.all():
            rows = self._resolve_unseen(flat, rows, ~found)
        return rows.reshape(query_keys.shape)

    def _resolve_unseen(self, flat, rows, unseen_mask):
        """Rows for the query keys that are not indexed, following the unseen_key policy."""
        if self._unseen_key == "skip":
            rows[unseen_mask] = -1
        elif self._unseen_key == "nearest":
            rows[unseen_mask] = self._nearest_rows(flat[unseen_mask])
        else:
            raise ValueError(f"query key {int(flat[unseen_mask][0])} is not in the index and unseen_key='score': "
                             f"add the query keys first with index.add(score_fn, keys)")
        return rows

    def _as_query_keys(self, query_keys, ndim):
        """Accept packed keys (ndim dims) or codes (ndim + 1 dims, last = M); return int64 keys."""
        if (type(query_keys) is np.ndarray and query_keys.dtype == np.int64 and query_keys.ndim == ndim
                and query_keys.flags.c_contiguous
                and (self.num_query_tokens is None or query_keys.shape[-1] == self.num_query_tokens)):
            return query_keys  # fast path for search_one; key ranges are checked downstream
        query_keys = np.asarray(query_keys)
        if query_keys.ndim == ndim + 1 and query_keys.shape[-1] == self.num_codebooks:
            query_keys = pack_codes(query_keys, self.codebook_size)
        if query_keys.ndim != ndim or not np.issubdtype(query_keys.dtype, np.integer):
            shape = "[B, K_u]" if ndim == 2 else "[K_u]"
            raise ValueError(f"query keys must be an integer array {shape} (or codes {shape[:-1]}, M]), "
                             f"got dtype {query_keys.dtype} shape {query_keys.shape}")
        if self.num_query_tokens is not None and query_keys.shape[-1] != self.num_query_tokens:
            raise ValueError(f"got {query_keys.shape[-1]} keys per query, the index was built for "
                             f"K_u={self.num_query_tokens}")
        return np.ascontiguousarray(query_keys, dtype=np.int64)

    def _kernel_rows(self, query):
        """(rows, min_row) for the numba kernels: the kernel rejects rows outside [min_row, n_keys).

        Key set "all": the keys are the rows (min_row 0, so a negative key is an error). Otherwise a
        compiled binary search; unseen keys take the slow path (_rows_for: policy, range errors).
        """
        if self._identity_rows:
            return query, 0
        rows = np.empty(query.shape, dtype=np.int64)
        if _merge.lookup_rows_numba(self.keys, query.reshape(-1), rows.reshape(-1)):
            rows = np.ascontiguousarray(self._rows_for(query), dtype=np.int64)
        return rows, -1

    def _buffers(self):
        """Per-thread scratch: float64 accumulator [n_items] (all zeros) and candidate ids."""
        local = self._local
        acc = getattr(local, "acc", None)
        if acc is None:
            local.acc = acc = np.zeros(self.n_items, dtype=np.float64)
            local.cand = np.empty(self.n_items, dtype=np.int64)
        return acc, local.cand

    # ------------------------------------------------------------------ query

    def search_one(self, keys, k, mask=None):
        """Top-k items for one query (the fast path).

        Args:
            keys: int [K_u] packed keys of the query tokens (or codes [K_u, M]).
            k: number of results.
            mask: optional int array of item ids to exclude.

        Returns:
            (scores float32 [k], ids int64 [k]); unfilled slots -inf / -1.
        """
        _check_k(k)
        query = self._as_query_keys(keys, 1)  # [K_u]
        if self._backend == "numba":
            rows, min_row = self._kernel_rows(query)  # [K_u]
            mask = _EMPTY_MASK if mask is None else np.ascontiguousarray(mask, dtype=np.int64).reshape(-1)
            acc, cand = self._buffers()
            out_scores = np.empty(k, dtype=np.float32)
            out_ids = np.empty(k, dtype=np.int64)
            status = _merge.query_one_numba(rows, min_row, self.indptr, self.items, self._kernel_scores, mask, k,
                                            acc, cand, out_scores, out_ids)
            if status != _merge.STATUS_OK:
                self._raise_kernel_error(status, query, mask)
            return out_scores, out_ids
        rows = self._rows_for(query)
        if mask is not None:
            mask = np.asarray(mask).reshape(-1)
            self._check_mask(mask)
        acc, _ = self._buffers()
        return _merge.query_numpy(rows.tolist(), self.indptr, self.items, self.scores, mask, k, acc)

    def search(self, query_keys, k, mask_indptr=None, mask_items=None, row_offset=0):
        """Top-k items for a batch of queries.

        Args:
            query_keys: int [B, K_u] packed keys (or codes [B, K_u, M]).
            k: results per query.
            mask_indptr, mask_items: CSR mask over users (item_index space) or None; query b uses
                mask row row_offset + b.
            row_offset: mask row of the first query.

        Returns:
            (scores float32 [B, k], ids int64 [B, k]); unfilled slots -inf / -1.
        """
        _check_k(k)
        query = self._as_query_keys(query_keys, 2)  # [B, K_u]
        n_queries = query.shape[0]
        numba_path = self._backend == "numba"
        if numba_path:
            rows, min_row = self._kernel_rows(query)  # [B, K_u]; key ranges checked by the kernel
        else:
            rows = self._rows_for(query)  # [B, K_u]
        if (mask_indptr is None) != (mask_items is None):
            raise ValueError("mask_indptr and mask_items must be given together (or both None)")
        if mask_indptr is not None:
            mask_indptr = np.asarray(mask_indptr)
            if row_offset < 0 or row_offset + n_queries > mask_indptr.shape[0] - 1:
                raise ValueError(f"rows [{row_offset}, {row_offset + n_queries}) are outside the mask's "
                                 f"{mask_indptr.shape[0] - 1} users")
            start, stop = int(mask_indptr[row_offset]), int(mask_indptr[row_offset + n_queries])
            local_indptr = mask_indptr[row_offset:row_offset + n_queries + 1].astype(np.int64) - start  # [B+1]
            local_items = np.ascontiguousarray(np.asarray(mask_items)[start:stop], dtype=np.int64)
            if not numba_path:  # the numba kernel checks the mask range itself
                self._check_mask(local_items)
        out_scores = np.empty((n_queries, k), dtype=np.float32)
        out_ids = np.empty((n_queries, k), dtype=np.int64)
        acc, cand = self._buffers()
        if numba_path:
            if mask_indptr is None:
                local_indptr, local_items = _EMPTY_MASK, _EMPTY_MASK
            status, _ = _merge.query_batch_numba(rows, min_row, self.indptr, self.items, self._kernel_scores,
                                                 local_indptr, local_items, 0, k, acc, cand,
                                                 out_scores, out_ids)
            if status != _merge.STATUS_OK:
                self._raise_kernel_error(status, query, local_items)
            return out_scores, out_ids
        for b in range(n_queries):
            mask = None if mask_indptr is None else local_items[local_indptr[b]:local_indptr[b + 1]]
            out_scores[b], out_ids[b] = _merge.query_numpy(rows[b].tolist(), self.indptr, self.items,
                                                           self.scores, mask, k, acc)
        return out_scores, out_ids

    def _check_mask(self, mask):
        if mask.size and (mask.min() < 0 or mask.max() >= self.n_items):
            raise ValueError(f"mask items must be in [0, n_items={self.n_items}), found range "
                             f"[{mask.min()}, {mask.max()}]")

    def _raise_kernel_error(self, status, query, mask):
        if status == _merge.STATUS_BAD_MASK_ITEM:
            self._check_mask(np.asarray(mask))
        self._rows_for(query)  # raises the descriptive error for a bad key
        raise RuntimeError(f"sparse index kernel failed with status {status}")  # unreachable in practice

    # ------------------------------------------------------------------ persistence

    def metadata(self):
        """JSON-ready metadata stored in the index file (index_io adds the format name and version)."""
        return {
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "num_query_tokens": self.num_query_tokens,
            "n_items": self.n_items,
            "n_keys": self.n_keys,
            "nnz": self.nnz,
            "sparsity_bias": self.sparsity_bias,
            "top_l": self.top_l,
            "key_set_kind": self.key_set_kind,
            "checkpoint_hash": self.checkpoint_hash,
            "build_seconds": self.build_seconds,
            "score_dtype": self.score_dtype,
            "unseen_key": self.unseen_key,
            "extra": self.extra_metadata,
        }

    def write(self, path):
        """Write the index to one .npz file atomically (format: index_io.py). Returns the path."""
        arrays = {"keys": self.keys, "indptr": self.indptr, "items": self.items, "scores": self.scores}
        if self.codebooks is not None:
            arrays["codebooks"] = self.codebooks
        return write_index_file(path, arrays, self.metadata())

    @classmethod
    def read(cls, path, expected_checkpoint_hash=None, backend="auto"):
        """Load an index written by ``write``.

        Args:
            path: the .npz file.
            expected_checkpoint_hash: if given, the file must have been built for this checkpoint.
            backend: query kernel, "auto" | "numpy" | "numba".

        Raises:
            FileNotFoundError: no file at path.
            SparseIndexFileError: not an index file, unreadable, checksum mismatch (tampered / corrupt),
                another format version, or arrays and metadata that do not form an index.
            SparseIndexMismatchError: built for another checkpoint than expected_checkpoint_hash.
        """
        arrays, metadata = read_index_file(path, expected_checkpoint_hash)
        try:
            return cls(keys=arrays["keys"], indptr=arrays["indptr"], items=arrays["items"], scores=arrays["scores"],
                       num_codebooks=metadata["num_codebooks"], codebook_size=metadata["codebook_size"],
                       n_items=metadata["n_items"], num_query_tokens=metadata["num_query_tokens"],
                       sparsity_bias=metadata["sparsity_bias"], top_l=metadata["top_l"],
                       key_set_kind=metadata["key_set_kind"], checkpoint_hash=metadata["checkpoint_hash"],
                       build_seconds=metadata["build_seconds"], codebooks=arrays.get("codebooks"),
                       unseen_key=metadata["unseen_key"], backend=backend, extra_metadata=metadata.get("extra"))
        except (KeyError, ValueError, TypeError) as err:
            raise SparseIndexFileError(f"sparse index file {os.fspath(path)!r} is inconsistent: "
                                       f"{type(err).__name__}: {err}") from err
