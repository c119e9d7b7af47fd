"""The closed-form anchors EASE and ItemKNN: their matrices against brute-force numpy, the user input they
score, the memory check, and a run through run_expid with a reloadable checkpoint."""
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import run_expid
from model_zoo import get_model
from model_zoo.data.interactions import training_interactions
from model_zoo.engine.evaluator import Evaluator
from model_zoo.models import _closed_form, ease

from .conftest import open_tiny, write_config

PAIRS_FEATURES = [{"name": "user_id", "type": "categorical", "source": "user"}]
MAX_LEN = 3


@pytest.fixture(scope="module")
def pairs_raw(tmp_path_factory):
    """train/valid/test (user, item) arrays: 40 users x 25 items; users have 4-12 training items (more than
    max_len), and user 99 appears only in test (no training row)."""
    rng = np.random.RandomState(3)
    pairs = {"train": [], "valid": [], "test": []}
    for user in range(40):
        items = rng.permutation(25)
        n_train = rng.randint(4, 13)
        pairs["train"] += [(user, i) for i in items[:n_train]]
        pairs["valid"] += [(user, i) for i in items[n_train:n_train + 2]]
        pairs["test"] += [(user, i) for i in items[n_train + 2:n_train + 5]]
    pairs["test"] += [(99, 0), (99, 1)]
    raw = tmp_path_factory.mktemp("pairs_raw")
    for split, rows in pairs.items():
        np.save(raw / f"{split}_list.npy", np.asarray(rows, dtype=np.int64))
    return str(raw)


def _pairs_data(root, pairs_raw, entries):
    config = write_config(str(root), pairs_raw, entries,
                          {"source": "pairs", "feature_cols": PAIRS_FEATURES, "max_len": MAX_LEN})
    return config, open_tiny(config, next(iter(entries)))


def _fitted(data, name, **keys):
    model = get_model(name)(data["feature_map"], **dict(data["params"], **keys))
    model.set_item_corpus(data["corpus"])
    model.fit_closed_form(data["train"])
    return model


def _raw_train_matrix(pairs_raw, data):
    """Dense binary [users, items] of the raw training pairs, items in corpus order."""
    train = np.load(os.path.join(pairs_raw, "train_list.npy"))
    column = {raw: i for i, raw in enumerate(data["corpus"].raw_ids)}
    matrix = np.zeros((train[:, 0].max() + 1, data["corpus"].num_items))
    matrix[train[:, 0], [column[str(i)] for i in train[:, 1]]] = 1.0
    return matrix


def test_ease_matrix_is_the_closed_form_with_zero_diagonal(tmp_path, pairs_raw):
    _, data = _pairs_data(tmp_path, pairs_raw, {"E": {"model": "EASE", "dataset_id": "tiny"}})
    model = _fitted(data, "EASE", regularization=7.0)
    x = _raw_train_matrix(pairs_raw, data)
    inverse = np.linalg.inv(x.T @ x + 7.0 * np.eye(x.shape[1]))                        # P
    expected = np.eye(x.shape[1]) - inverse / np.diag(inverse)                          # B = I - P / diag(P)
    fitted = model.item_item.numpy()
    assert np.abs(np.diag(fitted)).max() == 0.0
    np.testing.assert_allclose(fitted, expected, atol=1e-6)
    assert np.abs(fitted).max() > 1e-3


def test_ease_blocks_give_the_same_matrix(monkeypatch):
    rng = np.random.RandomState(0)
    x = (rng.rand(60, 37) < 0.2).astype(np.float32)
    import scipy.sparse as sp
    whole = np.zeros((37, 37), dtype=np.float32)
    ease.ease_weights(sp.csr_matrix(x), 3.0, whole)
    monkeypatch.setattr(ease, "ROW_BLOCK_BYTES", 8 * 37 * 5)                           # 5 rows of P at a time
    monkeypatch.setattr(_closed_form, "GRAM_BLOCK_BYTES", 16 * 37 * 4)                 # 4 Gram rows at a time
    blocked = np.zeros((37, 37), dtype=np.float32)
    ease.ease_weights(sp.csr_matrix(x), 3.0, blocked)
    inverse = np.linalg.inv(x.T.astype(np.float64) @ x + 3.0 * np.eye(37))
    np.testing.assert_allclose(blocked, np.eye(37) - inverse / np.diag(inverse), atol=1e-6)
    np.testing.assert_array_equal(blocked, whole)


