"""SparCode sparse inverted index (paper Sec. 3.3, Eq. 15; statistics of Sec. 4.4).

Model-independent core: the index only sees a score function ``score_fn(keys, start, stop)``
that returns the raw code-item scores S (before the ReLU) of a block of keys against items
start..stop-1. A *key* is a full code tuple (k_1, .., k_M), k_m in [0, N), packed into one int64:

    key = sum_m k_m * N ** (M - 1 - m)           (pack_codes / unpack_keys)

Build: for every key of the key set, the sparse score relu(S + b~) (Eq. 15, b~ = ``sparsity_bias``,
the "sparsity control") is computed against every item in [key_block, item_block] blocks; only
positive entries are kept, optionally capped at the top-L per key. Cost is linear in keys x items;
memory holds one score block plus the kept postings.

Storage: CSR over the sorted key array: ``indptr`` int64 [n_keys + 1], ``items`` int32 [nnz]
(item_index space, ascending within a key), ``scores`` float16|float32 [nnz] (all > 0).
``write`` puts the arrays, a JSON metadata string and a sha256 checksum in one .npz file,
atomically; ``read`` refuses missing, corrupt, tampered or other-checkpoint files with an error
naming the file.

Query (Eq. 11 through the index): the user's K_u keys -> sum of their posting lists (a key that
occurs twice counts twice), masked items removed, top-k by score desc then item id asc. Items in
none of the K_u posting lists have score 0 and are never returned; unfilled slots are -inf / -1.
With b~ = the trained b, float32 storage and no top-L cap, the result is exactly the top-k of the
model's Eq. 11 scores (among items with a positive score). Kernels live in ``_merge.py``:
``backend="auto"`` uses numba when it is installed (needed for the DESIGN.md latency target),
else numpy; both return identical results.

Key set: all N^M keys when N^M <= ``index_max_keys``, else the keys observed on training users
(``choose_key_set``). A query key outside an "observed" key set is handled by ``unseen_key``:
- "nearest" (default): replaced by the indexed key whose reconstructed token (concatenation of
  its M codewords) is nearest in squared L2 distance, i.e. the key minimising
  sum_m ||C_m[k_m] - C_m[k'_m]||^2 (ties: smallest key). Needs the codebooks [M, N, D/M]
  (passed to ``build`` / the constructor and stored in the file).
- "skip": the key contributes nothing (its token adds 0 to every item, like an empty list).
Scoring an unseen key on the fly needs the model and is left to the caller (build a one-key
index with the same score_fn). With key set "all" every valid key is indexed; a key outside
[0, N^M) is an error.

Thread safety: queries reuse per-thread scratch buffers (threading.local), so one index can be
searched from several threads.
"""
import hashlib
import json
import math
import os
import threading
import time
import warnings
import zipfile

import numpy as np
from tqdm import tqdm

from . import _merge

FORMAT_NAME = "sparcode-sparse-index"
FORMAT_VERSION = 1
KEY_SET_KINDS = ("all", "observed")
UNSEEN_KEY_POLICIES = ("nearest", "skip")
SCORE_DTYPES = ("float16", "float32")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_NEAREST_CACHE_SIZE = 100_000


class SparseIndexFileError(ValueError):
    """An index file is missing its parts, corrupt, tampered with, or not an index file."""


class SparseIndexMismatchError(ValueError):
    """An index file was built for another model checkpoint than the one expected."""


# ----------------------------------------------------------------------------- keys

