"""The Deezer cold-start release (Briand et al., KDD 2021; zenodo record 5121674).

Files (`files:` roles in the dataset config; defaults are the TT-SVD names):

| role    | release file                                   | content |
|---------|------------------------------------------------|---------|
| `train` | `user_features_train_svd.parquet` (or `_mf`)   | 70,000 warm users |
| `valid` | `user_features_validation_svd.parquet`         | 20,000 cold users |
| `test`  | `user_features_test_svd.parquet`               | 10,000 cold users |
| `items` | `song_embeddings.parquet`                      | 50,000 songs: `song_index`,       |
|         |                                                | `features_svd` 128-d, `features_mf` 256-d |

A user file has `user_index`, the ground truth `d1d30_songs` (songs streamed in the 30 days
after registration), 20 feature groups of 128 (TT-SVD) or 256 (UT-ALS) columns named
`<group>_embedding0..N-1`, `age_value` and 18 `nb_*` counts. Each group is one FuxiCTR
`embedding` feature named `<group>_embedding` (the loader assembles its columns into one
vector); `age_value` and `nb_*` are `numeric` (missing counts are 0, as in the authors' code).
Song vectors may be arrays (the release) or "[...]" strings (the sample files).

Protocol: the release's own users per split. Training rows are (train user, ground-truth song)
pairs; validation / test users are cold: no history (the history feature is all padding)
and nothing masked at ranking; ground truth = their `d1d30_songs`.
"""
import pandas as pd
import pyarrow.parquet as pq

from ..errors import DataError
from .raw import GivenSplit, RawData, raw_path, read_parquet_checked, require_files, side_specs

GROUND_TRUTH_COL = "d1d30_songs"
DEFAULT_FILES = {"train": "user_features_train_svd.parquet", "valid": "user_features_validation_svd.parquet",
                 "test": "user_features_test_svd.parquet", "items": "song_embeddings.parquet"}


def _wanted_columns(path, names, always):
    """Columns of the parquet file needed for `names` (exact, or `<name>N` embedding parts)."""
    try:
        available = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: cannot be read as parquet ({type(exc).__name__}: {exc})") from None
    missing = [c for c in always if c not in available]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {available[:10]}...")
    wanted, keep = set(names), list(always)
    for column in available:
        base = column.rstrip("0123456789")
        if column not in always and (column in wanted or (base != column and base in wanted)):
            keep.append(column)
    return keep


def deezer_source(params):
    """Users of the three split files, songs of the song table, ground truth `d1d30_songs`."""
    uid, iid = params["user_id_col"], params["item_id_col"]
    paths = {role: raw_path(params, role, name) for role, name in DEFAULT_FILES.items()}
    require_files(params, list(paths.values()))
    user_names = [s["name"] for s in side_specs(params, "user")]
    item_names = [s["name"] for s in side_specs(params, "item")]

    items_columns = _wanted_columns(paths["items"], item_names, [iid])
    items = read_parquet_checked(paths["items"], [iid], columns=items_columns)
    items[iid] = items[iid].astype(str)
    if items.empty:
        raise DataError(f"{paths['items']}: no song")

    frames, given, owner = [], {}, {}
    for split in ("train", "valid", "test"):
        path = paths[split]
        frame = read_parquet_checked(path, columns=_wanted_columns(path, user_names, [uid, GROUND_TRUTH_COL]))
        if frame.empty:
            raise DataError(f"{path}: no user")
        frame[uid] = frame[uid].astype(str)
        twice = [u for u in frame[uid] if u in owner]
        if twice:
            raise DataError(f"{path}: user(s) {twice[:5]} also appear in the {owner[twice[0]]} file; "
                            f"the Deezer splits must have disjoint users")
        owner.update({u: split for u in frame[uid]})
        truth = frame[[uid, GROUND_TRUTH_COL]].explode(GROUND_TRUTH_COL).dropna(subset=[GROUND_TRUTH_COL])
        pairs = pd.DataFrame({uid: truth[uid].to_numpy(),
                              iid: truth[GROUND_TRUTH_COL].astype("int64").astype(str).to_numpy()})
        given[split] = GivenSplit(pairs=pairs, path=path)
        frames.append(frame.drop(columns=[GROUND_TRUTH_COL]))
    users = pd.concat(frames, ignore_index=True)
    files = tuple(paths[r] for r in ("train", "valid", "test", "items"))
    return RawData(interactions=None, users=users, items=items, files=files, given=given, given_history=False,
                   notes={"users_path": paths["train"], "items_path": paths["items"]})


def deezer_file_names(space):
    """Release file names of one embedding space: `svd` (TT-SVD) or `mf` (UT-ALS)."""
    if space not in ("svd", "mf"):
        raise ValueError(f"space={space!r}; expected 'svd' or 'mf'")
    return {role: name.replace("_svd", f"_{space}") for role, name in DEFAULT_FILES.items()}

