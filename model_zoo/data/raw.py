"""What every raw-data source returns, and the checks all of them share.

A source turns the files of one dataset release into pandas tables (`RawData`). Two shapes:

- sequential: `interactions` (user, item, time events); the pipeline splits users 8:1:1 and
  cuts each held-out user's timeline into history and ground truth;
- given splits: `given` maps `train` / `valid` / `test` to (user, item) pair tables decided by
  the release itself (Deezer's user files, BARS `train.txt` / `test.txt`, `.npy` pair arrays).

Column names are the dataset's configured `user_id_col`, `item_id_col`, `time_col`.
"""
import ast
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError


@dataclass
class GivenSplit:
    """(user, item) pairs of one split as given by the release, in file order.

    pairs: DataFrame with the user and item id columns (ids as strings).
    path: the file the pairs came from (named in errors).
    """
    pairs: pd.DataFrame
    path: str


@dataclass
class RawData:
    """Raw tables of one dataset.

    interactions: one row per (user, item, time) event (None for given splits).
    users: one row per user with user-side feature columns (None if there are none).
    items: one row per item with item-side feature columns; defines the item corpus order.
    files: the raw files read (hashed by the pipeline to decide on rebuilds).
    given: for releases with their own splits, `{"train", "valid", "test"} -> GivenSplit`
        (`valid` may be None: see the dataset key `valid_fraction`).
    given_history: for given splits, whether a user's history sequence is built from their
        training items (False for cold-start users, e.g. Deezer: the history is all padding).
    """
    interactions: Optional[pd.DataFrame]
    users: Optional[pd.DataFrame]
    items: pd.DataFrame
    files: tuple
    given: Optional[dict] = None
    given_history: bool = True
    notes: dict = field(default_factory=dict)


def raw_path(params, role, default_name):
    """Path of the raw file playing `role`: `files[role]` if configured, else `default_name`.

    Relative names are taken inside `raw_dir`; absolute paths are used as they are.
    """
    files = params.get("files") or {}
    if not isinstance(files, dict):
        raise ConfigError(f"{params.get('_dataset_config_file', 'dataset_config.yaml')}: dataset_id="
                          f"{params['dataset_id']} has files={files!r}; expected a mapping role -> file name")
    name = files.get(role, default_name)
    return name if os.path.isabs(name) else os.path.join(params["raw_dir"], name)


def download_hint(params):
    """The sentence telling how to get the raw files of this dataset."""
    release = params.get("release")
    if not release:
        return ("Put the files there by hand (data/README.md says where each dataset comes from), or set "
                "raw_dir / files in the dataset config.")
    from .download import RELEASES, default_raw_dir
    command = f"python -m model_zoo.data.download {release}"
    if release in RELEASES:
        wanted = os.path.abspath(params["raw_dir"])
        if wanted != os.path.abspath(default_raw_dir(release, params.get("data_root", "./data/"))):
            command += f" --raw-dir {params['raw_dir']}"
    return (f"Download them with `{command}` (needs internet access), or put the files there by hand "
            f"(data/README.md says where to get them).")


def require_files(params, paths):
    """Raise DataError naming every missing raw file and the download command."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        names = ", ".join(os.path.basename(p) for p in missing)
        where = os.path.dirname(missing[0]) or "."
        raise DataError(f"dataset_id={params['dataset_id']}: raw file(s) missing from {where}: {names}. "
                        + download_hint(params))


def read_csv_checked(path, required, sep=",", **kwargs):
    """Read a CSV file; errors name the file and the missing column."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, sep=sep, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot be parsed as CSV ({exc})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame


