"""Data pipeline: H5 build, reuse, splits, loaders, samplers and bad-input errors."""
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from model_zoo.config import load_config
from model_zoo.data.loaders import EvalUsers, ItemCorpus, TrainLoader, load_feature_map
from model_zoo.data.pipeline import build_dataset
from model_zoo.data.samplers import NegativeSampler
from model_zoo.errors import DataError


def _params(config):
    return load_config(config, "DSSM_tiny")


def test_build_writes_all_files_with_consistent_splits(tiny_config):
    params = _params(tiny_config)
    data_dir = build_dataset(params)
    for name in ("train.h5", "valid.h5", "test.h5", "item_corpus.h5", "feature_map.json", "build_info.json",
                 "feature_processor.pkl"):
        assert os.path.exists(os.path.join(data_dir, name)), name
    with h5py.File(os.path.join(data_dir, "item_corpus.h5")) as fd:
        n_items = fd["item_id"].shape[0]
        assert (fd["item_id"][()] == np.arange(1, n_items + 1)).all()
    users = {}
    for split in ("train", "valid", "test"):
        with h5py.File(os.path.join(data_dir, f"{split}.h5")) as fd:
            users[split] = set(fd["raw_user_id"][()].astype(str))
            assert fd["hist_item_id"].shape[1] == params["max_len"]
            if split != "train":
                gt_ptr, gt = fd["gt_indptr"][()], fd["gt_items"][()]
                mask_ptr, mask = fd["mask_indptr"][()], fd["mask_items"][()]
                for u in range(len(gt_ptr) - 1):
                    truth, seen = set(gt[gt_ptr[u]:gt_ptr[u + 1]]), set(mask[mask_ptr[u]:mask_ptr[u + 1]])
                    assert truth and not truth & seen
    assert not users["train"] & users["valid"] and not users["train"] & users["test"]
    total = sum(len(u) for u in users.values())
    assert abs(len(users["train"]) / total - 0.8) < 0.05


def test_heldout_user_history_is_first_80_percent(tiny_config):
    params = _params(tiny_config)
    data_dir = build_dataset(params)
    raw = pd.read_csv(os.path.join(params["raw_dir"], "interactions.csv"))
    with h5py.File(os.path.join(data_dir, "item_corpus.h5")) as fd:
        code_of = {raw_id.decode() if isinstance(raw_id, bytes) else raw_id: i + 1
                   for i, raw_id in enumerate(fd["raw_item_id"][()])}
    with h5py.File(os.path.join(data_dir, "valid.h5")) as fd:
        user = fd["raw_user_id"][0].decode()
        hist = fd["hist_item_id"][0]
        gt = fd["gt_items"][fd["gt_indptr"][0]:fd["gt_indptr"][1]]
    events = raw[raw.user_id == user].sort_values("timestamp")
    codes = [code_of[i] for i in events.item_id]
    n_hist = int(np.floor(0.8 * len(codes)))
    expected = codes[:n_hist][-params["max_len"]:]
    assert list(hist[-len(expected):]) == expected
    assert sorted(gt + 1) == sorted(set(codes[n_hist:]) - set(codes[:n_hist]))


def test_rebuild_only_when_raw_or_params_change(tiny_config):
    params = _params(tiny_config)
    data_dir = build_dataset(params)
    train_path = os.path.join(data_dir, "train.h5")
    stamp = os.stat(train_path).st_mtime_ns
    build_dataset(params)
    assert os.stat(train_path).st_mtime_ns == stamp, "unchanged input must reuse the H5 files"
    build_dataset(dict(params, max_len=5))
    with h5py.File(train_path) as fd:
        assert fd["hist_item_id"].shape[1] == 5
    inter = os.path.join(params["raw_dir"], "interactions.csv")
    frame = pd.read_csv(inter)
    frame.iloc[:-1].to_csv(inter, index=False)
    stamp = os.stat(train_path).st_mtime_ns
    build_dataset(dict(params, max_len=5))
    assert os.stat(train_path).st_mtime_ns != stamp, "a changed raw file must trigger a rebuild"


