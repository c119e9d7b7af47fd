"""Serving reports (model_zoo/engine/serving.py): a SparCode index against exact scoring, index files next to
the checkpoint, faiss comparators of vector models, and the choice by declared capability."""
import json
import logging
import os

import numpy as np
import pytest
import torch

from model_zoo import get_model
from model_zoo.base import CodeIndexable, VectorServable
from model_zoo.config import load_config
from model_zoo.data.loaders import TrainLoader
from model_zoo.engine import serving
from model_zoo.models.dssm import DSSM
from model_zoo.models.sparcode import SparCode
from model_zoo.retrieval.exact import masked_topk
from model_zoo.retrieval.index_io import SparseIndexFileError, SparseIndexMismatchError, file_sha256
from model_zoo.retrieval.metrics import tie_aware_hits
from model_zoo.retrieval.sparse_index import SparseCodeIndex

from .conftest import open_tiny, train_steps, write_config

SMALL_SPARCODE = {"embedding_dim": 8, "token_dim": 8, "num_query_tokens": 2, "num_item_tokens": 2,
                  "num_codebooks": 2, "codebook_size": 8, "hidden_units": [8], "tokenizer_hidden_units": [16],
                  "net_dropout": 0.0}                                   # N^M = 64 keys
SMALL_DSSM = {"user_hidden_units": [16], "item_hidden_units": [16]}
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_raw):
    """Tiny dataset with a briefly trained SparCode and DSSM (checkpoints saved)."""
    root = tmp_path_factory.mktemp("serving")
    entries = {"SparCode_tiny": {"model": "SparCode", "dataset_id": "tiny", **SMALL_SPARCODE},
               "DSSM_tiny": {"model": "DSSM", "dataset_id": "tiny", **SMALL_DSSM}}
    config = write_config(str(root), tiny_raw, entries)
    data = open_tiny(config, "SparCode_tiny", batch_size=64)
    models = {}
    for name, cls in (("SparCode_tiny", SparCode), ("DSSM_tiny", DSSM)):
        torch.manual_seed(0)
        params = dict(load_config(config, name), num_threads=1)
        model = cls(data["feature_map"], **params)
        model.set_item_corpus(data["corpus"], data["train"].item_counts(data["corpus"].num_items))
        train_steps(model, data["train"], 5)
        model.save_weights(model.checkpoint)
        model.eval()
        models[name] = (model, params)
    return {"config": config, "data_dir": data["data_dir"], "feature_map": data["feature_map"],
            "corpus": data["corpus"], "test": data["test"], "models": models}


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
    index = serving.build_code_index(model, tiny["data_dir"])         # b~ = trained b, no cap
    assert index.key_set_kind == "all" and index.n_keys == 64 and index.num_query_tokens == 2
    assert index.sparsity_bias == pytest.approx(model.sparse_bias)
    keys = _query_keys(model, test)
    index_scores, index_ids = index.search(keys, k, test.mask_indptr, test.mask_items)
    with torch.no_grad():
        exact = model.full_scores(test.batch(0, len(test)), model.all_item_repr())    # [n_users, n_items]
    ref_scores, ref_ids = masked_topk(exact, k, test.mask_indptr, test.mask_items)
    exact_np = exact.double().numpy()
    _assert_same_topk(index_scores, index_ids, ref_scores.double().numpy(), ref_ids.numpy(),
                      lambda u, ids: exact_np[u, ids])
    for u in range(len(test)):                                         # masked (history) items never come back
        assert not set(index_ids[u]) & set(test.mask_items[test.mask_indptr[u]:test.mask_indptr[u + 1]])


def test_index_at_target_sparsity_matches_dense_relu_reference(tiny):
    """A higher b~ leaves many items with score exactly 0: the index returns only the positive ones."""
    model, _ = _sparcode(tiny)
    test, k = tiny["test"], 50
    index = serving.build_code_index(model, tiny["data_dir"], target_sparsity=0.9)
    stats = index.stats()
    assert stats["Sparsity"] == pytest.approx(0.9, abs=0.01)
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
    fixed = serving.build_code_index(model, tiny["data_dir"], sparsity_bias=index.sparsity_bias)
    assert fixed.extra_metadata["bias_source"] == "sparsity_bias"
    np.testing.assert_array_equal(fixed.items, index.items)


