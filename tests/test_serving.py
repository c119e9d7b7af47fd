"""Serving glue (model_zoo/retrieval/serving.py): SparCode index vs exact scoring, index files, faiss comparators."""
import json
import os

import numpy as np
import pytest
import torch

from model_zoo import get_model
from model_zoo.config import load_config
from model_zoo.data.loaders import TrainLoader
from model_zoo.experiment import run_experiment, serve_experiment
from model_zoo.models.dssm import DSSM
from model_zoo.models.sparcode import SparCode
from model_zoo.retrieval import serving
from model_zoo.retrieval.exact import masked_topk
from model_zoo.retrieval.sparse_index import SparseIndexFileError, SparseIndexMismatchError

from .conftest import open_tiny, write_config

SMALL_SPARCODE = {"embedding_dim": 8, "token_dim": 8, "num_query_tokens": 2, "num_item_tokens": 2,
                  "num_codebooks": 2, "codebook_size": 8, "hidden_units": [8], "tokenizer_hidden_units": [16],
                  "net_dropout": 0.0}                                   # N^M = 64 keys
SMALL_DSSM = {"user_hidden_units": [16], "item_hidden_units": [16]}
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_raw):
    """Tiny dataset with a briefly trained SparCode and DSSM (checkpoints saved by fit)."""
    root = tmp_path_factory.mktemp("serving")
    entries = {"SparCode_tiny": {"model": "SparCode", "dataset_id": "tiny", **SMALL_SPARCODE},
               "DSSM_tiny": {"model": "DSSM", "dataset_id": "tiny", **SMALL_DSSM}}
    config = write_config(str(root), tiny_raw, entries)
    data = open_tiny(config, "SparCode_tiny", batch_size=64)
    data_dir, feature_map, corpus, train, test = (data[k] for k in ("data_dir", "feature_map", "corpus", "train",
                                                                    "test"))
    models = {}
    for name, cls in (("SparCode_tiny", SparCode), ("DSSM_tiny", DSSM)):
        torch.manual_seed(0)
        model_params = dict(load_config(config, name), num_threads=1)
        model = cls(feature_map, **model_params)
        model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
        model.fit(train)                                                  # saves the checkpoint
        model.eval()
        models[name] = (model, model_params)
    return {"config": config, "root": str(root), "data_dir": data_dir, "feature_map": feature_map,
            "corpus": corpus, "train": train, "test": test, "models": models}


def _sparcode(tiny):
    return tiny["models"]["SparCode_tiny"]


def _query_keys(model, users):
    return model.query_codes(users.batch(0, len(users))).cpu().numpy()                   # [n_users, K_u]


