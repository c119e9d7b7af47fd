"""Raw tables -> FuxiCTR features -> H5 files (docs/design.md, "Data and file formats").

`build_dataset(params)` is idempotent: it rebuilds only when a raw file (size and sha256)
or a build parameter changed since `build_info.json` was written, or when a built file no
longer matches the size and sha256 recorded for it. `build_info.json` is written last and
atomically, so an interrupted build is never taken for a complete one.
"""
import hashlib
import json
import logging
import os
import time

import numpy as np
import pandas as pd

from ..config import TRAIN_HISTORIES  # noqa: F401  (re-exported: the train_history values built here)
from ..errors import ConfigError, DataError
from .feature_processor import HISTORY_FEATURE, MatchFeatureProcessor
from .h5 import write_h5
from .sources import feature_specs, load_raw

BUILD_KEYS = ("source", "feature_cols", "user_id_col", "item_id_col", "time_col", "split_ratios",
              "history_ratio", "max_len", "min_history", "split_seed", "min_user_interactions",
              "rating_col", "rating_threshold", "files", "valid_fraction", "train_user_table",
              "train_history")
DEMO_BUILD_KEYS = ("demo_num_users", "demo_num_items")   # build keys of the `demo` source only
BUILD_VERSION = 3
BUILD_INFO = "build_info.json"
SPLITS = ("train", "valid", "test")
# Files a build writes into the data folder; build_info.json records the size and sha256 of each one present.
BUILT_FILES = tuple(f"{s}.h5" for s in SPLITS) + ("item_corpus.h5", "users.h5", "feature_map.json",
                                                   "feature_processor.pkl", "feature_vocab.json")
HASH_CHUNK_BYTES = 4 << 20


def data_dir_of(params):
    return os.path.join(params["data_root"], params["dataset_id"])


def file_digest(path):
    """{"bytes": size, "sha256": hex digest} of a file, hashed in chunks (never loaded whole)."""
    sha = hashlib.sha256()
    with open(path, "rb") as fd:
        for chunk in iter(lambda: fd.read(HASH_CHUNK_BYTES), b""):
            sha.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": sha.hexdigest()}


def _raw_file_record(path):
    return {"path": os.path.abspath(path), **file_digest(path)}


def _build_params(params):
    keys = BUILD_KEYS + (DEMO_BUILD_KEYS if params.get("source") == "demo" else ())
    return json.loads(json.dumps({k: params.get(k) for k in keys}, default=list))


def _required_built_files(build_params):
    """Names of the files every complete build of `build_params` has in its data folder."""
    names = [f"{s}.h5" for s in SPLITS] + ["item_corpus.h5", "feature_map.json", "feature_processor.pkl"]
    if build_params.get("train_user_table"):
        names.append("users.h5")
    return names


def _read_build_info(data_dir):
    """The parsed build_info.json of `data_dir`, or None when it is absent or unreadable."""
    try:
        with open(os.path.join(data_dir, BUILD_INFO)) as fd:
            info = json.load(fd)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def verify_built_files(data_dir, info):
    """What differs between the built files of `data_dir` and their records in `info` (build_info.json).

    Every recorded file must exist with its recorded size and sha256; sizes are compared first, so a
    truncated file is found without hashing it.

    Args:
        data_dir: the dataset folder.
        info: parsed build_info.json of that folder.
    Returns:
        list of sentences, one per damaged file, each naming the file and what differs; empty when
        every file matches.
    """
    records = {r.get("name"): r for r in info.get("built_files", []) if isinstance(r, dict)}
    problems = [f"{os.path.join(data_dir, name)}: not recorded in {BUILD_INFO}"
                for name in _required_built_files(info.get("params") or {}) if name not in records]
    for name, record in records.items():
        path = os.path.join(data_dir, str(name))
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != record.get("bytes"):
            problems.append(f"{path}: {size} bytes, recorded {record.get('bytes')} (truncated or overwritten)")
            continue
        digest = file_digest(path)["sha256"]
        if digest != record.get("sha256"):
            problems.append(f"{path}: sha256 {digest[:16]}..., recorded {str(record.get('sha256'))[:16]}... "
                            "(same size, content changed)")
    return problems


