"""TDM: the balanced item tree (layers/tree.py), layer-wise beam search (retrieval/beam_search.py) against brute
force, the tree file, and the model on the tiny dataset (loss, tree learning, checkpoint, serving report)."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

from model_zoo.engine import serving
from model_zoo.layers.tree import BalancedTree, TreeFileError, capacity_assign, tree_file
from model_zoo.models.dssm import DSSM
from model_zoo.models.tdm import TDM
from model_zoo.retrieval.beam_search import beam_search

from .conftest import open_tiny, write_config

SMALL = {"embedding_dim": 8, "user_hidden_units": [16], "hidden_units": [8], "layer_negatives": 3,
         "net_dropout": 0.0}
CASES = [(1, 2), (2, 2), (5, 2), (7, 3), (16, 2), (33, 4), (100, 3), (200, 2)]


# ---- the tree ---------------------------------------------------------------------------------------
def assert_balanced_bijection(tree):
    n, b = tree.num_items, tree.branching
    assert np.array_equal(np.sort(tree.leaf_items), np.arange(n))                     # every item one leaf
    assert np.array_equal(tree.leaf_items[tree.item_leaf], np.arange(n))
    assert b ** (tree.depth - 1) < n <= b ** tree.depth or (n == 1 and tree.depth == 1)
    assert tree.level_sizes[0] == 1 and tree.level_sizes[-1] == n                     # every leaf at depth D
    for level in range(tree.depth):
        kids, ranges, below = tree.children[level], tree.leaf_ranges[level], tree.leaf_ranges[level + 1]
        present = kids[kids >= 0]
        assert np.array_equal(present, np.arange(tree.level_sizes[level + 1]))      # one parent per node, in order
        for node, row in enumerate(kids):
            row = row[row >= 0]
            assert 1 <= len(row) <= b
            counts = below[row, 1] - below[row, 0]
            assert counts.max() - counts.min() <= 1                                  # balanced siblings
            assert below[row[0], 0] == ranges[node, 0] and below[row[-1], 1] == ranges[node, 1]
    paths = tree.item_paths()
    for level in range(1, tree.depth + 1):
        start, stop = tree.leaf_ranges[level][paths[:, level - 1]].T
        assert ((start <= tree.item_leaf) & (tree.item_leaf < stop)).all()          # ancestors hold the leaf


@pytest.mark.parametrize("num_items,branching", CASES)
def test_random_and_kmeans_trees_are_balanced_bijections(num_items, branching):
    assert_balanced_bijection(BalancedTree.random(num_items, branching, seed=num_items))
    vectors = np.random.RandomState(num_items).randn(num_items, 4)
    assert_balanced_bijection(BalancedTree.from_vectors(vectors, branching, seed=1))


def test_kmeans_tree_puts_each_cluster_under_one_node():
    rng = np.random.RandomState(0)
    centres = rng.randn(4, 8) * 100
    cluster = rng.permutation(np.repeat(np.arange(4), 8))                             # 32 items, 4 clusters of 8
    tree = BalancedTree.from_vectors(centres[cluster] + rng.randn(32, 8), branching=2, seed=3)
    level2 = tree.item_paths()[:, 1]                                                  # 4 nodes of 8 leaves
    for c in range(4):
        assert len(set(level2[cluster == c])) == 1
    assert len(set(level2)) == 4


def test_capacity_assign_meets_sizes_and_is_optimal_for_two_columns():
    rng = np.random.RandomState(1)
    for trial in range(30):
        m = rng.randint(2, 9)
        distances = rng.rand(m, 2)
        sizes = np.array([rng.randint(0, m + 1), 0])
        sizes[1] = m - sizes[0]
        groups = capacity_assign(distances, sizes)
        assert np.array_equal(np.bincount(groups, minlength=2), sizes)
        best = min(distances[list(rows), 0].sum() + distances[[r for r in range(m) if r not in rows], 1].sum()
                   for rows in itertools.combinations(range(m), sizes[0]))
        assert distances[np.arange(m), groups].sum() == pytest.approx(best)
    distances = rng.rand(40, 5)
    assert np.array_equal(np.bincount(capacity_assign(distances, [10, 3, 0, 20, 7]), minlength=5), [10, 3, 0, 20, 7])


def test_tree_file_round_trip_and_refusals(tmp_path):
    tree = BalancedTree.random(37, 3, seed=5)
    path = tree.save(tmp_path / "t.tree.npz", checkpoint_hash="abc", metadata={"model_id": "X"})
    loaded, meta = BalancedTree.load(path, expected_checkpoint_hash="abc")
    assert np.array_equal(loaded.leaf_items, tree.leaf_items) and loaded.branching == 3
    assert meta["model_id"] == "X" and not any(name.startswith(".") for name in os.listdir(tmp_path))
    with pytest.raises(TreeFileError, match="t.tree.npz.*another|written for checkpoint"):
        BalancedTree.load(path, expected_checkpoint_hash="other")
    arrays = dict(np.load(path))
    arrays["leaf_items"] = arrays["leaf_items"][::-1].copy()                           # tampered
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(TreeFileError, match="tampered.npz.*sha256"):
        BalancedTree.load(tmp_path / "tampered.npz")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2:len(data) // 2 + 16] = b"\x00" * 16
    (tmp_path / "corrupt.npz").write_bytes(bytes(data))
    with pytest.raises(TreeFileError, match="corrupt.npz"):
        BalancedTree.load(tmp_path / "corrupt.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        BalancedTree.load(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="permutation"):
        BalancedTree(4, 2, [0, 1, 1, 3])


# ---- beam search ------------------------------------------------------------------------------------
def _table_scores(tables):
    """score_fn over fixed per-level score tables [B, n_l]."""
    return lambda level, nodes: torch.gather(tables[level], 1, nodes)


def _random_mask(rng, n_queries, n_leaves):
    rows = [np.flatnonzero(rng.rand(n_leaves) < 0.3) for _ in range(n_queries)]
    return np.concatenate([[0], np.cumsum([len(r) for r in rows])]), np.concatenate(rows).astype(np.int64)


@pytest.mark.parametrize("num_items,branching", CASES)
def test_wide_beam_returns_the_exhaustive_masked_topk(num_items, branching):
    rng = np.random.RandomState(num_items * 7 + branching)
    tree, n_queries, k = BalancedTree.random(num_items, branching, seed=2), 6, min(num_items, 10) + 3
    tables = {level: torch.from_numpy(rng.randn(n_queries, size)) for level, size in enumerate(tree.level_sizes)}
    indptr, leaves = _random_mask(rng, n_queries, num_items)
    scores, ids = beam_search(_table_scores(tables), tree.children, n_queries, k, beam_size=num_items,
                              leaf_mask=(indptr, leaves))
    leaf_scores = tables[tree.depth].clone()
    for q in range(n_queries):
        leaf_scores[q, leaves[indptr[q]:indptr[q + 1]]] = -np.inf
    want_scores, want_ids = torch.sort(leaf_scores, dim=1, descending=True)
    for q in range(n_queries):
        n_valid = int(torch.isfinite(want_scores[q, :k]).sum())
        assert ids[q, :n_valid].tolist() == want_ids[q, :n_valid].tolist()
        assert (ids[q, n_valid:] == -1).all() and torch.isneginf(scores[q, n_valid:]).all()
        torch.testing.assert_close(scores[q, :n_valid].double(), want_scores[q, :n_valid], check_dtype=False)


@pytest.mark.parametrize("num_items,branching", [(200, 2), (100, 3), (33, 4)])
def test_beam_of_k_is_exact_on_a_max_heap_tree(num_items, branching):
    """A node scored as the best of its leaves (the paper's max-heap): a beam of k finds the exact top-k."""
    rng = np.random.RandomState(branching)
    tree, n_queries, k = BalancedTree.random(num_items, branching, seed=4), 5, 7
    leaf = rng.randn(n_queries, num_items)
    tables = {level: torch.from_numpy(np.maximum.reduceat(leaf, tree.leaf_ranges[level][:, 0], axis=1))
              for level in range(tree.depth + 1)}                                      # [B, n_l]: best leaf below
    leaf = torch.from_numpy(leaf)
    _, ids = beam_search(_table_scores(tables), tree.children, n_queries, k, beam_size=k)
    assert ids.tolist() == torch.topk(leaf, k, dim=1).indices.tolist()
    _, narrow = beam_search(_table_scores(tables), tree.children, n_queries, k, beam_size=1)
    assert (narrow[:, 0] == ids[:, 0]).all()                                          # beam 1 still finds the best


def test_batched_search_equals_one_query_at_a_time_and_counts_nodes():
    rng = np.random.RandomState(3)
    tree = BalancedTree.random(150, 3, seed=1)
    tables = {level: torch.from_numpy(rng.randn(4, size)) for level, size in enumerate(tree.level_sizes)}
    stats = {}
    scores, ids = beam_search(_table_scores(tables), tree.children, 4, 5, beam_size=4, stats=stats)
    for q in range(4):
        one = {level: table[q:q + 1] for level, table in tables.items()}
        q_scores, q_ids = beam_search(_table_scores(one), tree.children, 1, 5, beam_size=4)
        assert q_ids[0].tolist() == ids[q].tolist() and torch.equal(q_scores[0], scores[q])
    assert (stats["nodes_scored"] <= 3 + (tree.depth - 1) * 4 * 3).all() and (stats["nodes_scored"] > 3).all()
    with pytest.raises(ValueError, match="beam_size=0"):
        beam_search(_table_scores(tables), tree.children, 4, 5, beam_size=0)


# ---- the model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_raw):
    root = tmp_path_factory.mktemp("tdm")
    entries = {"TDM_tiny": {"model": "TDM", "dataset_id": "tiny", **SMALL},
               "DSSM_tiny": {"model": "DSSM", "dataset_id": "tiny", "user_hidden_units": [16],
                             "item_hidden_units": [16]}}
    config = write_config(str(root), tiny_raw, entries)
    return dict(open_tiny(config, "TDM_tiny", batch_size=32), config=config)


def _model(tiny, **overrides):
    torch.manual_seed(0)
    model = TDM(tiny["feature_map"], **{**tiny["params"], **overrides})
    model.set_item_corpus(tiny["corpus"], tiny["train"].item_counts(tiny["corpus"].num_items))
    return model


def _batch(tiny):
    batch = next(iter(tiny["train"]))
    return batch, batch.pop("item_index")


@pytest.mark.parametrize("overrides", [{"tdm_loss": "bce", "history_features": "item"},
                                       {"interaction": "dot", "layer_negatives": [0, 0, 2, 0, 3, 1, 0, 5],
                                        "history_features": "item"},
                                       {"history_features": "id", "tree_branching": 3}])
def test_loss_reaches_every_trainable_parameter(tiny, overrides):
    model = _model(tiny, **overrides)
    model.train()
    loss = model.loss(dict(next(iter(tiny["train"]))))
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.requires_grad and param.grad is not None and torch.isfinite(param.grad).all(), name


def test_bad_keys_raise_naming_them(tiny):
    with pytest.raises(ValueError, match=r"layer_negatives=\[1, 2\].*list of 8"):
        _model(tiny, layer_negatives=[1, 2])
    with pytest.raises(ValueError, match="interaction='cosine'"):
        _model(tiny, interaction="cosine")
    with pytest.raises(ValueError, match="tree_learning_steps=None"):
        _model(tiny, tree_learning_rounds=1)
    model = _model(tiny, tree_init_expid="DSSM_absent")
    with pytest.raises(FileNotFoundError, match="tree_init_expid='DSSM_absent'.*run_expid.py --expid DSSM_absent"):
        model.loss(dict(next(iter(tiny["train"]))))                                     # built at the first step


def test_leaf_scores_are_the_full_ranking_scores_and_learning_the_tree_keeps_them(tiny):
    model = _model(tiny, tree_learning_rounds=1, tree_learning_steps=2)
    model.eval()
    users = {k: v for k, v in tiny["valid"].batch(0, 8).items()}
    full = model.full_scores(users, model.all_item_repr())                              # [8, n_items]
    leaves = torch.arange(model.tree.num_items).expand(8, -1)
    by_leaf = model.score_nodes(model.encode_users(users), model.tree.depth, leaves)
    torch.testing.assert_close(by_leaf, full[:, torch.from_numpy(model.tree.leaf_items)])
    before = model.tree.leaf_items.copy()
    model.train()
    for _ in range(3):                                                                   # the rebuild is at step 2
        model.loss(dict(next(iter(tiny["train"]))))
    model.eval()
    assert not np.array_equal(model.tree.leaf_items, before)
    assert_balanced_bijection(model.tree)
    torch.testing.assert_close(model.full_scores(users, model.all_item_repr()), full)   # leaves keyed by item
    item_vectors, first = model.all_item_repr(), model.tree.leaf_ranges[1][0]         # node 0: first of level 1
    torch.testing.assert_close(model.node_embedding.weight[0],
                               item_vectors[torch.from_numpy(model.tree.leaf_items[first[0]:first[1]])].mean(0))


def test_checkpoint_carries_the_tree_and_a_corrupt_tree_file_is_refused(tiny):
    model = _model(tiny)
    model.save_weights(model.checkpoint)
    saved = model.tree.leaf_items.copy()
    assert os.path.isfile(tree_file(model.checkpoint))
    model.learn_tree()
    assert not np.array_equal(model.tree.leaf_items, saved)
    model.load_weights(model.checkpoint)
    assert np.array_equal(model.tree.leaf_items, saved) and np.array_equal(model.leaf_items.numpy(), saved)
    other = _model(tiny, seed=99)                                                         # another random tree
    assert not np.array_equal(other.tree.leaf_items, saved)
    other.load_state_dict(model.state_dict())                                           # a resumed training state
    assert np.array_equal(other.tree.leaf_items, saved)
    with open(tree_file(model.checkpoint), "r+b") as fd:
        fd.seek(100)
        fd.write(b"\xff" * 32)
    with pytest.raises(TreeFileError, match=os.path.basename(tree_file(model.checkpoint))):
        model.load_weights(model.checkpoint)


def test_tree_from_a_trained_two_tower_expid(tiny):
    params = {k: v for k, v in __import__("model_zoo.config", fromlist=["load_config"]).load_config(
        tiny["config"], "DSSM_tiny").items()}
    torch.manual_seed(0)
    dssm = DSSM(tiny["feature_map"], **params)
    dssm.set_item_corpus(tiny["corpus"])
    dssm.save_weights(dssm.checkpoint)
    with open(os.path.splitext(dssm.checkpoint)[0] + ".json", "w") as fd:                # trained in-batch
        json.dump({"model": "DSSM", "params": {**params, "negative_sampler": "in_batch"},
                   "checkpoint": dssm.checkpoint}, fd, default=str)
    model = _model(tiny, tree_init_expid="DSSM_tiny")
    random_tree = model.tree.leaf_items.copy()
    model.train()
    model.loss(dict(next(iter(tiny["train"]))))                                           # the first step builds it
    dssm.eval()
    want = BalancedTree.from_vectors(dssm.all_item_repr().numpy(), 2, seed=model.seed)
    assert np.array_equal(model.tree.leaf_items, want.leaf_items)
    assert not np.array_equal(random_tree, want.leaf_items)
    model.loss(dict(next(iter(tiny["train"]))))                                           # not at later steps
    assert np.array_equal(model.tree.leaf_items, want.leaf_items)
    with open(os.path.splitext(model.checkpoint)[0] + ".json", "w") as fd:
        json.dump({"model": "TDM", "params": {}, "checkpoint": model.checkpoint}, fd)
    with pytest.raises(ValueError, match="tree_init_expid='TDM_tiny'.*two-tower"):
        _model(tiny, tree_init_expid="TDM_tiny").loss(dict(next(iter(tiny["train"]))))


def test_serving_report_beam_against_exact(tiny):
    model = _model(tiny)
    model.save_weights(model.checkpoint)
    params = dict(tiny["params"], verbose=0, beam_size=model.tree.num_items)
    report = serving.serving_report(model, tiny["test"], tiny["data_dir"], params)
    assert report["kind"] == "tree" and report["recall_vs_exact"] == 1.0
    test, k = tiny["test"], 50                                     # the same scores at every rank as exact
    model.eval()
    item_repr = model.all_item_repr()
    users = test.batch(0, len(test))
    scores, ids = serving.tree_search(model, users, k, model.tree.num_items, serving.mask_block(test, 0, len(test)),
                                      item_repr=item_repr)
    exact_scores, _ = serving.masked_topk(model.full_scores(users, item_repr), k, test.mask_indptr, test.mask_items)
    np.testing.assert_allclose(scores, exact_scores.numpy(), rtol=1e-5, atol=1e-6)
    assert ((ids >= 0) == np.isfinite(scores)).all()
    assert report["tree"]["path"] == tree_file(model.checkpoint)
    narrow = serving.serving_report(model, tiny["test"], tiny["data_dir"], dict(params, beam_size=2))
    assert narrow["tree"]["nodes_scored_per_user"] < report["tree"]["nodes_scored_per_user"]
    assert 0.0 <= narrow["recall_vs_exact"] < 1.0
    json.dumps(narrow)
    lines = serving.report_lines(narrow)
    assert lines[0].startswith("[Tree] Depth: 8 - Branching: 2 - Leaves: 200 - Beam size: 2 - Nodes scored per user: ")
    assert lines[1].startswith("[Metrics] (beam) Recall(k=20): ") and lines[2].startswith("[Metrics] (exact) ")
    assert lines[3].startswith("[Tree] Recall vs exact(k=50): ")
