"""Full-ranking top-k metrics (Recall, NDCG, HitRate, Precision) with FuxiCTR-style names.

Everything is computed on item indices (0-based `item_index` space). The caller is expected to
rank the whole corpus, remove masked (e.g. already seen) items and pass the best `k_max` items
per user. Metric names in logs and files look like ``Recall(k=20)`` / ``NDCG(k=50)``.
"""
import collections
import logging
import re

import numpy as np

from ..config import PRECISION_DENOMINATORS

KNOWN_METRICS = ("Recall", "NDCG", "HitRate", "Precision")
_METRIC_NAME_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\(\s*k\s*=\s*(\d+)\s*\)\s*$")


def parse_metric_name(name):
    """Split a FuxiCTR-style metric name into its base name and cutoff.

    Args:
        name: a string such as ``"Recall(k=20)"``.

    Returns:
        (base_name, k), e.g. ``("Recall", 20)``. The base name is not checked against
        KNOWN_METRICS here (``topk_metrics`` does that).

    Raises:
        ValueError: if the name is not of the form ``Name(k=<positive int>)``.
    """
    match = _METRIC_NAME_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"malformed metric name {name!r}: expected the form 'Name(k=<int>)', "
                         f"e.g. 'Recall(k=20)'")
    k = int(match.group(2))
    if k <= 0:
        raise ValueError(f"metric name {name!r} has k={k}: expected k >= 1")
    return match.group(1), k


def format_metrics(metric_values):
    """Format metrics FuxiCTR style: ``"Recall(k=20): 0.123456 - NDCG(k=20): 0.234567"``.

    Args:
        metric_values: mapping metric name -> number (insertion order is kept).
    """
    return " - ".join(f"{name}: {float(value):.6f}" for name, value in metric_values.items())


def _validate_csr(indptr, items, n_rows, what):
    indptr = np.asarray(indptr)
    items = np.asarray(items)
    if indptr.ndim != 1 or indptr.shape[0] != n_rows + 1:
        raise ValueError(f"{what}_indptr must have shape [{n_rows + 1}] (n_users + 1), "
                         f"got {list(indptr.shape)}")
    if items.ndim != 1:
        raise ValueError(f"{what}_items must be 1-D, got shape {list(items.shape)}")
    if not (np.issubdtype(indptr.dtype, np.integer) and np.issubdtype(items.dtype, np.integer)):
        raise ValueError(f"{what}_indptr and {what}_items must be integer arrays, "
                         f"got {indptr.dtype} and {items.dtype}")
    if indptr[0] != 0 or indptr[-1] != items.shape[0] or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{what}_indptr must start at 0, be non-decreasing and end at "
                         f"len({what}_items)={items.shape[0]}; got start {indptr[0]}, end {indptr[-1]}")
    if items.size and items.min() < 0:
        raise ValueError(f"{what}_items must be item indices >= 0, found {items.min()}")
    return indptr.astype(np.int64, copy=False), items.astype(np.int64, copy=False)


