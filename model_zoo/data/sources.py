"""Raw data sources: the dataset config's `source:` picks one of `SOURCES`.

A source is a function `(params) -> RawData` (see raw.py). Available sources:

| source      | files in raw_dir                                                        | splits |
|-------------|-------------------------------------------------------------------------|--------|
| `csv`       | `interactions.csv`, `items.csv`, optional `users.csv`                   | sequential |
| `demo`      | the bundled synthetic data, generated on first use                      | sequential |
| `movielens` | GroupLens ML-1M/10M `.dat`, ML-100K `u.*`, or RecBole atomic files      | sequential |
| `recbole`   | RecBole atomic files `.inter` / `.user` / `.item`                       | sequential |
| `deezer`    | Deezer cold-start release (user_features_*.parquet, song_embeddings)    | given (users) |
| `bars`      | BARS matching format `train.txt` / `test.txt` ("user item item ...")    | given |
| `pairs`     | (user, item) arrays `train_list.npy` / `valid_list.npy` / `test_list.npy` or CSV | given |

Sequential: users are split by `split_ratios` and each held-out user's first `history_ratio`
interactions are history, the rest ground truth. Given: the release's own splits are kept.
"""
import os

from ..errors import ConfigError
from .deezer import deezer_source
from .given_splits import bars_source, pairs_source
from .movielens import movielens_source, recbole_source
from .raw import (GivenSplit, RawData, expand_feature_cols, prepare_side, raw_path, read_csv_checked,
                  require_files, side_columns, side_specs)

__all__ = ["SOURCES", "RawData", "GivenSplit", "load_raw", "read_csv_checked"]


def csv_source(params):
    """`interactions.csv`, `users.csv` (optional if no user feature) and `items.csv` in raw_dir."""
    uid, iid, tcol = params["user_id_col"], params["item_id_col"], params["time_col"]
    inter_path = raw_path(params, "interactions", "interactions.csv")
    items_path = raw_path(params, "items", "items.csv")
    users_path = raw_path(params, "users", "users.csv")
    user_cols = side_columns(params, "user")
    if params.get("release"):
        require_files(params, [inter_path, items_path] + ([users_path] if user_cols else []))
    interactions = read_csv_checked(inter_path, [uid, iid, tcol])
    users = read_csv_checked(users_path, [uid] + user_cols) if user_cols or os.path.exists(users_path) else None
    items = read_csv_checked(items_path, [iid] + side_columns(params, "item"))
    files = tuple(p for p in (inter_path, users_path, items_path) if os.path.exists(p))
    return RawData(interactions=interactions, users=users, items=items, files=files)


def demo_source(params):
    """The bundled synthetic dataset, generated into raw_dir on first use (demo_num_users x demo_num_items)."""
    from .demo import ensure_demo
    ensure_demo(params["raw_dir"], num_users=params["demo_num_users"], num_items=params["demo_num_items"])
    return csv_source(params)


SOURCES = {"csv": csv_source, "demo": demo_source, "movielens": movielens_source, "recbole": recbole_source,
           "deezer": deezer_source, "bars": bars_source, "pairs": pairs_source}


def load_raw(params):
    """Read the raw tables of `params['dataset_id']` with its source, checked and prepared.

    Side tables come back with `embedding` features as vector columns and numeric missing
    values filled (see raw.prepare_side); `RawData.notes['pretrain_dims']` holds the width of
    every embedding feature.
    """
    name = params.get("source", "csv")
    if name not in SOURCES:
        raise ConfigError(f"{params.get('_dataset_config_file', 'dataset_config')}: dataset_id="
                          f"{params['dataset_id']} has source={name}; known sources: {sorted(SOURCES)}")
    raw = SOURCES[name](params)
    widths = {}
    for side, table in (("user", "users"), ("item", "items")):
        frame = getattr(raw, table)
        specs = side_specs(params, side)
        if frame is None or not specs:
            continue
        path = raw.notes.get(f"{table}_path") or next(
            (f for f in raw.files if table.rstrip("s") in os.path.basename(f)), raw.files[0])
        frame, side_widths = prepare_side(frame, specs, path)
        setattr(raw, table, frame)
        widths.update(side_widths)
    raw.notes["pretrain_dims"] = widths
    return raw


def feature_specs(params, pretrain_dims=None):
    """The dataset's feature specs, list names expanded, embedding widths filled in."""
    specs = expand_feature_cols(params.get("feature_cols"))
    for spec in specs:
        if spec.get("type") == "embedding" and not spec.get("pretrain_dim") and pretrain_dims:
            if spec["name"] in pretrain_dims:
                spec["pretrain_dim"] = pretrain_dims[spec["name"]]
    return specs
