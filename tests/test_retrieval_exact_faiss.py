"""Exact masked top-k and the faiss retriever: correctness vs numpy/torch references, I/O."""
import os

import faiss
import numpy as np
import pytest
import torch

from model_zoo.errors import DataError
from model_zoo.retrieval.exact import csr_rows, exact_search, masked_topk
from model_zoo.retrieval.faiss_index import FaissRetriever, FaissThreads


def random_mask(rng, n_users, n_items, max_len):
    """CSR mask with row lengths 0..max_len (distinct items per row)."""
    rows = [rng.choice(n_items, size=int(rng.integers(0, max_len + 1)), replace=False) for _ in range(n_users)]
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    return indptr, np.concatenate(rows).astype(np.int32), rows


def numpy_masked_topk(scores, k, mask_rows):
    """Reference: sort each row descending after dropping masked items; pad with -1."""
    ids = np.full((scores.shape[0], k), -1, dtype=np.int64)
    for u, row in enumerate(scores):
        allowed = np.setdiff1d(np.arange(scores.shape[1]), mask_rows[u])
        ranked = allowed[np.argsort(-row[allowed], kind="stable")][:k]
        ids[u, :len(ranked)] = ranked
    return ids


def test_csr_rows_block():
    indptr = np.array([0, 2, 2, 5, 6])
    items = np.array([7, 1, 3, 4, 5, 9])
    rows, cols = csr_rows(indptr, items, 1, 4)
    assert rows.tolist() == [1, 1, 1, 2] and cols.tolist() == [3, 4, 5, 9]
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    with pytest.raises(ValueError, match=r"\[3, 5\)"):
        csr_rows(indptr, items, 3, 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_topk_matches_numpy_and_never_returns_masked(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, k, offset = 30, 50, 10, 5
    indptr, items, rows = random_mask(rng, n_users + offset, n_items, max_len=45)  # some rows < k valid
    scores = torch.from_numpy(rng.normal(size=(n_users, n_items)).astype(np.float32))
    before = scores.clone()
    top_scores, top_ids = masked_topk(scores, k, indptr, items, row_offset=offset)
    assert torch.equal(scores, before), "caller's tensor must be untouched when inplace=False"
    want = numpy_masked_topk(scores.numpy(), k, rows[offset:])
    np.testing.assert_array_equal(top_ids.numpy(), want)
    assert (want == -1).any(), "the case should include rows with fewer than k valid items"
    for u in range(n_users):
        returned = set(top_ids[u].tolist()) - {-1}
        assert not returned & set(rows[offset + u].tolist())
    valid = top_ids >= 0
    assert torch.equal(top_scores[valid], scores[valid.nonzero()[:, 0], top_ids[valid]])
    assert torch.isneginf(top_scores[~valid]).all()


def test_masked_topk_inplace_no_mask_and_k_beyond_items():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.7]])
    indptr, items = np.array([0, 1, 1]), np.array([1])
    _, ids = masked_topk(scores, 5, indptr, items, inplace=True)
    assert ids.tolist() == [[2, 0, -1, -1, -1], [2, 0, 1, -1, -1]]
    assert torch.isneginf(scores[0, 1]), "inplace=True overwrites masked entries"
    _, ids = masked_topk(torch.tensor([[0.1, 0.9, 0.5]]), 2)
    assert ids.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="NaN"):
        masked_topk(torch.tensor([[0.1, float("nan")]]), 1)
    with pytest.raises(ValueError, match=r"mask items must be in \[0, 3\)"):
        masked_topk(torch.zeros(1, 3), 1, np.array([0, 1]), np.array([3]))


def test_exact_search_blocks_equal_one_shot():
    rng = np.random.default_rng(3)
    n_users, n_items, k = 23, 40, 8
    indptr, items, rows = random_mask(rng, n_users, n_items, max_len=36)
    full = torch.from_numpy(rng.normal(size=(n_users, n_items)).astype(np.float32))
    before = full.clone()
    scores, ids = exact_search(lambda a, b: full[a:b], n_users, k, batch_size=7,
                               mask_indptr=indptr, mask_items=items, progress=False)
    assert torch.equal(full, before), "views returned by score_fn must not be modified"
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (n_users, k)
    np.testing.assert_array_equal(ids, numpy_masked_topk(full.numpy(), k, rows))
    with pytest.raises(ValueError, match="mask_indptr has length"):
        exact_search(lambda a, b: full[a:b], n_users, k, 7, indptr[:-1], items, progress=False)


def clustered(seed, n_items=2000, n_users=100, dim=32, n_clusters=20):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)) * 2
    items = centers[rng.integers(0, n_clusters, n_items)] + rng.normal(size=(n_items, dim)) * 0.5
    users = centers[rng.integers(0, n_clusters, n_users)] + rng.normal(size=(n_users, dim)) * 0.5
    return items.astype(np.float32), users.astype(np.float32)


@pytest.fixture
def faiss_threads_restored():
    """num_threads=1 avoids OpenMP spin on loaded CI cores; restore the process-wide setting after."""
    before = faiss.omp_get_max_threads()
    yield 1
    faiss.omp_set_num_threads(before)