def _check_codebook_shape(num_codebooks, codebook_size):
    """Validate M and N and return N ** M (as a Python int) if it fits an int64 key."""
    for name, value in (("num_codebooks", num_codebooks), ("codebook_size", codebook_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    n_keys = int(codebook_size) ** int(num_codebooks)
    if n_keys > np.iinfo(np.int64).max:
        raise ValueError(f"codebook_size ** num_codebooks = {codebook_size}^{num_codebooks} does not fit "
                         f"an int64 key; expected at most 2^63 - 1")
    return n_keys


def pack_codes(codes, codebook_size):
    """Pack code tuples into int64 keys: key = sum_m codes[..., m] * N ** (M - 1 - m).

    Args:
        codes: int array [..., M] with entries in [0, N).
        codebook_size: N.

    Returns:
        int64 array [...].
    """
    codes = np.asarray(codes)
    if codes.ndim < 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array [..., M], got dtype {codes.dtype} shape {codes.shape}")
    num_codebooks = codes.shape[-1]
    _check_codebook_shape(num_codebooks, codebook_size)
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must be in [0, {codebook_size}), found range [{codes.min()}, {codes.max()}]")
    codes = codes.astype(np.int64, copy=False)
    keys = np.zeros(codes.shape[:-1], dtype=np.int64)  # [...]
    for m in range(num_codebooks):
        keys = keys * codebook_size + codes[..., m]
    return keys


def unpack_keys(keys, codebook_size, num_codebooks):
    """Inverse of pack_codes: int64 keys [...] -> codes int64 [..., M]."""
    keys = np.asarray(keys)
    if not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"keys must be an integer array, got dtype {keys.dtype}")
    n_all = _check_codebook_shape(num_codebooks, codebook_size)
    keys = keys.astype(np.int64, copy=False)
    if keys.size and (keys.min() < 0 or int(keys.max()) >= n_all):
        raise ValueError(f"keys must be in [0, N^M = {n_all}), found range [{keys.min()}, {keys.max()}]")
    codes = np.empty(keys.shape + (num_codebooks,), dtype=np.int64)  # [..., M]
    rest = keys.copy()
    for m in range(num_codebooks - 1, -1, -1):
        codes[..., m] = rest % codebook_size
        rest //= codebook_size
    return codes


def choose_key_set(num_codebooks, codebook_size, observed_keys=None, index_max_keys=1_000_000):
    """The keys to index: all N^M keys if N^M <= index_max_keys, else the observed keys.

    When more distinct keys were observed than ``index_max_keys``, the most frequent ones are kept
    (ties: smaller key first) and a warning is issued; the others go through the unseen-key policy.

    Args:
        num_codebooks: M.
        codebook_size: N.
        observed_keys: int64 keys [...] or codes [..., M] seen on training users (with
            repetitions, used for the frequency cap); required when N^M > index_max_keys.
        index_max_keys: largest key set built.

    Returns:
        (keys int64 [n_keys] sorted unique, kind "all" | "observed").
    """
    n_all = _check_codebook_shape(num_codebooks, codebook_size)
    if isinstance(index_max_keys, bool) or not isinstance(index_max_keys, (int, np.integer)) or index_max_keys < 1:
        raise ValueError(f"index_max_keys must be a positive int, got {index_max_keys!r}")
    if n_all <= index_max_keys:
        return np.arange(n_all, dtype=np.int64), "all"
    if observed_keys is None:
        raise ValueError(f"N^M = {codebook_size}^{num_codebooks} = {n_all} keys exceed index_max_keys="
                         f"{index_max_keys}: pass the observed_keys of the training users")
    observed = np.asarray(observed_keys)
    if observed.ndim >= 2 and observed.shape[-1] == num_codebooks and num_codebooks > 1:
        observed = pack_codes(observed, codebook_size)
    observed = observed.reshape(-1)
    unpack_keys(observed, codebook_size, num_codebooks)  # validates the range
    keys, counts = np.unique(observed.astype(np.int64), return_counts=True)
    if keys.size == 0:
        raise ValueError("observed_keys is empty; expected the keys of at least one training user")
    if keys.size > index_max_keys:
        warnings.warn(f"{keys.size} distinct observed keys exceed index_max_keys={index_max_keys}: "
                      f"indexing the {index_max_keys} most frequent", stacklevel=2)
        order = np.lexsort((keys, -counts))[:index_max_keys]
        keys = np.sort(keys[order])
    return keys, "observed"


# ----------------------------------------------------------------------------- helpers

def _scores_to_numpy(block, n_rows, n_cols, key_start, item_start):
    """Convert a score_fn result to float32 numpy [n_rows, n_cols] and validate it."""
    if hasattr(block, "detach"):  # torch tensor
        block = block.detach().float().cpu().numpy()
    block = np.asarray(block)
    if block.shape != (n_rows, n_cols):
        raise ValueError(f"score_fn(keys[{key_start}:{key_start + n_rows}], {item_start}, {item_start + n_cols}) "
                         f"returned shape {tuple(block.shape)}, expected ({n_rows}, {n_cols})")
    if not np.issubdtype(block.dtype, np.floating):
        raise ValueError(f"score_fn must return float scores, got dtype {block.dtype}")
    block = block.astype(np.float32, copy=False)
    if not np.isfinite(block).all():
        raise ValueError(f"score_fn(keys[{key_start}:{key_start + n_rows}], {item_start}, "
                         f"{item_start + n_cols}) returned NaN or inf scores")
    return block


def _validate_keys_arg(keys):
    keys = np.asarray(keys)
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"keys must be a 1-D integer array, got dtype {keys.dtype} shape {keys.shape}")
    return keys.astype(np.int64, copy=False)


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _iter_score_blocks(score_fn, keys, n_items, key_block, item_block, bar):
    """Yield (key_start, item_start, S float32 [kb, ib]) over all blocks, keys outer."""
    import torch  # local import: the index itself does not need torch

    with torch.no_grad():
        for key_start in range(0, keys.shape[0], key_block):
            keys_block = keys[key_start:key_start + key_block]  # [kb]
            for item_start in range(0, n_items, item_block):
                item_stop = min(item_start + item_block, n_items)
                raw = score_fn(keys_block, item_start, item_stop)
                block = _scores_to_numpy(raw, keys_block.shape[0], item_stop - item_start,
                                         key_start, item_start)  # [kb, ib]
                yield key_start, item_start, block
                bar.update(1)