def read_parquet_checked(path, required=(), columns=None):
    """Read a parquet file; errors name the file and the missing column."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_parquet(path, columns=columns)
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: cannot be read as parquet ({type(exc).__name__}: {exc})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)[:20]}...")
    return frame


def expand_feature_cols(feature_cols):
    """FuxiCTR feature specs with list-valued `name` expanded to one spec per name."""
    expanded = []
    for col in feature_cols or ():
        names = col.get("name")
        if isinstance(names, (list, tuple)):
            expanded += [dict(col, name=name) for name in names]
        else:
            expanded.append(dict(col))
    return expanded


def side_specs(params, source):
    return [c for c in expand_feature_cols(params.get("feature_cols")) if c.get("source") == source
            and c.get("active", True)]


def side_columns(params, source):
    return [c["name"] for c in side_specs(params, source)]


def apply_rating_threshold(frame, params, default, path):
    """Keep interactions rated at least `rating_threshold` (None = `default`; 0 keeps all)."""
    threshold = params.get("rating_threshold")
    threshold = default if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ConfigError(f"{params.get('_dataset_config_file', 'dataset_config.yaml')}: rating_threshold="
                          f"{threshold!r}; expected a number >= 0 (0 keeps every interaction)")
    if not threshold:
        return frame
    rating_col = params.get("rating_col", "rating")
    if rating_col not in frame.columns:
        raise DataError(f"{path}: rating_threshold={threshold} needs the rating column {rating_col}; "
                        f"found {list(frame.columns)}")
    kept = frame[pd.to_numeric(frame[rating_col], errors="coerce") >= threshold]
    if kept.empty:
        raise DataError(f"{path}: no interaction has {rating_col} >= {threshold}")
    return kept


_FLOAT_LIST = re.compile(r"^\s*\[.*\]\s*$", re.S)


def _as_vector(value, path, name):
    if isinstance(value, str):
        if not _FLOAT_LIST.match(value):
            raise DataError(f"{path}: column {name} holds {value[:40]!r}; expected a vector like '[0.1, 0.2]'")
        try:
            value = ast.literal_eval(value)         # a literal list of numbers, never code
        except (ValueError, SyntaxError):
            raise DataError(f"{path}: column {name} holds an unreadable vector {value[:40]!r}") from None
    try:
        return np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: column {name} holds {type(value).__name__} values; expected vectors") from None


def prepare_side(frame, specs, path):
    """Bring one side's table into the shape the feature processor expects.

    - `embedding` features become one column of float32 vectors. Accepted inputs: a column of
      arrays / lists, a column of strings "[0.1, ...]" (the Deezer sample files), or the
      columns `<name>0`, `<name>1`, ... (one per dimension, as in Deezer's user files).
      Every vector must have the same width, given by the spec's `pretrain_dim` when set.
    - `numeric` features: missing values are filled with the spec's `fill_na` (default 0.0,
      as FuxiCTR does).

    Returns the new frame and `{embedding name: width}`.
    """
    widths, new_columns, parts_of = {}, {}, {}
    by_base = {}
    for column in frame.columns:
        base = str(column).rstrip("0123456789")
        if base != column:
            by_base.setdefault(base, []).append(column)
    for spec in specs:
        name = spec["name"]
        if spec["type"] == "embedding":
            if name in frame.columns:
                vectors = [_as_vector(v, path, name) for v in frame[name].to_numpy()]
            else:
                parts = sorted(by_base.get(name, []), key=lambda c: int(c[len(name):]))
                if not parts:
                    raise DataError(f"{path}: missing column(s) ['{name}'] (or {name}0, {name}1, ...) of "
                                    f"embedding feature {name}")
                matrix = frame[parts].to_numpy(dtype=np.float32)                 # [rows, dims]
                parts_of[name] = parts
                vectors = list(matrix)
            lengths = {len(v) for v in vectors}
            if len(lengths) > 1:
                raise DataError(f"{path}: embedding feature {name} has vectors of different widths "
                                f"{sorted(lengths)}")
            width = lengths.pop() if lengths else 0
            expected = spec.get("pretrain_dim")
            if expected and int(expected) != width:
                raise DataError(f"{path}: embedding feature {name} has width {width}; the dataset config "
                                f"says pretrain_dim={expected}")
            if any(np.isnan(v).any() for v in vectors):
                raise DataError(f"{path}: embedding feature {name} contains NaN")
            new_columns[name] = vectors
            widths[name] = width
        elif spec["type"] == "numeric":
            if name not in frame.columns:
                raise DataError(f"{path}: missing column(s) ['{name}']; found {list(frame.columns)[:20]}")
            values = pd.to_numeric(frame[name], errors="coerce")
            new_columns[name] = values.fillna(float(spec.get("fill_na", 0.0))).astype(np.float64).to_numpy()
        elif name not in frame.columns:
            raise DataError(f"{path}: missing column(s) ['{name}']; found {list(frame.columns)[:20]}")
    dropped = [c for parts in parts_of.values() for c in parts] + [c for c in new_columns if c in frame.columns]
    frame = pd.concat([frame.drop(columns=dropped).reset_index(drop=True),
                       pd.DataFrame(new_columns)], axis=1)
    return frame, widths
