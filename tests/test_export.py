"""Export of the SparCode index (model_zoo/serving/export.py) and its build across processes
(model_zoo/retrieval/sharded_build.py), on a small SparCode trained once for the module."""
import json
import multiprocessing
import os
import shutil
import struct
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from model_zoo.engine.experiment import run_experiment
from model_zoo.engine.serving import build_code_index, load_code_index
from model_zoo.retrieval.index_io import read_index_file
from model_zoo.retrieval.sharded_build import build_sharded, key_ranges
from model_zoo.retrieval.sparse_index import SparseCodeIndex
from model_zoo.serving import export
from model_zoo.serving.export import (ExpidScoreFunction, QdrantSparseEngine, build_index, item_postings,
                                      load_trained, lucene_feature_value, opensearch_mapping, query_rows, recall_of,
                                      user_keys, write_opensearch)

from .conftest import write_config

K = 50
EXPID = "SparCode_export"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_raw):
    """A SparCode trained for 30 steps (M = 2, N = 8: 64 keys), its index written by run_expid's serving step."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_raw, root / "raw")
    config = write_config(str(root), str(root / "raw"), {EXPID: {
        "model": "SparCode", "dataset_id": "tiny", "interaction": "dot", "num_query_tokens": 3,
        "num_codebooks": 2, "codebook_size": 8, "tokenizer_hidden_units": [16], "hidden_units": [16],
        "max_steps_per_epoch": 30, "embedding_init_std": 1.e-2, "learning_rate": 1.e-2}})
    run_experiment(config, EXPID)
    params, data_dir, model, users = load_trained(config, EXPID)
    index = load_code_index(model)
    return {"config": config, "root": str(root), "params": params, "data_dir": data_dir, "model": model,
            "users": users["test"], "index": index, "keys": user_keys(model, users["test"])}


@pytest.fixture(scope="module")
def pool():
    """Two worker processes shared by the sharded builds of this module (they start once)."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


class RandomScores:
    """Picklable score-function factory: S = E[key] . F[item] from seeded random embeddings."""

    def __init__(self, n_keys, n_items, seed=0):
        self.n_keys, self.n_items, self.seed = n_keys, n_items, seed

    def __call__(self):
        rng = np.random.default_rng(self.seed)
        keys, items = rng.normal(size=(self.n_keys, 8)), rng.normal(size=(self.n_items, 8))
        return lambda block, start, stop: (keys[block] @ items[start:stop].T).astype(np.float32)


def _stored_checksum(path):
    with np.load(path, allow_pickle=False) as archive:
        return archive["sha256"].tobytes().decode()


def _same_file(first, second, folder):
    """Both indexes written with the same measured seconds: (stored sha256 of each file, arrays equal)."""
    second.build_seconds = first.build_seconds
    second.extra_metadata = dict(first.extra_metadata)
    paths = [first.write(os.path.join(folder, "one.npz")), second.write(os.path.join(folder, "sharded.npz"))]
    (arrays_a, meta_a), (arrays_b, meta_b) = (read_index_file(p) for p in paths)
    same_arrays = arrays_a.keys() == arrays_b.keys() and all(
        arrays_a[n].dtype == arrays_b[n].dtype and arrays_a[n].tobytes() == arrays_b[n].tobytes() for n in arrays_a)
    return _stored_checksum(paths[0]), _stored_checksum(paths[1]), same_arrays and meta_a == meta_b


# ---- the sharded build ----------------------------------------------------------------------------------
def test_sharded_build_of_a_trained_expid_equals_the_one_process_file(trained, pool, tmp_path):
    model, params = trained["model"], trained["params"]
    one = build_code_index(model, trained["data_dir"], params["sparsity_bias"], params["target_sparsity"],
                           params["index_top_l"], params["index_max_keys"], params["index_score_dtype"],
                           params["unseen_key"])
    sharded = build_index(model, trained["data_dir"], params, workers=2,
                          score_fn_factory=ExpidScoreFunction(trained["config"], EXPID),
                          num_query_tokens=one.num_query_tokens, executor=pool)
    assert one.nnz > 0 and sharded.extra_metadata.keys() == one.extra_metadata.keys()
    first, second, same = _same_file(one, sharded, str(tmp_path))
    assert same and first == second


