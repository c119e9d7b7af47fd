"""Raw data sources: each returns the same three tables.

A source is a function `(params) -> RawData` registered in `SOURCES` by name; the dataset
config selects it with `source:`. Tables use the dataset's configured column names
(`user_id_col`, `item_id_col`, `time_col`).
"""
import os
from dataclasses import dataclass
from typing import Optional

import pandas as pd

from ..errors import ConfigError, DataError


@dataclass
class RawData:
    """Raw tables of one dataset.

    interactions: one row per (user, item, time) event.
    users: one row per user with user-side feature columns (None if there are none).
    items: one row per item with item-side feature columns; defines the item corpus order.
    files: the raw files read (hashed by the pipeline to decide on rebuilds).
    """
    interactions: pd.DataFrame
    users: Optional[pd.DataFrame]
    items: pd.DataFrame
    files: tuple


def read_csv_checked(path, required, sep=","):
    """Read a CSV file; errors name the file and the missing column."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, sep=sep)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be parsed as CSV ({exc})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame


def _side_columns(params, source):
    return [c["name"] for c in params.get("feature_cols") or () if c.get("source") == source]


def csv_source(params):
    """`interactions.csv`, `users.csv` (optional if no user feature) and `items.csv` in raw_dir."""
    raw_dir = params["raw_dir"]
    uid, iid, tcol = params["user_id_col"], params["item_id_col"], params["time_col"]
    inter_path = os.path.join(raw_dir, "interactions.csv")
    interactions = read_csv_checked(inter_path, [uid, iid, tcol])
    user_cols = _side_columns(params, "user")
    users_path = os.path.join(raw_dir, "users.csv")
    users = read_csv_checked(users_path, [uid] + user_cols) if user_cols or os.path.exists(users_path) else None
    items_path = os.path.join(raw_dir, "items.csv")
    items = read_csv_checked(items_path, [iid] + _side_columns(params, "item"))
    files = tuple(p for p in (inter_path, users_path, items_path) if os.path.exists(p))
    return RawData(interactions=interactions, users=users, items=items, files=files)


def demo_source(params):
    """The bundled synthetic dataset, generated into raw_dir on first use."""
    from .demo import ensure_demo
    ensure_demo(params["raw_dir"])
    return csv_source(params)


SOURCES = {"csv": csv_source, "demo": demo_source}


def load_raw(params):
    name = params.get("source", "csv")
    if name not in SOURCES:
        raise ConfigError(f"{params.get('_dataset_config_file', 'dataset_config')}: dataset_id="
                          f"{params['dataset_id']} has source={name}; known sources: {sorted(SOURCES)}")
    return SOURCES[name](params)