def _assert_same_topk(index_scores, index_ids, ref_scores, ref_ids, score_of):
    """The index top-k is the reference top-k restricted to positive scores, up to float near-ties.

    index_scores/index_ids: [n, k] from the index (-1 = empty slot). ref_scores/ref_ids: [n, k] exact
    top-k (masked items -inf). score_of(u, ids) -> exact scores of ids for user u. Scores within ATOL
    of 0 may or may not be indexed (S computed in another block shape can differ in the last bit).
    """
    for u in range(ref_ids.shape[0]):
        clear = ref_scores[u] > ATOL                                   # items with score 0 are never indexed
        n_clear = int(clear.sum())
        returned = index_ids[u] >= 0
        assert returned[:n_clear].all(), f"user {u}: {returned.sum()} items returned, expected >= {n_clear}"
        got, want = index_ids[u][:n_clear], ref_ids[u][:n_clear]
        # the returned scores are the exact scores of those items, in the exact top-k order
        np.testing.assert_allclose(index_scores[u][:n_clear], score_of(u, got), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(index_scores[u][:n_clear], ref_scores[u][:n_clear], rtol=RTOL, atol=ATOL)
        # ids differ only where two items' exact scores are tied within float tolerance
        differ = got != want
        if differ.any():
            np.testing.assert_allclose(score_of(u, got[differ]), score_of(u, want[differ]), rtol=RTOL, atol=ATOL)
        # anything returned beyond them has an exact score of (almost) 0
        extra = index_ids[u][n_clear:][returned[n_clear:]]
        assert (np.abs(score_of(u, extra)) <= ATOL).all(), f"user {u}: returned items outside the exact top-k"


def test_index_returns_exact_topk_at_trained_bias(tiny):
    model, _ = _sparcode(tiny)
    test, k = tiny["test"], 50
    index = serving.build_sparcode_index(model, tiny["data_dir"])     # b~ = trained b, no cap
    assert index.key_set_kind == "all" and index.n_keys == 64
    assert index.sparsity_bias == pytest.approx(model.sparse_bias)
    keys = _query_keys(model, test)
    index_scores, index_ids = index.search(keys, k, test.mask_indptr, test.mask_items)
    with torch.no_grad():
        exact = model.full_scores(test.batch(0, len(test)), model.all_item_repr())    # [n_users, n_items]
    ref_scores, ref_ids = masked_topk(exact, k, test.mask_indptr, test.mask_items)
    exact_np = exact.double().numpy()
    _assert_same_topk(index_scores, index_ids, ref_scores.double().numpy(), ref_ids.numpy(),
                      lambda u, ids: exact_np[u, ids])
    # masked (history) items never come back
    for u in range(len(test)):
        assert not set(index_ids[u]) & set(test.mask_items[test.mask_indptr[u]:test.mask_indptr[u + 1]])


def test_index_at_target_sparsity_matches_dense_relu_reference(tiny):
    """A higher b~ leaves many items with score exactly 0: the index returns only the positive ones."""
    model, _ = _sparcode(tiny)
    test, k = tiny["test"], 50
    index = serving.build_sparcode_index(model, tiny["data_dir"], target_sparsity=0.9)
    stats = index.stats()
    assert stats["Sparsity"] == pytest.approx(0.9, abs=0.01)
    assert stats["Average Items"] == pytest.approx(stats["nnz"] / 64)
    assert index.extra_metadata["bias_source"] == "target_sparsity"
    with torch.no_grad():
        raw = model.score_codes(torch.arange(64)).double().numpy()                       # [64, n_items]
    sparse = np.maximum(raw + np.float32(index.sparsity_bias), 0.0)
    keys = _query_keys(model, test)
    dense = sparse[keys].sum(axis=1)                                                     # [n_users, n_items]
    ref_scores, ref_ids = masked_topk(torch.from_numpy(dense), k, test.mask_indptr, test.mask_items)
    index_scores, index_ids = index.search(keys, k, test.mask_indptr, test.mask_items)
    assert (index_ids == -1).any(), "expected users with fewer than k positive items at sparsity 0.9"
    _assert_same_topk(index_scores, index_ids, ref_scores.numpy(), ref_ids.numpy(), lambda u, ids: dense[u, ids])


def test_observed_key_set_and_unseen_key_policies(tiny):
    model, _ = _sparcode(tiny)
    train_keys = []
    for batch in TrainLoader(os.path.join(tiny["data_dir"], "train.h5"), tiny["feature_map"], 512, shuffle=False):
        batch.pop("item_index")
        train_keys.append(model.query_codes(batch).numpy().reshape(-1))
    expected = np.unique(np.concatenate(train_keys))
    keys, counts = serving.observed_keys(model, tiny["data_dir"], block_rows=1000)
    np.testing.assert_array_equal(keys, expected)
    assert counts.sum() == sum(part.size for part in train_keys)
    # fewer keys allowed than observed: the most frequent ones; the cap leaves out at least one test key
    by_frequency = keys[np.lexsort((keys, -counts))]                                    # most frequent first
    test_keys = set(_query_keys(model, tiny["test"]).ravel().tolist())
    ranks = [rank for rank, key in enumerate(by_frequency.tolist()) if key in test_keys]
    cap = max(ranks) if len(ranks) == len(test_keys) else max(1, expected.size // 2)
    assert 1 <= cap < expected.size
    index = serving.build_sparcode_index(model, tiny["data_dir"], index_max_keys=cap, unseen_key="score")
    assert index.key_set_kind == "observed" and index.n_keys == cap
    np.testing.assert_array_equal(index.keys, np.sort(keys[np.lexsort((keys, -counts))][:cap]))
    full = serving.build_sparcode_index(model, tiny["data_dir"])
    test = tiny["test"]
    exact = serving.evaluate_sparcode_index(model, full, test, 20)
    scored = serving.evaluate_sparcode_index(model, index, test, 20, unseen_key="score")
    assert scored["unseen_keys"] > 0
    assert scored["index"].n_keys == index.n_keys + scored["unseen_keys"]   # missing keys were scored
    np.testing.assert_array_equal(scored["index_ids"], exact["index_ids"])
    for policy in ("nearest", "skip"):
        index.unseen_key = policy
        result = serving.evaluate_sparcode_index(model, index, test, 20, unseen_key=policy)
        assert result["unseen_keys"] == scored["unseen_keys"]
        assert 0.0 <= serving._recall(result["hits"], result["sizes"]) <= 1.0


def test_add_keys_equals_building_the_union(tiny):
    model, _ = _sparcode(tiny)
    score_fn = serving.sparcode_score_fn(model)
    common = dict(num_codebooks=2, codebook_size=8, progress=False, checkpoint_hash="h", key_set_kind="observed",
                  unseen_key="skip")
    bias = model.sparse_bias - 0.5
    part = serving.SparseCodeIndex.build(score_fn, np.array([3, 9, 40]), 200, bias, top_l=30, **common)
    union = serving.SparseCodeIndex.build(score_fn, np.array([1, 3, 9, 20, 40, 63]), 200, bias, top_l=30, **common)
    merged = serving.add_keys(part, score_fn, np.array([63, 1, 20, 9]))
    for name in ("keys", "indptr", "items", "scores"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(union, name))


def test_index_file_is_written_next_to_checkpoint_and_checked(tiny, tmp_path):
    model, _ = _sparcode(tiny)
    index = serving.build_sparcode_index(model, tiny["data_dir"])
    path = serving.write_sparcode_index(index, serving.default_index_path(model.checkpoint))
    assert path == model.checkpoint[:-len(".model")] + ".sparse_index.npz"
    assert index.checkpoint_hash == serving.file_sha256(model.checkpoint)
    loaded = serving.load_sparcode_index(model)
    np.testing.assert_array_equal(loaded.scores, index.scores)

    # tampered: one byte of the file changed
    tampered = str(tmp_path / "tampered.npz")
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(tampered, "wb").write(bytes(blob))
    with pytest.raises(SparseIndexFileError, match="tampered.npz"):
        serving.load_sparcode_index(model, tampered)
    # truncated
    open(tampered, "wb").write(bytes(blob[:len(blob) // 3]))
    with pytest.raises(SparseIndexFileError, match="corrupt"):
        serving.load_sparcode_index(model, tampered)

    # mismatched: the model was retrained (another checkpoint) -> the old index is refused
    other_checkpoint = str(tmp_path / "other.model")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bias"] = state["bias"] + 1.0
    torch.save(state, other_checkpoint)
    with pytest.raises(SparseIndexMismatchError, match="built for checkpoint .* expected"):
        serving.load_sparcode_index(model, path, checkpoint=other_checkpoint)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        serving.load_sparcode_index(model, path, checkpoint=str(tmp_path / "missing.model"))


def test_index_for_other_model_shape_is_refused(tiny, tmp_path):
    model, params = _sparcode(tiny)
    index = serving.build_sparcode_index(model, tiny["data_dir"])
    torch.manual_seed(1)
    other = SparCode(tiny["feature_map"], **dict(params, codebook_size=4, model_root=str(tmp_path)))
    other.set_item_corpus(tiny["corpus"])
    other.save_weights(other.checkpoint)
    rebadged = serving.SparseCodeIndex(**{**{name: getattr(index, name) for name in (
        "keys", "indptr", "items", "scores", "num_codebooks", "codebook_size", "n_items", "num_query_tokens",
        "sparsity_bias", "top_l", "key_set_kind", "codebooks", "unseen_key")},
        "checkpoint_hash": serving.file_sha256(other.checkpoint)})
    path = rebadged.write(str(tmp_path / "rebadged.npz"))
    with pytest.raises(SparseIndexMismatchError, match="codebook_size=8, the model has 4"):
        serving.load_sparcode_index(other, path)


def test_sparcode_report_through_index_equals_exact(tiny, tmp_path):
    model, params = _sparcode(tiny)
    report = serving.sparcode_report(model, tiny["test"], tiny["data_dir"], dict(params, verbose=0),
                                     index_path=str(tmp_path / "index.npz"))
    stats = report["index"]
    assert report["kind"] == "sparcode" and stats["key_set"] == "all" and stats["bias_source"] == "trained"
    assert 0.0 <= stats["Sparsity"] <= 1.0 and stats["Average Items"] == pytest.approx(stats["nnz"] / 64)
    assert stats["index_bytes"] > 0 and stats["build_seconds"] > 0 and stats["query_us_median"] > 0
    assert os.path.getsize(stats["path"]) == stats["file_bytes"]
    assert report["recall_vs_exact"] == 1.0
    assert set(report["metrics_index"]) == set(params["metrics"])
    for name, value in report["metrics_exact"].items():
        assert report["metrics_index"][name] == pytest.approx(value, abs=0.02)   # near-ties may swap ranks
    json.dumps(report)                                                             # JSON-ready


def test_two_tower_comparators_report_recall_against_exact(tiny):
    model, params = tiny["models"]["DSSM_tiny"]
    report = serving.two_tower_report(model, tiny["test"], tiny["data_dir"], dict(params, verbose=0))
    assert set(report["faiss"]) == {"flat_ip", "ivfpq", "hnsw"}
    flat = report["faiss"]["flat_ip"]
    assert flat["recall_vs_exact"] == 1.0
    for name, entry in report["faiss"].items():
        assert 0.0 <= entry["recall_vs_exact"] <= 1.0, name
        assert entry["index_bytes"] > 0 and entry["query_us_median"] > 0
        assert all(0.0 <= v <= 1.0 for v in entry["metrics"].values())
    for name, value in report["metrics_exact"].items():
        assert flat["metrics"][name] == pytest.approx(value, abs=1e-9)
    assert report["faiss"]["ivfpq"]["params"]["nbits"] == 7                        # 200 items < 2^8
    json.dumps(report)


@pytest.mark.parametrize("name", ["GRU4Rec", "SASRec"])
def test_sequential_two_tower_models_get_faiss_comparators(tiny, name):
    """GRU4Rec / SASRec declare two_tower = True and serve through the same faiss harness (untrained here)."""
    cls = get_model(name)
    assert getattr(cls, "two_tower", False) and not hasattr(cls, "query_codes")
    torch.manual_seed(0)
    params = dict(load_config(tiny["config"], "DSSM_tiny"), model=name, num_threads=1, verbose=0)
    params = {k: v for k, v in params.items() if k not in ("similarity",)}
    model = cls(tiny["feature_map"], **{**params, "user_hidden_units": [16], "item_hidden_units": [16],
                                        "num_layers": 1})
    model.set_item_corpus(tiny["corpus"])
    report = serving.two_tower_report(model, tiny["test"], tiny["data_dir"], params)
    assert report["faiss"]["flat_ip"]["recall_vs_exact"] == 1.0
    assert all(0.0 <= entry["recall_vs_exact"] <= 1.0 for entry in report["faiss"].values())


def test_tie_aware_hits():
    reference = np.array([[3.0, 2.0, 1.0], [2.0, 0.0, -np.inf]])
    approx = np.array([[0, 5, -1], [4, 7, 8]])
    approx_scores = np.array([[3.0, 1.0 - 1e-7, -np.inf], [2.0, 0.0, 0.0]])
    hits, sizes = serving.tie_aware_hits(approx, approx_scores, reference)
    np.testing.assert_array_equal(hits, [2, 2])             # 1 - 1e-7 ties the 3rd; row 2: zeros tie
    np.testing.assert_array_equal(sizes, [3, 2])
    hits, sizes = serving.tie_aware_hits(approx, approx_scores, reference, min_score=0.0)
    np.testing.assert_array_equal(hits, [2, 1])             # score-0 items are not part of the reference
    np.testing.assert_array_equal(sizes, [3, 1])


@pytest.mark.parametrize("overrides,message", [
    ({"sparsity_bias": -0.5, "target_sparsity": 0.9}, "both set"),
    ({"target_sparsity": 1.5}, r"target_sparsity=1.5.*\[0, 1\]"),
    ({"sparsity_bias": "1e-3"}, "PyYAML"),
    ({"index_score_dtype": "float64"}, "index_score_dtype='float64'"),
    ({"unseen_key": "random"}, "unseen_key='random'.*score"),
    ({"index_top_l": 0}, "index_top_l=0"),
    ({"faiss_m": 2.5}, "faiss_m=2.5"),
    ({"serve": "yes"}, "serve='yes'"),
])
def test_serving_keys_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        serving.serving_params(overrides)


def test_run_expid_reports_index_and_faiss(tmp_path, monkeypatch, tiny_raw):
    monkeypatch.chdir(tmp_path)
    entries = {"SparCode_run": {"model": "SparCode", "dataset_id": "tiny", **SMALL_SPARCODE},
               "DSSM_run": {"model": "DSSM", "dataset_id": "tiny", "num_threads": 1, **SMALL_DSSM},
               "Popularity_run": {"model": "Popularity", "dataset_id": "tiny"}}
    config = write_config(str(tmp_path), tiny_raw, entries)
    result = run_experiment(config, "SparCode_run")
    serving_result = result["serving"]
    assert serving_result["index"]["Sparsity"] >= 0.0 and serving_result["recall_vs_exact"] == 1.0
    index_path = serving.default_index_path(result["checkpoint"])
    assert serving_result["index"]["path"] == index_path
    assert serving_result["index"]["checkpoint_hash"] == serving.file_sha256(result["checkpoint"])
    log = open(result["checkpoint"][:-len(".model")] + ".log").read()
    assert "[Index] Sparsity: " in log and "- Average Items: " in log and "[Metrics] (index) Recall(k=20): " in log
    saved = json.load(open(result["checkpoint"][:-len(".model")] + ".json"))
    assert saved["serving"]["index"]["Average Items"] == serving_result["index"]["Average Items"]
    # serve the trained checkpoint again at another sparsity, without training
    entries["SparCode_run"]["target_sparsity"] = 0.9
    write_config(str(tmp_path), tiny_raw, entries)
    checkpoint_bytes = open(result["checkpoint"], "rb").read()
    report = serve_experiment(config, "SparCode_run")
    assert report["index"]["Sparsity"] == pytest.approx(0.9, abs=0.01)
    assert open(result["checkpoint"], "rb").read() == checkpoint_bytes            # not retrained
    saved = json.load(open(result["checkpoint"][:-len(".model")] + ".json"))
    assert saved["serving"]["index"]["bias_source"] == "target_sparsity"

    result = run_experiment(config, "DSSM_run")
    assert result["serving"]["faiss"]["flat_ip"]["recall_vs_exact"] == 1.0
    assert "[Metrics] (ivfpq) Recall(k=20): " in open(result["checkpoint"][:-len(".model")] + ".log").read()
    assert "serving" not in run_experiment(config, "Popularity_run")


def test_serve_false_skips_serving(tmp_path, monkeypatch, tiny_raw):
    monkeypatch.chdir(tmp_path)
    config = write_config(str(tmp_path), tiny_raw, {"DSSM_off": {"model": "DSSM", "dataset_id": "tiny", "serve": False,
                                                                 **SMALL_DSSM}})
    assert "serving" not in run_experiment(config, "DSSM_off")


def test_bad_serving_key_fails_before_training(tmp_path, tiny_raw):
    config = write_config(str(tmp_path), tiny_raw, {"DSSM_bad": {"model": "DSSM", "dataset_id": "tiny",
                                                                 "unseen_key": "bogus", **SMALL_DSSM}})
    with pytest.raises(ValueError, match="unseen_key='bogus'"):
        run_experiment(config, "DSSM_bad")
    assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints", "tiny", "DSSM_bad.model"))


def test_index_size_is_estimated_and_too_large_builds_are_refused(tiny):
    model, _ = _sparcode(tiny)
    score_fn = serving.sparcode_score_fn(model)
    keys = np.arange(64)
    index = serving.build_sparcode_index(model, tiny["data_dir"], target_sparsity=0.8)
    estimate = serving.estimate_index_size(score_fn, keys, 200, index.sparsity_bias)
    assert estimate["sampled_keys"] == 64                                 # few keys: all scored, exact
    assert estimate["nnz"] == index.nnz
    sampled = serving.estimate_index_size(score_fn, keys, 200, index.sparsity_bias, sample_keys=16)
    assert sampled["Sparsity"] == pytest.approx(0.8, abs=0.1)
    assert serving.estimate_index_size(score_fn, keys, 200, 1e6, top_l=7)["nnz"] == 64 * 7
    with pytest.raises(ValueError, match="set target_sparsity"):
        serving.check_index_fits(estimate, index.sparsity_bias, available_bytes=estimate["bytes"])
    serving.check_index_fits(estimate, index.sparsity_bias, available_bytes=100 * estimate["bytes"])