def test_observed_key_set_and_unseen_key_policies(tiny, caplog):
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
    with caplog.at_level(logging.WARNING):
        index = serving.build_code_index(model, tiny["data_dir"], index_max_keys=cap, unseen_key="score")
    assert f"distinct observed keys exceed index_max_keys={cap}" in caplog.text
    assert index.key_set_kind == "observed" and index.n_keys == cap and index.unseen_key == "score"
    np.testing.assert_array_equal(index.keys, np.sort(by_frequency[:cap]))
    full = serving.build_code_index(model, tiny["data_dir"])
    test = tiny["test"]
    exact = serving.evaluate_code_index(model, full, test, 20)
    scored = serving.evaluate_code_index(model, index, test, 20)
    assert scored["unseen_keys"] > 0
    assert scored["index"].n_keys == index.n_keys + scored["unseen_keys"]   # missing keys were scored
    assert index.n_keys == cap                                               # on a copy: the index is unchanged
    np.testing.assert_array_equal(scored["index_ids"], exact["index_ids"])
    results = {}
    for policy in ("nearest", "skip"):
        index.unseen_key = policy
        results[policy] = serving.evaluate_code_index(model, index, test, 20)
        assert results[policy]["unseen_keys"] == scored["unseen_keys"] and results[policy]["index"] is index
        assert (results[policy]["hits"] <= results[policy]["sizes"]).all()
    assert not np.array_equal(results["nearest"]["index_ids"], results["skip"]["index_ids"])


