"""Tests of the bundled demo data generator (model_zoo/data/demo.py)."""
import json
import os
import re
import time

import numpy as np
import pandas as pd
import pytest

from model_zoo.data.demo import (AGE_BANDS, DEMO_FILES, PRICE_BANDS, REGIONS, TAG_SEPARATOR,
                                 ensure_demo, generate_demo, simulate_demo,
                                 DEMO_GENERATOR_VERSION, DEMO_STAMP_FILE)

SMALL = dict(num_users=300, num_items=400)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default-size demo files, generated once, with the CPU seconds the generation took.

    CPU time of this process, not wall time, so a busy machine does not make the test flaky.
    """
    out_dir = tmp_path_factory.mktemp("demo_default")
    start = time.process_time()
    paths = generate_demo(str(out_dir))
    seconds = time.process_time() - start
    tables = {name: pd.read_csv(path) for name, path in paths.items()}
    return {"dir": str(out_dir), "paths": paths, "seconds": seconds, **tables}


@pytest.fixture(scope="module")
def small_simulation():
    """In-memory tables and latent structure of a small demo (same rules, fewer users/items)."""
    return simulate_demo(num_users=1000, num_items=1000, seed=7)


def _read_bytes(paths):
    return {name: open(path, "rb").read() for name, path in paths.items()}


def test_generation_is_fast_and_writes_only_the_three_files(demo):
    assert demo["seconds"] < 10.0, f"generation took {demo['seconds']:.1f} CPU seconds"
    assert sorted(os.listdir(demo["dir"])) == sorted(DEMO_FILES)
    assert set(demo["paths"]) == {"users", "items", "interactions"}
    assert all(os.path.dirname(p) == demo["dir"] for p in demo["paths"].values())


def test_same_seed_gives_byte_identical_files(demo, tmp_path):
    again = generate_demo(str(tmp_path), num_users=5000, num_items=2000, seed=2023)
    assert _read_bytes(again) == _read_bytes(demo["paths"])


def test_different_seed_gives_different_files(tmp_path):
    first = _read_bytes(generate_demo(str(tmp_path / "a"), seed=1, **SMALL))
    second = _read_bytes(generate_demo(str(tmp_path / "b"), seed=2, **SMALL))
    assert first["interactions"] != second["interactions"]
    assert first["items"] != second["items"]
    assert first["users"] != second["users"]


def test_files_match_simulate_demo(tmp_path):
    paths = generate_demo(str(tmp_path), seed=5, **SMALL)
    users, items, interactions, _ = simulate_demo(seed=5, **SMALL)
    for name, frame in (("users", users), ("items", items), ("interactions", interactions)):
        read = pd.read_csv(paths[name])
        assert list(read.columns) == list(frame.columns)
        assert len(read) == len(frame)
        for column in frame.columns:
            if column == "activity":
                np.testing.assert_allclose(read[column], frame[column], atol=1e-4)
            else:
                assert read[column].astype(str).tolist() == frame[column].astype(str).tolist()


def test_schema_and_dtypes(demo):
    users, items, inter = demo["users"], demo["items"], demo["interactions"]
    assert list(users.columns) == ["user_id", "age_band", "region", "activity"]
    assert list(items.columns) == ["item_id", "category", "tags", "price_band"]
    assert list(inter.columns) == ["user_id", "item_id", "timestamp"]
    for frame, column in ((users, "user_id"), (users, "age_band"), (users, "region"), (items, "item_id"),
                          (items, "category"), (items, "tags"), (items, "price_band"),
                          (inter, "user_id"), (inter, "item_id")):
        dtype = frame[column].dtype
        assert pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype), column
    assert pd.api.types.is_float_dtype(users["activity"])
    assert pd.api.types.is_integer_dtype(inter["timestamp"])
    assert users["user_id"].str.fullmatch(r"u\d{4}").all()
    assert items["item_id"].str.fullmatch(r"i\d{4}").all()
    for frame in (users, items, inter):
        assert not frame.isna().any().any()


def test_value_sets_and_counts(demo):
    users, items, inter = demo["users"], demo["items"], demo["interactions"]
    assert len(users) == 5000 and users["user_id"].is_unique
    assert len(items) == 2000 and items["item_id"].is_unique
    assert set(users["age_band"]) == set(AGE_BANDS) and len(AGE_BANDS) == 6
    assert set(users["region"]) == set(REGIONS) and len(REGIONS) == 8
    assert users["activity"].between(0.0, 1.0, inclusive="neither").all()
    assert items["category"].nunique() == 20
    assert set(items["price_band"]) == set(PRICE_BANDS)
    tag_lists = items["tags"].str.split(re.escape(TAG_SEPARATOR), regex=True)
    tag_counts = tag_lists.str.len()
    assert tag_counts.between(1, 4).all() and set(tag_counts) == {1, 2, 3, 4}
    assert all(len(set(tags)) == len(tags) for tags in tag_lists)
    vocab = set(tag for tags in tag_lists for tag in tags)
    assert 40 <= len(vocab) <= 50 and all(re.fullmatch(r"t\d{2}", tag) for tag in vocab)
    per_user = inter.groupby("user_id").size()
    assert set(per_user.index) == set(users["user_id"])
    assert per_user.min() >= 20 and per_user.max() <= 60
    assert 35 <= per_user.mean() <= 45
    assert 150_000 <= len(inter) <= 250_000
    # Longer histories for more active users (R7).
    active = users.set_index("user_id")["activity"].reindex(per_user.index)
    assert np.corrcoef(active, per_user)[0, 1] > 0.9


def test_sorted_by_user_then_time_with_increasing_timestamps(demo):
    inter = demo["interactions"]
    users = inter["user_id"].to_numpy()
    assert (users[1:] >= users[:-1]).all(), "rows are not grouped by user in id order"
    same_user = users[1:] == users[:-1]
    gaps = np.diff(inter["timestamp"].to_numpy())
    assert (gaps[same_user] > 0).all(), "timestamps must increase strictly within a user"
    assert inter["timestamp"].min() >= 1672531200  # 2023-01-01 UTC


def test_items_exist_and_no_repeats_within_a_user(demo):
    inter, items = demo["interactions"], demo["items"]
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert not inter.duplicated(["user_id", "item_id"]).any()
    # Most of the corpus is used; popularity is skewed but mild (R3).
    counts = inter["item_id"].value_counts()
    assert len(counts) >= 0.95 * len(items)
    top_decile_share = counts.iloc[: len(items) // 10].sum() / len(inter)
    assert top_decile_share < 0.4, f"top 10% of items hold {top_decile_share:.0%} of interactions"


def _consecutive_categories(interactions, items):
    category_of = dict(zip(items["item_id"], items["category"].str[1:].astype(int)))
    categories = interactions["item_id"].map(category_of).to_numpy()
    users = interactions["user_id"].to_numpy()
    same_user = users[1:] == users[:-1]
    return categories[:-1][same_user], categories[1:][same_user]


def test_sequential_rule_is_planted_and_directional(small_simulation):
    users, items, inter, latent = small_simulation
    previous, following = _consecutive_categories(inter, items)
    forward = np.mean(following == latent.successor[previous])
    backward = np.mean(previous == latent.successor[following])
    shares = np.bincount(np.concatenate([previous, following]), minlength=len(latent.successor))
    shares = shares / shares.sum()
    chance = float(np.sum(shares * shares[latent.successor]))  # independent consecutive categories
    assert forward > 0.2 and forward > 4 * chance, (forward, chance)
    # Order matters: the reversed pairs follow the map only at chance level.
    assert backward < 2 * chance, (backward, chance)


def test_interest_rule_or_of_thresholded_tag_matches(small_simulation):
    users, items, inter, latent = small_simulation
    user_index = {u: k for k, u in enumerate(users["user_id"])}
    item_index = {i: k for k, i in enumerate(items["item_id"])}
    rows = inter["user_id"].map(user_index).to_numpy()
    cols = inter["item_id"].map(item_index).to_numpy()
    tag_matrix = latent.item_tag_matrix.astype(np.int32)  # [I, T]
    matched = np.zeros(len(inter), dtype=bool)   # >= 2 tags of one of the user's themes
    blended = np.zeros(len(inter), dtype=bool)   # >= 2 of the user's tags, but < 2 of any single theme
    corpus_matched, corpus_blended = [], []
    for user in range(len(users)):
        themes = latent.theme_tags[latent.user_themes[user]]  # [K_u, 3]
        per_theme = np.stack([tag_matrix[:, t].sum(1) for t in themes], 1)  # [I, K_u]
        is_match = (per_theme >= 2).any(1)
        is_blend = ~is_match & (per_theme.sum(1) >= 2)
        mask = rows == user
        matched[mask] = is_match[cols[mask]]
        blended[mask] = is_blend[cols[mask]]
        corpus_matched.append(is_match.mean())
        corpus_blended.append(is_blend.mean())
    # Users' items match an interest far above the corpus rate (the OR of interests) ...
    assert matched.mean() > 0.35 and matched.mean() > 10 * np.mean(corpus_matched)
    # ... while blends of two interests, which a tag-additive single vector scores just as high,
    # appear at most a few times above their (tiny) corpus rate.
    assert blended.mean() < 3 * np.mean(corpus_blended) + 0.01
    # Every user has 2-4 interests with disjoint tag sets.
    for themes in latent.user_themes:
        tags = latent.theme_tags[themes].ravel()
        assert 2 <= len(themes) <= 4 and len(set(tags.tolist())) == len(tags)


def test_cross_rule_depends_on_region_and_age_jointly(small_simulation):
    users, items, inter, latent = small_simulation
    table = latent.cross_table  # [R, A, C]
    assert table.any(axis=2).all()
    # Not a product of a region effect and an age effect: some (region, age) rows differ from
    # every other age band of the same region.
    assert any(len({table[r, a].tobytes() for a in range(table.shape[1])}) > 1 for r in range(table.shape[0]))
    user_rows = inter["user_id"].map({u: k for k, u in enumerate(users["user_id"])}).to_numpy()
    item_rows = inter["item_id"].map({i: k for k, i in enumerate(items["item_id"])}).to_numpy()
    in_cross = table[latent.user_region[user_rows], latent.user_age_band[user_rows],
                     latent.item_category[item_rows]]
    # p_cross = 0.15 of the steps come from cross categories on top of the base rate.
    assert in_cross.mean() > table.mean() + 0.08, (in_cross.mean(), table.mean())


def test_ensure_demo_is_idempotent(tmp_path):
    out_dir = str(tmp_path / "raw")
    paths = ensure_demo(out_dir, **SMALL)
    assert all(os.path.isfile(p) for p in paths.values())
    with open(paths["users"], "a") as fd:
        fd.write("# marker\n")
    marked = _read_bytes(paths)
    assert ensure_demo(out_dir, **SMALL) == paths
    assert _read_bytes(paths) == marked, "existing files must be kept"
    os.remove(paths["items"])
    ensure_demo(out_dir, **SMALL)
    assert os.path.isfile(paths["items"])
    assert not open(paths["users"]).read().endswith("# marker\n"), "a missing file regenerates all three"
    assert sorted(os.listdir(out_dir)) == sorted(DEMO_FILES + (DEMO_STAMP_FILE,))


def test_ensure_demo_regenerates_files_of_another_generator_version(tmp_path):
    out_dir = str(tmp_path / "raw")
    paths = ensure_demo(out_dir, **SMALL)
    fresh = _read_bytes(paths)
    stamp_path = os.path.join(out_dir, DEMO_STAMP_FILE)
    with open(stamp_path) as fd:
        stamp = json.load(fd)
    assert stamp["generator_version"] == DEMO_GENERATOR_VERSION
    for change in ("older version", "no stamp", "other arguments"):
        with open(paths["users"], "a") as fd:
            fd.write("# stale\n")
        if change == "older version":
            with open(stamp_path, "w") as fd:
                json.dump(dict(stamp, generator_version=DEMO_GENERATOR_VERSION - 1), fd)
        elif change == "no stamp":
            os.remove(stamp_path)
        else:
            with open(stamp_path, "w") as fd:
                json.dump(dict(stamp, arguments=dict(stamp["arguments"], seed=7)), fd)
        ensure_demo(out_dir, **SMALL)
        assert _read_bytes(paths) == fresh, change


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(num_users=0), "num_users=0"),
    (dict(num_items=10), "num_items=10"),
    (dict(seed=-1), "seed=-1"),
    (dict(p_seq=1.5), "p_seq=1.5"),
    (dict(p_seq=0.5, p_interest=0.5, p_cross=0.5), "p_seq + p_interest + p_cross"),
    (dict(max_interactions=10), "max_interactions=10"),
    (dict(num_users=2.5), "num_users=2.5"),
    (dict(liked_boost=-1.0), "liked_boost=-1.0"),
])
def test_invalid_arguments_name_the_value(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        generate_demo(str(tmp_path), **kwargs)
    assert not os.listdir(tmp_path), "nothing may be written on bad arguments"


def test_interrupted_generation_leaves_no_file_behind(tmp_path, monkeypatch):
    original_to_csv = pd.DataFrame.to_csv

    def failing_to_csv(frame, path, *args, **kwargs):
        if "interactions" in os.fspath(path):
            raise OSError("disk full (simulated)")
        return original_to_csv(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(OSError, match="disk full"):
        generate_demo(str(tmp_path), **SMALL)
    assert os.listdir(tmp_path) == [], "no half-written or partial set of files may remain"