def _hit_matrix(topk_items, gt_indptr, gt_items):
    """Return (hits bool [n_users, k_max], gt_sizes int64 [n_users]) treating GT rows as sets."""
    n_users = topk_items.shape[0]
    top_max = int(topk_items.max()) if topk_items.size else -1
    gt_max = int(gt_items.max()) if gt_items.size else -1
    key_base = max(top_max, gt_max, 0) + 1  # keys user * key_base + item are unique per (user, item)
    gt_users = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(gt_indptr))
    gt_keys = np.unique(gt_users * key_base + gt_items)  # sorted, duplicates in a GT row removed
    gt_sizes = np.bincount(gt_keys // key_base, minlength=n_users).astype(np.int64)  # [n_users]
    valid = topk_items >= 0  # [n_users, k_max]; -1 is padding
    query_keys = np.arange(n_users, dtype=np.int64)[:, None] * key_base + topk_items  # [n_users, k_max]
    if gt_keys.size == 0:
        return np.zeros(topk_items.shape, dtype=bool), gt_sizes
    pos = np.minimum(np.searchsorted(gt_keys, query_keys), gt_keys.size - 1)
    hits = valid & (gt_keys[pos] == query_keys)
    return hits, gt_sizes


def topk_metrics(topk_items, gt_indptr, gt_items, ks=(20, 50),
                 metrics=("Recall", "NDCG", "HitRate", "Precision"), precision_denominator="k"):
    """Average top-k metrics over users (vectorised; one pass per k).

    Definitions for user u with ground-truth set G (duplicates within a row count once) and
    hits@k = |top-k(u) ∩ G|:
      Recall@k = hits@k / |G|;  HitRate@k = 1[hits@k > 0];
      Precision@k = hits@k / k  (precision_denominator="k") or hits@k / min(|G|, k) ("min_gt_k",
      the Deezer protocol); NDCG@k = DCG / IDCG with DCG = sum over hit ranks r (1-based) of
      1 / log2(r + 1) and IDCG the same sum over ranks 1..min(|G|, k).
    Users with an empty ground truth are skipped (excluded from the average, not counted as 0).

    Args:
        topk_items: int array [n_users, k_max], ranked best first, masked items already removed;
            -1 means "no item" (padding) and never counts as a hit.
        gt_indptr: int array [n_users + 1], CSR row pointer of the ground truth.
        gt_items: int array [nnz], ground-truth item indices.
        ks: cutoffs (each 1 <= k <= k_max); an int is accepted for a single cutoff.
        metrics: subset of KNOWN_METRICS.
        precision_denominator: "k" or "min_gt_k".

    Returns:
        OrderedDict name -> float, ordered by metric then k, e.g. ``Recall(k=20), Recall(k=50),
        NDCG(k=20), ...``.

    Raises:
        ValueError: unknown metric or denominator, bad shapes/ranges, duplicate items in a
            top-k row, or no user with a non-empty ground truth.
    """
    topk_items = np.asarray(topk_items)
    if topk_items.ndim != 2 or not np.issubdtype(topk_items.dtype, np.integer):
        raise ValueError(f"topk_items must be an integer array [n_users, k_max], got dtype "
                         f"{topk_items.dtype} and shape {list(topk_items.shape)}")
    topk_items = topk_items.astype(np.int64, copy=False)
    n_users, k_max = topk_items.shape
    metrics = [metrics] if isinstance(metrics, str) else list(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown or empty metrics {unknown or metrics!r}: known metrics are "
                         f"{list(KNOWN_METRICS)}")
    if precision_denominator not in PRECISION_DENOMINATORS:
        raise ValueError(f"unknown precision_denominator {precision_denominator!r}: expected one of "
                         f"{list(PRECISION_DENOMINATORS)}")
    ks = [ks] if isinstance(ks, (int, np.integer)) else list(ks)
    for k in ks:
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= k_max:
            raise ValueError(f"cutoff k={k!r} must be an int in [1, {k_max}] (the width of topk_items)")
    gt_indptr, gt_items = _validate_csr(gt_indptr, gt_items, n_users, "gt")
    if topk_items.size and topk_items.min() < -1:
        raise ValueError(f"topk_items must hold item indices >= 0 or -1 padding, found {topk_items.min()}")
    sorted_rows = np.sort(topk_items, axis=1)
    duplicated = (sorted_rows[:, 1:] == sorted_rows[:, :-1]) & (sorted_rows[:, 1:] >= 0)
    if duplicated.any():
        user = int(np.flatnonzero(duplicated.any(axis=1))[0])
        raise ValueError(f"topk_items row {user} contains a duplicated item; rows must rank distinct items")

    hits, gt_sizes = _hit_matrix(topk_items, gt_indptr, gt_items)  # [n_users, k_max], [n_users]
    evaluated = gt_sizes > 0
    n_skipped = int(n_users - evaluated.sum())
    if n_skipped == n_users:
        raise ValueError(f"no user has a non-empty ground truth (n_users={n_users}); cannot average metrics")
    if n_skipped:
        logging.debug("topk_metrics: skipped %d of %d users with empty ground truth", n_skipped, n_users)
    hits, gt_sizes = hits[evaluated], gt_sizes[evaluated]

    cum_hits = np.cumsum(hits, axis=1, dtype=np.int64)  # [n_eval, k_max]
    discounts = 1.0 / np.log2(np.arange(2, k_max + 2, dtype=np.float64))  # [k_max], rank r -> 1/log2(r+1)
    cum_dcg = np.cumsum(hits * discounts, axis=1)  # [n_eval, k_max]
    cum_ideal = np.cumsum(discounts)  # [k_max]

    per_k = {}
    for k in dict.fromkeys(int(k) for k in ks):  # dedupe, keep order
        hits_k = cum_hits[:, k - 1].astype(np.float64)  # [n_eval]
        ideal_hits = np.minimum(gt_sizes, k)  # [n_eval], >= 1
        precision_den = k if precision_denominator == "k" else ideal_hits
        per_k[k] = {
            "Recall": hits_k / gt_sizes,
            "NDCG": cum_dcg[:, k - 1] / cum_ideal[ideal_hits - 1],
            "HitRate": (hits_k > 0).astype(np.float64),
            "Precision": hits_k / precision_den,
        }
    results = collections.OrderedDict()
    for metric in metrics:
        for k, values in per_k.items():
            results[f"{metric}(k={k})"] = float(values[metric].mean())
    return results


TIE_RTOL = 1e-5  # relative tolerance under which two exact scores count as tied at the top-k cut-off


def tie_aware_hits(approx_ids, exact_scores_of_approx, reference_scores, min_score=None):
    """Per user, how many of the exact top-k an approximate top-k list found, counting near-ties as found.

    The reference is the exact top-k (masked items removed; with ``min_score``, only entries above it:
    for SparCode items with score 0 are tied and unordered). A returned item counts when its exact score
    is >= the last reference score minus TIE_RTOL * (1 + |score|), so a near-tie swapped at the cut-off
    is not a miss; hits are capped at the reference size.

    Args:
        approx_ids: int [B, k] returned ids (-1 = empty slot).
        exact_scores_of_approx: float [B, k] exact scores of approx_ids (ignored where the id is -1).
        reference_scores: float [B, k] exact top-k scores, best first (-inf = masked / empty).
        min_score: if set, only reference entries with score > min_score count.

    Returns:
        (hits int64 [B], sizes int64 [B]); hits <= sizes.
    """
    reference_scores = np.asarray(reference_scores, dtype=np.float64)
    valid_ref = np.isfinite(reference_scores)                                            # [B, k]
    if min_score is not None:
        valid_ref &= reference_scores > min_score
    sizes = valid_ref.sum(axis=1).astype(np.int64)                                       # [B]
    last = np.where(sizes > 0, sizes - 1, 0)
    threshold = reference_scores[np.arange(reference_scores.shape[0]), last]             # [B]
    threshold = threshold - TIE_RTOL * (1.0 + np.abs(threshold))
    scores = np.asarray(exact_scores_of_approx, dtype=np.float64)
    good = (np.asarray(approx_ids) >= 0) & (scores >= threshold[:, None])                # [B, k]
    if min_score is not None:
        good &= scores > min_score
    hits = np.minimum(good.sum(axis=1), sizes).astype(np.int64)
    return hits, sizes


def recall_vs_exact(hits, sizes):
    """Mean over users with a non-empty reference of hits / reference size (nan if there is none)."""
    hits, sizes = np.asarray(hits), np.asarray(sizes)
    used = sizes > 0
    return float((hits[used] / sizes[used]).mean()) if used.any() else float("nan")
