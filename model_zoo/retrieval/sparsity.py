"""Sparsity control of the SparCode index (Eq. 15): choosing b~, estimating the index size, memory check.

Every function sees the model only through a score function (model_zoo/retrieval/score_blocks.py).
"""
import logging
import math
import os

import numpy as np
from tqdm import tqdm

from .score_blocks import TorchThreads, check_keys, iter_score_blocks

POSTING_INDEX_BYTES = 4       # int32 item id of a posting
KEY_ROW_BYTES = 16            # int64 key + int64 indptr entry per indexed key


def choose_bias_for_sparsity(score_fn, keys, n_items, target_sparsity, sample_keys=None,
                             max_sample_values=1 << 23, key_block=256, item_block=16384, seed=0,
                             num_threads=None, progress=False):
    """Pick b~ so that a share ``1 - target_sparsity`` of the (key, item) pairs has S + b~ > 0.

    The scores of a sample of keys are collected and b~ = -q, where q is the value such that exactly
    round((1 - target) * #values) of them are strictly greater than q (ties can only keep fewer). All
    keys are used when #keys x n_items <= max_sample_values (exact), otherwise ``sample_keys`` keys drawn
    without replacement with ``seed`` (default: as many as fit in max_sample_values). b~ is returned as
    a float32 value, so relu(S + b~) computed in float32 by ``SparseCodeIndex.build`` keeps exactly the
    entries with S > q.

    Args:
        score_fn: callable(keys_block int64 [kb], item_start, item_stop) -> float [kb, ib] raw S.
        keys: int64 [n_keys] key set.
        n_items: number of items.
        target_sparsity: share of pairs to drop, in [0, 1] (the config checks its range at load).
        sample_keys: number of keys to sample, or None for the automatic choice above.
        max_sample_values: cap on collected scores (memory = 4 bytes each).
        key_block, item_block: block shape passed to score_fn.
        seed: seed of the key sample.
        num_threads: torch threads while scoring (None: unchanged).
        progress: tqdm progress bar.

    Returns:
        float b~.
    """
    keys = check_keys(keys)
    if keys.size == 0:
        raise ValueError("keys is empty; expected at least one key")
    if sample_keys is None:
        sample_keys = keys.size if keys.size * n_items <= max_sample_values else max(1, max_sample_values // n_items)
    sample_keys = min(int(sample_keys), keys.size)
    sample = keys if sample_keys == keys.size else \
        np.sort(np.random.default_rng(seed).choice(keys, size=sample_keys, replace=False))
    values = np.empty((sample.size, n_items), dtype=np.float32)                        # every sampled S
    n_blocks = math.ceil(sample.size / key_block) * math.ceil(n_items / item_block)
    with TorchThreads(num_threads), tqdm(total=n_blocks, desc="sparsity bias", disable=not progress) as bar:
        for key_start, item_start, block in iter_score_blocks(score_fn, sample, n_items, key_block, item_block,
                                                              bar):
            values[key_start:key_start + block.shape[0], item_start:item_start + block.shape[1]] = block
    values = values.reshape(-1)
    total = values.size
    n_keep = int(round((1.0 - float(target_sparsity)) * total))
    if n_keep >= total:
        threshold = np.nextafter(values.min(), np.float32(-np.inf))                     # everything strictly above
    elif n_keep == 0:
        threshold = values.max()                                                         # nothing strictly above
    else:
        threshold = np.partition(values, total - n_keep - 1)[total - n_keep - 1]        # (n_keep + 1)-th largest
    return float(-np.float32(threshold))


def estimate_index_size(score_fn, keys, n_items, bias, top_l=None, score_dtype="float32", sample_keys=256,
                        item_block=16384, seed=0):
    """Sparsity, scores kept and bytes of the index at b~ = bias, from the scores of a sample of keys.

    Args:
        score_fn: see choose_bias_for_sparsity.
        keys: int64 [n_keys] key set.
        n_items: number of items.
        bias: b~.
        top_l: posting-list cap (None: none).
        score_dtype: "float32" | "float16" posting scores.
        sample_keys: keys scored (all when there are fewer).
        item_block: items per score block.
        seed: seed of the key sample.

    Returns:
        dict with "Sparsity", "nnz", "bytes" (the stored arrays) and "sampled_keys".
    """
    keys = check_keys(keys)
    sample = keys if keys.size <= sample_keys else \
        np.sort(np.random.default_rng(seed).choice(keys, size=sample_keys, replace=False))
    positive = np.zeros(sample.size, dtype=np.int64)                                     # [n_sample]
    for _, _, block in iter_score_blocks(score_fn, sample, n_items, key_block=sample.size, item_block=item_block):
        positive += (block + np.float32(bias) > 0).sum(axis=1)
    if top_l is not None:
        positive = np.minimum(positive, top_l)
    nnz = float(positive.mean()) * keys.size
    bytes_per_posting = POSTING_INDEX_BYTES + np.dtype(score_dtype).itemsize
    return {"Sparsity": 1.0 - nnz / (keys.size * n_items), "nnz": int(round(nnz)),
            "bytes": int(nnz * bytes_per_posting + keys.size * KEY_ROW_BYTES), "sampled_keys": int(sample.size)}


def available_memory_bytes():
    """Available physical memory in bytes (Linux MemAvailable: free plus reclaimable page cache, else free
    pages), or None where the OS does not report it (then no check is made)."""
    try:
        with open("/proc/meminfo") as fd:
            for line in fd:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_index_fits(estimate, bias, available_bytes=None):
    """ValueError when building the index (peak about twice its size) would need more than half the free memory.

    Args:
        estimate: the dict of estimate_index_size.
        bias: b~ of the estimate (named in the messages).
        available_bytes: free memory; None reads it from the OS.
    """
    available_bytes = available_memory_bytes() if available_bytes is None else available_bytes
    logging.info("Sparse index at b~=%.6f: estimated Sparsity %.6f, %d scores, %.1f MiB (from %d keys)",
                 bias, estimate["Sparsity"], estimate["nnz"], estimate["bytes"] / 2 ** 20, estimate["sampled_keys"])
    if available_bytes is not None and 2 * estimate["bytes"] > available_bytes / 2:
        raise ValueError(
            f"the sparse index at b~={bias:.6f} would hold about {estimate['nnz']} scores "
            f"({estimate['bytes'] / 2 ** 30:.2f} GiB, estimated Sparsity {estimate['Sparsity']:.6f}); building it "
            f"needs about twice that, more than half the free memory ({available_bytes / 2 ** 30:.2f} GiB): set "
            f"target_sparsity (e.g. 0.99), a lower sparsity_bias, or index_top_l")
