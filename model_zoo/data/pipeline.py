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
from .sources import feature_specs, load_raw

BUILD_KEYS = ("source", "feature_cols", "user_id_col", "item_id_col", "time_col", "split_ratios",
              "history_ratio", "max_len", "min_history", "split_seed", "min_user_interactions",
              "rating_col", "rating_threshold", "files", "valid_fraction", "train_user_table",
              "train_history")
BUILD_VERSION = 2
SPLITS = ("train", "valid", "test")
TRAIN_HISTORIES = ("past", "user_sample")


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
    if build_params.get("train_user_table"):
        needed.append("users.h5")
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


def check_train_history(value):
    if value not in TRAIN_HISTORIES:
        raise ConfigError(f"train_history={value!r}: expected one of {list(TRAIN_HISTORIES)}")
    return value


def timeline_columns(timelines, row_timeline):
    """train.h5 columns for `train_history: user_sample`: every training user's items as CSR.

    Args:
        timelines: list over training users of item_index arrays (time or file order).
        row_timeline: [rows] int, the timeline (position in `timelines`) of each training row.
    Returns:
        {"timeline_row": [rows], "timeline_indptr": [users + 1], "timeline_items": item_index + 1}.
    """
    indptr, items = _csr(list(timelines))
    return {"timeline_row": np.asarray(row_timeline, dtype=np.int64), "timeline_indptr": indptr,
            "timeline_items": items + 1}


def make_examples(sequences, max_len, min_history, history_ratio, is_train, train_history="past"):
    """Training rows from every position, or one held-out row per user.

    Args:
        sequences: list of (user_row, item_index array in time order).
        max_len: history window: the last `max_len` items before the target, left-padded with 0.
        min_history: training positions t with fewer than `min_history` earlier items are skipped
            (0 keeps the first item of every sequence as a target with an empty history).
        history_ratio: share of a held-out user's sequence used as history.
        is_train: training rows (one per position) or held-out rows (one per user).
        train_history: `past`: a training row's history is the `max_len` items before it;
            `user_sample`: the same rows plus every training user's timeline (`timeline_columns`),
            from which TrainLoader draws a fresh history of the user's other items every epoch.
    Returns:
        dict with `user_row`, `hist` and either `item_index` (train) or the gt/mask CSR.
    """
    if isinstance(min_history, bool) or not isinstance(min_history, (int, np.integer)) or min_history < 0:
        raise ConfigError(f"min_history={min_history!r}: expected an integer >= 0 (earlier items required "
                          "before a training target)")
    if is_train:
        check_train_history(train_history)
        rows, hists, targets, timelines, row_timeline = [], [], [], [], []
        for user_row, seq in sequences:
            positions = np.arange(min_history, len(seq))
            if len(positions) == 0:
                continue
            hists.append(left_padded_windows(seq + 1, positions, max_len))
            targets.append(seq[positions])
            rows.append(np.full(len(positions), user_row))
            row_timeline.append(np.full(len(positions), len(timelines)))
            timelines.append(seq)
        if not rows:
            raise DataError("no training example: every training user has at most min_history items")
        columns = {"user_row": np.concatenate(rows), HISTORY_FEATURE: np.concatenate(hists),
                   "item_index": np.concatenate(targets)}
        if train_history == "user_sample":
            columns.update(timeline_columns(timelines, np.concatenate(row_timeline)))
        return columns
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


def _index_items(params, frame, item_row, path):
    """Item ids of `frame` -> corpus row indices; unknown ids raise DataError naming `path`."""
    iid = params["item_id_col"]
    index = item_row.reindex(frame[iid].astype(str).values).to_numpy()
    unknown = np.isnan(index)
    if unknown.any():
        bad = frame[iid].astype(str).values[unknown][:5].tolist()
        raise DataError(f"{path}: {int(unknown.sum())} interaction(s) name items missing from the "
                        f"item table (column {iid}), e.g. {bad}")
    return index.astype(np.int64)


def _users_table(params, raw, user_ids):
    """One row per user of `user_ids` (in that order) with the user-side columns."""
    uid = params["user_id_col"]
    if raw.users is None:
        return pd.DataFrame({uid: user_ids})
    users = raw.users.assign(**{uid: raw.users[uid].astype(str)}).drop_duplicates(uid).reset_index(drop=True)
    position = pd.Index(users[uid].to_numpy(dtype=object)).get_indexer(np.asarray(user_ids, dtype=object))
    missing = np.asarray(user_ids)[position < 0]
    if len(missing):
        raise DataError(f"users table of {params['dataset_id']}: {len(missing)} user(s) with "
                        f"interactions have no row (column {uid}), e.g. {missing[:5].tolist()}")
    return users.iloc[position].reset_index(drop=True)