class _ThreadsFor:
    """Context manager: torch.set_num_threads(n) inside, previous value restored after."""

    def __init__(self, num_threads=None):
        self.num_threads = num_threads
        self.previous = None

    def __enter__(self):
        if self.num_threads is not None:
            import torch
            self.previous = torch.get_num_threads()
            torch.set_num_threads(int(self.num_threads))
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            import torch
            torch.set_num_threads(self.previous)
        return False


def choose_bias_for_sparsity(score_fn, keys, n_items, target_sparsity, sample_keys=None,
                             max_sample_values=1 << 23, key_block=256, item_block=16384, seed=0,
                             num_threads=None, progress=False):
    """Pick b~ so that a fraction ``1 - target_sparsity`` of (key, item) pairs has S + b~ > 0.

    The scores of a sample of keys are collected and b~ = -q, where q is the value such that
    exactly round((1 - target) * #values) of them are strictly greater than q (ties can only keep
    fewer). All keys are used when #keys x n_items <= max_sample_values ("exact"), otherwise
    ``sample_keys`` keys drawn without replacement with ``seed`` (default: as many as fit in
    max_sample_values). The returned b~ is a float32 value, so relu(S + b~) computed in float32 by
    ``SparseCodeIndex.build`` keeps exactly the entries with S > q.

    Args:
        score_fn: callable(keys_block int64 [kb], item_start, item_stop) -> float [kb, ib] raw S.
        keys: int64 [n_keys] key set.
        n_items: number of items.
        target_sparsity: fraction of pairs to drop, in [0, 1].
        sample_keys: number of keys to sample, or None for the automatic choice above.
        max_sample_values: cap on collected scores (memory = 4 bytes each).
        key_block, item_block: block shape passed to score_fn.
        seed: seed of the key sample.
        num_threads: torch threads while scoring (None: leave as is).
        progress: tqdm progress bar.

    Returns:
        float b~.
    """
    keys = _validate_keys_arg(keys)
    n_items = _positive_int("n_items", n_items)
    key_block = _positive_int("key_block", key_block)
    item_block = _positive_int("item_block", item_block)
    if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float, np.floating)) \
            or not 0.0 <= float(target_sparsity) <= 1.0:
        raise ValueError(f"target_sparsity must be a number in [0, 1], got {target_sparsity!r}")
    if keys.size == 0:
        raise ValueError("keys is empty; expected at least one key")
    max_sample_values = _positive_int("max_sample_values", max_sample_values)
    if sample_keys is None:
        sample_keys = keys.size if keys.size * n_items <= max_sample_values else \
            max(1, max_sample_values // n_items)
    sample_keys = min(_positive_int("sample_keys", sample_keys), keys.size)
    if sample_keys < keys.size:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(keys, size=sample_keys, replace=False))
    else:
        sample = keys
    values = np.empty(sample.size * n_items, dtype=np.float32)  # all sampled S
    n_blocks = math.ceil(sample.size / key_block) * math.ceil(n_items / item_block)
    with _ThreadsFor(num_threads), tqdm(total=n_blocks, desc="sparsity bias", disable=not progress) as bar:
        for key_start, item_start, block in _iter_score_blocks(score_fn, sample, n_items, key_block,
                                                               item_block, bar):
            rows = slice(key_start, key_start + block.shape[0])
            view = values.reshape(sample.size, n_items)[rows, item_start:item_start + block.shape[1]]
            view[...] = block
    total = values.size
    n_keep = int(round((1.0 - float(target_sparsity)) * total))
    if n_keep >= total:
        threshold = np.nextafter(values.min(), np.float32(-np.inf))  # everything strictly above
    elif n_keep == 0:
        threshold = values.max()  # nothing strictly above
    else:
        threshold = np.partition(values, total - n_keep - 1)[total - n_keep - 1]  # (n_keep+1)-th largest
    return float(-np.float32(threshold))


