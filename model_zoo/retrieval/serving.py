"""Serving glue: a trained model -> its retrieval index -> metrics through the index and exactly.

Layering: this module sits above the models (it calls their hooks, never the other way round);
model_zoo/experiment.py calls ``sparcode_report`` or ``two_tower_report`` after evaluation.

SparCode (paper Sec. 3.3, 4.4; model hooks ``query_codes``, ``code_vectors``, ``score_codes``,
``sparse_bias``):

- key set: all N^M keys when N^M <= ``index_max_keys``, else the keys the model assigns to the
  training rows of train.h5 (``observed_keys``; the ``index_max_keys`` most frequent if more).
- b~ (Eq. 15): ``sparsity_bias`` if set, else the b~ that drops a ``target_sparsity`` share of the
  (key, item) scores if set, else the trained b (then the index reproduces Eq. 11 exactly on the
  items with a positive score). Setting both is an error.
- unseen keys (observed key set only): "nearest" (nearest indexed key by codeword distance),
  "skip" (the token adds nothing) or "score" (``evaluate_sparcode_index`` scores the missing keys
  with the model and merges their postings into an in-memory copy of the index before searching,
  ``add_keys``: exact, costs one CSR merge per evaluation that meets new keys; the file keeps
  "nearest" as the fallback of the stored index).
- the index is written atomically next to the checkpoint (``<checkpoint stem>.sparse_index.npz``)
  with the sha256 of the checkpoint file as ``checkpoint_hash``; ``load_sparcode_index`` refuses a
  file built for another checkpoint, or a corrupt / tampered one.

Two-tower models (``two_tower = True``; ``encode_users -> [B, d]``, ``encode_items -> [C, d]``,
score = inner product): faiss IndexFlatIP, IndexIVFPQ and IndexHNSWFlat over every item vector,
each reported with its metrics, build time, bytes, batch-1 latency and recall against exact search.

Recall against exact search (``recall_vs_exact``), per user, averaged over users with at least
one reference item: the reference is the exact top-k (masked items removed; for SparCode only the
items with a positive score, since items with score 0 are tied and unordered); a returned item
counts when its exact score is >= the k-th reference score minus a float tolerance
(1e-5 * (1 + |score|)), so near-ties at the cut-off are not counted as misses. Result = min(hits,
|reference|) / |reference|.
"""
import hashlib
import logging
import math
import os
import time

import faiss
import h5py
import numpy as np
import torch
from tqdm import tqdm

from ..config import TRAINING_DEFAULTS
from ..data.loaders import feature_columns
from .exact import masked_topk
from .faiss_index import FaissRetriever
from .metrics import format_metrics, parse_metric_name, topk_metrics
from .sparse_index import (SCORE_DTYPES, SparseCodeIndex, SparseIndexMismatchError, choose_bias_for_sparsity,
                           choose_key_set)

# Serving keys of the config; their defaults live in model_zoo/config.py TRAINING_DEFAULTS.
SERVING_KEYS = ("serve", "sparsity_bias", "target_sparsity", "index_top_l", "index_max_keys", "index_score_dtype",
                "unseen_key", "faiss_nlist", "faiss_m", "faiss_nprobe", "hnsw_m", "hnsw_ef_search")
SERVING_DEFAULTS = {key: TRAINING_DEFAULTS[key] for key in SERVING_KEYS}
UNSEEN_KEY_MODES = ("nearest", "skip", "score")
FAISS_INDEX_TYPES = ("flat_ip", "ivfpq", "hnsw")
INDEX_SUFFIX = ".sparse_index.npz"
LATENCY_QUERIES = 200             # batch-1 queries timed per index (after LATENCY_WARMUP)
LATENCY_WARMUP = 20
_TIE_RTOL = 1e-5


# ----------------------------------------------------------------------------- config / files

def serving_params(params=None):
    """SERVING_DEFAULTS overridden by ``params`` (a merged config), validated.

    Raises:
        ValueError naming the key, the bad value and what is expected.
    """
    params = params or {}
    out = {key: params.get(key, default) for key, default in SERVING_DEFAULTS.items()}
    if out["serve"] not in (True, False):
        raise ValueError(f"serve={out['serve']!r}; expected true or false")
    for key in ("sparsity_bias", "target_sparsity"):
        value = out[key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            hint = " (write floats as 1.e-3: PyYAML reads 1e-3 as a string)" if isinstance(value, str) else ""
            raise ValueError(f"{key}={value!r}; expected a finite number or null{hint}")
        out[key] = float(value)
    if out["target_sparsity"] is not None and not 0.0 <= out["target_sparsity"] <= 1.0:
        raise ValueError(f"target_sparsity={out['target_sparsity']!r}; expected a number in [0, 1] or null")
    if out["sparsity_bias"] is not None and out["target_sparsity"] is not None:
        raise ValueError(f"sparsity_bias={out['sparsity_bias']!r} and target_sparsity={out['target_sparsity']!r} "
                         f"are both set; expected at most one of them (the other null)")
    for key, allow_none in (("index_top_l", True), ("index_max_keys", False), ("faiss_nlist", True),
                            ("faiss_m", False), ("faiss_nprobe", False), ("hnsw_m", False),
                            ("hnsw_ef_search", False)):
        value = out[key]
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key}={value!r}; expected a positive int{' or null' if allow_none else ''}")
        out[key] = int(value)
    if out["index_score_dtype"] not in SCORE_DTYPES:
        raise ValueError(f"index_score_dtype={out['index_score_dtype']!r}; expected one of {list(SCORE_DTYPES)}")
    if out["unseen_key"] not in UNSEEN_KEY_MODES:
        raise ValueError(f"unseen_key={out['unseen_key']!r}; expected one of {list(UNSEEN_KEY_MODES)}")
    return out