def sequential_examples(params, raw, item_row):
    """Users split by `split_ratios`; held-out users' timelines cut by `history_ratio`.

    Returns (user_ids, users table, train user rows, {split: example columns}).
    """
    uid, iid, tcol = params["user_id_col"], params["item_id_col"], params["time_col"]
    inter = raw.interactions
    item_index = _index_items(params, inter, item_row, raw.files[0])
    inter = pd.DataFrame({"user": inter[uid].astype(str).values, "item": item_index,
                          "time": inter[tcol].values})
    if inter["time"].isna().any():
        raise DataError(f"{raw.files[0]}: column {tcol} contains missing values")
    inter = inter.sort_values(["user", "time"], kind="stable")
    counts = inter.groupby("user", sort=True).size()
    user_ids = counts.index[counts >= params["min_user_interactions"]].to_numpy()
    if len(user_ids) == 0:
        raise DataError(f"{raw.files[0]}: no user has {params['min_user_interactions']} interactions")
    users = _users_table(params, raw, user_ids)
    user_pos = pd.Series(np.arange(len(user_ids)), index=user_ids)
    grouped = {u: g.to_numpy() for u, g in inter.groupby("user", sort=True)["item"]}
    splits = dict(zip(SPLITS, split_users(user_ids, params["split_ratios"], params["split_seed"])))
    examples = {}
    for split, ids in splits.items():
        if len(ids) == 0:
            raise DataError(f"dataset {params['dataset_id']}: split {split} is empty "
                            f"(split_ratios={list(params['split_ratios'])}, {len(user_ids)} users)")
        seqs = [(user_pos[u], grouped[u]) for u in ids]
        examples[split] = make_examples(seqs, params["max_len"], params["min_history"], params["history_ratio"],
                                        is_train=(split == "train"), train_history=params["train_history"])
    return user_ids, users, user_pos[splits["train"]].to_numpy(), examples


def cyclic_histories(codes, group_start, group_size, position, max_len):
    """For each row, the `min(max_len, n - 1)` codes before it in its group, wrapping around.

    Row r belongs to a group (one user's training items in file order) that starts at
    `group_start[r]`, has `group_size[r]` = n rows, and r is at `position[r]` in it. Its
    history never contains the row itself. Left-padded with 0: returns [rows, max_len].
    """
    length = np.minimum(max_len, group_size - 1)                          # [rows]
    offset = np.arange(max_len)[None, :] - (max_len - length)[:, None]     # [rows, max_len]; < 0 = padding
    pos = (position[:, None] - length[:, None] + offset) % np.maximum(group_size, 1)[:, None]
    hist = codes[group_start[:, None] + pos]
    return np.where(offset >= 0, hist, 0)


def _hold_out_valid(train, fraction, history_ratio, seed, path):
    """Move the last (1 - history_ratio) of the training items of a `fraction` of users to validation."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"valid_fraction={fraction!r}; expected a number in (0, 1) or null (validation = test)")
    sizes = train.groupby("user_row").size()
    eligible = sizes.index[sizes >= 2].to_numpy()
    if len(eligible) == 0:
        raise DataError(f"{path}: no user has 2 training items to hold some out for validation")
    rng = np.random.RandomState(seed)
    chosen = np.sort(rng.choice(eligible, max(1, int(round(fraction * len(eligible)))), replace=False))
    rank = train.groupby("user_row").cumcount().to_numpy()
    size = sizes.reindex(train["user_row"].to_numpy()).to_numpy()
    n_keep = np.clip(np.floor(history_ratio * size), 1, size - 1)
    held = np.isin(train["user_row"].to_numpy(), chosen) & (rank >= n_keep)
    return train[~held].reset_index(drop=True), train[held].reset_index(drop=True)


def _group_bounds(sorted_rows):
    """Start and size of each run of equal values in a sorted array."""
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1] if len(sorted_rows) else np.zeros(0, np.int64)
    return starts, np.diff(np.r_[starts, len(sorted_rows)])


def _unique_sorted(values):
    """np.unique for integer arrays, by sorting (faster than the hash path on large inputs)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _in_sorted(values, sorted_unique):
    """Boolean mask: which of `values` occur in the sorted unique array `sorted_unique`."""
    if len(sorted_unique) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return sorted_unique[pos] == values


