"""MovieLens in its official GroupLens formats and in RecBole atomic files.

Formats (found in `raw_dir` or one sub-folder below it, e.g. `raw/ml-1m/` after a manual unzip):

- ML-1M / ML-10M: `ratings.dat` (`UserID::MovieID::Rating::Timestamp`), `movies.dat`
  (`MovieID::Title (Year)::Genre|Genre`), ML-1M also `users.dat`
  (`UserID::Gender::Age::Occupation::Zip-code`). ML-10M has no user file.
- ML-100K: `u.data` (tab separated user, item, rating, timestamp), `u.user`
  (`user|age|gender|occupation|zip`), `u.item` (latin-1, `|` separated, 19 genre flags).
- RecBole atomic files: `<name>.inter`, `<name>.user`, `<name>.item`, tab separated, header
  `field:type` (`token`, `token_seq` (space separated), `float`, `float_seq`).

Every format is normalised to the same tables (column names as configured by `user_id_col`,
`item_id_col`, `time_col`, `rating_col`; defaults shown):
- interactions: `user_id, item_id, rating, timestamp`, filtered by `rating_threshold`
  (None = 4 for the `movielens` source, keep all for `recbole`; 0 keeps every rating);
- users (when the format has them): `user_id, gender, age, occupation, zip_code`;
- items: `item_id, title, year, genres` with genres `^`-joined (a FuxiCTR sequence feature).
  Only items with at least one kept interaction form the item corpus.
"""
import csv
import glob
import os
import re

import pandas as pd

from ..errors import DataError
from .raw import RawData, apply_rating_threshold, raw_path, require_files

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
                 "Sci-Fi", "Thriller", "War", "Western")
RECBOLE_ALIASES = {"class": "genres", "genre": "genres", "release_year": "year", "movie_title": "title"}
DEFAULT_THRESHOLD = 4
# Files each official release needs (named when they are missing).
RELEASE_FILES = {"ml100k": ("u.data", "u.user", "u.item"), "ml1m": ("ratings.dat", "users.dat", "movies.dat"),
                 "ml10m": ("ratings.dat", "movies.dat")}
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _locate(params, role, name):
    """`files[role]` if configured, else `name` in raw_dir or in one sub-folder of it."""
    path = raw_path(params, role, name)
    if os.path.exists(path) or (params.get("files") or {}).get(role):
        return path
    below = sorted(glob.glob(os.path.join(params["raw_dir"], "*", name)))
    return below[0] if below else path


def _read_lines(path):
    with open(path, "rb") as fd:
        data = fd.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return [line for line in text.splitlines() if line.strip()]


def _read_double_colon(path, names, dtype=str):
    """`a::b::c` files read fast: split on ':' and keep every other column."""
    try:
        frame = pd.read_csv(path, sep=":", header=None, usecols=list(range(0, 2 * len(names), 2)),
                            dtype=dtype, encoding="latin-1", quoting=csv.QUOTE_NONE, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path}: expected {len(names)} fields separated by '::' ({exc})") from None
    if frame.empty:
        raise DataError(f"{path}: no rows")
    frame.columns = list(names)
    return frame


def _split_lines(path, sep, n_fields):
    rows = []
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.split(sep)
        if len(parts) < n_fields:
            raise DataError(f"{path}: line {number} has {len(parts)} field(s) separated by {sep!r}; "
                            f"expected {n_fields}")
        rows.append(parts)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _title_year(title):
    match = _YEAR.search(title)
    return match.group(1) if match else ""


def read_ml_dat(params):
    """ML-1M / ML-10M `.dat` files -> (interactions, users or None, items, files)."""
    ratings = _locate(params, "ratings", "ratings.dat")
    movies = _locate(params, "items", "movies.dat")
    users_path = _locate(params, "users", "users.dat")
    require_files(params, [ratings, movies])
    inter = _read_double_colon(ratings, ("user_id", "item_id", "rating", "timestamp"), dtype=None)
    rows = _split_lines(movies, "::", 3)
    items = pd.DataFrame({"item_id": [r[0] for r in rows], "title": [r[1] for r in rows],
                          "year": [_title_year(r[1]) for r in rows],
                          "genres": [r[2].strip().replace("|", "^") for r in rows]})
    users, files = None, [ratings, movies]
    if os.path.exists(users_path):
        users = _read_double_colon(users_path, ("user_id", "gender", "age", "occupation", "zip_code"))
        files.append(users_path)
    return inter, users, items, files


def read_ml100k(params):
    """ML-100K `u.data`, `u.user`, `u.item` -> (interactions, users, items, files)."""
    data = _locate(params, "ratings", "u.data")
    user_path = _locate(params, "users", "u.user")
    item_path = _locate(params, "items", "u.item")
    require_files(params, [data, item_path])
    rows = _split_lines(data, "\t", 4)
    inter = pd.DataFrame([r[:4] for r in rows], columns=["user_id", "item_id", "rating", "timestamp"])
    genre_path = os.path.join(os.path.dirname(item_path), "u.genre")
    genres = ML100K_GENRES
    if os.path.exists(genre_path):
        pairs = [line.split("|") for line in _read_lines(genre_path)]
        genres = tuple(name for name, _ in sorted(((p[0], int(p[1])) for p in pairs if len(p) == 2),
                                                  key=lambda p: p[1]))
    item_rows = _split_lines(item_path, "|", 5 + len(genres))
    items = pd.DataFrame({
        "item_id": [r[0] for r in item_rows], "title": [r[1] for r in item_rows],
        "year": [r[2][-4:] if r[2][-4:].isdigit() else _title_year(r[1]) for r in item_rows],
        "genres": ["^".join(g for g, flag in zip(genres, r[-len(genres):]) if flag.strip() == "1")
                   for r in item_rows]})
    users, files = None, [data, item_path]
    if os.path.exists(user_path):
        user_rows = _split_lines(user_path, "|", 5)
        users = pd.DataFrame([[r[0], r[2], r[1], r[3], r[4]] for r in user_rows],
                             columns=["user_id", "gender", "age", "occupation", "zip_code"])
        files.append(user_path)
    return inter, users, items, files