def test_sharded_build_with_top_l_float16_and_uneven_ranges(pool, tmp_path):
    factory = RandomScores(n_keys=100, n_items=300)
    keys = np.random.default_rng(1).permutation(100)[:61]               # an observed key set, unsorted
    options = dict(top_l=7, key_block=8, item_block=64, score_dtype="float16", num_codebooks=1, codebook_size=100,
                   unseen_key="skip", extra_metadata={"note": "random"})
    one = SparseCodeIndex.build(factory(), keys, 300, 0.5, **options)
    sharded = build_sharded(factory, keys, 300, 0.5, workers=3, executor=pool, **options)
    first, second, same = _same_file(one, sharded, str(tmp_path))
    assert same and first == second and one.key_set_kind == "observed"


def test_key_ranges_cover_the_keys_in_whole_blocks():
    for n_keys, block, workers in ((61, 8, 3), (5, 8, 4), (1000, 256, 2), (7, 1, 7)):
        ranges = key_ranges(n_keys, block, workers)
        assert ranges[0][0] == 0 and ranges[-1][1] == n_keys and len(ranges) <= workers
        assert all(a % block == 0 and a < b for a, b in ranges)
        assert all(b == c for (_, b), (c, _) in zip(ranges[:-1], ranges[1:]))
    with pytest.raises(ValueError, match="workers=0"):
        key_ranges(10, 2, 0)


# ---- score quantization -----------------------------------------------------------------------------------
def test_lucene_feature_value_keeps_nine_significant_bits():
    values = np.random.default_rng(0).lognormal(0.0, 3.0, 2000).astype(np.float32)
    quantized = lucene_feature_value(values)
    brute = [struct.unpack(">f", struct.pack(">I", struct.unpack(">I", struct.pack(">f", v))[0] >> 15 << 15))[0]
             for v in values.tolist()]
    assert quantized.tolist() == brute
    assert (quantized <= values).all() and ((values - quantized) / values).max() < 2.0 ** -8
    assert (lucene_feature_value(quantized) == quantized).all()
    assert lucene_feature_value(np.float32([0.75, 1.0, 3.0])).tolist() == [0.75, 1.0, 3.0]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive normal floats"):
            lucene_feature_value([1.0, bad])


# ---- engines -----------------------------------------------------------------------------------------------
def test_qdrant_local_mode_returns_the_index_top_k(trained):
    qdrant_client = pytest.importorskip("qdrant_client", reason="qdrant-client is not installed (pip install "
                                                               "-e '.[export]')")
    index, users, keys = trained["index"], trained["users"], trained["keys"]
    engine = QdrantSparseEngine(qdrant_client.QdrantClient(":memory:"), "items")
    assert engine.load(index) == len(np.unique(index.items))
    expected_scores, expected = index.search(keys, K, users.mask_indptr, users.mask_items)
    scores, got = engine.search(keys, K, users.mask_indptr, users.mask_items)
    assert recall_of(expected, got) >= 0.99
    filled = expected >= 0
    assert np.allclose(scores[filled], expected_scores[filled], rtol=1e-5)
    assert not any(np.isin(got[b], users.mask_items[users.mask_indptr[b]:users.mask_indptr[b + 1]]).any()
                   for b in range(len(keys)))


def _check_document(doc, properties, n_items):
    """A bulk source against the mapping: only mapped fields, each of its type."""
    assert set(doc) <= set(properties), set(doc) - set(properties)
    for name, value in doc.items():
        kind = properties[name]["type"]
        if kind == "rank_features":           # string keys, strictly positive floats of 9 significant bits
            assert isinstance(value, dict) and value
            assert all(isinstance(f, str) and isinstance(v, float) and v > 0 for f, v in value.items())
            assert lucene_feature_value(list(value.values())).tolist() == list(value.values())
        elif kind == "integer":
            assert isinstance(value, int) and 0 <= value < min(n_items, 2 ** 31)
        else:
            assert kind == "keyword" and isinstance(value, str)


def _ndjson(path):
    with open(path) as fd:
        return [json.loads(line) for line in fd if line.strip()]


