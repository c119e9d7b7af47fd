"""The sparse code index (model_zoo/retrieval/sparse_index.py) against a dense brute-force reference:
build, top-L, float16, masks, backends, unseen-key policies, adding keys, structure checks."""
import numpy as np
import pytest
import torch

from model_zoo.retrieval import _merge
from model_zoo.retrieval.code_keys import pack_codes, unpack_keys
from model_zoo.retrieval.sparse_index import UNSEEN_KEY_POLICIES, SparseCodeIndex

BACKENDS = ["numpy"] + (["numba"] if _merge.HAVE_NUMBA else [])
M, N, N_ITEMS, K_U = 2, 4, 300, 4  # 16 keys


def random_scores(seed=0, n_keys=N ** M, n_items=N_ITEMS):
    """Raw scores S [n_keys, n_items]: continuous random values (no ties)."""
    return np.random.default_rng(seed).standard_normal((n_keys, n_items)).astype(np.float32)


def score_fn_of(matrix, as_torch=False):
    def score_fn(keys, start, stop):
        block = matrix[keys, start:stop]  # [kb, ib]
        return torch.from_numpy(block.copy()) if as_torch else block
    return score_fn


def dense_topk(matrix, bias, query_keys, k, masks=None):
    """Reference: relu(S + b~) densely, summed over each query's keys in float64, masked, top-k
    among positive scores ordered by score desc then id asc."""
    sparse = np.maximum(matrix + np.float32(bias), 0).astype(np.float64)  # [n_keys, n_items]
    all_ids, all_scores = [], []
    for b, keys in enumerate(query_keys):
        total = np.zeros(matrix.shape[1])
        for key in keys:  # a repeated key counts twice (Eq. 11)
            total += sparse[key]
        if masks is not None:
            total[masks[b]] = 0.0
        ids = np.flatnonzero(total > 0)
        ids = ids[np.lexsort((ids, -total[ids]))][:k]
        all_ids.append(np.concatenate([ids, -np.ones(k - ids.size, np.int64)]))
        all_scores.append(np.concatenate([total[ids], np.full(k - ids.size, -np.inf)]))
    return np.array(all_scores, np.float32), np.array(all_ids, np.int64)


