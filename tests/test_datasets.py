"""Real-data sources: MovieLens (GroupLens zips, RecBole), Deezer, BARS text files, pair arrays.

Official MovieLens formats are tested on small synthetic zips written here; Deezer and the
shared ML-100K / ML-1M copies come from ../shared/data (skipped where it is absent).
"""
import io
import os
import shutil
import zipfile

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

import run_expid
from model_zoo.config import load_config
from model_zoo.data.download import unpack_zip
from model_zoo.data.loaders import EvalUsers, ItemCorpus, load_feature_map
from model_zoo.data.pipeline import build_dataset, cyclic_histories
from model_zoo.data.sources import load_raw
from model_zoo.errors import ConfigError, DataError
from model_zoo.models import MODELS

from .conftest import shared_path, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML_FEATURES = [{"name": ["gender", "age", "occupation"], "type": "categorical", "source": "user"},
               {"name": "year", "type": "categorical", "source": "item"},
               {"name": "genres", "type": "sequence", "source": "item", "max_len": 4}]
GENRES = ("Action", "Comedy", "Drama", "Sci-Fi", "Film-Noir", "Children's")


def _params(tmp_path, raw_dir, overrides, expid="Popularity_tiny"):
    config = write_config(str(tmp_path), str(raw_dir), {expid: {"model": "Popularity", "dataset_id": "tiny"}},
                          overrides)
    return load_config(config, expid)


def _events(seed, n_users=40, n_items=30, half_stars=False):
    rng = np.random.RandomState(seed)
    rows = []
    for user in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items + 1), size=rng.randint(6, 14), replace=False)
        for k, item in enumerate(items):
            rating = rng.randint(1, 11) / 2 if half_stars else rng.randint(1, 6)
            rows.append((user, int(item), rating, 978300000 + 1000 * user + 7 * (len(items) - k)))
    return rows                                   # timestamps decrease in file order on purpose


def _movie_genres(item):
    return [GENRES[item % len(GENRES)], GENRES[(item * 7 + 1) % len(GENRES)]][: 1 + item % 2]


def _zip(path, members, encoding="utf-8"):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text.encode(encoding))
    return path


def _write_ml1m_zip(path, events, n_users=40, n_items=30):
    ratings = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in events)
    users = "".join(f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 21}::{10000 + u}\n"
                    for u in range(1, n_users + 1))
    movies = "".join(f"{i}::Movie: Part {i} ({1950 + i})::{'|'.join(_movie_genres(i))}\n"
                     for i in range(1, n_items + 1))
    return _zip(path, {"ml-1m/ratings.dat": ratings, "ml-1m/users.dat": users, "ml-1m/movies.dat": movies,
                       "ml-1m/README": "synthetic"}, encoding="latin-1")


def _write_ml10m_zip(path, events, n_items=30):
    ratings = "".join(f"{u}::{i}::{r:.1f}::{t}\n" for u, i, r, t in events)
    movies = "".join(f"{i}::Film {i}: The Sequel ({1980 + i})::{'|'.join(_movie_genres(i))}\n"
                     for i in range(1, n_items + 1))
    return _zip(path, {"ml-10M100K/ratings.dat": ratings, "ml-10M100K/movies.dat": movies,
                       "ml-10M100K/tags.dat": "1::1::tag::1\n"})


def _write_ml100k_zip(path, events, n_users=40, n_items=30):
    all_genres = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                  "War", "Western")
    data = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in events)
    users = "".join(f"{u}|{20 + u}|{'MF'[u % 2]}|job{u % 5}|{10000 + u}\n" for u in range(1, n_users + 1))
    items = ""
    for i in range(1, n_items + 1):
        flags = ["1" if g in _movie_genres(i) else "0" for g in all_genres]
        items += f"{i}|Café n°{i} ({1960 + i})|01-Jan-{1960 + i}||http://x/{i}|{'|'.join(flags)}\n"
    genre = "".join(f"{g}|{k}\n" for k, g in enumerate(all_genres))
    return _zip(path, {"ml-100k/u.data": data, "ml-100k/u.user": users, "ml-100k/u.item": items,
                       "ml-100k/u.genre": genre}, encoding="latin-1")


