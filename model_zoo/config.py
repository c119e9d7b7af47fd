"""Experiment configuration: FuxiCTR-style YAML folders, loaded with checks.

A config folder holds `dataset_config.yaml` (one entry per dataset_id) and
`model_config/*.yaml` (a `Base` entry plus one entry per expid). The merged dict is
what FuxiCTR's `load_config` would return, but every failure names the file and key:
a malformed YAML, an unknown expid (the known ones are listed), a missing dataset_id,
a float written as `1e-3` (PyYAML reads it as a string) in a key that must be a number.
"""
import glob
import os

import yaml

from .errors import ConfigError

# Keys that describe a dataset (dataset_config.yaml), with their defaults.
# The README's configuration reference documents each one.
DATASET_DEFAULTS = {
    "dataset_id": None,
    "data_root": "./data/",
    "source": "csv",            # how raw files are read: demo | csv | movielens | recbole | deezer | bars | pairs
                                # (see model_zoo/data/sources.py)
    "raw_dir": None,            # default: <data_root>/<dataset_id>/raw
    "release": None,            # official release `python -m model_zoo.data.download <release>` fetches
                                # (ml100k, ml1m, ml10m, deezer_ttsvd, deezer_utals, gowalla_m1, ...); None = none
    "files": None,              # {role: file name} overriding the source's default raw file names
    "rating_col": "rating",
    "rating_threshold": None,   # keep interactions rated >= this; None = source default (movielens: 4); 0 = keep all
    "valid_fraction": None,     # given splits without a validation file: None = validate on test (BARS),
                                # else this fraction of train users get their last items held out
    "train_user_table": False,  # True: train.h5 holds user_row + item_index, user features are in users.h5
                                # once per user (needed for Deezer at full scale; the loader gathers them)
    "feature_cols": (),         # side features; the item id and history features are added automatically
    "user_id_col": "user_id",
    "item_id_col": "item_id",
    "time_col": "timestamp",
    "split_ratios": (0.8, 0.1, 0.1),
    "history_ratio": 0.8,
    "max_len": 20,
    "min_history": 1,
    "train_history": "past",    # past: a training row's history = the max_len items before its target;
                                # user_sample: a fresh random max_len of the user's other training items
                                # (time order) every epoch (model_zoo/data/loaders.py, TrainLoader)
    "split_seed": 2023,
    "min_user_interactions": 2,
    "precision_denominator": "k",
}

# Keys MatchModel and run_expid understand (training, evaluation, serving), with defaults.
TRAINING_DEFAULTS = {
    "model": None,
    "model_id": None,
    "seed": 2023,
    "epochs": 10,
    "batch_size": 256,
    "eval_batch_size": 512,
    "learning_rate": 1.e-3,
    "optimizer": "adam",
    "temperature": 1.0,
    "num_negatives": 100,
    "negative_sampler": "uniform",
    "sampler_alpha": 0.75,
    "embedding_dim": 64,
    "embedding_init_std": 1.e-4,
    "history_features": "id",       # "item": a history position = mean of the item's field embeddings
    "embedding_regularizer": 0.0,
    "net_regularizer": 0.0,
    "metrics": ("Recall(k=20)", "Recall(k=50)", "NDCG(k=20)", "NDCG(k=50)",
                "HitRate(k=20)", "HitRate(k=50)", "Precision(k=20)", "Precision(k=50)"),
    "monitor": "Recall(k=20)",
    "monitor_mode": "max",
    "early_stop_patience": 2,
    "max_steps_per_epoch": None,
    "eval_max_users": None,
    "model_root": "./checkpoints/",
    "num_threads": None,
    "verbose": 1,
    "gpu": -1,
    # serving (model_zoo/retrieval/serving.py; validated there)
    "serve": True,                  # after training: SparCode sparse index / two-tower faiss comparators
    "sparsity_bias": None,          # b~ of Eq. 15; None = the trained b (unless target_sparsity is set)
    "target_sparsity": None,        # pick b~ so this share of (key, item) scores is dropped, e.g. 0.99
    "index_top_l": None,            # keep at most L items per key; None = every positive score
    "index_max_keys": 1_000_000,    # all N^M keys if N^M <= this, else the keys seen on training users
    "index_score_dtype": "float32",  # float32 | float16 posting scores
    "unseen_key": "nearest",        # query key not indexed: nearest | skip | score
    "faiss_nlist": None,            # IVFPQ cells; None = round(4 * sqrt(n_items))
    "faiss_m": 8,                   # IVFPQ sub-quantizers
    "faiss_nprobe": 16,             # IVFPQ cells visited per query
    "hnsw_m": 32,                   # HNSW graph degree
    "hnsw_ef_search": 128,          # HNSW search beam width
}