def build(matrix, bias, **kwargs):
    params = dict(num_codebooks=M, codebook_size=N, num_query_tokens=K_U, key_block=5, item_block=64,
                  progress=False, checkpoint_hash="ckpt-a")
    params.update(kwargs)
    return SparseCodeIndex.build(score_fn_of(matrix), np.arange(matrix.shape[0]), matrix.shape[1], bias, **params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_equals_dense_relu_topk_without_cap(backend):
    matrix = random_scores(0)
    bias = -1.2  # the "trained b": ~11% of the entries are positive
    index = build(matrix, bias, backend=backend)
    rng = np.random.default_rng(2)
    queries = rng.integers(0, N ** M, size=(40, K_U))
    queries[0] = [3, 3, 3, 5]  # duplicate keys are summed per occurrence
    for k in (1, 10, 200):  # 200 > positive items of most queries: padded
        scores, ids = index.search(queries, k)
        ref_scores, ref_ids = dense_topk(matrix, bias, queries, k)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
        assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert (ids[:, -1] == -1).any() and np.isneginf(scores[ids == -1]).all()
    one_scores, one_ids = index.search_one(queries[7], 10)
    np.testing.assert_array_equal(one_ids, ref_ids[7, :10])
    np.testing.assert_array_equal(one_scores, index.search(queries[7:8], 10)[0][0])
    # codes [B, K_u, M] are accepted as well as packed keys
    np.testing.assert_array_equal(index.search(unpack_keys(queries, N, M), 10)[1], ref_ids[:, :10])


def test_build_accepts_torch_and_checks_score_fn_output():
    matrix = random_scores(3)
    index = SparseCodeIndex.build(score_fn_of(matrix, as_torch=True), np.arange(16), N_ITEMS, -1.0,
                                  num_codebooks=M, codebook_size=N, progress=False, num_threads=1)
    reference = build(matrix, -1.0)
    np.testing.assert_array_equal(index.items, reference.items)
    np.testing.assert_array_equal(index.scores, reference.scores)
    assert index.key_set_kind == "all"
    with pytest.raises(ValueError, match=r"returned shape \(16, 299\), expected \(16, 300\)"):
        SparseCodeIndex.build(lambda keys, a, b: matrix[keys, a:b - 1], np.arange(16), N_ITEMS, -1.0,
                              num_codebooks=M, codebook_size=N, progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        SparseCodeIndex.build(lambda keys, a, b: np.full((len(keys), b - a), np.nan), np.arange(16), N_ITEMS,
                              -1.0, num_codebooks=M, codebook_size=N, progress=False)


def test_float16_storage_drops_underflow_and_rejects_overflow():
    matrix = np.array([[1e-9, 0.5, 3.0, -1.0], [2.0, 1e-3, -2.0, 7.0]], np.float32)  # 2 keys (M=1, N=2)
    params = dict(num_codebooks=1, codebook_size=2, progress=False, score_dtype="float16")
    index = SparseCodeIndex.build(score_fn_of(matrix), np.arange(2), 4, 0.0, **params)
    np.testing.assert_array_equal(index.postings(0)[0], [1, 2])  # 1e-9 rounds to 0 in float16: dropped
    np.testing.assert_array_equal(index.postings(1)[0], [0, 1, 3])
    assert index.scores.dtype == np.float16
    with pytest.raises(ValueError, match="exceeds the float16 range"):
        SparseCodeIndex.build(score_fn_of(matrix * 1e5), np.arange(2), 4, 0.0, **params)


def test_postings_are_exactly_the_positive_sparse_scores():
    matrix = random_scores(4)
    index = build(matrix, -0.5)
    sparse = np.maximum(matrix + np.float32(-0.5), 0)
    for key in range(N ** M):
        items, scores = index.postings(key)
        np.testing.assert_array_equal(items, np.flatnonzero(sparse[key] > 0))
        np.testing.assert_array_equal(scores, sparse[key][sparse[key] > 0])


def test_top_l_cap_keeps_the_largest_with_id_tie_break():
    matrix = np.round(random_scores(5) * 4) / 4  # many ties
    top_l = 7
    index = build(matrix, 0.1, top_l=top_l)
    sparse = np.maximum(matrix + np.float32(0.1), 0)
    for key in range(N ** M):
        row = sparse[key]
        positive = np.flatnonzero(row > 0)
        expected = positive[np.lexsort((positive, -row[positive]))][:top_l]  # score desc, id asc
        items, scores = index.postings(key)
        np.testing.assert_array_equal(items, np.sort(expected))  # stored ascending by item id
        np.testing.assert_array_equal(scores, row[np.sort(expected)])
    assert np.diff(index.indptr).max() == top_l


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_are_respected(backend):
    matrix = random_scores(6)
    index = build(matrix, -1.0, backend=backend)
    rng = np.random.default_rng(7)
    queries = rng.integers(0, N ** M, size=(12, K_U))
    unmasked_ids = index.search(queries, 20)[1]
    masks = [np.unique(np.concatenate([ids[:5][ids[:5] >= 0], rng.integers(0, N_ITEMS, 10)]))
             for ids in unmasked_ids]
    masks[3] = np.array([], np.int64)
    # the CSR holds two extra leading users: row_offset selects the rows of this batch
    mask_rows = [np.array([1, 2]), np.array([0])] + masks
    mask_indptr = np.concatenate([[0], np.cumsum([len(m) for m in mask_rows])]).astype(np.int64)
    mask_items = np.concatenate(mask_rows).astype(np.int32)
    scores, ids = index.search(queries, 20, mask_indptr, mask_items, row_offset=2)
    ref_scores, ref_ids = dense_topk(matrix, -1.0, queries, 20, masks)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    for b in range(len(queries)):
        assert not np.isin(ids[b], masks[b]).any()
        np.testing.assert_array_equal(index.search_one(queries[b], 20, mask=masks[b])[1], ids[b])
    with pytest.raises(ValueError, match=r"mask items must be in \[0, n_items=300\)"):
        index.search_one(queries[0], 5, mask=np.array([300]))
    with pytest.raises(ValueError, match="outside the mask's 14 users"):
        index.search(queries, 5, mask_indptr, mask_items, row_offset=3)


def test_stats_follow_section_4_4():
    index = SparseCodeIndex(keys=np.arange(4), indptr=np.array([0, 2, 2, 5, 6]), items=np.array([0, 3, 1, 2, 9, 4]),
                            scores=np.ones(6, np.float32), num_codebooks=2, codebook_size=2, n_items=10,
                            build_seconds=1.5)
    stats = index.stats()
    assert stats["Sparsity"] == pytest.approx(1 - 6 / (4 * 10))
    assert stats["Average Items"] == pytest.approx(6 / 4)
    assert (stats["nnz"], stats["n_keys"], stats["max_items"], stats["empty_keys"]) == (6, 4, 3, 1)
    assert stats["index_bytes"] == 4 * 8 + 5 * 8 + 6 * 4 + 6 * 4
    assert stats["build_seconds"] == 1.5


def test_constructor_validates_the_csr():
    good = dict(keys=np.arange(4), indptr=np.array([0, 2, 2, 3, 4]), items=np.array([0, 3, 1, 1]),
                scores=np.ones(4, np.float32), num_codebooks=2, codebook_size=2, n_items=5)
    SparseCodeIndex(**good)  # items may repeat across keys
    for change, message in [
        (dict(items=np.array([3, 0, 1, 1])), "strictly ascending"),
        (dict(items=np.array([0, 0, 1, 1])), "strictly ascending"),
        (dict(items=np.array([0, 3, 1, 5])), r"item ids must be in \[0, n_items=5\)"),
        (dict(scores=np.array([1, 0, 1, 1], np.float32)), "finite and > 0"),
        (dict(indptr=np.array([0, 2, 2, 3, 3])), "end at nnz=4"),
        (dict(keys=np.array([0, 2, 1, 3])), "sorted ascending and unique"),
        (dict(keys=np.arange(3), indptr=np.array([0, 2, 3, 4])), r"needs all N\^M = 4 keys"),
        (dict(scores=np.ones(4)), "scores dtype must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            SparseCodeIndex(**{**good, **change})


@pytest.mark.skipif(not _merge.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("score_dtype", ["float32", "float16"])
def test_numpy_and_numba_backends_are_identical(score_dtype):
    rng = np.random.default_rng(11)
    matrix = np.round(rng.standard_normal((64, 3000)) * 8).astype(np.float32) / 8  # ties in sums too
    index = SparseCodeIndex.build(score_fn_of(matrix), np.arange(64), 3000, -1.5, score_dtype=score_dtype,
                                  num_codebooks=2, codebook_size=8, progress=False, backend="numba")
    queries = rng.integers(0, 64, size=(200, 3))
    queries[:20, 1] = queries[:20, 0]  # repeated keys
    masks = [rng.choice(3000, size=rng.integers(0, 60), replace=False) for _ in range(200)]
    mask_indptr = np.concatenate([[0], np.cumsum([len(m) for m in masks])])
    mask_items = np.concatenate(masks)
    results = {}
    for backend in ("numpy", "numba"):
        index.backend = backend
        results[backend] = (index.search(queries, 50, mask_indptr, mask_items),
                            index.search(queries, 7),
                            [index.search_one(q, 30, mask=m) for q, m in zip(queries[:30], masks)])
    (np_masked, np_plain, np_one), (nb_masked, nb_plain, nb_one) = results["numpy"], results["numba"]
    for got, expected in list(zip(nb_masked, np_masked)) + list(zip(nb_plain, np_plain)):
        np.testing.assert_array_equal(got, expected)
    for (s1, i1), (s2, i2) in zip(nb_one, np_one):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


@pytest.mark.skipif(not _merge.HAVE_NUMBA, reason="numba not installed")
def test_numba_decodes_every_float16_value_exactly():
    halves = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16)  # all positive finite float16
    n = halves.size
    index = SparseCodeIndex(keys=np.arange(2), indptr=np.array([0, n, n]), items=np.arange(n),
                            scores=halves, num_codebooks=1, codebook_size=2, n_items=n, backend="numba")
    scores, ids = index.search_one(np.array([0]), n)
    np.testing.assert_array_equal(ids, np.arange(n)[::-1])
    np.testing.assert_array_equal(scores, halves[::-1].astype(np.float32))


def observed_index(matrix, backend, **kwargs):
    """Index over 4 of the 16 keys; codeword j of each codebook is the scalar j, so the codeword
    distance of two keys is the squared difference of their codes."""
    codebooks = np.tile(np.arange(N, dtype=np.float32)[None, :, None], (M, 1, 1))      # [M, N, 1]
    observed = pack_codes(np.array([[0, 0], [1, 3], [3, 3], [2, 0]]), N)               # keys 0, 7, 15, 8
    params = dict(num_codebooks=M, codebook_size=N, num_query_tokens=2, codebooks=codebooks, progress=False,
                  backend=backend)
    params.update(kwargs)
    return SparseCodeIndex.build(score_fn_of(matrix), observed, N_ITEMS, -1.0, **params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unseen_key_policies(backend):
    assert UNSEEN_KEY_POLICIES == ("nearest", "skip", "score")
    matrix = random_scores(12)
    index = observed_index(matrix, backend)
    assert index.key_set_kind == "observed" and index.n_keys == 4 and index.unseen_key == "nearest"
    unseen = int(pack_codes(np.array([1, 2]), N))                                       # not indexed
    query = np.array([[unseen, 0]])

    # nearest: (1, 2) is served by the indexed (1, 3) at distance 1
    expected = index.search(np.array([[pack_codes(np.array([1, 3]), N), 0]]), 10)
    for got, want in zip(index.search(query, 10), expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(index.search_one(query[0], 10)[1], expected[1][0])

    # skip: the unseen key adds nothing, the result is key 0 alone
    index.unseen_key = "skip"
    only_zero = np.maximum(matrix[0] + np.float32(-1.0), 0)
    ref = np.flatnonzero(only_zero > 0)
    ids = index.search(query, 10)[1][0]
    np.testing.assert_array_equal(ids, ref[np.lexsort((ref, -only_zero[ref]))][:10])
    np.testing.assert_array_equal(index.search_one(query[0], 10)[1], ids)

    # score: an unindexed key is an error until it is added; then the result is the dense reference
    index.unseen_key = "score"
    with pytest.raises(ValueError, match=rf"query key {unseen} is not in the index and unseen_key='score'"):
        index.search(query, 10)
    with pytest.raises(ValueError, match="index.add"):
        index.search_one(query[0], 10)
    scored = index.copy().add(score_fn_of(matrix), [unseen])
    with pytest.raises(ValueError, match="not in the index"):
        index.search(query, 10)                                                         # the original is unchanged
    ref_scores, ref_ids = dense_topk(matrix, -1.0, query, 10)
    np.testing.assert_array_equal(scored.search(query, 10)[1], ref_ids)
    np.testing.assert_allclose(scored.search_one(query[0], 10)[0], ref_scores[0], rtol=1e-6)

    # nearest after add: the added key (1, 2) is now the nearest of (1, 1) (before: (0, 0), tied with (2, 0))
    index.unseen_key = scored.unseen_key = "nearest"
    near = np.array([[int(pack_codes(np.array([1, 1]), N)), 0]])
    np.testing.assert_array_equal(index.search(near, 10)[1], index.search(np.array([[0, 0]]), 10)[1])
    np.testing.assert_array_equal(scored.search(near, 10)[1], scored.search(query, 10)[1])

    with pytest.raises(ValueError, match=r"unseen_key='random'; expected one of \['nearest', 'skip', 'score'\]"):
        index.unseen_key = "random"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_needs_codebooks_and_keys_outside_the_key_space_are_errors(backend):
    matrix = random_scores(12)
    index = observed_index(matrix, backend)
    query = np.array([[int(pack_codes(np.array([1, 2]), N)), 0]])
    no_codebooks = SparseCodeIndex(keys=index.keys, indptr=index.indptr, items=index.items, scores=index.scores,
                                   num_codebooks=M, codebook_size=N, n_items=N_ITEMS, key_set_kind="observed",
                                   backend=backend)
    with pytest.raises(ValueError, match="unseen_key='nearest' needs the codebooks"):
        no_codebooks.search(query, 10)
    with pytest.raises(ValueError, match="needs the codebooks"):
        observed_index(matrix, backend, codebooks=None)
    for policy in UNSEEN_KEY_POLICIES:
        index.unseen_key = policy
        with pytest.raises(ValueError, match=r"query key 16 is outside \[0, N\^M = 16\)"):
            index.search_one(np.array([16, 0]), 5)


@pytest.mark.parametrize("top_l,score_dtype", [(None, "float32"), (30, "float16")])
def test_add_equals_building_the_union(top_l, score_dtype):
    matrix = random_scores(16)
    common = dict(num_codebooks=M, codebook_size=N, progress=False, checkpoint_hash="h", key_set_kind="observed",
                  unseen_key="skip", top_l=top_l, score_dtype=score_dtype, key_block=2, item_block=64)
    part = SparseCodeIndex.build(score_fn_of(matrix), np.array([3, 9, 14]), N_ITEMS, -0.5, **common)
    union = SparseCodeIndex.build(score_fn_of(matrix), np.array([1, 3, 9, 10, 14, 15]), N_ITEMS, -0.5, **common)
    queries = np.array([[1, 3], [10, 15], [9, 9]])
    part_ids = part.search(queries, 20)[1]
    merged = part.copy().add(score_fn_of(matrix), np.array([15, 1, 10, 9]))             # 9 is indexed already
    for name in ("keys", "indptr", "items", "scores"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(union, name))
    for got, want in zip(merged.search(queries, 20), union.search(queries, 20)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(part.search(queries, 20)[1], part_ids)                # copy: part unchanged
    assert part.n_keys == 3 and merged.add(score_fn_of(matrix), np.array([1, 3])) is merged


def test_concurrent_searches_from_threads_agree_with_serial():
    from concurrent.futures import ThreadPoolExecutor

    index = build(random_scores(14), -1.0)
    queries = np.random.default_rng(15).integers(0, N ** M, size=(400, K_U))
    serial = [index.search_one(q, 20)[1] for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda q: index.search_one(q, 20)[1], queries))
    np.testing.assert_array_equal(np.array(threaded), np.array(serial))


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_queries_are_rejected(backend):
    index = build(random_scores(13), -1.0, backend=backend)
    with pytest.raises(ValueError, match=r"query key -1 is outside"):
        index.search_one(np.array([-1, 0, 1, 2]), 5)
    with pytest.raises(ValueError, match=r"query key 99 is outside"):
        index.search(np.array([[0, 1, 2, 99]]), 5)
    with pytest.raises(ValueError, match="built for K_u=4"):
        index.search(np.array([[0, 1]]), 5)
    with pytest.raises(ValueError, match="k=0; expected a positive int"):
        index.search_one(np.array([0, 1, 2, 3]), 0)
