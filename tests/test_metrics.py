"""Top-k metrics against a slow per-user reference, sklearn's ndcg_score, and hand-computed values."""
import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from model_zoo.retrieval.metrics import format_metrics, parse_metric_name, topk_metrics


def reference_metrics(topk_items, gt_lists, ks, precision_denominator):
    """Obviously-correct per-user loop; users with empty ground truth are skipped."""
    sums, n_eval = {}, 0
    for row, gt in zip(topk_items, gt_lists):
        gt = set(int(i) for i in gt)
        if not gt:
            continue
        n_eval += 1
        for k in ks:
            ranked = [int(i) for i in row[:k]]
            hit_ranks = [r + 1 for r, item in enumerate(ranked) if item >= 0 and item in gt]
            hits = len(hit_ranks)
            dcg = sum(1.0 / math.log2(r + 1) for r in hit_ranks)
            idcg = sum(1.0 / math.log2(r + 1) for r in range(1, min(len(gt), k) + 1))
            denom = k if precision_denominator == "k" else min(len(gt), k)
            for name, value in (("Recall", hits / len(gt)), ("NDCG", dcg / idcg),
                                ("HitRate", float(hits > 0)), ("Precision", hits / denom)):
                key = f"{name}(k={k})"
                sums[key] = sums.get(key, 0.0) + value
    return {key: total / n_eval for key, total in sums.items()}


def to_csr(lists):
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    items = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.zeros(0, np.int64)
    return indptr, items


