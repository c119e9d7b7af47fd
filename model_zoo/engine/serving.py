"""Serving report of a trained model: its retrieval index, built, written and evaluated against exact scoring.

The engine asks a model what it can serve (the capability classes of model_zoo/base.py):

- ``CodeIndexable`` (SparCode): a sparse code index (model_zoo/retrieval/sparse_index.py). Key set: all
  N^M keys when N^M <= ``index_max_keys``, else the keys the model assigns to the training users
  (the ``index_max_keys`` most frequent). b~ (Eq. 15): ``sparsity_bias`` if set, else the b~ that drops
  a ``target_sparsity`` share of the (key, item) scores if set, else the trained b (then the index
  reproduces Eq. 11 exactly on the items with a positive score). ``index_top_l`` caps the postings per
  key, ``index_score_dtype`` stores them as float32 or float16, ``unseen_key`` (UNSEEN_KEY_POLICIES)
  handles a test key outside an observed key set ("score": scored with the model and added to an
  in-memory copy of the index before searching). The index is written atomically next to the checkpoint
  (``<checkpoint stem>.sparse_index.npz``) with the sha256 of the checkpoint file; ``load_code_index``
  refuses a file built for another checkpoint or model shape.
- ``VectorServable`` (DSSM, GRU4Rec, SASRec): faiss IndexFlatIP, IndexIVFPQ (``faiss_nlist``, ``faiss_m``,
  ``faiss_nprobe``) and IndexHNSWFlat (``hnsw_m``, ``hnsw_ef_search``) over every item vector.
- ``TreeRetrievable`` (TDM): layer-wise beam search over the model's item tree (model_zoo/retrieval/beam_search.py)
  keeping ``beam_size`` nodes per level (null: the largest metric cutoff), history items masked at the leaves.

Each report holds the metrics through the index and by exact scoring, and the recall of the exact top-k
(model_zoo/retrieval/metrics.py ``tie_aware_hits``). The serving keys are validated once, when the
config loads (model_zoo/config.py); nothing here checks them again. Query speed is not measured here:
benchmarks/retrieval_latency.py and benchmarks/sparsity_sweep.py time queries.
"""
import logging
import math
import os
import time
import warnings

import h5py
import numpy as np
import torch

from ..base import CodeIndexable, TreeRetrievable, VectorServable
from ..data.loaders import feature_columns
from ..layers.tree import tree_file
from ..retrieval.beam_search import beam_search
from ..retrieval.code_keys import choose_key_set
from ..retrieval.exact import masked_topk
from ..retrieval.faiss_index import INDEX_TYPES, FaissRetriever, FaissThreads
from ..retrieval.index_io import SparseIndexMismatchError, file_sha256
from ..retrieval.metrics import format_metrics, recall_vs_exact, tie_aware_hits
from ..retrieval.sparse_index import SparseCodeIndex
from ..retrieval.sparsity import check_index_fits, choose_bias_for_sparsity, estimate_index_size
from .evaluator import Evaluator
from .progress import on_terminal, progress_bar

INDEX_SUFFIX = ".sparse_index.npz"


# ----------------------------------------------------------------------------- entry points

def serving_report(model, test_users, data_dir, params):
    """Build the model's serving index and evaluate the test users through it and exactly.

    Args:
        model: a trained model with its item corpus set (and its checkpoint saved, for code indexes).
        test_users: EvalUsers of the test split.
        data_dir: built dataset folder (train.h5: the observed key set of a code index).
        params: the expid's merged config (serving keys, metrics, precision_denominator, eval_batch_size,
            num_threads, verbose), validated at load.

    Returns:
        JSON-ready dict (``"kind"``: "sparcode" | "two_tower" | "tree"), or None when the model declares no
        serving capability.
    """
    if isinstance(model, TreeRetrievable):
        logging.info("******** Serving: tree beam search ********")
        return tree_report(model, test_users, params)
    if isinstance(model, CodeIndexable):
        logging.info("******** Serving: sparse code index ********")
        return code_index_report(model, test_users, data_dir, params)
    if isinstance(model, VectorServable):
        logging.info("******** Serving: faiss indexes ********")
        return vector_index_report(model, test_users, params)
    return None