def split_users(user_ids, ratios, seed):
    """Shuffle users with `seed` and cut them by `ratios` (train, valid, test; checked by the config)."""
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
    if is_train:
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
    """Move the last (1 - history_ratio) of the training items of a `fraction` (in (0, 1), checked by the
    config) of users to validation."""
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
    if params["train_history"] == "user_sample":
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
    """Build (or reuse) the H5 files of `params['dataset_id']`. Returns the data folder.

    The previous build is reused when its build_info.json has this BUILD_VERSION, the same build
    parameters and raw files (size and sha256), and every built file still has its recorded size and
    sha256. A damaged built file (missing, truncated, changed) is logged by name and the dataset is
    rebuilt from the raw files; when the raw files are gone, a verified build is reused as it is.

    Args:
        params: merged experiment parameters (`model_zoo.config.load_config`).
        force: rebuild even when the previous build is current.
    Raises:
        DataError: a built file is damaged and the raw files to rebuild it are unavailable (the
            message names both), or the raw data is missing or malformed.
    """
    data_dir = data_dir_of(params)
    build_params = _build_params(params)
    info = None if force else _read_build_info(data_dir)
    if info is not None and (info.get("version") != BUILD_VERSION or info.get("params") != build_params):
        info = None                         # another build version or other build parameters: rebuild
    problems = verify_built_files(data_dir, info) if info is not None else []
    for problem in problems:
        logging.warning(f"Built dataset {params['dataset_id']} does not match {BUILD_INFO}: {problem}")
    try:
        raw = load_raw(params)
    except DataError as exc:
        missing = _missing_raw_files(info) if info is not None else []
        if problems:
            raise DataError(f"built dataset {data_dir} is damaged ({'; '.join(problems)}) and cannot be rebuilt: "
                            f"{_unavailable_raw(params, missing, exc)}. Restore the raw files (or point raw_dir "
                            "in the dataset config at them) and run again") from None
        if not missing:
            raise
        logging.warning(f"Raw file(s) of {params['dataset_id']} are gone ({', '.join(missing)}); reusing the "
                        f"built dataset in {data_dir}, whose files match {BUILD_INFO}")
        return data_dir
    raw_files = [_raw_file_record(p) for p in raw.files]
    if info is not None and not problems and _digests_by_path(info.get("files", [])) == _digests_by_path(raw_files):
        logging.info(f"Reusing built dataset in {data_dir}")
        return data_dir
    if problems:
        logging.warning(f"Rebuilding dataset {params['dataset_id']} in {data_dir} from its raw files")
    _write_dataset(params, raw, raw_files, build_params)
    return data_dir


def _missing_raw_files(info):
    """Raw files recorded in build_info.json that no longer exist."""
    return [r["path"] for r in info.get("files", []) if isinstance(r, dict) and not os.path.exists(r["path"])]


def _unavailable_raw(params, missing, exc):
    """Why the raw data cannot be read: the missing folder / files, else the source's own error."""
    raw_dir = params.get("raw_dir")
    if raw_dir and not os.path.isdir(raw_dir):
        return f"raw_dir {raw_dir} does not exist ({exc})"
    if missing:
        return f"raw file(s) missing: {', '.join(missing)} ({exc})"
    return str(exc)


def _digests_by_path(records):
    return {r.get("path"): (r.get("bytes"), r.get("sha256")) for r in records if isinstance(r, dict)}


def _write_dataset(params, raw, raw_files, build_params):
    """Write every built file of one dataset from its raw tables, build_info.json last.

    Args:
        params: merged experiment parameters.
        raw: the source's RawData (`load_raw(params)`).
        raw_files: records ({"path", "bytes", "sha256"}) of the raw files, kept in build_info.json.
        build_params: the build parameters (`BUILD_KEYS` of params), kept in build_info.json.
    Returns:
        the build_info dict that was written.
    """
    data_dir = data_dir_of(params)
    started = time.time()
    os.makedirs(data_dir, exist_ok=True)
    info_path = os.path.join(data_dir, BUILD_INFO)
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
    built_files = [{"name": name, **file_digest(os.path.join(data_dir, name))}
                   for name in BUILT_FILES if os.path.isfile(os.path.join(data_dir, name))]
    info = {"version": BUILD_VERSION, "dataset_id": params["dataset_id"], "params": build_params,
            "files": raw_files, "built_files": built_files, "sizes": sizes,
            "build_seconds": round(time.time() - started, 2)}
    _write_json_atomic(info_path, info)
    logging.info(f"Built dataset {params['dataset_id']} in {info['build_seconds']} s: {sizes}")
    return info


def _write_json_atomic(path, content):
    """Write JSON under a temporary name, then rename it into place: readers see all of it or nothing."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as fd:
            json.dump(content, fd, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