def random_case(seed, n_users=80, n_items=60, k_max=25, pad=True):
    """Random rankings (some rows -1 padded) and ground truths of sizes 0..35 (some > k, some < k)."""
    rng = np.random.default_rng(seed)
    topk = np.stack([rng.permutation(n_items)[:k_max] for _ in range(n_users)]).astype(np.int64)
    if pad:
        for u in rng.choice(n_users, size=n_users // 4, replace=False):
            topk[u, rng.integers(0, k_max):] = -1
    gt_lists = []
    for _ in range(n_users):
        size = int(rng.integers(0, 36))
        gt_lists.append(rng.choice(n_items, size=size, replace=False) if size else np.zeros(0, np.int64))
    return topk, gt_lists


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("precision_denominator", ["k", "min_gt_k"])
def test_matches_reference(seed, precision_denominator):
    topk, gt_lists = random_case(seed)
    ks = (1, 5, 20, 25)
    indptr, items = to_csr(gt_lists)
    got = topk_metrics(topk, indptr, items, ks=ks, precision_denominator=precision_denominator)
    want = reference_metrics(topk, gt_lists, ks, precision_denominator)
    assert list(got) == [f"{m}(k={k})" for m in ("Recall", "NDCG", "HitRate", "Precision") for k in ks]
    assert all(isinstance(v, float) for v in got.values())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # sanity: the case really mixes |GT| > k and |GT| < k users and has hits
    sizes = np.diff(indptr)
    assert (sizes > 20).any() and ((sizes > 0) & (sizes < 5)).any() and got["HitRate(k=25)"] > 0


def test_denominators_differ_only_in_precision():
    topk, gt_lists = random_case(7)
    indptr, items = to_csr(gt_lists)
    standard = topk_metrics(topk, indptr, items, ks=(20,), precision_denominator="k")
    deezer = topk_metrics(topk, indptr, items, ks=(20,), precision_denominator="min_gt_k")
    assert deezer["Precision(k=20)"] > standard["Precision(k=20)"]
    for name in ("Recall(k=20)", "NDCG(k=20)", "HitRate(k=20)"):
        assert deezer[name] == standard[name]


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_ndcg_matches_sklearn(seed):
    n_items, k_max = 60, 25
    topk, gt_lists = random_case(seed, n_items=n_items, k_max=k_max, pad=False)
    keep = [u for u, gt in enumerate(gt_lists) if len(gt) > 0]
    topk, gt_lists = topk[keep], [gt_lists[u] for u in keep]
    # Same ranking for sklearn: ranked items get distinct scores k_max..1, the rest 0 (ranks > k_max).
    y_score = np.zeros((len(keep), n_items))
    y_true = np.zeros((len(keep), n_items))
    for row, (ranked, gt) in enumerate(zip(topk, gt_lists)):
        y_score[row, ranked] = np.arange(k_max, 0, -1)
        y_true[row, gt] = 1.0
    indptr, items = to_csr(gt_lists)
    for k in (1, 3, 10, 25):
        ours = topk_metrics(topk, indptr, items, ks=(k,), metrics=("NDCG",))[f"NDCG(k={k})"]
        assert ours == pytest.approx(ndcg_score(y_true, y_score, k=k), abs=1e-12)


def test_hand_computed_values():
    topk = np.array([[3, 1, 2], [0, 4, -1]])
    indptr, items = to_csr([[1, 5], [4]])
    got = topk_metrics(topk, indptr, items, ks=(1, 3), precision_denominator="min_gt_k")
    d2 = 1 / math.log2(3)
    assert got["Recall(k=3)"] == pytest.approx((0.5 + 1.0) / 2)
    assert got["NDCG(k=3)"] == pytest.approx((d2 / (1 + d2) + d2 / 1.0) / 2)
    assert got["HitRate(k=1)"] == 0.0 and got["HitRate(k=3)"] == 1.0
    assert got["Precision(k=3)"] == pytest.approx((1 / 2 + 1 / 1) / 2)


def test_empty_ground_truth_users_are_skipped():
    topk, gt_lists = random_case(3, pad=False)
    nonempty = [u for u, gt in enumerate(gt_lists) if len(gt)]
    assert len(nonempty) < len(gt_lists)
    full = topk_metrics(topk, *to_csr(gt_lists), ks=(10,))
    only = topk_metrics(topk[nonempty], *to_csr([gt_lists[u] for u in nonempty]), ks=(10,))
    assert full == pytest.approx(only, abs=1e-12)
    with pytest.raises(ValueError, match="no user has a non-empty ground truth"):
        topk_metrics(topk[:2], np.zeros(3, np.int64), np.zeros(0, np.int64), ks=(10,))


def test_duplicate_ground_truth_counts_once():
    topk = np.array([[2, 7, 1]])
    once = topk_metrics(topk, *to_csr([[7, 9]]), ks=(3,))
    twice = topk_metrics(topk, *to_csr([[7, 9, 7]]), ks=(3,))
    assert once == twice and once["Recall(k=3)"] == 0.5


def test_validation_errors():
    topk = np.array([[0, 1, 2], [3, 4, 5]])
    indptr, items = to_csr([[1], [2]])
    with pytest.raises(ValueError, match=r"unknown.*'MRR'.*Recall.*NDCG.*HitRate.*Precision"):
        topk_metrics(topk, indptr, items, ks=(2,), metrics=("Recall", "MRR"))
    with pytest.raises(ValueError, match="precision_denominator 'gt'.*'k'.*'min_gt_k'"):
        topk_metrics(topk, indptr, items, ks=(2,), precision_denominator="gt")
    with pytest.raises(ValueError, match=r"k=4 .*\[1, 3\]"):
        topk_metrics(topk, indptr, items, ks=(2, 4))
    with pytest.raises(ValueError, match=r"gt_indptr must have shape \[3\]"):
        topk_metrics(topk, indptr[:-1], items, ks=(2,))
    with pytest.raises(ValueError, match="topk_items must be an integer array"):
        topk_metrics(topk.astype(float), indptr, items, ks=(2,))
    with pytest.raises(ValueError, match="duplicated item"):
        topk_metrics(np.array([[0, 1, 0], [3, 4, 5]]), indptr, items, ks=(2,))
    with pytest.raises(ValueError, match="end at len"):
        topk_metrics(topk, np.array([0, 1, 5]), items, ks=(2,))


def test_format_and_parse_metric_names():
    text = format_metrics({"Recall(k=20)": 0.1234564, "NDCG(k=20)": 0.2345671})
    assert text == "Recall(k=20): 0.123456 - NDCG(k=20): 0.234567"
    assert parse_metric_name("Recall(k=20)") == ("Recall", 20)
    assert parse_metric_name(" NDCG( k = 50 ) ") == ("NDCG", 50)
    for bad in ("Recall", "Recall(k=)", "Recall(20)", "Recall(k=0)", "(k=5)", "Recall(k=2.5)", None):
        with pytest.raises(ValueError, match="metric name"):
            parse_metric_name(bad)
    # every name produced by topk_metrics parses back
    names = topk_metrics(np.array([[0, 1]]), *to_csr([[1]]), ks=(1, 2))
    assert [parse_metric_name(n) for n in names][:2] == [("Recall", 1), ("Recall", 2)]