def report_lines(report):
    """FuxiCTR-style log lines of a serving report ([] for None or an empty report)."""
    if not report:
        return []
    k = report.get("recall_vs_exact_k")
    lines = []
    if report.get("kind") == "sparcode":
        index = report["index"]
        lines.append(f"[Index] Sparsity: {index['Sparsity']:.6f} - Average Items: {index['Average Items']:.2f} - "
                     f"Keys: {index['n_keys']} ({index['key_set']}) - b~: {index['sparsity_bias']:.6f} "
                     f"({index['bias_source']}) - Bytes: {index['index_bytes']} - "
                     f"Build seconds: {index['build_seconds']:.3f} - Unseen test keys: {index['unseen_test_keys']} "
                     f"({index['unseen_key']})")
        lines.append(f"[Metrics] (index) {format_metrics(report['metrics_index'])}")
        lines.append(f"[Metrics] (exact) {format_metrics(report['metrics_exact'])}")
        lines.append(f"[Index] Recall vs exact(k={k}): {report['recall_vs_exact']:.6f}")
    elif report.get("kind") == "two_tower":
        lines.append(f"[Metrics] (exact) {format_metrics(report['metrics_exact'])}")
        for name, entry in report["faiss"].items():
            lines.append(f"[Index] {name} - Recall vs exact(k={k}): {entry['recall_vs_exact']:.6f} - "
                         f"Bytes: {entry['index_bytes']} - Build seconds: {entry['build_seconds']:.3f} - "
                         + " - ".join(f"{key}: {value}" for key, value in entry["params"].items()))
            lines.append(f"[Metrics] ({name}) {format_metrics(entry['metrics'])}")
    elif report.get("kind") == "tree":
        tree = report["tree"]
        lines.append(f"[Tree] Depth: {tree['depth']} - Branching: {tree['branching']} - Leaves: {tree['leaves']} - "
                     f"Beam size: {tree['beam_size']} - Nodes scored per user: {tree['nodes_scored_per_user']:.1f} "
                     f"({tree['nodes_scored_per_user'] / tree['leaves']:.3f} of the leaves)")
        lines.append(f"[Metrics] (beam) {format_metrics(report['metrics_beam'])}")
        lines.append(f"[Metrics] (exact) {format_metrics(report['metrics_exact'])}")
        lines.append(f"[Tree] Recall vs exact(k={k}): {report['recall_vs_exact']:.6f}")
    return lines


# ----------------------------------------------------------------------------- shared helpers

def _metrics(evaluator, topk, eval_users):
    return {name: float(value) for name, value in evaluator.metrics(topk, eval_users).items()}


def _show_progress(params):
    return bool(params["verbose"]) and on_terminal()


def _batches(n_users, batch_size):
    return [(start, min(start + batch_size, n_users)) for start in range(0, n_users, batch_size)]


def _inputs(model, eval_users, start, stop):
    return {name: value.to(model.device) for name, value in eval_users.batch(start, stop).items()}


def scores_at(scores, ids):
    """scores [B, n_items] (tensor), ids [B, k] (numpy, -1 allowed) -> float64 [B, k] (-inf at -1)."""
    ids_t = torch.from_numpy(np.maximum(ids, 0)).to(scores.device)
    out = torch.gather(scores, 1, ids_t).double().cpu().numpy()
    out[ids < 0] = -np.inf
    return out


def checkpoint_sha256(checkpoint):
    """sha256 of the checkpoint file; FileNotFoundError naming it when the model was never saved."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist; train (or save) the model first")
    return file_sha256(checkpoint)


def default_index_path(checkpoint):
    """``<model_root>/<dataset_id>/<expid>.sparse_index.npz`` for ``.../<expid>.model``."""
    return os.path.splitext(os.fspath(checkpoint))[0] + INDEX_SUFFIX


# ----------------------------------------------------------------------------- code index: build

def code_score_fn(model):
    """score_fn(keys int64 [kb], start, stop) -> S [kb, stop - start] (before the ReLU) for the index."""
    def score_fn(keys, start, stop):
        return model.score_codes(torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                                 torch.arange(start, stop))                            # [kb, ib]
    return score_fn


def _train_user_blocks(data_dir, feature_map, block_rows):
    """User-side inputs of every training row, block by block: dict name -> tensor [rows, ...].

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


