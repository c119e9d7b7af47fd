"""Sparsity control of the code index (model_zoo/retrieval/sparsity.py) and block-wise scoring."""
import numpy as np
import pytest
import torch

from model_zoo.retrieval.score_blocks import TorchThreads, iter_score_blocks
from model_zoo.retrieval.sparse_index import SparseCodeIndex
from model_zoo.retrieval.sparsity import check_index_fits, choose_bias_for_sparsity, estimate_index_size


def score_fn_of(matrix):
    return lambda keys, start, stop: matrix[keys, start:stop]


def random_scores(seed, n_keys=16, n_items=2000):
    return np.random.default_rng(seed).standard_normal((n_keys, n_items)).astype(np.float32)


def build(matrix, bias, **kwargs):
    return SparseCodeIndex.build(score_fn_of(matrix), np.arange(matrix.shape[0]), matrix.shape[1], bias,
                                 num_codebooks=2, codebook_size=4, progress=False, **kwargs)


def test_bias_for_target_sparsity():
    matrix = random_scores(8)
    keys = np.arange(16)
    for target in (0.0, 0.5, 0.9, 0.99, 1.0):
        bias = choose_bias_for_sparsity(score_fn_of(matrix), keys, 2000, target, key_block=5, item_block=300)
        assert abs(build(matrix, bias).stats()["Sparsity"] - target) <= 1.0 / matrix.size
    sampled = choose_bias_for_sparsity(score_fn_of(matrix), keys, 2000, 0.95, sample_keys=6, seed=3)
    kept = (matrix + np.float32(sampled) > 0).mean()
    assert abs((1 - kept) - 0.95) < 0.02
    # the automatic sample: as many keys as max_sample_values allows
    auto = choose_bias_for_sparsity(score_fn_of(matrix), keys, 2000, 0.9, max_sample_values=4000 * 2, seed=0)
    rows = np.sort(np.random.default_rng(0).choice(keys, size=4, replace=False))
    assert auto == choose_bias_for_sparsity(score_fn_of(matrix[rows]), np.arange(4), 2000, 0.9)


def test_index_size_estimate_equals_the_built_index_when_all_keys_are_scored():
    matrix = random_scores(4, n_keys=64, n_items=200)
    keys = np.arange(64)
    for top_l, score_dtype in ((None, "float32"), (7, "float16")):
        index = SparseCodeIndex.build(score_fn_of(matrix), keys, 200, -0.8, top_l=top_l, score_dtype=score_dtype,
                                      num_codebooks=2, codebook_size=8, progress=False)
        estimate = estimate_index_size(score_fn_of(matrix), keys, 200, -0.8, top_l=top_l, score_dtype=score_dtype,
                                       item_block=64)
        assert estimate["sampled_keys"] == 64 and estimate["nnz"] == index.nnz
        assert estimate["Sparsity"] == pytest.approx(index.stats()["Sparsity"])
        assert estimate["bytes"] == index.nnz * (4 + np.dtype(score_dtype).itemsize) + 64 * 16
    sampled = estimate_index_size(score_fn_of(matrix), keys, 200, -0.8, sample_keys=16)
    assert sampled["sampled_keys"] == 16
    assert sampled["Sparsity"] == pytest.approx(float((matrix + np.float32(-0.8) <= 0).mean()), abs=0.05)


def test_too_large_builds_are_refused_before_scoring():
    estimate = {"Sparsity": 0.5, "nnz": 1000, "bytes": 8000, "sampled_keys": 4}
    with pytest.raises(ValueError, match="b~=-0.500000.*set target_sparsity"):
        check_index_fits(estimate, -0.5, available_bytes=estimate["bytes"])
    check_index_fits(estimate, -0.5, available_bytes=4 * estimate["bytes"] + 1)


def test_score_blocks_cover_every_key_and_item_once_and_check_the_output():
    matrix = random_scores(5, n_keys=7, n_items=50)
    seen = np.zeros_like(matrix)
    for key_start, item_start, block in iter_score_blocks(score_fn_of(matrix), np.arange(7), 50, key_block=3,
                                                          item_block=20):
        assert block.dtype == np.float32
        seen[key_start:key_start + block.shape[0], item_start:item_start + block.shape[1]] += block
    np.testing.assert_array_equal(seen, matrix)
    with pytest.raises(ValueError, match=r"score_fn\(keys\[0:7\], 0, 50\) returned shape \(7, 49\)"):
        list(iter_score_blocks(lambda k, a, b: matrix[k, a:b - 1], np.arange(7), 50, item_block=64))
    with pytest.raises(ValueError, match="returned dtype int64; expected float"):
        list(iter_score_blocks(lambda k, a, b: np.zeros((len(k), b - a), np.int64), np.arange(7), 50))
    with pytest.raises(ValueError, match="NaN or inf"):
        list(iter_score_blocks(lambda k, a, b: np.full((len(k), b - a), np.inf), np.arange(7), 50))


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with TorchThreads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