def _eval_examples(truth, known, max_len, with_history, n_items):
    """One row per user of `truth` with ground truth minus `known` items, mask = `known`.

    The history is the user's last `max_len` known items in file order (none without history).
    """
    truth_keys = _unique_sorted(truth["user_row"].to_numpy() * n_items + truth["item"].to_numpy())
    known_order = np.argsort(known["user_row"].to_numpy(), kind="stable")
    known_rows = known["user_row"].to_numpy()[known_order]
    known_items = known["item"].to_numpy()[known_order]
    known_keys = _unique_sorted(known_rows * n_items + known_items)
    gt_keys = truth_keys[~_in_sorted(truth_keys, known_keys)]
    if len(gt_keys) == 0:
        return None
    users = _unique_sorted(gt_keys // n_items)                                    # sorted user rows
    mask_keys = known_keys[_in_sorted(known_keys // n_items, users)]
    gt_indptr = np.r_[0, np.searchsorted(gt_keys // n_items, users, side="right")].astype(np.int64)
    mask_indptr = np.r_[0, np.searchsorted(mask_keys // n_items, users, side="right")].astype(np.int64)
    hist = np.zeros((len(users), max_len), dtype=np.int64)
    if with_history and len(known_rows):
        starts, sizes = _group_bounds(known_rows)
        group_of = np.searchsorted(known_rows[starts], users)                     # [U]
        has = (group_of < len(starts)) & (known_rows[starts[np.minimum(group_of, len(starts) - 1)]] == users)
        ends = np.where(has, starts[np.minimum(group_of, len(starts) - 1)] + sizes[np.minimum(group_of,
                                                                                              len(starts) - 1)], 0)
        length = np.where(has, np.minimum(max_len, sizes[np.minimum(group_of, len(starts) - 1)]), 0)  # [U]
        offset = np.arange(max_len)[None, :] - (max_len - length)[:, None]        # [U, max_len]; < 0 = padding
        pos = np.clip(ends[:, None] - length[:, None] + offset, 0, max(len(known_items) - 1, 0))
        hist = np.where(offset >= 0, known_items[pos] + 1, 0)
    return {"user_row": users.astype(np.int64), HISTORY_FEATURE: hist,
            "gt_indptr": gt_indptr, "gt_items": (gt_keys % n_items).astype(np.int64),
            "mask_indptr": mask_indptr, "mask_items": (mask_keys % n_items).astype(np.int64)}


def given_examples(params, raw, item_row):
    """The release's own splits (Deezer users, BARS files, pair arrays).

    - train rows: one per training (user, item) pair; history = the user's other training
      items, the `max_len` before it in file order wrapping around (all padding when the
      source has no history, e.g. Deezer's cold users);
    - valid / test rows: one per user of the split; ground truth = their pairs in the split
      minus known items; mask = known items = their training pairs (plus the given
      validation pairs for test); history = the last `max_len` known items.
    - no validation file: validation = test (BARS) when `valid_fraction` is null, else a
      seeded `valid_fraction` of the training users have the last (1 - history_ratio) of
      their training items (file order) held out as validation ground truth.
    Returns (user_ids, users table, train user rows, {split: example columns}).
    """
    uid, max_len = params["user_id_col"], params["max_len"]
    present = {s: g for s, g in raw.given.items() if g is not None}
    for split in ("train", "test"):
        if split not in present:
            raise DataError(f"dataset {params['dataset_id']}: the source gave no {split} split")
    user_ids = np.sort(pd.unique(np.concatenate([g.pairs[uid].astype(str).to_numpy(dtype=object)
                                                 for g in present.values()])))
    user_index = pd.Index(user_ids)
    pairs = {}
    for split, g in present.items():
        frame = pd.DataFrame({"user_row": user_index.get_indexer(g.pairs[uid].astype(str).to_numpy(dtype=object)),
                              "item": _index_items(params, g.pairs, item_row, g.path)})
        if frame.empty:
            raise DataError(f"{g.path}: split {split} has no (user, item) pair")
        pairs[split] = frame
    original_train = pairs["train"]
    if "valid" not in pairs:
        if params.get("valid_fraction") is None:
            pairs["valid"] = pairs["test"]
            known = {"valid": original_train, "test": original_train}
        else:
            pairs["train"], pairs["valid"] = _hold_out_valid(original_train, params["valid_fraction"],
                                                             params["history_ratio"], params["split_seed"],
                                                             present["train"].path)
            known = {"valid": pairs["train"], "test": original_train}
    else:
        known = {"valid": original_train, "test": pd.concat([original_train, pairs["valid"]], ignore_index=True)}

    train = pairs["train"]
    order = np.argsort(train["user_row"].to_numpy(), kind="stable")
    train = train.iloc[order].reset_index(drop=True)
    user_rows = train["user_row"].to_numpy()
    codes = train["item"].to_numpy() + 1
    if raw.given_history:
        starts = np.r_[0, np.flatnonzero(np.diff(user_rows)) + 1]
        sizes = np.diff(np.r_[starts, len(user_rows)])
        group = np.repeat(np.arange(len(starts)), sizes)
        hist = cyclic_histories(codes, starts[group], sizes[group], np.arange(len(user_rows)) - starts[group],
                                max_len)
    else:
        hist = np.zeros((len(user_rows), max_len), dtype=np.int64)
    examples = {"train": {"user_row": user_rows, HISTORY_FEATURE: hist, "item_index": codes - 1}}
    if check_train_history(params["train_history"]) == "user_sample":
        if not raw.given_history:
            raise ConfigError(f"dataset {params['dataset_id']}: train_history='user_sample' needs user histories; "
                              f"source {params['source']!r} has none: expected 'past'")
        examples["train"].update(timeline_columns(np.split(codes - 1, starts[1:]), group))
    for split in ("valid", "test"):
        rows = _eval_examples(pairs[split], known[split], max_len, raw.given_history, len(item_row))
        if rows is None:
            raise DataError(f"{present.get(split, present['test']).path}: no user of split {split} has a "
                            f"ground-truth item that is not already known from the earlier splits")
        examples[split] = rows
    users = _users_table(params, raw, user_ids)
    return user_ids, users, np.unique(user_rows), examples


MAX_TRAIN_GB = 20.0


def _check_train_size(params, user_features, n_rows):
    """Refuse to write a per-row train.h5 larger than MAX_TRAIN_GB (Deezer would take ~100 GB)."""
    row_bytes = sum(v[:1].nbytes for v in user_features.values()) + 8 * (params["max_len"] + 2)
    size_gb = row_bytes * n_rows / 1e9
    if size_gb > MAX_TRAIN_GB:
        raise DataError(f"dataset {params['dataset_id']}: train.h5 would take {size_gb:.0f} GB ({n_rows} rows x "
                        f"{row_bytes} bytes of user features each); set train_user_table: true in the dataset "
                        f"config to store user features once per user (users.h5)")


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
    iid = params["item_id_col"]
    items = raw.items.assign(**{iid: raw.items[iid].astype(str)}).drop_duplicates(iid).reset_index(drop=True)
    item_row = pd.Series(np.arange(len(items)), index=items[iid].values)
    if raw.given is None:
        user_ids, users, train_rows, examples = sequential_examples(params, raw, item_row)
    else:
        user_ids, users, train_rows, examples = given_examples(params, raw, item_row)

    processor = MatchFeatureProcessor(feature_specs(params, raw.notes.get("pretrain_dims")), params["dataset_id"],
                                      params["data_root"], params["max_len"],
                                      params.get("_dataset_config_file", "dataset_config.yaml"))
    processor.fit_sides(users.iloc[train_rows], items, len(items))
    user_features = processor.transform_side(users, "user")
    item_features = processor.transform_side(items, "item")
    item_features["item_id"] = np.arange(1, len(items) + 1, dtype=np.int64)
    item_features["raw_item_id"] = items[iid].astype(str).to_numpy()
    write_h5(os.path.join(data_dir, "item_corpus.h5"), item_features)
    sizes = {"items": len(items), "users": len(user_ids)}
    user_table = bool(params.get("train_user_table"))
    if user_table:      # user features once per user; train.h5 rows point at them by user_row
        write_h5(os.path.join(data_dir, "users.h5"), dict(user_features, raw_user_id=user_ids.astype(str)))
    else:
        _check_train_size(params, user_features, len(examples["train"]["user_row"]))
        if os.path.exists(os.path.join(data_dir, "users.h5")):
            os.remove(os.path.join(data_dir, "users.h5"))
    for split, rows in examples.items():
        if split == "train" and user_table:
            columns = {}
        else:
            columns = {name: values[rows["user_row"]] for name, values in user_features.items()}
        columns.update(rows)
        if not (split == "train" and user_table):
            columns["raw_user_id"] = user_ids[rows["user_row"]].astype(str)
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