@torch.no_grad()
def observed_keys(model, data_dir, block_rows=8192, progress=False):
    """Distinct keys the model assigns to the training rows, with their counts.

    Returns:
        (keys int64 [n_distinct] sorted, counts int64 [n_distinct]).
    """
    keys = np.empty(0, dtype=np.int64)
    counts = np.empty(0, dtype=np.int64)
    for inputs in progress_bar(_train_user_blocks(data_dir, model.feature_map, block_rows), desc="observed keys",
                               verbose=progress):
        block = model.query_codes(inputs).cpu().numpy().reshape(-1)                    # [rows * K_u]
        merged, inverse = np.unique(np.concatenate([keys, block]), return_inverse=True)
        merged_counts = np.bincount(inverse, weights=np.concatenate([counts, np.ones(block.size, np.int64)]),
                                    minlength=merged.size)
        keys, counts = merged, merged_counts.astype(np.int64)
    if keys.size == 0:
        raise ValueError(f"{data_dir}/train.h5 has no training row to observe keys on")
    return keys, counts


def code_key_set(model, data_dir=None, index_max_keys=1_000_000, progress=False):
    """(keys int64 [n_keys], kind "all" | "observed"): all N^M keys, or those of the training users."""
    num_codebooks, codebook_size = model.quantizer.num_codebooks, model.quantizer.codebook_size
    if codebook_size ** num_codebooks <= index_max_keys:
        return choose_key_set(num_codebooks, codebook_size, None, index_max_keys)
    if data_dir is None:
        raise ValueError(f"N^M = {codebook_size}^{num_codebooks} keys exceed index_max_keys={index_max_keys}: "
                         f"pass data_dir so the keys of the training users can be observed")
    keys, counts = observed_keys(model, data_dir, progress=progress)
    with warnings.catch_warnings(record=True) as caught:                              # the cap warning goes to the log
        warnings.simplefilter("always")
        key_set = choose_key_set(num_codebooks, codebook_size, keys, index_max_keys, counts=counts)
    for warning in caught:
        logging.warning(str(warning.message))
    return key_set


def resolve_sparsity_bias(model, score_fn, keys, sparsity_bias=None, target_sparsity=None, num_threads=None,
                          progress=False):
    """(b~, source "sparsity_bias" | "target_sparsity" | "trained"); the config allows at most one of the two set."""
    if sparsity_bias is not None:
        return float(sparsity_bias), "sparsity_bias"
    if target_sparsity is not None:
        return choose_bias_for_sparsity(score_fn, keys, model.item_corpus.num_items, target_sparsity,
                                        num_threads=num_threads, progress=progress), "target_sparsity"
    return float(model.sparse_bias), "trained"


@torch.no_grad()
def build_code_index(model, data_dir=None, sparsity_bias=None, target_sparsity=None, top_l=None,
                     index_max_keys=1_000_000, score_dtype="float32", unseen_key="nearest", checkpoint_hash=None,
                     num_threads=None, progress=False):
    """Build the sparse code index of a trained CodeIndexable model (Eq. 15 for every key x item).

    Args:
        model: a CodeIndexable model with its item corpus set.
        data_dir: built dataset folder (train.h5): the observed key set and K_u.
        sparsity_bias: b~; None = the trained b unless target_sparsity is set.
        target_sparsity: share of (key, item) scores to drop; picks b~.
        top_l: cap on items per key (None: every positive score).
        index_max_keys: largest key set built (see code_key_set).
        score_dtype: "float32" | "float16" posting scores.
        unseen_key: policy for query keys outside an observed key set (UNSEEN_KEY_POLICIES).
        checkpoint_hash: stored in the index (default: sha256 of model.checkpoint).
        num_threads: torch threads while scoring (None: unchanged).
        progress: progress bars.

    Returns:
        SparseCodeIndex; extra metadata: model, model_id, bias_source, trained_bias, target_sparsity,
        key_set_seconds (observing training keys), bias_seconds (choosing b~). Its build_seconds is the
        scoring + CSR build alone.
    """
    if model.item_corpus is None:
        raise ValueError("call model.set_item_corpus(corpus) before building its index")
    if checkpoint_hash is None:
        checkpoint_hash = checkpoint_sha256(model.checkpoint)
    n_items = model.item_corpus.num_items
    score_fn = code_score_fn(model)
    started = time.perf_counter()
    keys, kind = code_key_set(model, data_dir, index_max_keys, progress)
    key_set_seconds = time.perf_counter() - started
    started = time.perf_counter()
    bias, source = resolve_sparsity_bias(model, score_fn, keys, sparsity_bias, target_sparsity, num_threads,
                                         progress)
    bias_seconds = time.perf_counter() - started
    check_index_fits(estimate_index_size(score_fn, keys, n_items, bias, top_l, score_dtype), bias)
    num_query_tokens = None
    if data_dir is not None:
        first_users = next(iter(_train_user_blocks(data_dir, model.feature_map, 2)))
        num_query_tokens = int(model.query_codes(first_users).shape[1])
    codebooks = model.quantizer.codebooks.detach().cpu().numpy()                        # [M, N, D_T / M]
    index = SparseCodeIndex.build(
        score_fn, keys, n_items, bias, top_l=top_l, score_dtype=score_dtype, num_threads=num_threads,
        progress=progress, num_codebooks=model.quantizer.num_codebooks, codebook_size=model.quantizer.codebook_size,
        num_query_tokens=num_query_tokens, key_set_kind=kind, checkpoint_hash=checkpoint_hash, codebooks=codebooks,
        unseen_key=unseen_key,
        extra_metadata={"model": type(model).__name__, "model_id": model.model_id,
                        "bias_source": source, "trained_bias": float(model.sparse_bias),
                        "target_sparsity": target_sparsity, "key_set_seconds": key_set_seconds,
                        "bias_seconds": bias_seconds})
    return index


