"""The sparse index build split over worker processes by key range, merged into the one-process index.

``SparseCodeIndex.build`` scores the sorted keys in blocks of ``key_block`` keys against every item and turns
each key block into postings on its own (a key's postings depend on its scores alone). ``build_sharded`` cuts
the key blocks into ``workers`` contiguous ranges; each worker process runs ``SparseCodeIndex.build`` on its
range with the same block shape, top-L, score dtype and thread count, so every block is scored with the same
shapes as in one process; the parent concatenates the ranges' CSR arrays in key order. The arrays and the
metadata equal those of ``SparseCodeIndex.build`` byte for byte, except ``build_seconds`` (a measurement: here
the wall time of the sharded build), and so does the file written with equal ``build_seconds``
(tests/test_export.py compares its sha256).

The model never crosses a process boundary: a worker calls ``score_fn_factory()`` for each key range to
get its score function (serving/export.py passes one that loads a trained expid's checkpoint). Workers start with
the "spawn" method (no forked torch threads), so the factory must be picklable: a module-level class or
function, or a functools.partial of one.
"""
import contextlib
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .code_keys import key_space
from .score_blocks import check_keys
from .sparse_index import SparseCodeIndex


def key_ranges(n_keys, key_block, workers):
    """[(start, stop)] of at most `workers` contiguous key ranges whose starts are multiples of key_block."""
    for name, value in (("n_keys", n_keys), ("key_block", key_block), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive int")
    n_blocks = math.ceil(n_keys / key_block)
    bounds = np.linspace(0, n_blocks, min(workers, n_blocks) + 1).round().astype(np.int64)   # block bounds
    return [(int(a) * key_block, min(int(b) * key_block, n_keys)) for a, b in zip(bounds[:-1], bounds[1:])]


def _build_range(score_fn_factory, keys, n_items, sparsity_bias, options):
    """In a worker: (lengths int64 [n], items int32 [nnz], scores [nnz]) of one key range."""
    part = SparseCodeIndex.build(score_fn_factory(), keys, n_items, sparsity_bias, key_set_kind="observed",
                                 unseen_key="skip", backend="numpy", **options)
    return np.diff(part.indptr), part.items, part.scores


def build_sharded(score_fn_factory, keys, n_items, sparsity_bias, workers=2, top_l=None, key_block=256,
                  item_block=16384, score_dtype="float32", num_threads=None, *, num_codebooks, codebook_size,
                  num_query_tokens=None, key_set_kind=None, checkpoint_hash="", codebooks=None,
                  unseen_key="nearest", backend="auto", extra_metadata=None, executor=None):
    """``SparseCodeIndex.build`` with the key range split over `workers` processes (same arguments, except
    `score_fn_factory` for `score_fn`).

    Args:
        score_fn_factory: picklable callable with no argument returning a score function (see
            ``SparseCodeIndex.build``); called in a worker once per key range.
        workers: worker processes (>= 1); each gets a contiguous range of whole key blocks.
        num_threads: torch threads of each worker while scoring; None: the machine's cores divided by the
            workers. The index does not depend on it.
        executor: a concurrent.futures executor of processes to run the ranges in (e.g. kept for several
            builds); None: a pool of `workers` "spawn" processes for this build.
        other arguments: as ``SparseCodeIndex.build``.

    Returns:
        SparseCodeIndex, equal to the one-process build (build_seconds aside).
    """
    started = time.perf_counter()
    keys = np.unique(check_keys(keys))                                                  # sorted unique [n_keys]
    n_all = key_space(num_codebooks, codebook_size)
    if keys.size == 0:
        raise ValueError("keys is empty; expected at least one key to index")
    if keys[0] < 0 or int(keys[-1]) >= n_all:
        raise ValueError(f"keys must be in [0, N^M = {n_all}), found range [{keys[0]}, {keys[-1]}]")
    key_set_kind = key_set_kind or ("all" if keys.size == n_all else "observed")
    if key_set_kind == "observed" and unseen_key == "nearest" and codebooks is None:
        raise ValueError("unseen_key='nearest' on an 'observed' key set needs the codebooks [M, N, D/M]; "
                         "pass codebooks= or use unseen_key='skip'")
    ranges = key_ranges(keys.size, key_block, workers)
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // len(ranges))
    options = {"top_l": top_l, "key_block": key_block, "item_block": item_block, "score_dtype": score_dtype,
               "num_threads": num_threads, "num_codebooks": num_codebooks, "codebook_size": codebook_size}
    with (ProcessPoolExecutor(max_workers=len(ranges), mp_context=multiprocessing.get_context("spawn"))
          if executor is None else contextlib.nullcontext(executor)) as pool:
        futures = [pool.submit(_build_range, score_fn_factory, keys[a:b], n_items, sparsity_bias, options)
                   for a, b in ranges]
        parts = [future.result() for future in futures]                                 # in key order
    indptr = np.zeros(keys.size + 1, dtype=np.int64)
    np.cumsum(np.concatenate([lengths for lengths, _, _ in parts]), out=indptr[1:])
    items = np.concatenate([part_items for _, part_items, _ in parts])
    scores = np.concatenate([part_scores for _, _, part_scores in parts]).astype(score_dtype, copy=False)
    return SparseCodeIndex(keys=keys, indptr=indptr, items=items, scores=scores, num_codebooks=num_codebooks,
                           codebook_size=codebook_size, n_items=n_items, num_query_tokens=num_query_tokens,
                           sparsity_bias=float(sparsity_bias), top_l=top_l,
                           key_set_kind=key_set_kind,
                           checkpoint_hash=checkpoint_hash, build_seconds=time.perf_counter() - started,
                           codebooks=codebooks, unseen_key=unseen_key, backend=backend,
                           extra_metadata=extra_metadata)
