"""Raw tables -> FuxiCTR features -> H5 files (DESIGN.md section 4).

`build_dataset(params)` is idempotent: it rebuilds only when a raw file (size and sha256)
or a build parameter changed since `build_info.json` was written. `build_info.json` is
written last, so an interrupted build is redone on the next call.
"""
import hashlib
import json
import logging
import os
import time

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from .feature_processor import HISTORY_FEATURE, MatchFeatureProcessor
from .h5 import write_h5
from .sources import load_raw

BUILD_KEYS = ("source", "feature_cols", "user_id_col", "item_id_col", "time_col", "split_ratios",
              "history_ratio", "max_len", "min_history", "split_seed", "min_user_interactions")
BUILD_VERSION = 1
SPLITS = ("train", "valid", "test")


def data_dir_of(params):
    return os.path.join(params["data_root"], params["dataset_id"])


def _file_digest(path):
    sha = hashlib.sha256()
    with open(path, "rb") as fd:
        for chunk in iter(lambda: fd.read(1 << 20), b""):
            sha.update(chunk)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": sha.hexdigest()}


def _build_params(params):
    return json.loads(json.dumps({k: params.get(k) for k in BUILD_KEYS}, default=list))


def _is_up_to_date(data_dir, raw_files, build_params):
    info_path = os.path.join(data_dir, "build_info.json")
    needed = [f"{s}.h5" for s in SPLITS] + ["item_corpus.h5", "feature_map.json", "feature_processor.pkl"]
    if not os.path.exists(info_path) or not all(os.path.exists(os.path.join(data_dir, n)) for n in needed):
        return False
    try:
        with open(info_path) as fd:
            info = json.load(fd)
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("version") != BUILD_VERSION or info.get("params") != build_params:
        return False
    old = {f["path"]: (f["bytes"], f["sha256"]) for f in info.get("files", [])}
    return all(old.get(f["path"]) == (f["bytes"], f["sha256"]) for f in raw_files)


def split_users(user_ids, ratios, seed):
    """Shuffle users with `seed` and cut them by `ratios` (train, valid, test)."""
    if len(ratios) != 3 or abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
        raise ConfigError(f"split_ratios={list(ratios)}: expected three non-negative numbers summing to 1")
    order = np.random.RandomState(seed).permutation(len(user_ids))
    n_train = int(round(ratios[0] * len(user_ids)))
    n_valid = int(round(ratios[1] * len(user_ids)))
    parts = (order[:n_train], order[n_train:n_train + n_valid], order[n_train + n_valid:])
    return [np.sort(user_ids[p]) for p in parts]


def left_padded_windows(codes, positions, max_len):
    """History windows: for each position t, the `max_len` codes before t, left-padded with 0."""
    padded = np.concatenate([np.zeros(max_len, dtype=np.int64), codes])
    windows = np.lib.stride_tricks.sliding_window_view(padded, max_len)
    return windows[positions]                                 # [len(positions), max_len]


def _csr(lists):
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    items = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
    return indptr, items


def make_examples(sequences, max_len, min_history, history_ratio, is_train):
    """Training rows from every position, or one held-out row per user.

    Args:
        sequences: list of (user_row, item_index array in time order).
    Returns:
        dict with `user_row`, `hist` and either `item_index` (train) or the gt/mask CSR.
    """
    if is_train:
        rows, hists, targets = [], [], []
        for user_row, seq in sequences:
            positions = np.arange(min_history, len(seq))
            if len(positions) == 0:
                continue
            hists.append(left_padded_windows(seq + 1, positions, max_len))
            targets.append(seq[positions])
            rows.append(np.full(len(positions), user_row))
        if not rows:
            raise DataError("no training example: every training user has at most min_history items")
        return {"user_row": np.concatenate(rows), HISTORY_FEATURE: np.concatenate(hists),
                "item_index": np.concatenate(targets)}
    rows, hists, gts, masks = [], [], [], []
    for user_row, seq in sequences:
        n_hist = min(max(1, int(np.floor(history_ratio * len(seq)))), len(seq) - 1)
        history = seq[:n_hist]
        seen = np.unique(history)
        truth = np.setdiff1d(np.unique(seq[n_hist:]), seen)
        if len(truth) == 0:
            continue
        rows.append(user_row)
        hists.append(left_padded_windows(history + 1, [n_hist], max_len)[0])
        gts.append(truth)
        masks.append(seen)
    gt_indptr, gt_items = _csr(gts)
    mask_indptr, mask_items = _csr(masks)
    return {"user_row": np.asarray(rows, dtype=np.int64), HISTORY_FEATURE: np.stack(hists),
            "gt_indptr": gt_indptr, "gt_items": gt_items,
            "mask_indptr": mask_indptr, "mask_items": mask_items}