def test_interrupted_build_is_redone(tiny_config):
    params = _params(tiny_config)
    data_dir = build_dataset(params)
    os.remove(os.path.join(data_dir, "build_info.json"))
    os.remove(os.path.join(data_dir, "test.h5"))
    build_dataset(params)
    assert os.path.exists(os.path.join(data_dir, "test.h5"))
    assert not [f for f in os.listdir(data_dir) if ".tmp" in f]


def test_missing_raw_file_names_the_file(tiny_config):
    params = _params(tiny_config)
    os.remove(os.path.join(params["raw_dir"], "items.csv"))
    with pytest.raises(DataError, match="items.csv"):
        build_dataset(params)


def test_feature_column_absent_from_data_names_column(tiny_config):
    params = _params(tiny_config)
    params["feature_cols"] = list(params["feature_cols"]) + [{"name": "colour", "type": "categorical",
                                                              "source": "item"}]
    with pytest.raises(DataError, match="colour"):
        build_dataset(params)


def test_interaction_with_unknown_item_is_rejected(tiny_config):
    params = _params(tiny_config)
    inter = os.path.join(params["raw_dir"], "interactions.csv")
    frame = pd.read_csv(inter)
    frame.loc[0, "item_id"] = "no-such-item"
    frame.to_csv(inter, index=False)
    with pytest.raises(DataError, match="no-such-item"):
        build_dataset(params)


def test_corrupt_and_out_of_range_h5_are_rejected(tiny_config):
    params = _params(tiny_config)
    data_dir = build_dataset(params)
    feature_map = load_feature_map(data_dir, "tiny")
    corpus = ItemCorpus(os.path.join(data_dir, "item_corpus.h5"), feature_map)
    valid = os.path.join(data_dir, "valid.h5")
    with h5py.File(valid, "r+") as fd:
        fd["gt_items"][0] = corpus.num_items + 5
    with pytest.raises(DataError, match="valid.h5.*gt_items"):
        EvalUsers(valid, feature_map, corpus.num_items)
    with h5py.File(valid, "r+") as fd:
        fd["region"][0] = 10_000
    with pytest.raises(DataError, match="region"):
        EvalUsers(valid, feature_map, corpus.num_items)
    with open(os.path.join(data_dir, "test.h5"), "wb") as fd:
        fd.write(b"not an h5 file")
    with pytest.raises(DataError, match="test.h5"):
        EvalUsers(os.path.join(data_dir, "test.h5"), feature_map, corpus.num_items)
    with h5py.File(os.path.join(data_dir, "train.h5"), "r+") as fd:
        fd["activity"][3] = np.nan
    with pytest.raises(DataError, match="activity.*NaN"):
        list(TrainLoader(os.path.join(data_dir, "train.h5"), feature_map, 32, num_items=corpus.num_items))


def test_train_loader_visits_every_row_once_per_epoch(tiny_config):
    params = _params(tiny_config)
    data_dir = build_dataset(params)
    feature_map = load_feature_map(data_dir, "tiny")
    path = os.path.join(data_dir, "train.h5")
    loader = TrainLoader(path, feature_map, batch_size=50, block_size=137, seed=1)
    with h5py.File(path) as fd:
        expected = np.sort(fd["item_index"][()])
    epochs = []
    for _ in range(2):
        seen = np.concatenate([b["item_index"].numpy() for b in loader])
        assert (np.sort(seen) == expected).all()
        epochs.append(seen)
    assert not (epochs[0] == epochs[1]).all(), "each epoch must be reshuffled"
    assert all(len(b["item_index"]) == 50 for b in list(loader)[:-1])


def test_samplers():
    counts = np.array([100, 10, 1, 0, 0, 0, 0, 0, 0, 1000])
    uniform = NegativeSampler("uniform", 10, 20000, seed=1).sample().numpy()
    assert np.bincount(uniform, minlength=10).min() > 1500
    pop = NegativeSampler("popularity", 10, 20000, counts, alpha=1.0, seed=1).sample().numpy()
    freq = np.bincount(pop, minlength=10) / 20000
    expected = (counts + 1) / (counts + 1).sum()
    assert np.abs(freq - expected).max() < 0.02
    in_batch = NegativeSampler("in_batch", 10, item_counts=counts + 1)
    assert in_batch.sample() is None
    assert torch.allclose(in_batch.log_probs.exp().sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="negative_sampler"):
        NegativeSampler("hard", 10)