# ----------------------------------------------------------------------------- the index

class SparseCodeIndex:
    """Sparse inverted index from SparCode keys (code tuples) to (item, relu(S + b~)) postings.

    Usually created by ``SparseCodeIndex.build`` or ``SparseCodeIndex.read``; the constructor
    takes ready CSR arrays (validated).

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
        unseen_key: "nearest" or "skip" (see module docstring).
        backend: "auto" (numba if installed), "numpy" or "numba" merge kernel.
        extra_metadata: optional JSON-serialisable dict stored with the index (e.g. model name).
    """

    def __init__(self, keys=None, indptr=None, items=None, scores=None, num_codebooks=None,
                 codebook_size=None, n_items=None, num_query_tokens=None, sparsity_bias=0.0,
                 top_l=None, key_set_kind="all", checkpoint_hash="", build_seconds=0.0,
                 codebooks=None, unseen_key="nearest", backend="auto", extra_metadata=None):
        if keys is None or indptr is None or items is None or scores is None:
            raise ValueError("keys, indptr, items and scores are required (use SparseCodeIndex.build or .read)")
        self.backend = backend  # property: validated / resolved
        self.unseen_key = unseen_key  # property: validated
        self.num_key_space = _check_codebook_shape(num_codebooks, codebook_size)
        self.num_codebooks = int(num_codebooks)
        self.codebook_size = int(codebook_size)
        self.n_items = _positive_int("n_items", n_items)
        self.num_query_tokens = _positive_int("num_query_tokens", num_query_tokens, allow_none=True)
        self.sparsity_bias = float(sparsity_bias)
        self.top_l = _positive_int("top_l", top_l, allow_none=True)
        if key_set_kind not in KEY_SET_KINDS:
            raise ValueError(f"key_set_kind must be one of {list(KEY_SET_KINDS)}, got {key_set_kind!r}")
        self.key_set_kind = key_set_kind
        if not isinstance(checkpoint_hash, str):
            raise ValueError(f"checkpoint_hash must be a str, got {type(checkpoint_hash).__name__}")
        self.checkpoint_hash = checkpoint_hash
        self.build_seconds = float(build_seconds)
        self.extra_metadata = dict(extra_metadata or {})
        try:
            json.dumps(self.extra_metadata)
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra_metadata must be JSON-serialisable: {err}") from err
        if self.n_items > np.iinfo(np.int32).max:
            raise ValueError(f"n_items={self.n_items} exceeds the int32 item ids of the index (max 2^31 - 1)")
        for name, array in (("keys", keys), ("indptr", indptr), ("items", items)):
            if not np.issubdtype(np.asarray(array).dtype, np.integer):
                raise ValueError(f"{name} must be an integer array, got dtype {np.asarray(array).dtype}")
        items = np.asarray(items)
        if items.size and (items.min() < 0 or items.max() >= self.n_items):  # before the int32 cast
            raise ValueError(f"item ids must be in [0, n_items={self.n_items}), found range "
                             f"[{items.min()}, {items.max()}]")
        self.keys = np.ascontiguousarray(keys, dtype=np.int64)  # [n_keys]
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)  # [n_keys + 1]
        self.items = np.ascontiguousarray(items, dtype=np.int32)  # [nnz]
        scores = np.asarray(scores)
        if scores.dtype.name not in SCORE_DTYPES:
            raise ValueError(f"scores dtype must be one of {list(SCORE_DTYPES)}, got {scores.dtype}")
        self.scores = np.ascontiguousarray(scores)  # [nnz]
        self.score_dtype = self.scores.dtype.name
        self.codebooks = None if codebooks is None else np.ascontiguousarray(codebooks, dtype=np.float32)
        self._validate_arrays()
        self._identity_rows = self.key_set_kind == "all"
        self._kernel_scores = _merge.kernel_scores_view(self.scores)
        self._local = threading.local()
        self._nearest_cache = {}
        self._nearest_lock = threading.Lock()
        self._distance_tables = None  # [M, N, N] squared codeword distances, built lazily
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
            ascending = np.diff(self.items) > 0  # [nnz - 1]
            row_starts = self.indptr[1:-1]
            row_starts = row_starts[(row_starts > 0) & (row_starts < nnz)]
            ascending[row_starts - 1] = True  # no order between the end of a row and the next row
            if not ascending.all():
                raise ValueError("item ids must be strictly ascending (unique) within each key's posting list")
        if self.codebooks is not None and self.codebooks.shape[:2] != (self.num_codebooks, self.codebook_size):
            raise ValueError(f"codebooks must have shape [M={self.num_codebooks}, N={self.codebook_size}, D/M], "
                             f"got {self.codebooks.shape}")
        if self.codebooks is not None and (self.codebooks.ndim != 3 or not np.isfinite(self.codebooks).all()):
            raise ValueError(f"codebooks must be a finite 3-D array [M, N, D/M], got shape {self.codebooks.shape}")

    @property
    def unseen_key(self):
        return self._unseen_key

    @unseen_key.setter
    def unseen_key(self, policy):
        if policy not in UNSEEN_KEY_POLICIES:
            raise ValueError(f"unseen_key must be one of {list(UNSEEN_KEY_POLICIES)}, got {policy!r}")
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

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, score_fn, keys, n_items, sparsity_bias, top_l=None, key_block=256, item_block=16384,
              score_dtype="float32", num_threads=None, progress=True, *, num_codebooks, codebook_size,
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
            unseen_key: "nearest" or "skip".
            backend: query kernel, "auto" | "numpy" | "numba".
            extra_metadata: JSON-serialisable dict stored with the index.

        Returns:
            SparseCodeIndex.
        """
        started = time.perf_counter()
        n_all = _check_codebook_shape(num_codebooks, codebook_size)
        keys = np.unique(_validate_keys_arg(keys))  # sorted unique [n_keys]
        if keys.size == 0:
            raise ValueError("keys is empty; expected at least one key to index")
        if keys[0] < 0 or int(keys[-1]) >= n_all:
            raise ValueError(f"keys must be in [0, N^M = {n_all}), found range [{keys[0]}, {keys[-1]}]")
        if key_set_kind is None:
            key_set_kind = "all" if keys.size == n_all else "observed"
        n_items = _positive_int("n_items", n_items)
        if n_items > np.iinfo(np.int32).max:
            raise ValueError(f"n_items={n_items} exceeds the int32 item ids of the index (max 2^31 - 1)")
        top_l = _positive_int("top_l", top_l, allow_none=True)
        key_block = _positive_int("key_block", key_block)
        item_block = _positive_int("item_block", item_block)
        num_threads = _positive_int("num_threads", num_threads, allow_none=True)
        if score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {list(SCORE_DTYPES)}, got {score_dtype!r}")
        if isinstance(sparsity_bias, bool) or not np.isfinite(float(sparsity_bias)):
            raise ValueError(f"sparsity_bias must be a finite number, got {sparsity_bias!r}")
        if not callable(score_fn):
            raise ValueError(f"score_fn must be callable, got {type(score_fn).__name__}")
        bias = np.float32(sparsity_bias)
        if unseen_key not in UNSEEN_KEY_POLICIES:  # fail before the (long) scoring
            raise ValueError(f"unseen_key must be one of {list(UNSEEN_KEY_POLICIES)}, got {unseen_key!r}")
        if key_set_kind == "observed" and unseen_key == "nearest" and codebooks is None:
            raise ValueError("unseen_key='nearest' on an 'observed' key set needs the codebooks [M, N, D/M]; "
                             "pass codebooks= or use unseen_key='skip'")

        n_blocks = math.ceil(keys.size / key_block) * math.ceil(n_items / item_block)
        lengths = np.zeros(keys.size, dtype=np.int64)  # [n_keys] postings per key
        item_parts, score_parts = [], []
        block_rows, block_items, block_vals = [], [], []

        def flush(key_start, n_rows):
            """Merge the collected entries of one key block into per-key sorted postings."""
            if block_rows:
                rows = np.concatenate(block_rows)
                cols = np.concatenate(block_items)
                vals = np.concatenate(block_vals)
            else:
                rows = np.empty(0, np.int64)
                cols = np.empty(0, np.int64)
                vals = np.empty(0, np.float32)
            block_rows.clear(), block_items.clear(), block_vals.clear()
            if top_l is not None:
                order = np.lexsort((cols, -vals, rows))  # by key, score desc, item asc
                rows, cols, vals = rows[order], cols[order], vals[order]
                starts = np.searchsorted(rows, np.arange(n_rows))  # first entry of each key
                rank = np.arange(rows.size) - starts[rows]
                keep = rank < top_l
                rows, cols, vals = rows[keep], cols[keep], vals[keep]
            order = np.lexsort((cols, rows))  # by key, item asc
            rows, cols, vals = rows[order], cols[order], vals[order]
            if score_dtype == "float16":
                if vals.size and vals.max() > _FLOAT16_MAX:
                    raise ValueError(f"a sparse score {vals.max():.6g} exceeds the float16 range "
                                     f"(max {_FLOAT16_MAX}); use score_dtype='float32'")
                vals = vals.astype(np.float16)
                nonzero = vals > 0  # tiny scores round to 0 in float16: drop them
                rows, cols, vals = rows[nonzero], cols[nonzero], vals[nonzero]
            lengths[key_start:key_start + n_rows] = np.bincount(rows, minlength=n_rows)
            item_parts.append(cols.astype(np.int32))
            score_parts.append(vals)

        with _ThreadsFor(num_threads), tqdm(total=n_blocks, desc="sparse index", unit="block",
                                            disable=not progress) as bar:
            current_key_start = 0
            for key_start, item_start, block in _iter_score_blocks(score_fn, keys, n_items, key_block,
                                                                   item_block, bar):
                if key_start != current_key_start:
                    flush(current_key_start, min(key_block, keys.size - current_key_start))
                    current_key_start = key_start
                sparse = block + bias  # [kb, ib] float32, Eq. 15 before the ReLU
                positive = sparse > 0  # [kb, ib]
                if top_l is not None and block.shape[1] > top_l:
                    # keep entries >= the top_l-th largest of their row (ties kept; cut in flush)
                    kth = -np.partition(-sparse, top_l - 1, axis=1)[:, top_l - 1]  # [kb]
                    positive &= sparse >= kth[:, None]
                rows, cols = np.nonzero(positive)
                block_rows.append(rows.astype(np.int64))
                block_items.append(cols.astype(np.int64) + item_start)
                block_vals.append(sparse[rows, cols])
            flush(current_key_start, min(key_block, keys.size - current_key_start))

        indptr = np.zeros(keys.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        items = np.concatenate(item_parts) if item_parts else np.empty(0, np.int32)
        scores = np.concatenate(score_parts) if score_parts else np.empty(0, score_dtype)
        return cls(keys=keys, indptr=indptr, items=items, scores=scores.astype(score_dtype, copy=False),
                   num_codebooks=num_codebooks, codebook_size=codebook_size, n_items=n_items,
                   num_query_tokens=num_query_tokens, sparsity_bias=float(sparsity_bias), top_l=top_l,
                   key_set_kind=key_set_kind, checkpoint_hash=checkpoint_hash,
                   build_seconds=time.perf_counter() - started, codebooks=codebooks, unseen_key=unseen_key,
                   backend=backend, extra_metadata=extra_metadata)

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
        lengths = np.diff(self.indptr)  # [n_keys]
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
        if self._unseen_key == "skip":
            rows[unseen_mask] = -1
            return rows
        rows[unseen_mask] = self._nearest_rows(flat[unseen_mask])
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
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
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
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
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
        """JSON-serialisable metadata stored in the index file."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
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

    def _arrays(self):
        arrays = {"keys": self.keys, "indptr": self.indptr, "items": self.items, "scores": self.scores}
        if self.codebooks is not None:
            arrays["codebooks"] = self.codebooks
        return arrays

    def write(self, path):
        """Write the index to one .npz file atomically (temp file in the same folder, then rename).

        The file holds the arrays, the metadata as JSON and a sha256 over both. Returns the path.
        """
        path = os.fspath(path)
        metadata_bytes = json.dumps(self.metadata(), sort_keys=True).encode("utf-8")
        arrays = self._arrays()
        checksum = _checksum(arrays, metadata_bytes)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp_path = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp_path, "wb") as handle:
                np.savez(handle, metadata=np.frombuffer(metadata_bytes, dtype=np.uint8),
                         sha256=np.frombuffer(checksum.encode("ascii"), dtype=np.uint8), **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_path, path)
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        return path

    @classmethod
    def read(cls, path, expected_checkpoint_hash=None, backend="auto"):
        """Load an index written by ``write``.

        Args:
            path: the .npz file.
            expected_checkpoint_hash: if given, the file must have been built for this checkpoint.
            backend: query kernel, "auto" | "numpy" | "numba".

        Raises:
            FileNotFoundError: no file at path.
            SparseIndexFileError: not an index file, unreadable, or checksum mismatch (tampered/corrupt).
            SparseIndexMismatchError: built for another checkpoint than expected_checkpoint_hash.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sparse index file {path!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as archive:
                contents = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as err:
            raise SparseIndexFileError(f"sparse index file {path!r} is corrupt or not an index file: "
                                       f"{type(err).__name__}: {err}") from err
        for required in ("metadata", "sha256", "keys", "indptr", "items", "scores"):
            if required not in contents:
                raise SparseIndexFileError(f"sparse index file {path!r} lacks the array {required!r}; "
                                           f"expected a file written by SparseCodeIndex.write")
        metadata_bytes = contents.pop("metadata").tobytes()
        stored_checksum = contents.pop("sha256").tobytes().decode("ascii", errors="replace")
        known = {"keys", "indptr", "items", "scores", "codebooks"}
        if set(contents) - known:
            raise SparseIndexFileError(f"sparse index file {path!r} holds unexpected arrays "
                                       f"{sorted(set(contents) - known)}")
        actual_checksum = _checksum(contents, metadata_bytes)
        if actual_checksum != stored_checksum:
            raise SparseIndexFileError(f"sparse index file {path!r} failed its sha256 check (stored "
                                       f"{stored_checksum[:16]}..., computed {actual_checksum[:16]}...): "
                                       f"the file is corrupt or was modified")
        try:
            metadata = json.loads(metadata_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SparseIndexFileError(f"sparse index file {path!r} has unreadable metadata: {err}") from err
        if metadata.get("format") != FORMAT_NAME or metadata.get("format_version") != FORMAT_VERSION:
            raise SparseIndexFileError(f"sparse index file {path!r} has format {metadata.get('format')!r} "
                                       f"v{metadata.get('format_version')}, expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
        if expected_checkpoint_hash is not None and metadata["checkpoint_hash"] != expected_checkpoint_hash:
            raise SparseIndexMismatchError(
                f"sparse index file {path!r} was built for checkpoint {metadata['checkpoint_hash']!r}, "
                f"expected {expected_checkpoint_hash!r}: rebuild the index for this checkpoint")
        try:
            return cls(keys=contents["keys"], indptr=contents["indptr"], items=contents["items"],
                       scores=contents["scores"], num_codebooks=metadata["num_codebooks"],
                       codebook_size=metadata["codebook_size"], n_items=metadata["n_items"],
                       num_query_tokens=metadata["num_query_tokens"], sparsity_bias=metadata["sparsity_bias"],
                       top_l=metadata["top_l"], key_set_kind=metadata["key_set_kind"],
                       checkpoint_hash=metadata["checkpoint_hash"], build_seconds=metadata["build_seconds"],
                       codebooks=contents.get("codebooks"), unseen_key=metadata["unseen_key"],
                       backend=backend, extra_metadata=metadata.get("extra"))
        except (KeyError, ValueError, TypeError) as err:
            raise SparseIndexFileError(f"sparse index file {path!r} is inconsistent: {err}") from err


_EMPTY_MASK = np.empty(0, dtype=np.int64)


def _checksum(arrays, metadata_bytes):
    """sha256 over the metadata and every array's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256()
    digest.update(len(metadata_bytes).to_bytes(8, "little"))
    digest.update(metadata_bytes)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        header = json.dumps([name, array.dtype.str, list(array.shape)]).encode("utf-8")
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()