def load_code_index(model, path=None, checkpoint=None, backend="auto"):
    """Load the index of ``model`` and check it belongs to it.

    Args:
        model: the CodeIndexable model the index must come from.
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
    index = SparseCodeIndex.read(path, expected_checkpoint_hash=checkpoint_sha256(checkpoint), backend=backend)
    expected = {"num_codebooks": model.quantizer.num_codebooks, "codebook_size": model.quantizer.codebook_size}
    if model.item_corpus is not None:
        expected["n_items"] = model.item_corpus.num_items
    for name, value in expected.items():
        if getattr(index, name) != value:
            raise SparseIndexMismatchError(f"sparse index file {path!r} has {name}={getattr(index, name)}, the "
                                           f"model has {value}: rebuild the index for this model")
    return index


# ----------------------------------------------------------------------------- code index: evaluation

@torch.no_grad()
def evaluate_code_index(model, index, eval_users, k, batch_size=512, progress=False):
    """Top-k through the index and exactly for every evaluation user, in one pass.

    Query keys outside the index follow ``index.unseen_key``; with "score" they are scored with the
    model and added to a copy of the index first.

    Returns:
        dict with "index_ids" / "exact_ids" int64 [n_users, k], "hits" / "sizes" (recall of the exact
        top-k among positive scores, metrics.tie_aware_hits), "keys" int64 [n_users, K_u], "unseen_keys"
        (distinct query keys not in the index) and "index" (the index searched).
    """
    n_users = len(eval_users)
    was_training = model.training
    model.eval()
    item_repr = model.all_item_repr()
    keys = np.concatenate([model.query_codes(_inputs(model, eval_users, a, b)).cpu().numpy()
                           for a, b in _batches(n_users, batch_size)])                  # [n_users, K_u]
    unseen = np.setdiff1d(keys, index.keys) if index.key_set_kind == "observed" else np.empty(0, np.int64)
    if unseen.size and index.unseen_key == "score":
        index = index.copy().add(code_score_fn(model), unseen)
    index_ids = np.empty((n_users, k), dtype=np.int64)
    exact_ids = np.empty((n_users, k), dtype=np.int64)
    hits = np.empty(n_users, dtype=np.int64)
    sizes = np.empty(n_users, dtype=np.int64)
    for start, stop in progress_bar(_batches(n_users, batch_size), desc="index eval", verbose=progress):
        _, ids = index.search(keys[start:stop], k, eval_users.mask_indptr, eval_users.mask_items,
                              row_offset=start)                                         # [B, k]
        scores = model.full_scores(_inputs(model, eval_users, start, stop), item_repr)  # [B, n_items]
        top_scores, top_ids = masked_topk(scores, k, eval_users.mask_indptr, eval_users.mask_items, row_offset=start)
        exact_ids[start:stop] = top_ids.cpu().numpy()
        index_ids[start:stop] = ids
        hits[start:stop], sizes[start:stop] = tie_aware_hits(ids, scores_at(scores, ids),
                                                             top_scores.double().cpu().numpy(), min_score=0.0)
    model.train(was_training)
    return {"index_ids": index_ids, "exact_ids": exact_ids, "hits": hits, "sizes": sizes, "keys": keys,
            "unseen_keys": int(unseen.size), "index": index}


def code_index_report(model, test_users, data_dir, params, index_path=None, write_index=True):
    """Build (and write) the sparse code index of a trained CodeIndexable model and evaluate the test
    users through it and exactly (see serving_report for the arguments).

    Args:
        index_path: where to write the index (default: next to the checkpoint).
        write_index: False keeps the index in memory only.

    Returns:
        JSON-ready dict: "kind", "index" (Sparsity, Average Items, bytes, build seconds, b~ ...),
        "metrics_index", "metrics_exact", "recall_vs_exact" / "recall_vs_exact_k".
    """
    evaluator = Evaluator.from_params(params)
    progress = _show_progress(params)
    checkpoint_sha = checkpoint_sha256(model.checkpoint)
    index = build_code_index(model, data_dir, params["sparsity_bias"], params["target_sparsity"],
                             params["index_top_l"], params["index_max_keys"], params["index_score_dtype"],
                             params["unseen_key"], checkpoint_hash=checkpoint_sha, num_threads=params["num_threads"],
                             progress=progress)
    stats = index.stats()
    path = index.write(index_path or default_index_path(model.checkpoint)) if write_index else None
    result = evaluate_code_index(model, index, test_users, evaluator.max_k, params["eval_batch_size"], progress)
    extra = index.extra_metadata
    index_stats = {
        "Sparsity": stats["Sparsity"], "Average Items": stats["Average Items"],
        "nnz": stats["nnz"], "n_keys": stats["n_keys"], "n_items": stats["n_items"],
        "max_items": stats["max_items"], "empty_keys": stats["empty_keys"],
        "index_bytes": stats["index_bytes"], "build_seconds": stats["build_seconds"],
        "key_set_seconds": extra["key_set_seconds"], "bias_seconds": extra["bias_seconds"],
        "key_set": index.key_set_kind, "sparsity_bias": index.sparsity_bias,
        "bias_source": extra["bias_source"], "trained_bias": extra["trained_bias"],
        "target_sparsity": extra["target_sparsity"], "top_l": index.top_l, "score_dtype": index.score_dtype,
        "unseen_key": index.unseen_key, "unseen_test_keys": result["unseen_keys"],
        "num_codebooks": index.num_codebooks, "codebook_size": index.codebook_size,
        "num_query_tokens": int(result["keys"].shape[1]), "backend": index.backend,
        "path": path, "file_bytes": os.path.getsize(path) if path else None, "checkpoint_hash": checkpoint_sha,
    }
    return {
        "kind": "sparcode",
        "index": index_stats,
        "metrics_index": _metrics(evaluator, result["index_ids"], test_users),
        "metrics_exact": _metrics(evaluator, result["exact_ids"], test_users),
        "recall_vs_exact": recall_vs_exact(result["hits"], result["sizes"]),
        "recall_vs_exact_k": evaluator.max_k,
    }


# ----------------------------------------------------------------------------- vector models: faiss

def _largest_divisor_at_most(value, limit):
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def faiss_retrievers(item_vectors, params, num_threads=None):
    """{name: (FaissRetriever, build seconds, effective params)} for flat_ip, ivfpq and hnsw.

    Args:
        item_vectors: float32 [n_items, d].
        params: the faiss keys faiss_nlist (None: round(4 sqrt(n_items))), faiss_m (largest divisor of d
            at most it), faiss_nprobe, hnsw_m, hnsw_ef_search.
        num_threads: faiss threads while building (None: unchanged).
    """
    n_items, dim = item_vectors.shape
    out = {}
    for name in INDEX_TYPES:
        options = {}
        if name == "ivfpq":
            nlist = params["faiss_nlist"] or max(1, int(round(4 * math.sqrt(n_items))))
            # PQ needs >= 2^nbits training vectors: fewer bits on tiny corpora.
            options = {"nlist": nlist, "m": _largest_divisor_at_most(dim, params["faiss_m"]),
                       "nbits": int(min(8, max(1, math.floor(math.log2(n_items))))), "nprobe": params["faiss_nprobe"]}
        elif name == "hnsw":
            options = {"hnsw_m": params["hnsw_m"], "ef_search": params["hnsw_ef_search"]}
        started = time.perf_counter()
        retriever = FaissRetriever(name, dim=dim, **options)
        with FaissThreads(num_threads):
            retriever.train(item_vectors)
            retriever.add(item_vectors)
        seconds = time.perf_counter() - started
        if name == "ivfpq":
            options["nlist"] = retriever.nlist_effective
            options["nprobe"] = int(retriever.index.nprobe)
        out[name] = (retriever, seconds, options)
    return out


@torch.no_grad()
def vector_index_report(model, test_users, params):
    """faiss IndexFlatIP / IndexIVFPQ / IndexHNSWFlat over a VectorServable model's item vectors: metrics,
    recall of the exact inner-product top-k, build seconds, bytes (see serving_report for the arguments).

    Returns:
        JSON-ready dict: "kind", "n_items", "dim", "metrics_exact", "faiss" {name: {"metrics",
        "recall_vs_exact", "build_seconds", "index_bytes", "params"}}, "recall_vs_exact_k".
    """
    evaluator = Evaluator.from_params(params)
    k_max = evaluator.max_k
    batch_size, num_threads = params["eval_batch_size"], params["num_threads"]
    n_users = len(test_users)
    was_training = model.training
    model.eval()
    item_vectors = model.all_item_repr()                                                # [C, d]
    if not torch.is_tensor(item_vectors) or item_vectors.dim() != 2:
        raise ValueError(f"{type(model).__name__}.encode_items must return [C, d] vectors for faiss, got "
                         f"{type(item_vectors).__name__} {getattr(item_vectors, 'shape', None)}")
    user_vectors = torch.cat([model.encode_users(_inputs(model, test_users, a, b))
                              for a, b in _batches(n_users, batch_size)])               # [n_users, d]
    model.train(was_training)
    items_np = np.ascontiguousarray(item_vectors.float().cpu().numpy())
    users_np = np.ascontiguousarray(user_vectors.float().cpu().numpy())
    retrievers = faiss_retrievers(items_np, params, num_threads)
    exact_ids = np.empty((n_users, k_max), dtype=np.int64)
    approx = {name: np.empty((n_users, k_max), dtype=np.int64) for name in retrievers}
    hits = {name: np.empty(n_users, dtype=np.int64) for name in retrievers}
    sizes = np.empty(n_users, dtype=np.int64)
    items_t = torch.from_numpy(items_np)
    for start, stop in progress_bar(_batches(n_users, batch_size), desc="faiss eval", verbose=_show_progress(params)):
        scores = torch.from_numpy(users_np[start:stop]) @ items_t.T                    # [B, C]
        top_scores, top_ids = masked_topk(scores, k_max, test_users.mask_indptr, test_users.mask_items,
                                          row_offset=start)
        exact_ids[start:stop] = top_ids.numpy()
        reference = top_scores.double().numpy()
        for name, (retriever, _, _) in retrievers.items():
            with FaissThreads(num_threads):
                _, ids = retriever.search(users_np[start:stop], k_max, test_users.mask_indptr,
                                          test_users.mask_items, row_offset=start)      # [B, k]
            approx[name][start:stop] = ids
            hits[name][start:stop], sizes[start:stop] = tie_aware_hits(ids, scores_at(scores, ids), reference)
    report = {"kind": "two_tower", "n_items": int(items_np.shape[0]), "dim": int(items_np.shape[1]),
              "metrics_exact": _metrics(evaluator, exact_ids, test_users), "recall_vs_exact_k": k_max, "faiss": {}}
    for name, (retriever, seconds, options) in retrievers.items():
        report["faiss"][name] = {
            "metrics": _metrics(evaluator, approx[name], test_users),
            "recall_vs_exact": recall_vs_exact(hits[name], sizes),
            "build_seconds": seconds,
            "index_bytes": retriever.serialized_bytes(),
            "params": options,
        }
    return report


# ----------------------------------------------------------------------------- tree models: beam search

def mask_block(eval_users, start, stop):
    """The masked items of users start..stop-1 as a CSR of their own: (indptr [stop - start + 1], items)."""
    indptr = np.asarray(eval_users.mask_indptr[start:stop + 1], dtype=np.int64)
    return indptr - indptr[0], np.asarray(eval_users.mask_items[indptr[0]:indptr[-1]], dtype=np.int64)


@torch.no_grad()
def tree_search(model, user_inputs, k, beam_size, mask=None, stats=None, item_repr=None):
    """Beam search of a TreeRetrievable model for a batch of users.

    Args:
        model: the model (eval mode), user_inputs: its user-side inputs [B, ...] on its device.
        k, beam_size: leaves returned and nodes kept per level.
        mask: None or (indptr [B + 1], item ids) of items not to return (mask_block).
        stats: optional dict; gets "nodes_scored" int64 [B] (retrieval/beam_search.py).
        item_repr: all_item_repr() of the model, to read the leaves' vectors from (None: encoded when scored).

    Returns:
        (scores float32 [B, k], item ids int64 [B, k]) numpy, best first, -inf / -1 in unfilled slots.
    """
    user_repr = model.encode_users(user_inputs)                                         # [B, d]
    tree = model.tree
    leaf_mask = None if mask is None else (mask[0], tree.item_leaf[mask[1]])
    scores, leaves = beam_search(lambda level, nodes: model.score_nodes(user_repr, level, nodes, item_repr),
                                 tree.children, next(iter(user_inputs.values())).shape[0], k, beam_size, leaf_mask,
                                 stats)
    leaves = leaves.numpy()
    return scores.numpy(), np.where(leaves >= 0, tree.leaf_items[np.maximum(leaves, 0)], -1)


@torch.no_grad()
def tree_report(model, test_users, params):
    """Beam search of a TreeRetrievable model against scoring every leaf: metrics of both, recall of the exact
    top-k, nodes scored per user (see serving_report for the arguments).

    Returns:
        JSON-ready dict: "kind", "tree" (depth, branching, leaves, beam_size, nodes scored per user, the tree
        file), "metrics_beam", "metrics_exact", "recall_vs_exact" / "recall_vs_exact_k".
    """
    evaluator = Evaluator.from_params(params)
    k_max = evaluator.max_k
    beam_size = params["beam_size"] or k_max
    n_users = len(test_users)
    was_training = model.training
    model.eval()
    item_repr = model.all_item_repr()
    beam_ids = np.empty((n_users, k_max), dtype=np.int64)
    exact_ids = np.empty((n_users, k_max), dtype=np.int64)
    hits, sizes, nodes = (np.empty(n_users, dtype=np.int64) for _ in range(3))
    for start, stop in progress_bar(_batches(n_users, params["eval_batch_size"]), desc="beam search",
                                    verbose=_show_progress(params)):
        inputs = _inputs(model, test_users, start, stop)
        stats = {}
        _, ids = tree_search(model, inputs, k_max, beam_size, mask_block(test_users, start, stop), stats, item_repr)
        scores = model.full_scores(inputs, item_repr)                                   # [B, n_items]
        top_scores, top_ids = masked_topk(scores, k_max, test_users.mask_indptr, test_users.mask_items,
                                          row_offset=start)
        beam_ids[start:stop], exact_ids[start:stop] = ids, top_ids.cpu().numpy()
        nodes[start:stop] = stats["nodes_scored"]
        hits[start:stop], sizes[start:stop] = tie_aware_hits(ids, scores_at(scores, ids),
                                                             top_scores.double().cpu().numpy())
    model.train(was_training)
    tree = model.tree
    path = tree_file(model.checkpoint)
    return {"kind": "tree",
            "tree": {"depth": tree.depth, "branching": tree.branching, "leaves": tree.num_items,
                     "beam_size": beam_size, "nodes_scored_per_user": float(nodes.mean()) if n_users else 0.0,
                     "nodes_scored_max": int(nodes.max()) if n_users else 0,
                     "path": path if os.path.isfile(path) else None},
            "metrics_beam": _metrics(evaluator, beam_ids, test_users),
            "metrics_exact": _metrics(evaluator, exact_ids, test_users),
            "recall_vs_exact": recall_vs_exact(hits, sizes), "recall_vs_exact_k": k_max}