def test_opensearch_files_validate_against_the_mapping_and_rank_like_the_index(trained, tmp_path):
    index, users, keys = trained["index"], trained["users"], trained["keys"]
    output = str(tmp_path / "os")
    manifest = write_opensearch(index, output, "sparcode", keys, K, user_ids=users.raw_user_ids,
                                mask_indptr=users.mask_indptr, mask_items=users.mask_items, bulk_docs=70)
    mapping = json.load(open(os.path.join(output, "mapping.json")))
    assert mapping == opensearch_mapping() and mapping["mappings"]["dynamic"] == "strict"
    properties = mapping["mappings"]["properties"]
    documents = {}
    for name in manifest["bulk_files"]:
        lines = _ndjson(os.path.join(output, name))
        assert len(lines) % 2 == 0 and len(lines) <= 140
        for action, doc in zip(lines[::2], lines[1::2]):
            assert action == {"index": {"_index": "sparcode", "_id": str(doc["item_index"])}}
            _check_document(doc, properties, index.n_items)
            documents[doc["item_index"]] = doc["codes"]
    assert len(documents) == manifest["documents"] == len(np.unique(index.items))
    lines = _ndjson(os.path.join(output, "queries.ndjson"))
    assert len(lines) == 2 * len(keys) and all(header == {"index": "sparcode"} for header in lines[::2])
    assert json.load(open(os.path.join(output, "query_users.json"))) == [str(u) for u in users.raw_user_ids]
    indptr, rows, scores = item_postings(index)
    exact = np.zeros((index.n_keys, index.n_items))                        # unquantized scores [n_keys, n_items]
    exact[rows, np.repeat(np.arange(index.n_items), np.diff(indptr))] = scores
    expected_scores, expected = index.search(keys, K, users.mask_indptr, users.mask_items)
    for b, body in enumerate(lines[1::2]):        # the engine's scoring: sum of boost x stored feature value
        assert set(body) == {"size", "_source", "track_total_hits", "query"} and body["size"] == K
        clauses = body["query"]["bool"]["should"]
        assert all(set(c["rank_feature"]) == {"field", "linear", "boost"} for c in clauses)
        masked = {int(i) for c in body["query"]["bool"].get("must_not", []) for i in c["ids"]["values"]}
        assert masked == set(users.mask_items[users.mask_indptr[b]:users.mask_indptr[b + 1]].tolist())
        scores = {item: sum(c["rank_feature"]["boost"] * codes.get(c["rank_feature"]["field"][len("codes."):], 0.0)
                            for c in clauses) for item, codes in documents.items() if item not in masked}
        top = sorted((item for item in scores if scores[item] > 0), key=lambda i: (-scores[i], i))[:K]
        # Same top k up to the quantization: truncating each feature to 9 significant bits lowers a sum by
        # less than 2^-8 of it, so an item can only swap with one whose exact score is that close.
        key_rows, counts = query_rows(index, keys[b:b + 1])[0]
        user_exact = counts @ exact[key_rows]                                               # [n_items]
        kth = expected_scores[b][expected[b] >= 0].min()
        assert len(top) == (expected[b] >= 0).sum() and user_exact[top].min() >= kth * (1 - 2.0 ** -8)
        sure = expected[b][expected_scores[b] > kth * (1 + 2.0 ** -8)]
        assert set(sure.tolist()) <= set(top)


def test_export_command_writes_the_files_and_checks_qdrant(trained, tmp_path, capsys):
    pytest.importorskip("qdrant_client", reason="qdrant-client is not installed (pip install -e '.[export]')")
    output = str(tmp_path / "cli")
    argv = ["--config", trained["config"], "--expid", EXPID, "--output", output]
    assert export.main(argv + ["--engine", "opensearch"]) == 0
    assert sorted(os.listdir(output)) == ["bulk-00000.ndjson", "export.json", "mapping.json", "queries.ndjson",
                                          "query_users.json"]
    assert export.main(argv[:-1] + [str(tmp_path / "qdrant"), "--engine", "qdrant", "--check-users", "20"]) == 0
    out = capsys.readouterr().out
    assert "curl -XPOST http://localhost:9200/_bulk" in out and "items in Qdrant collection sparcode_export" in out
    recall = float(out.split("top 50 on 20 test users: ")[1].split()[0])
    assert recall >= 0.99
    assert export.main(["--config", trained["config"], "--expid", "nope", "--engine", "qdrant"]) == 2