FLOAT_KEYS = ("learning_rate", "temperature", "sampler_alpha", "history_ratio", "rating_threshold",
              "valid_fraction")
INT_KEYS = ("epochs", "batch_size", "eval_batch_size", "num_negatives", "embedding_dim",
            "early_stop_patience", "max_len", "min_history", "seed", "split_seed")


def _read_yaml(path):
    try:
        with open(path, "r", encoding="utf-8") as fd:
            content = yaml.safe_load(fd)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of ids to settings, got {type(content).__name__}")
    return content


def list_expids(config_dir):
    """All expids defined in `config_dir/model_config/*.yaml` (without `Base`)."""
    expids = []
    for path in _model_config_files(config_dir):
        expids += [k for k in _read_yaml(path) if k != "Base"]
    return sorted(expids)


def _model_config_files(config_dir):
    files = sorted(glob.glob(os.path.join(config_dir, "model_config.yaml")))
    files += sorted(glob.glob(os.path.join(config_dir, "model_config", "*.yaml")))
    if not files:
        raise ConfigError(f"{config_dir}: no model_config.yaml or model_config/*.yaml found")
    return files


def load_model_config(config_dir, expid):
    """Merge `Base` with the expid's entry. Raises ConfigError naming the files searched."""
    base, found, where = {}, None, None
    for path in _model_config_files(config_dir):
        content = _read_yaml(path)
        if "Base" in content:
            base = dict(content["Base"] or {})
        if expid in content:
            if found is not None:
                raise ConfigError(f"expid={expid} is defined twice: in {where} and {path}")
            found, where = dict(content[expid] or {}), path
    if found is None:
        known = list_expids(config_dir)
        raise ConfigError(f"expid={expid} is not defined in {config_dir}/model_config; "
                          f"known expids: {', '.join(known)}")
    params = base
    params.update(found)
    if "dataset_id" not in params:
        raise ConfigError(f"{where}: expid={expid} has no dataset_id")
    if "model" not in params:
        raise ConfigError(f"{where}: expid={expid} has no model")
    params["model_id"] = expid
    params["_config_file"] = where
    return params


def load_dataset_config(config_dir, dataset_id):
    files = sorted(glob.glob(os.path.join(config_dir, "dataset_config.yaml")))
    files += sorted(glob.glob(os.path.join(config_dir, "dataset_config", "*.yaml")))
    known = []
    for path in files:
        content = _read_yaml(path)
        if dataset_id in content:
            params = dict(content[dataset_id] or {})
            unknown = sorted(set(params) - set(DATASET_DEFAULTS))
            if unknown:
                raise ConfigError(f"{path}: dataset_id={dataset_id} has unknown key(s) {unknown}; "
                                  f"known keys: {sorted(DATASET_DEFAULTS)}")
            params["dataset_id"] = dataset_id
            params["_dataset_config_file"] = path
            return params
        known += list(content)
    raise ConfigError(f"dataset_id={dataset_id} is not defined in {files or config_dir}; "
                      f"known dataset ids: {', '.join(sorted(known))}")


def check_types(params, source):
    """Reject numbers given as strings (PyYAML reads `1e-3` as a string)."""
    for key in FLOAT_KEYS + INT_KEYS:
        value = params.get(key)
        if value is None:
            continue
        expected = float if key in FLOAT_KEYS else int
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (write floats as 1.e-3: PyYAML reads 1e-3 as a string)" if isinstance(value, str) else ""
            raise ConfigError(f"{source}: key {key}={value!r} must be a {expected.__name__}{hint}")
        if expected is int and not float(value).is_integer():
            raise ConfigError(f"{source}: key {key}={value!r} must be an integer")


def load_config(config_dir, expid):
    """Merged parameters of one experiment: dataset keys, training keys, model keys."""
    if not os.path.isdir(config_dir):
        raise ConfigError(f"config folder {config_dir} does not exist")
    params = load_model_config(config_dir, expid)
    data_params = load_dataset_config(config_dir, params["dataset_id"])
    merged = dict(DATASET_DEFAULTS)
    merged.update(TRAINING_DEFAULTS)
    merged.update(data_params)
    merged.update({k: v for k, v in params.items() if k != "dataset_id"})
    check_types(merged, params["_config_file"])
    if merged.get("raw_dir") is None:
        merged["raw_dir"] = os.path.join(merged["data_root"], merged["dataset_id"], "raw")
    return merged