@pytest.mark.parametrize("fmt", ["ml1m", "ml10m", "ml100k"])
def test_official_movielens_zips_load_and_build(tmp_path, fmt):
    events = _events(seed={"ml1m": 1, "ml10m": 2, "ml100k": 3}[fmt], half_stars=(fmt == "ml10m"))
    archive = {"ml1m": _write_ml1m_zip, "ml10m": _write_ml10m_zip, "ml100k": _write_ml100k_zip}[fmt](
        str(tmp_path / f"{fmt}.zip"), events)
    raw_dir = str(tmp_path / "raw")
    unpack_zip(archive, raw_dir)
    features = ML_FEATURES[1:] if fmt == "ml10m" else ML_FEATURES
    params = _params(tmp_path, raw_dir, {"source": "movielens", "release": fmt, "feature_cols": features,
                                         "rating_threshold": 4, "max_len": 5})
    raw = load_raw(params)
    kept = [e for e in events if e[2] >= 4]
    assert len(raw.interactions) == len(kept)
    assert set(raw.items["item_id"]) == {str(e[1]) for e in kept}, "the corpus = items with a kept rating"
    item = raw.items.set_index("item_id").loc[str(kept[0][1])]
    assert sorted(item["genres"].split("^")) == sorted(_movie_genres(kept[0][1]))   # u.item: flag order
    assert item["year"] == str({"ml1m": 1950, "ml10m": 1980, "ml100k": 1960}[fmt] + kept[0][1])
    if fmt == "ml100k":
        assert item["title"].startswith("Café n°")          # u.item is latin-1
        assert raw.users.set_index("user_id").loc["3", "age"] == "23"
    if fmt == "ml1m":
        assert item["title"].startswith("Movie: Part")       # a title with a colon survives '::' parsing
        assert raw.users.set_index("user_id").loc["3", "gender"] == "F"
    if fmt == "ml10m":
        assert raw.users is None
    assert len(load_raw(dict(params, rating_threshold=0)).interactions) == len(events)

    data_dir = build_dataset(params)
    feature_map = load_feature_map(data_dir, "tiny")
    expected = {"year", "genres", "item_id", "hist_item_id"} | ({"gender", "age", "occupation"}
                                                                 if fmt != "ml10m" else set())
    assert set(feature_map.features) == expected
    users = {}
    for split in ("train", "valid", "test"):
        with h5py.File(os.path.join(data_dir, f"{split}.h5")) as fd:
            users[split] = set(fd["raw_user_id"][()].astype(str))
    assert not users["train"] & (users["valid"] | users["test"])
    # the history follows time, not file order: the valid user's history ends with their earliest items
    with h5py.File(os.path.join(data_dir, "valid.h5")) as fd:
        user, hist = fd["raw_user_id"][0].decode(), fd["hist_item_id"][0]
    with h5py.File(os.path.join(data_dir, "item_corpus.h5")) as corpus:
        raw_ids = corpus["raw_item_id"][()].astype(str)
    timeline = sorted((t, i) for u, i, r, t in kept if str(u) == user)
    n_hist = int(np.floor(0.8 * len(timeline)))
    expected_hist = [str(i) for _, i in timeline[:n_hist]][-5:]
    assert [raw_ids[c - 1] for c in hist if c] == expected_hist


