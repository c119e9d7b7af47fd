"""Built data is verified before reuse: build_info.json records the size and sha256 of every built file;
a truncated or changed file is rebuilt from the raw files, or refused by name when they are gone."""
import hashlib
import json
import logging
import os
import shutil

import h5py
import pytest

from model_zoo.config import load_config
from model_zoo.data.loaders import EvalUsers, ItemCorpus, TrainLoader, load_feature_map
from model_zoo.data.pipeline import BUILD_INFO, BUILD_VERSION, build_dataset
from model_zoo.errors import DataError

BUILT = ("train.h5", "valid.h5", "test.h5", "item_corpus.h5", "feature_map.json", "feature_processor.pkl")


@pytest.fixture
def built(tiny_config):
    """params and data folder of a fresh build of the tiny dataset."""
    params = load_config(tiny_config, "DSSM_tiny")
    return params, build_dataset(params)


def _sha256(path):
    with open(path, "rb") as fd:
        return hashlib.sha256(fd.read()).hexdigest()


def _build_info(data_dir):
    with open(os.path.join(data_dir, BUILD_INFO)) as fd:
        return json.load(fd)


def _truncate(path):
    with open(path, "r+b") as fd:
        fd.truncate(os.path.getsize(path) // 2)


def _flip_middle_byte(path):
    with open(path, "r+b") as fd:
        fd.seek(os.path.getsize(path) // 2)
        byte = fd.read(1)
        fd.seek(-1, os.SEEK_CUR)
        fd.write(bytes([byte[0] ^ 0xFF]))


def _stamps(data_dir):
    return {name: os.stat(os.path.join(data_dir, name)).st_mtime_ns for name in BUILT + (BUILD_INFO,)}


def test_build_info_records_size_and_sha256_of_every_built_file(built):
    _, data_dir = built
    info = _build_info(data_dir)
    assert info["version"] == BUILD_VERSION
    records = {r["name"]: r for r in info["built_files"]}
    assert set(BUILT) <= set(records)
    for name, record in records.items():
        path = os.path.join(data_dir, name)
        assert record["bytes"] == os.path.getsize(path), name
        assert record["sha256"] == _sha256(path), name
    assert not [f for f in os.listdir(data_dir) if ".tmp" in f]


def test_unchanged_build_is_reused_without_rewriting(built):
    params, data_dir = built
    before = _stamps(data_dir)
    assert build_dataset(params) == data_dir
    assert _stamps(data_dir) == before


def test_truncated_train_h5_is_detected_and_rebuilt(built, caplog):
    params, data_dir = built
    train = os.path.join(data_dir, "train.h5")
    original = _sha256(train)
    _truncate(train)
    with caplog.at_level(logging.WARNING):
        build_dataset(params)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "train.h5" in warned and "bytes" in warned
    assert _sha256(train) == original
    loader = TrainLoader(train, load_feature_map(data_dir, "tiny"), batch_size=64)
    assert sum(len(batch["item_index"]) for batch in loader) == loader.num_rows


def test_byte_flipped_item_corpus_is_detected_and_rebuilt(built, caplog):
    params, data_dir = built
    corpus = os.path.join(data_dir, "item_corpus.h5")
    original, size = _sha256(corpus), os.path.getsize(corpus)
    _flip_middle_byte(corpus)
    assert os.path.getsize(corpus) == size and _sha256(corpus) != original
    with caplog.at_level(logging.WARNING):
        build_dataset(params)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "item_corpus.h5" in warned and "sha256" in warned
    assert _sha256(corpus) == original


def test_users_table_is_recorded_and_verified(tiny_config):
    params = dict(load_config(tiny_config, "DSSM_tiny"), train_user_table=True)
    data_dir = build_dataset(params)
    users = os.path.join(data_dir, "users.h5")
    assert "users.h5" in {r["name"] for r in _build_info(data_dir)["built_files"]}
    original = _sha256(users)
    _flip_middle_byte(users)
    build_dataset(params)
    assert _sha256(users) == original


def test_missing_built_file_is_rebuilt(built):
    params, data_dir = built
    os.remove(os.path.join(data_dir, "feature_map.json"))
    build_dataset(params)
    assert load_feature_map(data_dir, "tiny").features


def test_damaged_build_without_raw_folder_names_the_file_and_the_folder(built):
    params, data_dir = built
    _truncate(os.path.join(data_dir, "train.h5"))
    shutil.rmtree(params["raw_dir"])
    with pytest.raises(DataError, match="train.h5") as caught:
        build_dataset(params)
    assert params["raw_dir"] in str(caught.value)


def test_damaged_build_without_a_raw_file_names_both_files(built):
    params, data_dir = built
    _flip_middle_byte(os.path.join(data_dir, "item_corpus.h5"))
    os.remove(os.path.join(params["raw_dir"], "interactions.csv"))
    with pytest.raises(DataError, match="item_corpus.h5") as caught:
        build_dataset(params)
    assert "interactions.csv" in str(caught.value)


def test_intact_build_is_reused_when_the_raw_files_are_gone(built, caplog):
    params, data_dir = built
    before = _stamps(data_dir)
    shutil.rmtree(params["raw_dir"])
    with caplog.at_level(logging.WARNING):
        assert build_dataset(params) == data_dir
    assert _stamps(data_dir) == before
    assert any("interactions.csv" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_build_of_an_older_version_is_rebuilt(built):
    params, data_dir = built
    info = _build_info(data_dir)
    info["version"] = BUILD_VERSION - 1
    with open(os.path.join(data_dir, BUILD_INFO), "w") as fd:
        json.dump(info, fd)
    stamp = os.stat(os.path.join(data_dir, "train.h5")).st_mtime_ns
    build_dataset(params)
    assert _build_info(data_dir)["version"] == BUILD_VERSION
    assert os.stat(os.path.join(data_dir, "train.h5")).st_mtime_ns != stamp


def test_loaders_raise_data_error_naming_a_truncated_file(built):
    _, data_dir = built
    feature_map = load_feature_map(data_dir, "tiny")
    corpus, test, train = (os.path.join(data_dir, name) for name in ("item_corpus.h5", "test.h5", "train.h5"))
    num_items = ItemCorpus(corpus, feature_map).num_items
    loader = TrainLoader(train, feature_map, batch_size=64)
    for path in (corpus, test, train):
        _truncate(path)
    with pytest.raises(DataError, match="item_corpus.h5.*not a readable H5 file"):
        ItemCorpus(corpus, feature_map)
    with pytest.raises(DataError, match="test.h5.*not a readable H5 file"):
        EvalUsers(test, feature_map, num_items)
    with pytest.raises(DataError, match="train.h5.*not a readable H5 file"):
        TrainLoader(train, feature_map, batch_size=64)
    with pytest.raises(DataError, match="train.h5.*not a readable H5 file"):
        next(iter(loader))                              # opened before the damage, read after it
    with pytest.raises(DataError, match="train.h5.*not a readable H5 file"):
        loader.item_counts(num_items)


def _corrupt_compressed_column(path, column):
    """Rewrite `path` with `column` stored in gzip chunks, then garble its first chunk: the file still
    opens, and reading that column fails inside h5py."""
    with h5py.File(path, "r") as fd:
        columns = {name: fd[name][()] for name in fd}
    with h5py.File(path, "w") as fd:
        for name, values in columns.items():
            fd.create_dataset(name, data=values, **({"compression": "gzip"} if name == column else {}))
    with h5py.File(path, "r") as fd:
        offset = fd[column].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fd:
        fd.seek(offset)
        fd.write(b"\xff" * 16)


def test_train_loader_raises_data_error_when_a_column_cannot_be_read(built):
    _, data_dir = built
    feature_map = load_feature_map(data_dir, "tiny")
    train = os.path.join(data_dir, "train.h5")
    _corrupt_compressed_column(train, "item_index")
    loader = TrainLoader(train, feature_map, batch_size=64)
    with pytest.raises(DataError, match="train.h5.*not a readable H5 file"):
        next(iter(loader))
    with pytest.raises(DataError, match="train.h5.*not a readable H5 file"):
        loader.item_counts(10)