@pytest.mark.parametrize("num_neighbors, shrink", [(None, 0.0), (None, 5.0), (3, 2.0)])
def test_itemknn_matrix_is_the_cosine_of_cooccurrence(tmp_path, pairs_raw, num_neighbors, shrink):
    _, data = _pairs_data(tmp_path, pairs_raw, {"K": {"model": "ItemKNN", "dataset_id": "tiny"}})
    model = _fitted(data, "ItemKNN", num_neighbors=num_neighbors, shrink=shrink)
    x = _raw_train_matrix(pairs_raw, data)
    counts = x.T @ x
    norms = np.sqrt(np.diag(counts))
    expected = counts / (np.outer(norms, norms) + shrink)
    np.fill_diagonal(expected, 0.0)
    fitted = model.item_item.numpy()
    if num_neighbors is None:
        np.testing.assert_allclose(fitted, expected, rtol=1e-5, atol=1e-7)
        return
    assert ((fitted != 0).sum(axis=0) <= num_neighbors).all()
    for item in range(expected.shape[1]):       # each column keeps its k largest similarities
        kept = np.flatnonzero(fitted[:, item])
        np.testing.assert_allclose(fitted[kept, item], expected[kept, item], rtol=1e-5)
        threshold = np.sort(expected[:, item])[-num_neighbors]
        assert (expected[kept, item] >= threshold - 1e-6).all()


def test_pairs_user_input_is_its_full_training_row(tmp_path, pairs_raw):
    _, data = _pairs_data(tmp_path, pairs_raw, {"E": {"model": "EASE", "dataset_id": "tiny"}})
    model = _fitted(data, "EASE")
    x = _raw_train_matrix(pairs_raw, data)
    test = data["test"]
    with torch.no_grad():
        inputs = model.encode_users(test.batch(0, len(test))).numpy()                  # [U, I]
    users = [int(u) for u in test.raw_user_ids]
    assert 99 in users
    longer = 0
    for row, user in enumerate(users):
        if user == 99:                          # no training row: its history (none) is the input
            assert inputs[row].sum() == 0
            continue
        np.testing.assert_array_equal(inputs[row], x[user])
        longer += x[user].sum() > MAX_LEN
    assert longer > 0, "the fixture must have users with more training items than max_len"


def test_held_out_user_input_is_its_history(tmp_path, tiny_raw):
    config = write_config(str(tmp_path), tiny_raw, {"K": {"model": "ItemKNN", "dataset_id": "tiny"}})
    data = open_tiny(config, "K")
    model = _fitted(data, "ItemKNN")
    assert model.user_key is None
    valid = data["valid"]
    history = valid.inputs["hist_item_id"]                                             # [U, L] codes
    with torch.no_grad():
        inputs = model.encode_users(valid.batch(0, len(valid))).numpy()
    for row in range(len(valid)):
        assert set(np.flatnonzero(inputs[row])) == set(history[row][history[row] > 0] - 1)


def test_training_matrix_holds_every_item_of_a_training_timeline(tmp_path, tiny_raw):
    """Sequential protocol: a training user's row is all its interactions, the first one (never a target) too."""
    config = write_config(str(tmp_path), tiny_raw, {"K": {"model": "ItemKNN", "dataset_id": "tiny"}})
    data = open_tiny(config, "K")
    path = os.path.join(data["data_dir"], "train.h5")
    interactions = training_interactions(path, data["corpus"].num_items)
    with h5py.File(path, "r") as fd:
        raw_user = dict(zip(fd["user_row"][()], fd["raw_user_id"][()].astype(str)))
    raw = pd.read_csv(os.path.join(tiny_raw, "interactions.csv"), dtype=str)
    column = {raw_id: i for i, raw_id in enumerate(data["corpus"].raw_ids)}
    for row, user_row in enumerate(interactions.user_rows):
        expected = {column[i] for i in raw.loc[raw["user_id"] == raw_user[user_row], "item_id"]}
        assert set(interactions.matrix[row].indices) == expected


