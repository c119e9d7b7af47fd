"""Datasets that come already split: BARS matching text files and (user, item) pair arrays.

- `bars`: `train.txt` and `test.txt` (BARS / LightGCN format), one line per user:
  `user item item ...` separated by spaces, ids only. There is no validation file: by default
  validation = test, as BARS reports it; set `valid_fraction` to hold out part of the training
  interactions instead (see pipeline.py).
- `pairs`: `train_list.npy`, `valid_list.npy` (optional), `test_list.npy`, each an integer array
  of shape (n, 2) holding (user, item) rows; or CSV files (`train.csv`, `valid.csv`,
  `test.csv`) with a header naming `user_id_col` / `item_id_col`, or headerless with the user
  and item in the first two columns.

Ground truth of an evaluated user = their pairs in that split; items masked at ranking = their
pairs in the earlier splits (train, plus given validation pairs for test). Ids are kept as
given (as strings); the item corpus = every item of any split, in ascending id order.
"""
import os

import numpy as np
import pandas as pd

from ..errors import DataError
from .raw import GivenSplit, RawData, raw_path, require_files


def _sorted_ids(values):
    values = pd.unique(values)
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def read_bars_file(path, uid, iid):
    """`user item item ...` lines -> pairs DataFrame in file order."""
    users, items = [], []
    with open(path, "r", encoding="utf-8") as fd:
        for number, line in enumerate(fd, 1):
            parts = line.split()
            if not parts:
                continue
            if not all(p.lstrip("-").isdigit() for p in parts):
                raise DataError(f"{path}: line {number} is not 'user item item ...' with integer ids: "
                                f"{line.strip()[:60]!r}")
            users += [parts[0]] * (len(parts) - 1)
            items += parts[1:]
    if not users:
        raise DataError(f"{path}: no (user, item) pair")
    return pd.DataFrame({uid: users, iid: items})


def _items_table(iid, given):
    ids = _sorted_ids(np.concatenate([g.pairs[iid].to_numpy() for g in given.values() if g is not None]))
    return pd.DataFrame({iid: ids})


def _users_table(uid, given):
    ids = _sorted_ids(np.concatenate([g.pairs[uid].to_numpy() for g in given.values() if g is not None]))
    return pd.DataFrame({uid: ids})


def bars_source(params):
    """BARS `train.txt` / `test.txt` (and `valid.txt` if present or configured)."""
    uid, iid = params["user_id_col"], params["item_id_col"]
    train, test = raw_path(params, "train", "train.txt"), raw_path(params, "test", "test.txt")
    valid = raw_path(params, "valid", "valid.txt")
    require_files(params, [train, test] + ([valid] if (params.get("files") or {}).get("valid") else []))
    given = {"train": GivenSplit(read_bars_file(train, uid, iid), train),
             "valid": GivenSplit(read_bars_file(valid, uid, iid), valid) if os.path.exists(valid) else None,
             "test": GivenSplit(read_bars_file(test, uid, iid), test)}
    files = tuple(g.path for g in given.values() if g is not None)
    return RawData(interactions=None, users=_users_table(uid, given), items=_items_table(iid, given),
                   files=files, given=given, given_history=True)


def read_pairs_file(path, uid, iid):
    """An (n, 2) `.npy` array or a CSV of (user, item) rows -> pairs DataFrame in file order."""
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a numpy array file ({exc})") from None
        if array.ndim != 2 or array.shape[1] < 2 or array.dtype.kind not in "iu":
            raise DataError(f"{path}: array of shape {array.shape} and dtype {array.dtype}; expected integer "
                            f"(user, item) rows of shape (n, 2)")
        frame = pd.DataFrame({uid: array[:, 0].astype(str), iid: array[:, 1].astype(str)})
    else:
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{path}: cannot be parsed as CSV ({exc})") from None
        if not {uid, iid} <= set(frame.columns):
            headerless = pd.read_csv(path, dtype=str, header=None, keep_default_na=False)
            if headerless.shape[1] < 2 or not headerless.iloc[:, :2].apply(
                    lambda c: c.str.lstrip("-").str.isdigit()).all().all():
                raise DataError(f"{path}: expected columns {uid}, {iid} (or two integer columns without "
                                f"header); found {list(frame.columns)}")
            frame = headerless.iloc[:, :2]
            frame.columns = [uid, iid]
        frame = frame[[uid, iid]]
    if frame.empty:
        raise DataError(f"{path}: no (user, item) pair")
    return frame.reset_index(drop=True)


def _pairs_path(params, split):
    npy = raw_path(params, split, f"{split}_list.npy")
    if (params.get("files") or {}).get(split) or os.path.exists(npy):
        return npy
    csv_path = raw_path(params, split, f"{split}.csv")
    return csv_path if os.path.exists(csv_path) else npy


def pairs_source(params):
    """Pre-split (user, item) pairs: train / valid (optional) / test."""
    uid, iid = params["user_id_col"], params["item_id_col"]
    paths = {split: _pairs_path(params, split) for split in ("train", "valid", "test")}
    require_files(params, [paths["train"], paths["test"]])
    given = {split: GivenSplit(read_pairs_file(path, uid, iid), path) if os.path.exists(path) else None
             for split, path in paths.items()}
    files = tuple(g.path for g in given.values() if g is not None)
    return RawData(interactions=None, users=_users_table(uid, given), items=_items_table(iid, given),
                   files=files, given=given, given_history=True)