def build_dataset(params, force=False):
    """Build (or reuse) the H5 files of `params['dataset_id']`. Returns the data folder."""
    data_dir = data_dir_of(params)
    raw = load_raw(params)
    raw_files = [_file_digest(p) for p in raw.files]
    build_params = _build_params(params)
    if not force and _is_up_to_date(data_dir, raw_files, build_params):
        logging.info(f"Reusing built dataset in {data_dir}")
        return data_dir
    started = time.time()
    os.makedirs(data_dir, exist_ok=True)
    info_path = os.path.join(data_dir, "build_info.json")
    if os.path.exists(info_path):
        os.remove(info_path)        # invalidate first: an interrupted rebuild is redone
    uid, iid, tcol = params["user_id_col"], params["item_id_col"], params["time_col"]
    items = raw.items.drop_duplicates(iid).reset_index(drop=True)
    item_row = pd.Series(np.arange(len(items)), index=items[iid].astype(str).values)
    inter = raw.interactions
    item_index = item_row.reindex(inter[iid].astype(str).values).to_numpy()
    unknown = np.isnan(item_index)
    if unknown.any():
        bad = inter[iid].astype(str).values[unknown][:5].tolist()
        raise DataError(f"{raw.files[0]}: {int(unknown.sum())} interaction(s) name items missing from the "
                        f"item table (column {iid}), e.g. {bad}")
    inter = pd.DataFrame({"user": inter[uid].astype(str).values, "item": item_index.astype(np.int64),
                          "time": inter[tcol].values})
    if inter["time"].isna().any():
        raise DataError(f"{raw.files[0]}: column {tcol} contains missing values")
    inter = inter.sort_values(["user", "time"], kind="stable")
    counts = inter.groupby("user", sort=True).size()
    user_ids = counts.index[counts >= params["min_user_interactions"]].to_numpy()
    if len(user_ids) == 0:
        raise DataError(f"{raw.files[0]}: no user has {params['min_user_interactions']} interactions")
    if raw.users is not None:
        users = raw.users.assign(**{uid: raw.users[uid].astype(str)}).drop_duplicates(uid).set_index(uid)
        missing = np.setdiff1d(user_ids, users.index.to_numpy())
        if len(missing):
            raise DataError(f"users table of {params['dataset_id']}: {len(missing)} user(s) with "
                            f"interactions have no row (column {uid}), e.g. {missing[:5].tolist()}")
        users = users.loc[user_ids].reset_index()
    else:
        users = pd.DataFrame({uid: user_ids})
    user_pos = pd.Series(np.arange(len(user_ids)), index=user_ids)
    grouped = {u: g.to_numpy() for u, g in inter.groupby("user", sort=True)["item"]}
    splits = dict(zip(SPLITS, split_users(user_ids, params["split_ratios"], params["split_seed"])))

    processor = MatchFeatureProcessor(params.get("feature_cols") or (), params["dataset_id"],
                                      params["data_root"], params["max_len"],
                                      params.get("_dataset_config_file", "dataset_config.yaml"))
    train_users = users.iloc[user_pos[splits["train"]].to_numpy()]
    processor.fit_sides(train_users, items, len(items))
    user_features = processor.transform_side(users, "user")
    item_features = processor.transform_side(items, "item")
    item_features["item_id"] = np.arange(1, len(items) + 1, dtype=np.int64)
    item_features["raw_item_id"] = items[iid].astype(str).to_numpy()
    write_h5(os.path.join(data_dir, "item_corpus.h5"), item_features)
    sizes = {"items": len(items), "users": len(user_ids)}
    for split, ids in splits.items():
        if len(ids) == 0:
            raise DataError(f"dataset {params['dataset_id']}: split {split} is empty "
                            f"(split_ratios={list(params['split_ratios'])}, {len(user_ids)} users)")
        seqs = [(user_pos[u], grouped[u]) for u in ids]
        rows = make_examples(seqs, params["max_len"], params["min_history"], params["history_ratio"],
                             is_train=(split == "train"))
        columns = {name: values[rows["user_row"]] for name, values in user_features.items()}
        columns.update(rows)
        columns["raw_user_id"] = user_ids[rows["user_row"]]
        write_h5(os.path.join(data_dir, f"{split}.h5"), columns)
        sizes[split] = int(len(rows["user_row"]))
    info = {"version": BUILD_VERSION, "dataset_id": params["dataset_id"], "params": build_params,
            "files": raw_files, "sizes": sizes, "build_seconds": round(time.time() - started, 2)}
    tmp = info_path + ".tmp"
    with open(tmp, "w") as fd:
        json.dump(info, fd, indent=2)
    os.replace(tmp, info_path)
    logging.info(f"Built dataset {params['dataset_id']} in {info['build_seconds']} s: {sizes}")
    return data_dir