@pytest.mark.parametrize("name, bytes_per_entry", [("EASE", 12), ("ItemKNN", 8)])
def test_too_many_items_raises_with_the_memory_needed(tmp_path, tiny_raw, monkeypatch, name, bytes_per_entry):
    config = write_config(str(tmp_path), tiny_raw, {"X": {"model": name, "dataset_id": "tiny"}})
    data = open_tiny(config, "X")
    num_items = data["corpus"].num_items
    needed = bytes_per_entry * num_items ** 2
    monkeypatch.setattr(_closed_form, "available_memory_bytes", lambda: needed - 1)
    with pytest.raises(ValueError) as error:
        get_model(name)(data["feature_map"], **data["params"])
    message = str(error.value)
    assert f"{num_items} items" in message and f"{needed / 2 ** 30:.2f} GiB" in message
    assert f"{(needed - 1) / 2 ** 30:.2f} GiB of memory is free" in message
    monkeypatch.setattr(_closed_form, "available_memory_bytes", lambda: needed)
    get_model(name)(data["feature_map"], **data["params"])                             # fits exactly: built


def test_bad_keys_are_named():
    with pytest.raises(ValueError, match="regularization=0"):
        get_model("EASE")(None, regularization=0)
    with pytest.raises(ValueError, match="num_neighbors=0"):
        get_model("ItemKNN")(None, num_neighbors=0)
    with pytest.raises(ValueError, match="shrink=-1"):
        get_model("ItemKNN")(None, shrink=-1)


@pytest.mark.parametrize("name", ["EASE", "ItemKNN"])
def test_run_expid_writes_metrics_and_a_reloadable_checkpoint(tmp_path, pairs_raw, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    config, data = _pairs_data(tmp_path, pairs_raw, {f"{name}_tiny": {"model": name, "dataset_id": "tiny"}})
    assert run_expid.main(["--config", config, "--expid", f"{name}_tiny"]) == 0
    with open(tmp_path / "checkpoints" / "tiny" / f"{name}_tiny.json") as fd:
        result = json.load(fd)
    assert 0.0 < result["test"]["Recall(k=20)"] <= 1.0
    reloaded = get_model(name)(data["feature_map"], **data["params"])
    reloaded.set_item_corpus(data["corpus"])
    assert reloaded.item_item.abs().sum() == 0 and reloaded.known_items.numel() == 0
    reloaded.load_weights(result["checkpoint"])
    fitted = _fitted(data, name)
    assert torch.equal(reloaded.item_item, fitted.item_item)
    assert torch.equal(reloaded.known_items, fitted.known_items)
    metrics = Evaluator(["Recall(k=20)", "Recall(k=50)"], verbose=False).evaluate(reloaded, data["test"])
    assert metrics == pytest.approx({k: result["test"][k] for k in metrics})


def test_training_matrix_is_the_same_read_in_blocks(tmp_path, pairs_raw):
    _, data = _pairs_data(tmp_path, pairs_raw, {"E": {"model": "EASE", "dataset_id": "tiny"}})
    path = os.path.join(data["data_dir"], "train.h5")
    whole = training_interactions(path, data["corpus"].num_items, key_column="user_id")
    blocked = training_interactions(path, data["corpus"].num_items, key_column="user_id", block_rows=7)
    assert whole.matrix.shape[0] == 40 and (whole.matrix != blocked.matrix).nnz == 0
    np.testing.assert_array_equal(whole.keys, blocked.keys)
    np.testing.assert_array_equal(whole.user_rows, blocked.user_rows)
    assert len(np.unique(whole.keys)) == 40