def file_sha256(path):
    """Hex sha256 of a file (streamed). FileNotFoundError naming the file if it is absent."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; train (or save) the model first")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_index_path(checkpoint):
    """``<model_root>/<dataset_id>/<expid>.sparse_index.npz`` for ``.../<expid>.model``."""
    return os.path.splitext(os.fspath(checkpoint))[0] + INDEX_SUFFIX


# ----------------------------------------------------------------------------- SparCode index

def _check_sparcode(model):
    missing = [name for name in ("query_codes", "score_codes", "sparse_bias", "quantizer") if not hasattr(model, name)]
    if missing:
        raise ValueError(f"{type(model).__name__} lacks the SparCode serving hook(s) {missing}")
    if model.item_corpus is None:
        raise ValueError("call model.set_item_corpus(corpus) before building its index")


def sparcode_score_fn(model):
    """score_fn(keys int64 [kb], start, stop) -> S [kb, stop - start] (before the ReLU) for the index."""
    def score_fn(keys, start, stop):
        return model.score_codes(torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                                 torch.arange(start, stop))                            # [kb, ib]
    return score_fn


def _train_user_blocks(data_dir, feature_map, block_rows):
    """User-side inputs of every row of train.h5, block by block: dict name -> tensor [rows, ...].

    Rows come from train.h5 itself, or (``train_user_table`` datasets, where train.h5 holds
    ``user_row`` only) from users.h5, one row per distinct training user.
    """
    names = feature_columns(feature_map, "user")
    train_path = os.path.join(data_dir, "train.h5")
    if not os.path.isfile(train_path):
        raise FileNotFoundError(f"{train_path} does not exist; the observed key set needs the training split")
    with h5py.File(train_path, "r") as fd:
        if all(name in fd for name in names):
            n_rows = fd[names[0]].shape[0]
            for start in range(0, n_rows, block_rows):
                yield {name: torch.from_numpy(np.ascontiguousarray(fd[name][start:start + block_rows]))
                       for name in names}
            return
        user_rows = np.unique(fd["user_row"][()]) if "user_row" in fd else None
    users_path = os.path.join(data_dir, "users.h5")
    if user_rows is None or not os.path.isfile(users_path):
        raise ValueError(f"{train_path} lacks the user columns {names} and there is no users.h5 with them")
    with h5py.File(users_path, "r") as fd:
        missing = [name for name in names if name not in fd]
        if missing:
            raise ValueError(f"{users_path} lacks the user column(s) {missing}")
        for start in range(0, user_rows.size, block_rows):
            rows = user_rows[start:start + block_rows]
            yield {name: torch.from_numpy(np.ascontiguousarray(fd[name][rows])) for name in names}


def observed_keys(model, data_dir, block_rows=8192, progress=False):
    """Distinct keys the model assigns to the training rows, with their counts.

    Returns:
        (keys int64 [n_distinct] sorted, counts int64 [n_distinct]).
    """
    keys = np.empty(0, dtype=np.int64)
    counts = np.empty(0, dtype=np.int64)
    for inputs in tqdm(_train_user_blocks(data_dir, model.feature_map, block_rows), desc="observed keys",
                       disable=not progress, leave=False):
        block = model.query_codes(inputs).cpu().numpy().reshape(-1)                    # [rows * K_u]
        merged, inverse = np.unique(np.concatenate([keys, block]), return_inverse=True)
        merged_counts = np.bincount(inverse, weights=np.concatenate([counts, np.ones(block.size, np.int64)]),
                                    minlength=merged.size)
        keys, counts = merged, merged_counts.astype(np.int64)
    if keys.size == 0:
        raise ValueError(f"{data_dir}/train.h5 has no training row to observe keys on")
    return keys, counts


def sparcode_key_set(model, data_dir=None, index_max_keys=1_000_000, progress=False):
    """(keys int64 [n_keys], kind "all" | "observed") following ``index_max_keys``."""
    num_codebooks, codebook_size = model.quantizer.num_codebooks, model.quantizer.codebook_size
    if codebook_size ** num_codebooks <= index_max_keys:
        return choose_key_set(num_codebooks, codebook_size, None, index_max_keys)
    if data_dir is None:
        raise ValueError(f"N^M = {codebook_size}^{num_codebooks} keys exceed index_max_keys={index_max_keys}: "
                         f"pass data_dir so the keys of the training users can be observed")
    keys, counts = observed_keys(model, data_dir, progress=progress)
    if keys.size > index_max_keys:
        logging.warning("%d distinct observed keys exceed index_max_keys=%d: indexing the most frequent",
                        keys.size, index_max_keys)
        keys = np.sort(keys[np.lexsort((keys, -counts))[:index_max_keys]])
    return choose_key_set(num_codebooks, codebook_size, keys, index_max_keys)


def resolve_sparsity_bias(model, score_fn, keys, n_items, sparsity_bias=None, target_sparsity=None,
                          num_threads=None, progress=False):
    """(b~, source) with source "sparsity_bias" | "target_sparsity" | "trained" (see module docstring)."""
    if sparsity_bias is not None and target_sparsity is not None:
        raise ValueError(f"sparsity_bias={sparsity_bias!r} and target_sparsity={target_sparsity!r} are both set; "
                         f"expected at most one")
    if sparsity_bias is not None:
        return float(sparsity_bias), "sparsity_bias"
    if target_sparsity is not None:
        return choose_bias_for_sparsity(score_fn, keys, n_items, target_sparsity, num_threads=num_threads,
                                        progress=progress), "target_sparsity"
    return float(model.sparse_bias), "trained"


def build_sparcode_index(model, data_dir=None, sparsity_bias=None, target_sparsity=None, top_l=None,
                         index_max_keys=1_000_000, score_dtype="float32", unseen_key="nearest",
                         checkpoint_hash=None, key_block=256, item_block=16384, num_threads=None, progress=False):
    """Build the sparse inverted index of a trained SparCode (Eq. 15 for every key x item).

    Args:
        model: a SparCode with its item corpus set.
        data_dir: built dataset folder (train.h5), needed when N^M > index_max_keys.
        sparsity_bias: b~; None = the trained b unless target_sparsity is set.
        target_sparsity: share of (key, item) scores to drop; picks b~.
        top_l: cap on items per key (None: every positive score).
        index_max_keys: largest key set built (see sparcode_key_set).
        score_dtype: "float32" | "float16" posting scores.
        unseen_key: "nearest" | "skip" | "score" (the index itself stores "nearest" for "score").
        checkpoint_hash: stored in the index (default: sha256 of model.checkpoint).
        key_block, item_block: score block shape.
        num_threads: torch threads while scoring (None: unchanged).
        progress: progress bars.

    Returns:
        SparseCodeIndex (extra metadata: model, model_id, bias_source, trained_bias, target_sparsity,
        unseen_key_serving, key_set_seconds (observing training keys), bias_seconds (choosing b~);
        build_seconds is the scoring + CSR build alone).
    """
    _check_sparcode(model)
    if unseen_key not in UNSEEN_KEY_MODES:
        raise ValueError(f"unseen_key={unseen_key!r}; expected one of {list(UNSEEN_KEY_MODES)}")
    if checkpoint_hash is None:
        checkpoint_hash = file_sha256(model.checkpoint)
    n_items = model.item_corpus.num_items
    score_fn = sparcode_score_fn(model)
    started = time.perf_counter()
    keys, kind = sparcode_key_set(model, data_dir, index_max_keys, progress)
    key_set_seconds = time.perf_counter() - started
    started = time.perf_counter()
    bias, source = resolve_sparsity_bias(model, score_fn, keys, n_items, sparsity_bias, target_sparsity,
                                         num_threads, progress)
    bias_seconds = time.perf_counter() - started
    check_index_fits(estimate_index_size(score_fn, keys, n_items, bias, top_l, score_dtype), bias)
    with torch.no_grad():
        num_query_tokens = int(model.query_codes(_first_user_inputs(model, data_dir)).shape[1]) \
            if data_dir is not None else None
    codebooks = model.quantizer.codebooks.detach().cpu().numpy()                        # [M, N, D_T / M]
    return SparseCodeIndex.build(
        score_fn, keys, n_items, bias, top_l=top_l, key_block=key_block, item_block=item_block,
        score_dtype=score_dtype, num_threads=num_threads, progress=progress,
        num_codebooks=model.quantizer.num_codebooks, codebook_size=model.quantizer.codebook_size,
        num_query_tokens=num_query_tokens, key_set_kind=kind, checkpoint_hash=checkpoint_hash,
        codebooks=codebooks, unseen_key="nearest" if unseen_key == "score" else unseen_key,
        extra_metadata={"model": type(model).__name__, "model_id": getattr(model, "model_id", None),
                        "bias_source": source, "trained_bias": float(model.sparse_bias),
                        "target_sparsity": target_sparsity, "unseen_key_serving": unseen_key,
                        "key_set_seconds": key_set_seconds, "bias_seconds": bias_seconds})


def estimate_index_size(score_fn, keys, n_items, bias, top_l=None, score_dtype="float32", sample_keys=256,
                        item_block=16384, seed=0):
    """Sparsity / nnz / bytes of the index at b~ = bias, from the scores of a sample of keys.

    Returns:
        dict with "Sparsity", "nnz", "bytes" (stored arrays) and "sampled_keys" (all keys when few).
    """
    keys = np.asarray(keys, dtype=np.int64)
    sample = keys if keys.size <= sample_keys else \
        np.sort(np.random.default_rng(seed).choice(keys, size=sample_keys, replace=False))
    positive = np.zeros(sample.size, dtype=np.int64)                                     # [n_sample]
    with torch.no_grad():
        for start in range(0, n_items, item_block):
            block = score_fn(sample, start, min(start + item_block, n_items))           # [n_sample, ib]
            block = block.detach().float().cpu().numpy() if torch.is_tensor(block) else np.asarray(block)
            positive += (block.astype(np.float32) + np.float32(bias) > 0).sum(axis=1)
    if top_l is not None:
        positive = np.minimum(positive, top_l)
    nnz = float(positive.mean()) * keys.size
    bytes_per_entry = 4 + np.dtype(score_dtype).itemsize
    return {"Sparsity": 1.0 - nnz / (keys.size * n_items), "nnz": int(round(nnz)),
            "bytes": int(nnz * bytes_per_entry + keys.size * 16), "sampled_keys": int(sample.size)}


def _available_memory_bytes():
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: no check
        return None


def check_index_fits(estimate, bias, available_bytes=None):
    """ValueError when building the index (peak about 2x its size) would need more than half the free memory."""
    available_bytes = _available_memory_bytes() if available_bytes is None else available_bytes
    logging.info("Sparse index at b~=%.6f: estimated Sparsity %.6f, %d scores, %.1f MiB (from %d keys)",
                 bias, estimate["Sparsity"], estimate["nnz"], estimate["bytes"] / 2 ** 20, estimate["sampled_keys"])
    if available_bytes is not None and 2 * estimate["bytes"] > available_bytes / 2:
        raise ValueError(
            f"the sparse index at b~={bias:.6f} would hold about {estimate['nnz']} scores "
            f"({estimate['bytes'] / 2 ** 30:.2f} GiB, estimated Sparsity {estimate['Sparsity']:.6f}); building it "
            f"needs about twice that, more than half the free memory ({available_bytes / 2 ** 30:.2f} GiB): set "
            f"target_sparsity (e.g. 0.99), a lower sparsity_bias, or index_top_l")


def _first_user_inputs(model, data_dir):
    """User inputs of the first training rows (to read K_u off query_codes)."""
    return next(iter(_train_user_blocks(data_dir, model.feature_map, 2)))


def add_keys(index, score_fn, new_keys, progress=False):
    """A copy of ``index`` with the postings of ``new_keys`` (scored by score_fn with the index's b~,
    top-L and dtype) merged in; keys already indexed are ignored. Key set kind stays "observed"."""
    new_keys = np.setdiff1d(np.asarray(new_keys, dtype=np.int64), index.keys)
    if new_keys.size == 0:
        return index
    extra = SparseCodeIndex.build(score_fn, new_keys, index.n_items, index.sparsity_bias, top_l=index.top_l,
                                  score_dtype=index.score_dtype, progress=progress,
                                  num_codebooks=index.num_codebooks, codebook_size=index.codebook_size,
                                  num_query_tokens=index.num_query_tokens, key_set_kind="observed",
                                  checkpoint_hash=index.checkpoint_hash, codebooks=index.codebooks,
                                  unseen_key=index.unseen_key, backend=index.backend)
    keys = np.concatenate([index.keys, extra.keys])                                     # [n1 + n2]
    order = np.argsort(keys, kind="stable")
    starts = np.concatenate([index.indptr[:-1], extra.indptr[:-1] + index.nnz])[order]  # [n1 + n2]
    lengths = np.concatenate([np.diff(index.indptr), np.diff(extra.indptr)])[order]
    indptr = np.zeros(keys.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])           # [nnz1 + nnz2]
    items = np.concatenate([index.items, extra.items])[gather]
    scores = np.concatenate([index.scores, extra.scores])[gather]
    return SparseCodeIndex(keys=keys[order], indptr=indptr, items=items, scores=scores,
                           num_codebooks=index.num_codebooks, codebook_size=index.codebook_size,
                           n_items=index.n_items, num_query_tokens=index.num_query_tokens,
                           sparsity_bias=index.sparsity_bias, top_l=index.top_l, key_set_kind="observed",
                           checkpoint_hash=index.checkpoint_hash,
                           build_seconds=index.build_seconds + extra.build_seconds, codebooks=index.codebooks,
                           unseen_key=index.unseen_key, backend=index.backend,
                           extra_metadata=index.extra_metadata)


def write_sparcode_index(index, path):
    """Write atomically (SparseCodeIndex.write); returns the path."""
    return index.write(path)


def load_sparcode_index(model, path=None, checkpoint=None, backend="auto"):
    """Load the index of ``model`` and check it belongs to it.

    Args:
        model: the SparCode the index must come from (its corpus set).
        path: index file (default: next to the checkpoint).
        checkpoint: checkpoint file whose sha256 the index must carry (default: model.checkpoint).
        backend: query kernel.

    Raises:
        FileNotFoundError: no index or no checkpoint file.
        SparseIndexFileError: corrupt / tampered / not an index file.
        SparseIndexMismatchError: built for another checkpoint, or M / N / item count differ.
    """
    checkpoint = model.checkpoint if checkpoint is None else checkpoint
    path = default_index_path(checkpoint) if path is None else path
    index = SparseCodeIndex.read(path, expected_checkpoint_hash=file_sha256(checkpoint), backend=backend)
    expected = {"num_codebooks": model.quantizer.num_codebooks, "codebook_size": model.quantizer.codebook_size}
    if model.item_corpus is not None:
        expected["n_items"] = model.item_corpus.num_items
    for name, value in expected.items():
        if getattr(index, name) != value:
            raise SparseIndexMismatchError(f"sparse index file {path!r} has {name}={getattr(index, name)}, the "
                                           f"model has {value}: rebuild the index for this model")
    return index


# ----------------------------------------------------------------------------- evaluation helpers

def _metric_spec(params, model):
    names = list((params or {}).get("metrics") or getattr(model, "metric_names", ()) or
                 ("Recall(k=20)", "Recall(k=50)", "NDCG(k=20)", "NDCG(k=50)"))
    parsed = [parse_metric_name(name) for name in names]
    return names, sorted({kind for kind, _ in parsed}), sorted({k for _, k in parsed})


def _metrics(topk, eval_users, names, kinds, ks, precision_denominator):
    values = topk_metrics(topk, eval_users.gt_indptr, eval_users.gt_items, ks=ks, metrics=kinds,
                          precision_denominator=precision_denominator)
    return {name: float(values[name]) for name in names}


def tie_aware_hits(approx_ids, exact_scores_of_approx, reference_scores, min_score=None):
    """Per-row (hits, reference size) of approximate top-k lists against the exact ones.

    Args:
        approx_ids: int [B, k] returned ids (-1 = empty slot).
        exact_scores_of_approx: float [B, k] exact scores of approx_ids (ignored where id is -1).
        reference_scores: float [B, k] exact top-k scores, best first (-inf = masked / empty).
        min_score: if set, only reference entries with score > min_score count (SparCode: 0).

    Returns:
        (hits int64 [B], sizes int64 [B]); hits <= sizes.
    """
    reference_scores = np.asarray(reference_scores, dtype=np.float64)
    valid_ref = np.isfinite(reference_scores)
    if min_score is not None:
        valid_ref &= reference_scores > min_score
    sizes = valid_ref.sum(axis=1).astype(np.int64)                                     # [B]
    last = np.where(sizes > 0, sizes - 1, 0)
    threshold = reference_scores[np.arange(reference_scores.shape[0]), last]           # [B]
    threshold = threshold - _TIE_RTOL * (1.0 + np.abs(threshold))
    scores = np.asarray(exact_scores_of_approx, dtype=np.float64)
    good = (np.asarray(approx_ids) >= 0) & (scores >= threshold[:, None])
    if min_score is not None:
        good &= scores > min_score
    hits = np.minimum(good.sum(axis=1), sizes).astype(np.int64)
    return hits, sizes


def _recall(hits, sizes):
    used = sizes > 0
    return float((hits[used] / sizes[used]).mean()) if used.any() else float("nan")


def _gather_rows(scores, ids):
    """scores [B, n_items] (tensor), ids [B, k] (numpy, -1 allowed) -> float64 [B, k] (-inf at -1)."""
    ids_t = torch.from_numpy(np.maximum(ids, 0)).to(scores.device)
    out = torch.gather(scores, 1, ids_t).double().cpu().numpy()
    out[ids < 0] = -np.inf
    return out


def _percentiles_us(seconds):
    seconds = np.asarray(seconds)
    return {"median": float(np.median(seconds) * 1e6), "p90": float(np.percentile(seconds, 90) * 1e6)}


def _time_calls(fn, queries):
    """Wall time of fn(query) for each query after LATENCY_WARMUP untimed calls."""
    for query in queries[:LATENCY_WARMUP]:
        fn(query)
    times = []
    for query in queries:
        started = time.perf_counter_ns()
        fn(query)
        times.append((time.perf_counter_ns() - started) * 1e-9)
    return times


def _user_mask(eval_users, user):
    return eval_users.mask_items[eval_users.mask_indptr[user]:eval_users.mask_indptr[user + 1]]


def _batches(n_users, batch_size):
    return [(start, min(start + batch_size, n_users)) for start in range(0, n_users, batch_size)]


def _inputs(model, eval_users, start, stop):
    return {name: value.to(model.device) for name, value in eval_users.batch(start, stop).items()}


# ----------------------------------------------------------------------------- SparCode report

def evaluate_sparcode_index(model, index, eval_users, k, batch_size=512, unseen_key="nearest", progress=False,
                            item_repr=None):
    """Top-k through the index and exactly for every evaluation user, in one pass.

    Returns:
        dict with "index_ids" / "exact_ids" int64 [n_users, k], "hits" / "sizes" (recall vs exact
        on the positive part), "keys" int64 [n_users, K_u], "unseen_keys" (distinct query keys not
        in the index), "index_seconds" (search time of the whole pass) and "index" (the index,
        extended with the unseen keys when unseen_key == "score").
    """
    n_users = len(eval_users)
    was_training = model.training
    model.eval()
    score_fn = sparcode_score_fn(model)
    with torch.no_grad():
        if item_repr is None:
            item_repr = model.all_item_repr()
        keys = np.concatenate([model.query_codes(eval_users.batch(a, b)).cpu().numpy()
                               for a, b in _batches(n_users, batch_size)])              # [n_users, K_u]
        unseen = np.setdiff1d(keys, index.keys) if index.key_set_kind == "observed" else np.empty(0, np.int64)
        if unseen.size and unseen_key == "score":
            index = add_keys(index, score_fn, unseen)
        index_ids = np.empty((n_users, k), dtype=np.int64)
        exact_ids = np.empty((n_users, k), dtype=np.int64)
        hits = np.empty(n_users, dtype=np.int64)
        sizes = np.empty(n_users, dtype=np.int64)
        index_seconds = 0.0
        for start, stop in tqdm(_batches(n_users, batch_size), desc="index eval", disable=not progress,
                                leave=False):
            started = time.perf_counter()
            _, ids = index.search(keys[start:stop], k, eval_users.mask_indptr, eval_users.mask_items,
                                  row_offset=start)                                     # [B, k]
            index_seconds += time.perf_counter() - started
            scores = model.full_scores(_inputs(model, eval_users, start, stop), item_repr)  # [B, n_items]
            top_scores, top_ids = masked_topk(scores, k, eval_users.mask_indptr, eval_users.mask_items,
                                              row_offset=start)
            exact_ids[start:stop] = top_ids.cpu().numpy()
            index_ids[start:stop] = ids
            hits[start:stop], sizes[start:stop] = tie_aware_hits(ids, _gather_rows(scores, ids),
                                                                 top_scores.double().cpu().numpy(), min_score=0.0)
    model.train(was_training)
    return {"index_ids": index_ids, "exact_ids": exact_ids, "hits": hits, "sizes": sizes, "keys": keys,
            "unseen_keys": int(unseen.size), "index_seconds": index_seconds, "index": index}


def sparcode_latency(model, index, eval_users, keys, k, n_queries=LATENCY_QUERIES):
    """Batch-1 latency: index.search_one (keys -> top-k with the user's mask) and query_codes of one user."""
    users = list(range(min(n_queries, len(eval_users))))
    search = _time_calls(lambda u: index.search_one(keys[u], k, _user_mask(eval_users, u)), users)
    encode = _time_calls(lambda u: model.query_codes(eval_users.batch(u, u + 1)), users[:50])
    return {"query_us": _percentiles_us(search), "encode_us": _percentiles_us(encode), "queries": len(users)}


def sparcode_report(model, test_users, data_dir=None, params=None, index_path=None, write_index=True,
                    progress=None):
    """Build (and write) the sparse index of a trained SparCode and evaluate the test users through it
    and exactly. See the module docstring for the configuration keys.

    Returns:
        JSON-ready dict: "kind", "index" (Sparsity, Average Items, bytes, build seconds, b~ ...,
        latency), "metrics_index", "metrics_exact", "recall_vs_exact" / "recall_vs_exact_k".
    """
    params = params or {}
    config = serving_params(params)
    progress = bool(params.get("verbose", 0)) if progress is None else progress
    names, kinds, ks = _metric_spec(params, model)
    k_max = max(ks)
    num_threads = params.get("num_threads")
    checkpoint_hash = file_sha256(model.checkpoint)
    index = build_sparcode_index(model, data_dir, config["sparsity_bias"], config["target_sparsity"],
                                 config["index_top_l"], config["index_max_keys"], config["index_score_dtype"],
                                 config["unseen_key"], checkpoint_hash=checkpoint_hash, num_threads=num_threads,
                                 progress=progress)
    stats = index.stats()
    path = None
    if write_index:
        path = write_sparcode_index(index, index_path or default_index_path(model.checkpoint))
    batch_size = int(params.get("eval_batch_size") or getattr(model, "eval_batch_size", 512))
    result = evaluate_sparcode_index(model, index, test_users, k_max, batch_size, config["unseen_key"], progress)
    precision_denominator = params.get("precision_denominator", "k")
    latency = sparcode_latency(model, result["index"], test_users, result["keys"], k_max)
    index_stats = {
        "Sparsity": stats["Sparsity"], "Average Items": stats["Average Items"],
        "nnz": stats["nnz"], "n_keys": stats["n_keys"], "n_items": stats["n_items"],
        "max_items": stats["max_items"], "empty_keys": stats["empty_keys"],
        "index_bytes": stats["index_bytes"], "build_seconds": stats["build_seconds"],
        "key_set_seconds": index.extra_metadata["key_set_seconds"],
        "bias_seconds": index.extra_metadata["bias_seconds"],
        "key_set": index.key_set_kind, "sparsity_bias": index.sparsity_bias,
        "bias_source": index.extra_metadata["bias_source"], "trained_bias": float(model.sparse_bias),
        "target_sparsity": config["target_sparsity"], "top_l": index.top_l, "score_dtype": index.score_dtype,
        "unseen_key": config["unseen_key"], "unseen_test_keys": result["unseen_keys"],
        "num_codebooks": index.num_codebooks, "codebook_size": index.codebook_size,
        "num_query_tokens": int(result["keys"].shape[1]), "backend": index.backend,
        "path": path, "file_bytes": os.path.getsize(path) if path else None, "checkpoint_hash": checkpoint_hash,
        "query_us_median": latency["query_us"]["median"], "query_us_p90": latency["query_us"]["p90"],
        "encode_us_median": latency["encode_us"]["median"], "latency_queries": latency["queries"],
        "eval_search_seconds": result["index_seconds"],
    }
    return {
        "kind": "sparcode",
        "index": index_stats,
        "metrics_index": _metrics(result["index_ids"], test_users, names, kinds, ks, precision_denominator),
        "metrics_exact": _metrics(result["exact_ids"], test_users, names, kinds, ks, precision_denominator),
        "recall_vs_exact": _recall(result["hits"], result["sizes"]),
        "recall_vs_exact_k": k_max,
    }


# ----------------------------------------------------------------------------- two-tower comparators

def _largest_divisor_at_most(value, limit):
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def faiss_retrievers(item_vectors, config, num_threads=None):
    """{name: (FaissRetriever, build seconds, effective params)} for flat_ip, ivfpq and hnsw."""
    n_items, dim = item_vectors.shape
    out = {}
    for name in FAISS_INDEX_TYPES:
        options = {}
        if name == "ivfpq":
            nlist = config["faiss_nlist"] or max(1, int(round(4 * math.sqrt(n_items))))
            # PQ needs >= 2^nbits training vectors: fewer bits on tiny corpora.
            options = {"nlist": nlist, "m": _largest_divisor_at_most(dim, config["faiss_m"]),
                       "nbits": int(min(8, max(1, math.floor(math.log2(n_items))))), "nprobe": config["faiss_nprobe"]}
        elif name == "hnsw":
            options = {"hnsw_m": config["hnsw_m"], "ef_search": config["hnsw_ef_search"]}
        started = time.perf_counter()
        retriever = FaissRetriever(name, dim=dim, **options)
        with _FaissThreads(num_threads):
            retriever.train(item_vectors)
            retriever.add(item_vectors)
        seconds = time.perf_counter() - started
        if name == "ivfpq":
            options["nlist"] = retriever.nlist_effective
            options["nprobe"] = int(retriever.index.nprobe)
        out[name] = (retriever, seconds, options)
    return out


def two_tower_report(model, test_users, data_dir=None, params=None, progress=None):
    """faiss IndexFlatIP / IndexIVFPQ / IndexHNSWFlat over a two-tower model's item vectors: metrics,
    recall against exact inner-product search, build seconds, bytes, batch-1 latency.

    Returns:
        JSON-ready dict: "kind", "metrics_exact", "faiss" {name: {"metrics", "recall_vs_exact",
        "build_seconds", "index_bytes", "query_us_median", "query_us_p90", "params"}}, "recall_vs_exact_k".
    """
    params = params or {}
    config = serving_params(params)
    progress = bool(params.get("verbose", 0)) if progress is None else progress
    names, kinds, ks = _metric_spec(params, model)
    k_max = max(ks)
    precision_denominator = params.get("precision_denominator", "k")
    batch_size = int(params.get("eval_batch_size") or getattr(model, "eval_batch_size", 512))
    n_users = len(test_users)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        item_vectors = model.all_item_repr()                                            # [C, d]
        if not torch.is_tensor(item_vectors) or item_vectors.dim() != 2:
            raise ValueError(f"{type(model).__name__}.encode_items must return [C, d] vectors for faiss, got "
                             f"{type(item_vectors).__name__} {getattr(item_vectors, 'shape', None)}")
        user_vectors = torch.cat([model.encode_users(_inputs(model, test_users, a, b))
                                  for a, b in _batches(n_users, batch_size)])           # [n_users, d]
    model.train(was_training)
    items_np = item_vectors.detach().float().cpu().numpy()
    users_np = np.ascontiguousarray(user_vectors.detach().float().cpu().numpy())
    retrievers = faiss_retrievers(items_np, config, params.get("num_threads"))
    exact_ids = np.empty((n_users, k_max), dtype=np.int64)
    approx = {name: np.empty((n_users, k_max), dtype=np.int64) for name in retrievers}
    hits = {name: np.empty(n_users, dtype=np.int64) for name in retrievers}
    sizes = np.empty(n_users, dtype=np.int64)
    items_t = torch.from_numpy(items_np)
    for start, stop in tqdm(_batches(n_users, batch_size), desc="faiss eval", disable=not progress, leave=False):
        scores = torch.from_numpy(users_np[start:stop]) @ items_t.T                    # [B, C]
        top_scores, top_ids = masked_topk(scores, k_max, test_users.mask_indptr, test_users.mask_items,
                                          row_offset=start)
        exact_ids[start:stop] = top_ids.numpy()
        reference = top_scores.double().numpy()
        for name, (retriever, _, _) in retrievers.items():
            with _FaissThreads(params.get("num_threads")):
                _, ids = retriever.search(users_np[start:stop], k_max, test_users.mask_indptr,
                                          test_users.mask_items, row_offset=start)      # [B, k]
            approx[name][start:stop] = ids
            hits[name][start:stop], sizes[start:stop] = tie_aware_hits(ids, _gather_rows(scores, ids), reference)
    report = {"kind": "two_tower", "n_items": int(items_np.shape[0]), "dim": int(items_np.shape[1]),
              "metrics_exact": _metrics(exact_ids, test_users, names, kinds, ks, precision_denominator),
              "recall_vs_exact_k": k_max, "faiss": {}}
    for name, (retriever, seconds, options) in retrievers.items():
        latency, raw_latency = faiss_latency(retriever, users_np, test_users, k_max)
        report["faiss"][name] = {
            "metrics": _metrics(approx[name], test_users, names, kinds, ks, precision_denominator),
            "recall_vs_exact": _recall(hits[name], sizes),
            "build_seconds": seconds,
            "index_bytes": int(faiss_index_bytes(retriever)),
            "query_us_median": latency["median"], "query_us_p90": latency["p90"],
            "raw_query_us_median": raw_latency["median"],
            "params": options,
        }
    return report


def faiss_latency(retriever, user_vectors, eval_users, k, n_queries=LATENCY_QUERIES):
    """Batch-1 latency on one faiss thread: (FaissRetriever.search with the user's mask, raw index.search)."""
    users = list(range(min(n_queries, user_vectors.shape[0])))

    def harness(u):
        mask = _user_mask(eval_users, u)
        retriever.search(user_vectors[u:u + 1], k, np.array([0, mask.size]), mask)

    with _FaissThreads(1):
        latency = _percentiles_us(_time_calls(harness, users))
        raw = _percentiles_us(_time_calls(lambda u: retriever.index.search(user_vectors[u:u + 1], k), users))
    return latency, raw


class _FaissThreads:
    """Context manager: faiss OpenMP threads set to n inside (None: unchanged), restored after."""

    def __init__(self, num_threads):
        self.num_threads, self.previous = num_threads, None

    def __enter__(self):
        if self.num_threads is not None:
            self.previous = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(int(self.num_threads))
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            faiss.omp_set_num_threads(self.previous)
        return False


def faiss_index_bytes(retriever):
    """Serialized size of a FaissRetriever's index."""
    return faiss.serialize_index(retriever.index).nbytes


# ----------------------------------------------------------------------------- logging

def report_lines(report):
    """FuxiCTR-style log lines of a serving report."""
    if not report:
        return []
    k = report.get("recall_vs_exact_k")
    lines = []
    if report.get("kind") == "sparcode":
        index = report["index"]
        lines.append(f"[Index] Sparsity: {index['Sparsity']:.6f} - Average Items: {index['Average Items']:.2f} - "
                     f"Keys: {index['n_keys']} ({index['key_set']}) - b~: {index['sparsity_bias']:.6f} "
                     f"({index['bias_source']}) - Bytes: {index['index_bytes']} - "
                     f"Build seconds: {index['build_seconds']:.3f} - Query us (median, batch 1): "
                     f"{index['query_us_median']:.1f} - Unseen test keys: {index['unseen_test_keys']}")
        lines.append(f"[Metrics] (index) {format_metrics(report['metrics_index'])}")
        lines.append(f"[Metrics] (exact) {format_metrics(report['metrics_exact'])}")
        lines.append(f"[Index] Recall vs exact(k={k}): {report['recall_vs_exact']:.6f}")
    elif report.get("kind") == "two_tower":
        lines.append(f"[Metrics] (exact) {format_metrics(report['metrics_exact'])}")
        for name, entry in report["faiss"].items():
            lines.append(f"[Index] {name} - Recall vs exact(k={k}): {entry['recall_vs_exact']:.6f} - "
                         f"Bytes: {entry['index_bytes']} - Build seconds: {entry['build_seconds']:.3f} - "
                         f"Query us (median, batch 1, with mask): {entry['query_us_median']:.1f} - "
                         f"Raw faiss search us: {entry['raw_query_us_median']:.1f} - "
                         + " - ".join(f"{key}: {value}" for key, value in entry["params"].items()))
            lines.append(f"[Metrics] ({name}) {format_metrics(entry['metrics'])}")
    return lines