def read_atomic(path):
    """One RecBole atomic file -> DataFrame with `field` names (types dropped).

    `token_seq` fields are `^`-joined (FuxiCTR's sequence splitter), `float` fields numeric.
    """
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False,
                            encoding="utf-8", encoding_errors="replace")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot be parsed as a RecBole atomic file ({exc})") from None
    names, types = [], {}
    for header in frame.columns:
        if ":" not in header:
            raise DataError(f"{path}: header field {header!r} is not `name:type` (RecBole atomic format)")
        name, kind = header.rsplit(":", 1)
        names.append(name)
        types[name] = kind
    frame.columns = names
    for name, kind in types.items():
        if kind == "token_seq":
            frame[name] = frame[name].str.split().str.join("^")
        elif kind == "float":
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame


def read_recbole(params):
    """RecBole `.inter` (+ optional `.user`, `.item`) -> (interactions, users, items, files)."""
    raw_dir = params["raw_dir"]
    configured = params.get("files") or {}
    if "inter" in configured:
        inter_path = raw_path(params, "inter", "")
    else:
        found = sorted(glob.glob(os.path.join(raw_dir, "*.inter")) + glob.glob(os.path.join(raw_dir, "*", "*.inter")))
        inter_path = found[0] if found else os.path.join(raw_dir, "<name>.inter")
    require_files(params, [inter_path])
    stem = os.path.splitext(inter_path)[0]
    user_path = raw_path(params, "user", stem + ".user") if "user" in configured else stem + ".user"
    item_path = raw_path(params, "item", stem + ".item") if "item" in configured else stem + ".item"
    inter = read_atomic(inter_path)
    files = [inter_path]
    users = None
    if os.path.exists(user_path):
        users = read_atomic(user_path)
        files.append(user_path)
    if os.path.exists(item_path):
        items = read_atomic(item_path).rename(columns=lambda c: RECBOLE_ALIASES.get(c, c))
        files.append(item_path)
    else:
        items = pd.DataFrame({"item_id": inter["item_id"].unique()})
    return inter, users, items, files


def _normalise(params, inter, users, items, files, default_threshold):
    """Rename to the configured columns, threshold, restrict items to those interacted with."""
    uid, iid, tcol = params["user_id_col"], params["item_id_col"], params["time_col"]
    rating_col = params.get("rating_col", "rating")
    rename = {"user_id": uid, "item_id": iid, "timestamp": tcol, "rating": rating_col}
    inter = inter.rename(columns=rename)
    missing = [c for c in (uid, iid, tcol) if c not in inter.columns]
    if missing:
        raise DataError(f"{files[0]}: missing column(s) {missing}; found {list(inter.columns)}")
    inter[tcol] = pd.to_numeric(inter[tcol], errors="coerce")
    if inter[tcol].isna().any():
        raise DataError(f"{files[0]}: column {tcol} has values that are not numbers")
    inter = apply_rating_threshold(inter, params, default_threshold, files[0])
    inter = inter.assign(**{uid: inter[uid].astype(str), iid: inter[iid].astype(str)})
    items = items.rename(columns={"item_id": iid})
    items[iid] = items[iid].astype(str)
    kept_items = set(inter[iid].unique())
    unknown = kept_items - set(items[iid])
    if unknown:
        raise DataError(f"{files[0]}: {len(unknown)} rated item(s) are missing from the item file, "
                        f"e.g. {sorted(unknown)[:5]}")
    items = items[items[iid].isin(kept_items)].reset_index(drop=True)
    if users is not None:
        users = users.rename(columns={"user_id": uid})
        users[uid] = users[uid].astype(str)
    return RawData(interactions=inter.reset_index(drop=True), users=users, items=items, files=tuple(files))


def movielens_source(params):
    """Any MovieLens release in raw_dir: RecBole atomic, ML-100K or ML-1M/ML-10M `.dat` files."""
    raw_dir = params["raw_dir"]
    configured = params.get("files") or {}
    if "inter" in configured or glob.glob(os.path.join(raw_dir, "*.inter")) or \
            glob.glob(os.path.join(raw_dir, "*", "*.inter")):
        parts = read_recbole(params)
    elif os.path.exists(_locate(params, "ratings", "u.data")):
        parts = read_ml100k(params)
    elif os.path.exists(_locate(params, "ratings", "ratings.dat")):
        parts = read_ml_dat(params)
    else:
        expected = RELEASE_FILES.get(params.get("release"), ("ratings.dat", "movies.dat"))
        require_files(params, [os.path.join(raw_dir, name) for name in expected])
        raise DataError(f"{raw_dir}: no MovieLens file found (expected ratings.dat, u.data or *.inter)")
    return _normalise(params, *parts, default_threshold=DEFAULT_THRESHOLD)


def recbole_source(params):
    """Any dataset in RecBole atomic files (`.inter` with user_id, item_id, timestamp fields)."""
    return _normalise(params, *read_recbole(params), default_threshold=0)