def test_index_file_is_written_next_to_checkpoint_and_checked(tiny, tmp_path):
    model, _ = _sparcode(tiny)
    index = serving.build_code_index(model, tiny["data_dir"])
    path = index.write(serving.default_index_path(model.checkpoint))
    assert path == model.checkpoint[:-len(".model")] + ".sparse_index.npz"
    assert index.checkpoint_hash == file_sha256(model.checkpoint)
    loaded = serving.load_code_index(model)
    np.testing.assert_array_equal(loaded.scores, index.scores)

    tampered = str(tmp_path / "tampered.npz")                         # one byte of the file changed
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(tampered, "wb").write(bytes(blob))
    with pytest.raises(SparseIndexFileError, match="tampered.npz"):
        serving.load_code_index(model, tampered)
    open(tampered, "wb").write(bytes(blob[:len(blob) // 3]))          # truncated
    with pytest.raises(SparseIndexFileError, match="corrupt"):
        serving.load_code_index(model, tampered)

    # mismatched: the model was retrained (another checkpoint) -> the old index is refused
    other_checkpoint = str(tmp_path / "other.model")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bias"] = state["bias"] + 1.0
    torch.save(state, other_checkpoint)
    with pytest.raises(SparseIndexMismatchError, match="built for checkpoint .* expected"):
        serving.load_code_index(model, path, checkpoint=other_checkpoint)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        serving.load_code_index(model, path, checkpoint=str(tmp_path / "missing.model"))


def test_index_for_other_model_shape_is_refused(tiny, tmp_path):
    model, params = _sparcode(tiny)
    index = serving.build_code_index(model, tiny["data_dir"])
    torch.manual_seed(1)
    other = SparCode(tiny["feature_map"], **dict(params, codebook_size=4, model_root=str(tmp_path)))
    other.set_item_corpus(tiny["corpus"])
    other.save_weights(other.checkpoint)
    rebadged = SparseCodeIndex(**{**{name: getattr(index, name) for name in (
        "keys", "indptr", "items", "scores", "num_codebooks", "codebook_size", "n_items", "num_query_tokens",
        "sparsity_bias", "top_l", "key_set_kind", "codebooks", "unseen_key")},
        "checkpoint_hash": file_sha256(other.checkpoint)})
    path = rebadged.write(str(tmp_path / "rebadged.npz"))
    with pytest.raises(SparseIndexMismatchError, match="codebook_size=8, the model has 4"):
        serving.load_code_index(other, path)


def test_code_index_report_through_index_equals_exact(tiny, tmp_path):
    model, params = _sparcode(tiny)
    report = serving.code_index_report(model, tiny["test"], tiny["data_dir"], dict(params, verbose=0),
                                       index_path=str(tmp_path / "index.npz"))
    stats = report["index"]
    assert report["kind"] == "sparcode" and stats["key_set"] == "all" and stats["bias_source"] == "trained"
    assert 0.0 <= stats["Sparsity"] <= 1.0 and stats["Average Items"] == pytest.approx(stats["nnz"] / 64)
    assert stats["index_bytes"] > 0 and stats["build_seconds"] > 0
    assert not any("us" in name.split("_") for name in stats), "query timing belongs to the benchmarks"
    assert os.path.getsize(stats["path"]) == stats["file_bytes"]
    assert report["recall_vs_exact"] == 1.0 and report["recall_vs_exact_k"] == 50
    assert set(report["metrics_index"]) == set(params["metrics"])
    for name, value in report["metrics_exact"].items():
        assert report["metrics_index"][name] == pytest.approx(value, abs=0.02)   # near-ties may swap ranks
    json.dumps(report)                                                             # JSON-ready
    lines = serving.report_lines(report)
    assert lines[0].startswith("[Index] Sparsity: ") and "Average Items: " in lines[0]
    assert lines[1].startswith("[Metrics] (index) Recall(k=20): ") and lines[2].startswith("[Metrics] (exact) ")
    assert lines[3] == "[Index] Recall vs exact(k=50): 1.000000"


def test_two_tower_comparators_report_recall_against_exact(tiny):
    model, params = tiny["models"]["DSSM_tiny"]
    report = serving.serving_report(model, tiny["test"], tiny["data_dir"], dict(params, verbose=0))
    assert report["kind"] == "two_tower" and set(report["faiss"]) == {"flat_ip", "ivfpq", "hnsw"}
    flat = report["faiss"]["flat_ip"]
    assert flat["recall_vs_exact"] == 1.0
    for name, entry in report["faiss"].items():
        assert 0.0 <= entry["recall_vs_exact"] <= 1.0, name
        assert entry["index_bytes"] > 0 and entry["build_seconds"] > 0
        assert all(0.0 <= v <= 1.0 for v in entry["metrics"].values())
    for name, value in report["metrics_exact"].items():
        assert flat["metrics"][name] == pytest.approx(value, abs=1e-9)
    assert report["faiss"]["ivfpq"]["params"]["nbits"] == 7                        # 200 items < 2^8
    json.dumps(report)
    lines = serving.report_lines(report)
    assert lines[0].startswith("[Metrics] (exact) ") and len(lines) == 1 + 2 * 3
    assert any(line.startswith("[Metrics] (ivfpq) Recall(k=20): ") for line in lines)


@pytest.mark.parametrize("name", ["GRU4Rec", "SASRec"])
def test_sequential_two_tower_models_get_faiss_comparators(tiny, name):
    """GRU4Rec / SASRec declare VectorServable and serve through the same faiss harness (untrained here)."""
    cls = get_model(name)
    assert issubclass(cls, VectorServable) and not issubclass(cls, CodeIndexable)
    torch.manual_seed(0)
    params = dict(load_config(tiny["config"], "DSSM_tiny"), model=name, num_threads=1, verbose=0)
    params = {k: v for k, v in params.items() if k not in ("similarity",)}
    model = cls(tiny["feature_map"], **{**params, "user_hidden_units": [16], "item_hidden_units": [16],
                                        "num_layers": 1})
    model.set_item_corpus(tiny["corpus"])
    report = serving.serving_report(model, tiny["test"], tiny["data_dir"], params)
    assert report["kind"] == "two_tower" and report["faiss"]["flat_ip"]["recall_vs_exact"] == 1.0
    assert all(0.0 <= entry["recall_vs_exact"] <= 1.0 for entry in report["faiss"].values())


def test_serving_is_chosen_by_declared_capability_not_by_attributes(tiny):
    """A model without a capability class gets no report, even if it has attributes of the same names."""
    _, dssm_params = tiny["models"]["DSSM_tiny"]
    params = {key: value for key, value in dssm_params.items() if key not in SMALL_DSSM}
    popularity = get_model("Popularity")(tiny["feature_map"], **dict(params, model="Popularity"))
    popularity.set_item_corpus(tiny["corpus"])
    popularity.query_codes = lambda inputs: None
    popularity.two_tower = True
    assert not isinstance(popularity, (CodeIndexable, VectorServable))
    assert serving.serving_report(popularity, tiny["test"], tiny["data_dir"], params) is None
    assert serving.report_lines(None) == []


def test_tie_aware_hits():
    reference = np.array([[3.0, 2.0, 1.0], [2.0, 0.0, -np.inf]])
    approx = np.array([[0, 5, -1], [4, 7, 8]])
    approx_scores = np.array([[3.0, 1.0 - 1e-7, -np.inf], [2.0, 0.0, 0.0]])
    hits, sizes = tie_aware_hits(approx, approx_scores, reference)
    np.testing.assert_array_equal(hits, [2, 2])             # 1 - 1e-7 ties the 3rd; row 2: zeros tie
    np.testing.assert_array_equal(sizes, [3, 2])
    hits, sizes = tie_aware_hits(approx, approx_scores, reference, min_score=0.0)
    np.testing.assert_array_equal(hits, [2, 1])             # score-0 items are not part of the reference
    np.testing.assert_array_equal(sizes, [3, 1])


def test_run_expid_reports_index_and_faiss(tmp_path, monkeypatch, tiny_raw):
    from model_zoo.engine.experiment import run_experiment, serve_experiment
    monkeypatch.chdir(tmp_path)
    entries = {"SparCode_run": {"model": "SparCode", "dataset_id": "tiny", **SMALL_SPARCODE},
               "DSSM_run": {"model": "DSSM", "dataset_id": "tiny", "num_threads": 1, **SMALL_DSSM},
               "DSSM_off": {"model": "DSSM", "dataset_id": "tiny", "serve": False, **SMALL_DSSM},
               "Popularity_run": {"model": "Popularity", "dataset_id": "tiny"}}
    config = write_config(str(tmp_path), tiny_raw, entries)
    result = run_experiment(config, "SparCode_run")
    serving_result = result["serving"]
    assert serving_result["index"]["Sparsity"] >= 0.0 and serving_result["recall_vs_exact"] == 1.0
    index_path = serving.default_index_path(result["checkpoint"])
    assert serving_result["index"]["path"] == index_path
    assert serving_result["index"]["checkpoint_hash"] == file_sha256(result["checkpoint"])
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
    assert "serving" not in run_experiment(config, "DSSM_off")
    assert "serving" not in run_experiment(config, "Popularity_run")