def test_flat_ip_equals_exact_torch_with_masks():
    rng = np.random.default_rng(4)
    n_users, n_items, dim, k = 40, 500, 16, 20
    item_vecs = rng.normal(size=(n_items, dim)).astype(np.float32)
    user_vecs = rng.normal(size=(n_users + 3, dim)).astype(np.float32)
    indptr, items, _ = random_mask(rng, n_users + 3, n_items, max_len=60)
    retriever = FaissRetriever("flat_ip", dim=dim).add(item_vecs)
    scores, ids = retriever.search(user_vecs[3:], k, indptr, items, row_offset=3)
    full = torch.from_numpy(user_vecs[3:]) @ torch.from_numpy(item_vecs).T  # [n_users, n_items]
    want_scores, want_ids = masked_topk(full, k, indptr, items, row_offset=3)
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_allclose(scores, want_scores.numpy(), rtol=1e-4, atol=1e-4)
    assert ids.shape == (n_users, k) and (ids >= 0).all()
    # k larger than the retrievable items: padded with -1 / -inf, exactly k columns
    scores, ids = retriever.search(user_vecs[:1], n_items, indptr, items)
    n_masked = int(indptr[1])
    assert ids.shape == (1, n_items) and (ids[0, n_items - n_masked:] == -1).all()
    assert (ids[0, :n_items - n_masked] >= 0).all() and np.isneginf(scores[0, n_items - n_masked:]).all()


@pytest.mark.parametrize("index_type, params, min_recall", [
    ("ivfpq", dict(m=16, nlist=100, nprobe=10), 0.6),
    ("hnsw", dict(hnsw_m=32, ef_search=128), 0.95),
])
def test_approximate_recall_vs_exact(index_type, params, min_recall, faiss_threads_restored):
    item_vecs, user_vecs = clustered(5)
    _, exact_ids = FaissRetriever("flat_ip").add(item_vecs).search(user_vecs, 10)
    retriever = FaissRetriever(index_type, dim=32, num_threads=faiss_threads_restored, **params)
    retriever.train(item_vecs).add(item_vecs)
    assert faiss.omp_get_max_threads() == 1, "num_threads is applied before heavy faiss calls"
    _, ids = retriever.search(user_vecs, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert recall > min_recall
    if index_type == "ivfpq":
        assert retriever.nlist_effective == 2000 // 39  # clamped from 100 for a 2000-item corpus


def test_ivfpq_validation():
    with pytest.raises(ValueError, match="dim % m == 0.*dim=30, m=8"):
        FaissRetriever("ivfpq", dim=30, m=8)
    with pytest.raises(ValueError, match="dim % m == 0.*dim=30, m=8"):
        FaissRetriever("ivfpq", m=8).train(np.zeros((300, 30), np.float32))
    with pytest.raises(ValueError, match="at least 256 training vectors, got 100"):
        FaissRetriever("ivfpq", m=4).train(np.random.default_rng(0).normal(size=(100, 8)))
    with pytest.raises(ValueError, match="call train"):
        FaissRetriever("ivfpq", dim=8, m=4).add(np.zeros((10, 8), np.float32))
    with pytest.raises(ValueError, match="unknown index_type 'ivf'"):
        FaissRetriever("ivf")
    retriever = FaissRetriever("flat_ip", dim=8)
    with pytest.raises(ValueError, match="index is empty"):
        retriever.search(np.zeros((1, 8), np.float32), 3)
    retriever.add(np.ones((5, 8)))
    with pytest.raises(ValueError, match="dim 7, expected dim=8"):
        retriever.search(np.zeros((2, 7), np.float32), 3)
    with pytest.raises(ValueError, match=r"mask items must be in \[0, 5\)"):
        retriever.search(np.zeros((1, 8), np.float32), 3, np.array([0, 1]), np.array([5]))


@pytest.mark.parametrize("index_type", ["flat_ip", "ivfpq", "hnsw"])
def test_write_read_round_trip(tmp_path, index_type, faiss_threads_restored):
    item_vecs, user_vecs = clustered(6, n_items=1000, n_users=20, dim=16)
    rng = np.random.default_rng(6)
    indptr, items, _ = random_mask(rng, 20, 1000, max_len=15)
    retriever = FaissRetriever(index_type, dim=16, m=4, nprobe=3, ef_search=40, num_threads=faiss_threads_restored)
    retriever.train(item_vecs).add(item_vecs)
    path = str(tmp_path / f"{index_type}.faiss")
    retriever.write(path)
    assert os.listdir(tmp_path) == [f"{index_type}.faiss"], "no temp file may be left behind"
    loaded = FaissRetriever.read(path)
    assert loaded.index_type == index_type and loaded.ntotal == 1000 and loaded.params == retriever.params
    assert loaded.serialized_bytes() == retriever.serialized_bytes() < os.path.getsize(path)
    for a, b in zip(retriever.search(user_vecs, 15, indptr, items), loaded.search(user_vecs, 15, indptr, items)):
        np.testing.assert_array_equal(a, b)


def test_read_missing_or_corrupt_file_names_it(tmp_path):
    item_vecs, _ = clustered(7, n_items=200, dim=16)
    path = tmp_path / "index.faiss"
    FaissRetriever("hnsw").add(item_vecs).write(str(path))
    blob = path.read_bytes()
    with pytest.raises(FileNotFoundError, match="missing.faiss"):
        FaissRetriever.read(str(tmp_path / "missing.faiss"))
    corruptions = {
        "truncated.faiss": blob[: len(blob) // 2],
        "header_only.faiss": blob[:12],
        "garbage.faiss": b"not a faiss file at all",
        "flipped.faiss": blob[:-100] + bytes([blob[-100] ^ 0xFF]) + blob[-99:],
    }
    for name, data in corruptions.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name):
            FaissRetriever.read(str(tmp_path / name))


def test_faiss_threads_sets_and_restores(faiss_threads_restored):
    faiss.omp_set_num_threads(2)
    with FaissThreads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == 2
    with FaissThreads(None):                                      # None leaves the setting alone
        assert faiss.omp_get_max_threads() == 2
    with pytest.raises(RuntimeError), FaissThreads(1):            # restored on an exception too
        raise RuntimeError("inside")
    assert faiss.omp_get_max_threads() == 2