def test_threshold_and_missing_files_errors(tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    params = _params(tmp_path, raw_dir, {"source": "movielens", "release": "ml1m", "feature_cols": []})
    with pytest.raises(DataError, match=r"ratings.dat, users.dat, movies.dat.*python -m model_zoo.data.download ml1m"):
        load_raw(params)
    unpack_zip(_write_ml1m_zip(str(tmp_path / "a.zip"), _events(4)), str(raw_dir))
    with pytest.raises(ConfigError, match="rating_threshold"):
        load_raw(dict(params, rating_threshold=-1))
    with pytest.raises(DataError, match="rating >= 9"):
        load_raw(dict(params, rating_threshold=9))
    with pytest.raises(DataError, match="missing column.*colour"):
        load_raw(dict(params, feature_cols=[{"name": "colour", "type": "categorical", "source": "item"}]))


def _write_atomic(folder, name):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.inter"), "w") as fd:
        fd.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u, i, r, t in _events(5):
            fd.write(f"{u}\t{i}\t{r}\t{t}\n")
    with open(os.path.join(folder, f"{name}.user"), "w") as fd:
        fd.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
        fd.writelines(f"{u}\t{20 + u}\t{'MF'[u % 2]}\tjob{u % 3}\t{u}\n" for u in range(1, 41))
    with open(os.path.join(folder, f"{name}.item"), "w") as fd:
        fd.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        fd.writelines(f'{i}\tThe "Film" {i}\t{1990 + i}\t{" ".join(_movie_genres(i))}\n' for i in range(1, 31))


def test_recbole_atomic_files(tmp_path):
    _write_atomic(str(tmp_path / "raw"), "ml-syn")
    params = _params(tmp_path, tmp_path / "raw", {"source": "movielens", "feature_cols": ML_FEATURES,
                                                  "rating_threshold": 4})
    raw = load_raw(params)
    assert len(raw.interactions) == sum(e[2] >= 4 for e in _events(5))
    item = raw.items.set_index("item_id").loc["7"]
    assert (item["year"], item["genres"], item["title"]) == ("1997", "^".join(_movie_genres(7)), 'The^"Film"^7')
    assert len(load_raw(dict(params, source="recbole", rating_threshold=None)).interactions) == len(_events(5))
    build_dataset(params)


def test_shared_recbole_ml100k_with_the_shipped_entry(tmp_path):
    raw_dir = shared_path("ml-100k_recbole")
    with open(os.path.join(ROOT, "config", "dataset_config.yaml")) as fd:
        entry = yaml.safe_load(fd)["ml100k_recbole"]
    params = _params(tmp_path, raw_dir, dict(entry, raw_dir=raw_dir, data_root=str(tmp_path / "data")))
    inter = pd.read_csv(os.path.join(raw_dir, "ml-100k.inter"), sep="\t")
    raw = load_raw(params)
    assert len(raw.interactions) == int((inter["rating:float"] >= 4).sum())
    assert len(load_raw(dict(params, rating_threshold=0)).interactions) == 100_000
    assert raw.users["gender"].isin(["M", "F"]).all() and len(raw.users) == 943
    data_dir = build_dataset(params)
    feature_map = load_feature_map(data_dir, "tiny")
    assert feature_map.features["gender"]["vocab_size"] == 4           # M, F, padding, OOV
    corpus = ItemCorpus(os.path.join(data_dir, "item_corpus.h5"), feature_map)
    assert corpus.num_items == raw.interactions["item_id"].nunique()
    test = EvalUsers(os.path.join(data_dir, "test.h5"), feature_map, corpus.num_items)
    n_users = (raw.interactions.groupby("user_id").size() >= 2).sum()
    assert abs(len(test) - 0.1 * n_users) <= 2
    assert (test.inputs["hist_item_id"][:, -1] > 0).all()


# ---------------------------------------------------------------------------------------- Deezer
SAMPLE_FILES = {"v1": {"train": "user_features_train_sample.parquet",
                       "valid": "user_features_validation_sample.parquet",
                       "test": "user_features_test_sample.parquet", "items": "song_embeddings_sample.parquet"},
                "v2": {"train": "user_features_train_sample_v2.parquet",
                       "valid": "user_features_validation_sample_v2.parquet",
                       "test": "user_features_test_sample.parquet", "items": "song_embeddings_sample.parquet"}}


def _deezer_entry(name="deezer_ttsvd"):
    with open(os.path.join(ROOT, "config", "dataset_config.yaml")) as fd:
        return yaml.safe_load(fd)[name]


def _deezer_params(tmp_path, raw_dir, files, name="deezer_ttsvd", expid="Popularity_tiny"):
    entry = dict(_deezer_entry(name), raw_dir=str(raw_dir), files=files, data_root=str(tmp_path / "data"))
    return _params(tmp_path, raw_dir, entry, expid)


def _ground_truth(raw_dir, name):
    frame = pd.read_parquet(os.path.join(raw_dir, name), columns=["user_index", "d1d30_songs"])
    return {str(u): sorted(set(int(s) for s in songs)) for u, songs in zip(frame.user_index, frame.d1d30_songs)}


def _songs_covering(raw_dir, files, path, seed=0):
    """A song table with every song of the ground-truth lists (vectors as arrays, as in the release)."""
    songs = sorted(set().union(*[set(s) for role in ("train", "valid", "test")
                                 for s in _ground_truth(raw_dir, files[role]).values()]))
    rng = np.random.RandomState(seed)
    pd.DataFrame({"song_index": np.asarray(songs, dtype=np.int32),
                  "features_svd": list(rng.normal(size=(len(songs), 128)).astype(np.float32)),
                  "features_mf": list(rng.normal(size=(len(songs), 256)).astype(np.float32))}).to_parquet(path)
    return songs


def _check_deezer_build(data_dir, raw_dir, files):
    feature_map = load_feature_map(data_dir, "tiny")
    users_h5 = os.path.join(data_dir, "users.h5")     # train_user_table layout: user features once per user
    with h5py.File(users_h5 if os.path.exists(users_h5) else os.path.join(data_dir, "train.h5")) as fd:
        user_cols = [n for n, s in feature_map.features.items() if s["source"] == "user" and n != "hist_item_id"]
        widths = {n: (fd[n].shape[1] if fd[n].ndim == 2 else 1) for n in user_cols}
        assert not np.isnan(fd["nb_favorite_songs"][()]).any(), "missing counts are filled with 0"
    with h5py.File(os.path.join(data_dir, "train.h5")) as fd:
        assert sum(widths.values()) == 20 * 128 + 1 + 18 == 2579
        assert sum(1 for s in feature_map.features.values() if s["type"] == "embedding" and s["source"] == "user") == 20
        assert feature_map.features["age_embedding"]["pretrain_dim"] == 128
        assert (fd["hist_item_id"][()] == 0).all(), "cold-start users have no history"
        truth = _ground_truth(raw_dir, files["train"])
        assert len(fd["item_index"]) == sum(len(v) for v in truth.values())
    with h5py.File(os.path.join(data_dir, "item_corpus.h5")) as fd:
        raw_items = fd["raw_item_id"][()].astype(str)
        assert fd["features_svd"].shape == (len(raw_items), 128)
    for split in ("valid", "test"):
        truth = _ground_truth(raw_dir, files[split])
        with h5py.File(os.path.join(data_dir, f"{split}.h5")) as fd:
            assert set(fd) >= {"gt_indptr", "gt_items", "mask_indptr", "mask_items", "age_embedding", "age_value"}
            assert len(fd["mask_items"]) == 0, "nothing is masked for cold users"
            indptr, items = fd["gt_indptr"][()], fd["gt_items"][()]
            for row, user in enumerate(fd["raw_user_id"][()].astype(str)):
                got = sorted(int(raw_items[i]) for i in items[indptr[row]:indptr[row + 1]])
                assert got == truth[user]
            assert len(fd["raw_user_id"]) == len(truth)


def test_deezer_samples_v1_build_expected_fields(tmp_path):
    raw_dir = shared_path("deezer_sample")
    params = _deezer_params(tmp_path, raw_dir, SAMPLE_FILES["v1"])
    data_dir = build_dataset(params)
    _check_deezer_build(data_dir, raw_dir, SAMPLE_FILES["v1"])
    songs = pd.read_parquet(os.path.join(raw_dir, "song_embeddings_sample.parquet"))
    with h5py.File(os.path.join(data_dir, "item_corpus.h5")) as fd:
        expected = np.asarray(yaml.safe_load(songs["features_svd"][2]), dtype=np.float32)   # "[...]" strings
        assert np.allclose(fd["features_svd"][2], expected)
    with pytest.raises(ConfigError, match="train_history='user_sample' needs user histories"):
        build_dataset(dict(params, train_history="user_sample"))      # cold users: no history to sample


def test_deezer_samples_v2_with_realistic_ground_truth(tmp_path):
    """The v2 lists name songs beyond the 5-song sample table: add a song table covering them."""
    raw_dir = shared_path("deezer_sample")
    files = dict(SAMPLE_FILES["v2"])
    local = tmp_path / "raw"
    local.mkdir()
    for role in ("train", "valid", "test"):
        shutil.copy(os.path.join(raw_dir, files[role]), local / files[role])
    _songs_covering(str(local), files, str(local / "songs.parquet"))
    files["items"] = "songs.parquet"
    data_dir = build_dataset(_deezer_params(tmp_path, local, files))
    _check_deezer_build(data_dir, str(local), files)


def _write_mini_deezer(folder, string_vectors=False, seed=0):
    """Deezer-format files with 2 feature groups of 4 dims, 2 counts and 6 songs."""
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    users = {"train": [0, 1, 2, 3], "valid": [10, 11], "test": [20, 21]}
    for split, ids in users.items():
        frame = pd.DataFrame({"user_index": np.asarray(ids, dtype=np.int32),
                              "d1d30_songs": [rng.choice(6, size=2, replace=False).astype(np.int32) for _ in ids]})
        for group in ("age", "streamed_songs"):
            for d in range(4):
                frame[f"{group}_embedding{d}"] = rng.normal(size=len(ids))
        frame["age_value"] = rng.randint(15, 60, len(ids))
        frame["nb_streamed_songs"] = [np.nan] + list(rng.randint(0, 9, len(ids) - 1).astype(float))
        frame.to_parquet(os.path.join(folder, f"{split}.parquet"))
    vectors = rng.normal(size=(6, 4)).astype(np.float32)
    songs = pd.DataFrame({"song_index": np.arange(6, dtype=np.int32),
                          "features_svd": [str(list(map(float, v))) if string_vectors else v for v in vectors]})
    songs.to_parquet(os.path.join(folder, "songs.parquet"))
    return vectors


MINI_FILES = {"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet", "items": "songs.parquet"}
MINI_FEATURES = [{"name": ["age_embedding", "streamed_songs_embedding"], "type": "embedding", "source": "user",
                  "pretrain_dim": 4},
                 {"name": ["age_value", "nb_streamed_songs"], "type": "numeric", "source": "user"},
                 {"name": "features_svd", "type": "embedding", "source": "item"}]


def test_deezer_format_vectors_errors_and_layouts(tmp_path):
    entry = dict(_deezer_entry(), files=MINI_FILES, feature_cols=MINI_FEATURES, data_root=str(tmp_path / "data"))
    vectors = _write_mini_deezer(str(tmp_path / "arrays"))
    _write_mini_deezer(str(tmp_path / "strings"), string_vectors=True)
    params = _params(tmp_path, tmp_path / "arrays", dict(entry, raw_dir=str(tmp_path / "arrays")))
    raw_arrays, raw_strings = load_raw(params), load_raw(dict(params, raw_dir=str(tmp_path / "strings")))
    assert raw_arrays.notes["pretrain_dims"] == {"age_embedding": 4, "streamed_songs_embedding": 4,
                                                 "features_svd": 4}
    for a, b, v in zip(raw_arrays.items["features_svd"], raw_strings.items["features_svd"], vectors):
        assert np.allclose(a, v) and np.allclose(b, v)
    assert raw_arrays.users["nb_streamed_songs"].iloc[0] == 0.0, "missing counts become 0"
    assert raw_arrays.given_history is False and len(raw_arrays.given["train"].pairs) == 8

    data_dir = build_dataset(dict(params, train_user_table=False))
    assert not os.path.exists(os.path.join(data_dir, "users.h5"))
    data_dir = build_dataset(dict(params, train_user_table=True))
    with h5py.File(os.path.join(data_dir, "train.h5")) as fd, h5py.File(os.path.join(data_dir, "users.h5")) as users:
        assert set(fd) == {"user_row", "item_index", "hist_item_id"}, "user features live in users.h5"
        assert users["age_embedding"].shape == (8, 4)
        raw_vectors = dict(zip(raw_arrays.users["user_index"], raw_arrays.users["age_embedding"]))
        table, names = users["age_embedding"][()], users["raw_user_id"][()].astype(str)
        for row in fd["user_row"][()]:
            assert np.allclose(table[row], raw_vectors[names[row]])

    songs = pd.read_parquet(tmp_path / "arrays" / "songs.parquet")
    songs.iloc[:4].to_parquet(tmp_path / "arrays" / "songs.parquet")
    with pytest.raises(DataError, match=r"(train|valid|test).parquet: .* missing from the item table"):
        build_dataset(dict(params, train_user_table=False))
    with pytest.raises(DataError, match="width 4; the dataset config says pretrain_dim=8"):
        load_raw(dict(params, feature_cols=[dict(MINI_FEATURES[0], pretrain_dim=8)]))
    shutil.copy(tmp_path / "arrays" / "train.parquet", tmp_path / "arrays" / "test.parquet")
    with pytest.raises(DataError, match="test.parquet: user.* also appear in the train file"):
        load_raw(params)


def test_deezer_release_files_missing_names_the_download_command(tmp_path):
    params = _deezer_params(tmp_path, tmp_path / "empty", {})
    params["files"] = None
    with pytest.raises(DataError, match=r"user_features_train_svd.parquet, .*song_embeddings.parquet\. "
                                        r"Download them with `python -m model_zoo.data.download deezer_ttsvd"):
        load_raw(params)


def test_run_expid_without_deezer_data_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    """`python run_expid.py --expid SparCode_deezer_001` (or DSSM_deezer_001) on a machine without the data."""
    shutil.copytree(os.path.join(ROOT, "config"), tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    expids = yaml.safe_load(open(tmp_path / "config" / "model_config" / "DSSM.yaml"))
    sparcode = tmp_path / "config" / "model_config" / "SparCode.yaml"
    expid = "SparCode_deezer_001" if sparcode.exists() and "SparCode_deezer_001" in open(sparcode).read() \
        else "DSSM_deezer_001"
    assert "DSSM_deezer_001" in expids
    assert run_expid.main(["--expid", expid]) == 2
    err = capsys.readouterr().err
    assert "raw file(s) missing from ./data/deezer/raw" in err
    assert "python -m model_zoo.data.download deezer_ttsvd" in err and "Traceback" not in err


DEEZER_MODELS = {
    "DSSM": {"user_hidden_units": [32], "item_hidden_units": [32]},
    "SparCode": {"num_codebooks": 1, "codebook_size": 4, "num_query_tokens": 2, "num_item_tokens": 2,
                 "hidden_units": [16], "tokenizer_hidden_units": [16]},
}


@pytest.mark.parametrize("model", ["DSSM", "SparCode"])
def test_one_epoch_on_deezer_samples(tmp_path, monkeypatch, model):
    if model not in MODELS:
        pytest.skip(f"{model} is not registered yet (model_zoo/models is being written)")
    raw_dir = shared_path("deezer_sample")
    monkeypatch.chdir(tmp_path)
    expid = f"{model}_deezer_sample"
    entry = dict(_deezer_entry(), raw_dir=raw_dir, files=SAMPLE_FILES["v1"], data_root=str(tmp_path / "data"))
    config = write_config(str(tmp_path), raw_dir, {expid: dict(DEEZER_MODELS[model], model=model, dataset_id="tiny",
                                                               batch_size=4, num_negatives=3,
                                                               metrics=["Recall(k=3)", "Precision(k=3)"],
                                                               monitor="Recall(k=3)")}, entry)
    assert run_expid.main(["--config", config, "--expid", expid]) == 0
    result = yaml.safe_load(open(tmp_path / "checkpoints" / "tiny" / f"{expid}.json"))
    assert 0.0 <= result["test"]["Precision(k=3)"] <= 1.0 and result["eval_users"] == {"valid": 5, "test": 5}


# ------------------------------------------------------------------------- BARS and pair arrays
def _bars_data(seed=0, n_users=16, n_items=25):
    rng = np.random.RandomState(seed)
    train, test = {}, {}
    for user in range(n_users):
        items = rng.choice(n_items, size=rng.randint(4, 10), replace=False)
        cut = max(1, int(0.7 * len(items)))
        train[user], test[user] = [int(i) for i in items[:cut]], [int(i) for i in items[cut:]]
    return train, test


def _write_bars(folder, train, test):
    os.makedirs(folder, exist_ok=True)
    for name, lists in (("train.txt", train), ("test.txt", test)):
        with open(os.path.join(folder, name), "w") as fd:
            fd.writelines(f"{u} {' '.join(map(str, items))}\n" for u, items in lists.items())


def _csr_rows(path):
    with h5py.File(path) as fd:
        users = fd["raw_user_id"][()].astype(str)
        gt_ptr, gt, mask_ptr, mask = (fd[k][()] for k in ("gt_indptr", "gt_items", "mask_indptr", "mask_items"))
        hist = fd["hist_item_id"][()]
    return {u: (set(gt[gt_ptr[r]:gt_ptr[r + 1]]), set(mask[mask_ptr[r]:mask_ptr[r + 1]]), hist[r])
            for r, u in enumerate(users)}


BARS_FEATURES = [{"name": "user_id", "type": "categorical", "source": "user"}]


def test_bars_text_format_builds_given_splits(tmp_path):
    train, test = _bars_data()
    _write_bars(str(tmp_path / "raw"), train, test)
    params = _params(tmp_path, tmp_path / "raw", {"source": "bars", "feature_cols": BARS_FEATURES, "max_len": 4})
    data_dir = build_dataset(params)
    with h5py.File(os.path.join(data_dir, "item_corpus.h5")) as fd:
        index_of = {raw: i for i, raw in enumerate(fd["raw_item_id"][()].astype(str))}
    code = {u: [index_of[str(i)] + 1 for i in items] for u, items in train.items()}
    with h5py.File(os.path.join(data_dir, "train.h5")) as fd:
        users, targets, hists = fd["raw_user_id"][()].astype(str), fd["item_index"][()], fd["hist_item_id"][()]
    assert len(targets) == sum(len(v) for v in train.values())
    for user, target, hist in zip(users, targets, hists):
        others = [c for c in hist if c]
        assert target + 1 not in others, "a training row's history never holds its target"
        assert set(others) <= set(code[int(user)]) and len(others) == min(4, len(train[int(user)]) - 1)
    valid, test_rows = _csr_rows(os.path.join(data_dir, "valid.h5")), _csr_rows(os.path.join(data_dir, "test.h5"))
    assert valid.keys() == test_rows.keys(), "BARS: validation = test"
    for user, (gt, mask, hist) in test_rows.items():
        assert {i + 1 for i in gt} == {index_of[str(i)] + 1 for i in test[int(user)]}
        assert {i + 1 for i in mask} == set(code[int(user)])
        assert list(hist[hist > 0]) == code[int(user)][-4:], "eval history = last training items"
    feature_map = load_feature_map(data_dir, "tiny")
    assert feature_map.features["user_id"]["vocab_size"] == len(train) + 2


def test_bars_valid_fraction_holds_out_training_items(tmp_path):
    train, test = _bars_data(seed=1)
    _write_bars(str(tmp_path / "raw"), train, test)
    params = _params(tmp_path, tmp_path / "raw", {"source": "bars", "feature_cols": BARS_FEATURES,
                                                  "valid_fraction": 0.5, "history_ratio": 0.5})
    data_dir = build_dataset(params)
    valid, test_rows = _csr_rows(os.path.join(data_dir, "valid.h5")), _csr_rows(os.path.join(data_dir, "test.h5"))
    assert len(valid) == len(train) // 2
    with h5py.File(os.path.join(data_dir, "train.h5")) as fd:
        train_pairs = set(zip(fd["raw_user_id"][()].astype(str), fd["item_index"][()]))
    for user, (gt, mask, _) in valid.items():
        assert not {(user, i) for i in gt} & train_pairs, "held-out items are not trained on"
        assert {(user, i) for i in mask} <= train_pairs
        assert gt <= test_rows[user][1], "the test mask covers all of the user's training items"
        assert len(gt) == len(train[int(user)]) - max(1, int(np.floor(0.5 * len(train[int(user)]))))


def test_bars_bad_line_is_named(tmp_path):
    _write_bars(str(tmp_path / "raw"), {0: [1, 2]}, {0: [3]})
    with open(tmp_path / "raw" / "test.txt", "a") as fd:
        fd.write("7 x9\n")
    params = _params(tmp_path, tmp_path / "raw", {"source": "bars", "feature_cols": BARS_FEATURES})
    with pytest.raises(DataError, match="test.txt: line 2"):
        load_raw(params)


def test_cyclic_histories_exclude_the_row_and_wrap():
    codes = np.array([11, 12, 13, 14, 21, 22])
    starts, sizes = np.array([0, 0, 0, 0, 4, 4]), np.array([4, 4, 4, 4, 2, 2])
    hist = cyclic_histories(codes, starts, sizes, np.array([0, 1, 2, 3, 0, 1]), 2)
    assert hist.tolist() == [[13, 14], [14, 11], [11, 12], [12, 13], [0, 22], [0, 21]]


def test_pair_arrays_npy_and_csv(tmp_path):
    rng = np.random.RandomState(3)
    pairs = {s: np.unique(np.stack([rng.randint(0, 12, n), rng.randint(0, 30, n)], 1), axis=0)
             for s, n in (("train", 150), ("valid", 40), ("test", 40))}
    pairs["valid"] = np.array([p for p in pairs["valid"] if not (pairs["train"] == p).all(1).any()])
    taken = np.concatenate([pairs["train"], pairs["valid"]])
    pairs["test"] = np.array([p for p in pairs["test"] if not (taken == p).all(1).any()])
    (tmp_path / "npy").mkdir()
    for split, array in pairs.items():
        np.save(tmp_path / "npy" / f"{split}_list.npy", array)
    params = _params(tmp_path, tmp_path / "npy", {"source": "pairs", "feature_cols": BARS_FEATURES, "max_len": 3})
    data_dir = build_dataset(params)
    with h5py.File(os.path.join(data_dir, "item_corpus.h5")) as fd:
        raw_item = fd["raw_item_id"][()].astype(int)
    valid, test = _csr_rows(os.path.join(data_dir, "valid.h5")), _csr_rows(os.path.join(data_dir, "test.h5"))
    for user, (gt, mask, _) in test.items():
        u = int(user)
        assert {raw_item[i] for i in gt} == set(pairs["test"][pairs["test"][:, 0] == u, 1])
        known = np.concatenate([pairs["train"], pairs["valid"]])
        assert {raw_item[i] for i in mask} == set(known[known[:, 0] == u, 1]), "test mask = train + valid"
    for user, (gt, mask, _) in valid.items():
        assert {raw_item[i] for i in mask} == set(pairs["train"][pairs["train"][:, 0] == int(user), 1])
    # train_history: user_sample stores each user's training pairs as its timeline
    data_dir = build_dataset(dict(params, train_history="user_sample", data_root=str(tmp_path / "sampled")))
    with h5py.File(os.path.join(data_dir, "train.h5")) as fd:
        train = {k: fd[k][()] for k in ("timeline_row", "timeline_indptr", "timeline_items", "item_index",
                                         "raw_user_id")}
    for row in range(len(train["item_index"])):
        k = train["timeline_row"][row]
        timeline = train["timeline_items"][train["timeline_indptr"][k]:train["timeline_indptr"][k + 1]] - 1
        user = int(train["raw_user_id"][row])
        assert {raw_item[i] for i in timeline} == set(pairs["train"][pairs["train"][:, 0] == user, 1])
        assert train["item_index"][row] in timeline
    # the same pairs as CSV files, with and without header
    (tmp_path / "csv").mkdir()
    for split, array in pairs.items():
        frame = pd.DataFrame(array, columns=["user_id", "item_id"])
        frame.to_csv(tmp_path / "csv" / f"{split}.csv", index=False, header=(split != "test"))
    raw_csv = load_raw(dict(params, raw_dir=str(tmp_path / "csv")))
    raw_npy = load_raw(params)
    for split in ("train", "valid", "test"):
        assert raw_csv.given[split].pairs.equals(raw_npy.given[split].pairs)
    np.save(tmp_path / "npy" / "test_list.npy", np.arange(6.0).reshape(3, 2))
    with pytest.raises(DataError, match="test_list.npy.*integer"):
        load_raw(params)


def test_shared_ml1m_pair_arrays(tmp_path):
    raw_dir = shared_path("ml-1m")
    with open(os.path.join(ROOT, "config", "dataset_config.yaml")) as fd:
        entry = yaml.safe_load(fd)["ml1m_pairs"]
    params = _params(tmp_path, raw_dir, dict(entry, raw_dir=raw_dir, data_root=str(tmp_path / "data")))
    data_dir = build_dataset(params)
    arrays = {s: np.load(os.path.join(raw_dir, f"{s}_list.npy")) for s in ("train", "valid", "test")}
    with h5py.File(os.path.join(data_dir, "train.h5")) as fd:
        assert len(fd["item_index"]) == len(arrays["train"]) == 403_277
    with h5py.File(os.path.join(data_dir, "test.h5")) as fd:
        assert len(fd["gt_items"]) == len(arrays["test"])
        assert len(fd["mask_items"]) == len(arrays["train"]) + len(arrays["valid"])
    with h5py.File(os.path.join(data_dir, "item_corpus.h5")) as fd:
        assert len(fd["item_id"]) == 2810


@pytest.mark.parametrize("model", ["DSSM", "SparCode"])
def test_bars_dataset_end_to_end(tmp_path, monkeypatch, model):
    if model not in MODELS:
        pytest.skip(f"{model} is not registered yet (model_zoo/models is being written)")
    train, test = _bars_data(seed=2, n_users=60, n_items=40)
    _write_bars(str(tmp_path / "raw"), train, test)
    monkeypatch.chdir(tmp_path)
    expid = f"{model}_bars_tiny"
    hyper = {"user_hidden_units": [16], "item_hidden_units": [16]} if model == "DSSM" else \
        {"num_codebooks": 1, "codebook_size": 8, "hidden_units": [16], "tokenizer_hidden_units": [16]}
    config = write_config(str(tmp_path), str(tmp_path / "raw"),
                          {expid: dict(hyper, model=model, dataset_id="tiny", batch_size=32, num_negatives=10)},
                          {"source": "bars", "feature_cols": BARS_FEATURES, "max_len": 5})
    assert run_expid.main(["--config", config, "--expid", expid]) == 0
    result = yaml.safe_load(open(tmp_path / "checkpoints" / "tiny" / f"{expid}.json"))
    assert result["eval_users"]["test"] == sum(1 for v in test.values() if v)
    assert 0.0 <= result["test"]["Recall(k=20)"] <= 1.0
