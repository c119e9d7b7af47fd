"""Bundled synthetic dataset `demo`: a deterministic generator of three raw CSV files.

`generate_demo(out_dir, ...)` writes `users.csv`, `items.csv` and `interactions.csv`;
`ensure_demo(raw_dir)` does so only when one of them is missing or was made by another
version of this generator (the pipeline calls it on first use of `dataset_id: demo`). Everything
is drawn from one `numpy.random.default_rng(seed)` in a fixed order, so the same arguments give
byte-identical files. Default size: 5,000 users, 2,000 items, about 200,000 interactions, written
in a few seconds.

Files
-----
users.csv         user_id (str "u0001"...), age_band (6 values "<18".."55+"),
                  region (8 names), activity (float in (0, 1), 4 decimals)
items.csv         item_id (str "i0001"...), category (20 values "c00".."c19"),
                  tags (1-4 distinct tag ids "t00".."t49" joined by "^"),
                  price_band ("low" | "mid" | "high" | "premium")
interactions.csv  user_id, item_id, timestamp (int Unix seconds, strictly increasing per user);
                  sorted by user then time; 20-60 rows per user; no item twice for one user

Latent structure (what a model can learn; `simulate_demo` also returns it as `DemoLatent`)
-----------------------------------------------------------------------------------------
R1 Themes. There are `num_themes` (default 120) themes, each a set of 3 distinct tags out of
   `num_tags` (default 50); the themes are distinct as sets but share tags and tag pairs with one
   another. Each theme has a home category (uniform).
R2 Items. 90% of items are theme items: a primary theme drawn uniformly, all 3 of its tags
   (probability 0.8) or 2 of them, plus one uniformly random extra tag with probability 0.3 (if
   new); the category is the theme's home category with probability 0.5, else uniform over
   `num_categories` (default 20). The other 10% are generic items with 1 or 2 uniformly random
   tags and a uniform category. So every item has 1-4 distinct tags. price_band: each category
   has a price level in 0..3; an item's band is that level plus -1/0/+1 (probabilities
   0.25/0.5/0.25), clipped. price_band plays no role in the preferences (a distractor feature).
R3 Popularity. Item i has a base weight pop_i = (1 + rank_i) ** -popularity_exponent (default
   0.4) over a random permutation of ranks: a mild skew.
R4 Interests: an OR over disjoint clusters, thresholded on tags. A user has 2, 3 or 4
   interests (probabilities 0.3/0.45/0.25): themes drawn uniformly under the constraint that no
   two of the user's themes share a tag. An item matches an interest when it carries >= 2 of that
   theme's 3 tags (about 29 items per theme); the user's liked set is the union (OR) over the
   interests (about 84 items). An item carrying one tag of interest A and one of interest B is
   NOT liked, although a tag-additive user vector (the blend of the interests) scores it like a
   true match. Over all users the liked sets span about one direction per theme (120, about twice
   a 64-d embedding): the user x item preference matrix has a rank above the towers' dimension.
R5 Cross table. cross[region, age_band, category] is an independent Bernoulli(0.15) table
   (8 x 6 x 20, forced to have >= 1 category per (region, age_band)). It is not a sum of a region
   effect and an age effect, so a model must cross region with age_band to use it (a two-tower
   model can, through its user tower: the table has rank <= 20).
R6 Category successor map. succ is a random permutation of the categories without fixed points.
R7 Activity and length. activity ~ Beta(2, 2) (stored with 4 decimals); the number of
   interactions is round(20 + 40 * activity + Normal(0, 2)), clipped to [20, 60]
   (`min_interactions`, `max_interactions`).
R8 The sequence. Step by step, each step is one component of a mixture with probabilities
   p_seq=0.35, p_interest=0.4, p_cross=0.15 and noise = the rest (0.1); at the first step p_seq
   is 0 and the others are rescaled:
   - seq: category = succ[category of the previous item] with probability 0.75, else the same
     category; within it an item with weight pop_i * (1 + liked_boost * liked_i), where
     liked_boost = 6 and liked_i = 1 if i is in the user's R4 liked set or its category is in the
     user's R5 cross set;
   - interest: one of the user's interests uniformly (the OR), then a uniformly drawn item
     matching that interest (R4);
   - cross: a category uniformly from cross[region, age_band, :], then an item as in seq;
   - noise: an item with weight pop_i over the whole corpus.
   Items the user already has are never drawn again (no repeats within a user); when a component
   has no unseen candidate left, the step falls back to noise.
R9 Timestamps. A user starts at 2023-01-01 00:00 UTC plus a uniform offset within 90 days; the
   gap between consecutive events is 60 s plus an exponential with mean 6 hours (integer seconds).

What models can exploit: R4 (an OR of disjoint interests with thresholded tag matches: a single
blended vector ranks blend items as high as true matches) and R8-seq (the order of the history:
the last item predicts the next category) are what interaction and sequence models can use and a
dot product of independent 64-d towers cannot express; R5 is a feature cross; R3 keeps Popularity
a weak floor. Version 1 had 600 themes; there no model learned much beyond Popularity (DSSM
peaked near valid Recall@50 0.09, Popularity had test Recall@50 0.073, in runs of that generator,
which is no longer in the code). With 120 themes DSSM_demo_001 reaches test Recall@50 0.118
against 0.070 for Popularity_demo_001 (README, "Benchmarks").
"""
import bisect
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

DEMO_FILES = ("users.csv", "items.csv", "interactions.csv")
DEMO_STAMP_FILE = "generator.json"
# Bump whenever the generator's output changes: ensure_demo then regenerates existing folders.
DEMO_GENERATOR_VERSION = 2
AGE_BANDS = ("<18", "18-24", "25-34", "35-44", "45-54", "55+")
REGIONS = ("north", "south", "east", "west", "central", "coast", "islands", "mountains")
PRICE_BANDS = ("low", "mid", "high", "premium")
TAG_SEPARATOR = "^"
START_TIMESTAMP = 1672531200  # 2023-01-01 00:00:00 UTC

_FLOAT_FORMAT = "%.4f"
_SAME_CATEGORY_PROB = 0.25       # seq step: stay in the previous item's category
_THEME_ITEM_SHARE = 0.9          # share of items generated from a theme (R2)
_HOME_CATEGORY_PROB = 0.5        # a theme item is in its theme's home category (R2)
_EXTRA_TAG_PROB = 0.3            # a theme item gets one extra random tag (R2)
_FULL_THEME_PROB = 0.8           # a theme item carries all 3 theme tags, else 2 (R2)
_CROSS_DENSITY = 0.15            # Bernoulli rate of the cross table (R5)
_INTEREST_COUNT_PROBS = (0.3, 0.45, 0.25)   # 2, 3 or 4 interests (R4)
_TAGS_PER_THEME = 3
_MIN_TAG_MATCH = 2
_GAP_SECONDS_MIN = 60
_GAP_SECONDS_MEAN = 6 * 3600
_START_SPREAD_SECONDS = 90 * 24 * 3600


@dataclass(frozen=True)
class DemoLatent:
    """The hidden structure behind the demo data (for oracle scorers and tests).

    Args:
        theme_tags: [num_themes, 3] int, tag indices of each theme (R1).
        theme_home_category: [num_themes] int (R1).
        item_category: [num_items] int, category index of each item.
        item_tag_matrix: [num_items, num_tags] bool, tags of each item.
        item_popularity: [num_items] float, base weight pop_i (R3).
        theme_items: list of int arrays, the items matching each theme (>= 2 of its tags, R4).
        user_themes: list of int arrays, the interests (theme indices) of each user (R4).
        cross_table: [num_regions, num_age_bands, num_categories] bool (R5).
        successor: [num_categories] int, the category successor map (R6).
        user_region: [num_users] int; user_age_band: [num_users] int.
    """
    theme_tags: np.ndarray
    theme_home_category: np.ndarray
    item_category: np.ndarray
    item_tag_matrix: np.ndarray
    item_popularity: np.ndarray
    theme_items: list
    user_themes: list
    cross_table: np.ndarray
    successor: np.ndarray
    user_region: np.ndarray
    user_age_band: np.ndarray


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")


def _check_prob(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a probability in [0, 1]")


def _id_strings(prefix, count):
    width = max(4, len(str(count)))
    return np.array([f"{prefix}{k:0{width}d}" for k in range(1, count + 1)], dtype=object)


def _uniform_stream(rng, block=8192):
    """An endless iterator of U(0, 1) floats drawn from `rng` in blocks (cheap to consume)."""
    return itertools.chain.from_iterable(iter(lambda: rng.random(block).tolist(), None))


class _StepSampler:
    """Draws the items of one user's sequence without repeats (R8), fast and exactly.

    Weighted picks use rejection sampling: propose from the precomputed popularity cumulative
    sums, reject seen items, and accept a not-liked item with probability 1 / (1 + liked_boost),
    which yields probabilities proportional to pop_i * (1 + liked_boost * liked_i) over unseen
    items. After `_MAX_REJECTIONS` proposals the pick is done exactly with numpy (or reports -1
    when nothing is left). Indices need no clipping: for u in [0, 1) and n < 2**53,
    int(u * n) < n and u * cum[-1] < cum[-1] hold exactly in double precision.

    Args:
        uniform: a callable returning the next U(0, 1) float of the shared stream.
        popularity: [I] float, base weights pop_i.
        category_items: list over categories of int arrays, the items of each category.
        liked_boost: extra weight of liked items.
    """

    _MAX_REJECTIONS = 64

    def __init__(self, uniform, popularity, category_items, liked_boost):
        self.uniform = uniform
        self._popularity = popularity
        self._category_items = category_items
        self._category_lists = [items.tolist() for items in category_items]
        self._category_cum = [np.cumsum(popularity[items]).tolist() for items in category_items]
        self._all_cum = np.cumsum(popularity).tolist()
        self._accept_not_liked = 1.0 / (1.0 + liked_boost)
        self._liked_boost = liked_boost
        self._liked_array = None
        self.liked = bytearray()
        self.seen = bytearray()

    def start_user(self, liked):
        """Reset for a new user whose liked items are the [I] bool array `liked`."""
        self._liked_array = liked
        self.liked = bytearray(liked.astype(np.uint8).tobytes())
        self.seen = bytearray(len(liked))

    def _exact(self, candidates, weights):
        unseen = np.frombuffer(bytes(self.seen), dtype=np.uint8)[candidates] == 0
        weights = weights * unseen
        if not weights.any():
            return -1
        cumulative = np.cumsum(weights)
        position = int(np.searchsorted(cumulative, self.uniform() * cumulative[-1], side="right"))
        return int(candidates[min(position, len(candidates) - 1)])

    def pick_in_category(self, category):
        """An unseen item of `category` with weight pop_i * (1 + liked_boost * liked_i)."""
        items, cum = self._category_lists[category], self._category_cum[category]
        if not items:  # a category without items (possible only in tiny corpora)
            return -1
        total, seen, liked = cum[-1], self.seen, self.liked
        uniform, accept, bisect_right = self.uniform, self._accept_not_liked, bisect.bisect_right
        for _ in range(self._MAX_REJECTIONS):
            item = items[bisect_right(cum, uniform() * total)]
            if not seen[item] and (liked[item] or uniform() < accept):
                return item
        candidates = self._category_items[category]
        weights = self._popularity[candidates] * (1.0 + self._liked_boost * self._liked_array[candidates])
        return self._exact(candidates, weights)

    def pick_uniform(self, candidates):
        """A uniformly drawn unseen element of the list `candidates` (-1 if none)."""
        if not candidates:
            return -1
        seen, uniform, size = self.seen, self.uniform, len(candidates)
        for _ in range(self._MAX_REJECTIONS):
            item = candidates[int(uniform() * size)]
            if not seen[item]:
                return item
        array = np.asarray(candidates)
        return self._exact(array, np.ones(len(array)))

    def pick_popular(self):
        """An unseen item of the whole corpus with weight pop_i."""
        cum, seen, uniform = self._all_cum, self.seen, self.uniform
        total = cum[-1]
        for _ in range(self._MAX_REJECTIONS):
            item = bisect.bisect_right(cum, uniform() * total)
            if not seen[item]:
                return item
        return self._exact(np.arange(len(cum)), self._popularity)


def _draw_themes(rng, num_themes, num_tags, num_categories):
    """R1: distinct 3-tag themes and a home category for each."""
    if num_themes > _max_distinct_themes(num_tags):
        raise ValueError(f"num_themes={num_themes}: expected at most {_max_distinct_themes(num_tags)} "
                         f"distinct {_TAGS_PER_THEME}-tag themes for num_tags={num_tags}")
    seen = set()
    themes = []
    while len(themes) < num_themes:
        tags = tuple(sorted(rng.choice(num_tags, size=_TAGS_PER_THEME, replace=False).tolist()))
        if tags not in seen:
            seen.add(tags)
            themes.append(tags)
    theme_tags = np.array(themes, dtype=np.int64)  # [G, 3]
    home_category = rng.integers(0, num_categories, size=num_themes)  # [G]
    return theme_tags, home_category


def _max_distinct_themes(num_tags):
    return num_tags * (num_tags - 1) * (num_tags - 2) // 6


def _draw_items(rng, num_items, num_tags, num_categories, theme_tags, home_category,
                popularity_exponent):
    """R2, R3: category, tag sets, price band and popularity weight of each item."""
    num_themes = len(theme_tags)
    item_category = np.empty(num_items, dtype=np.int64)
    item_tags = []
    for item in range(num_items):
        if rng.random() < _THEME_ITEM_SHARE:
            theme = int(rng.integers(num_themes))
            keep = 3 if rng.random() < _FULL_THEME_PROB else 2
            tags = rng.choice(theme_tags[theme], size=keep, replace=False).tolist()
            if rng.random() < _EXTRA_TAG_PROB:
                extra = int(rng.integers(num_tags))
                if extra not in tags:
                    tags.append(extra)
            if rng.random() < _HOME_CATEGORY_PROB:
                item_category[item] = home_category[theme]
            else:
                item_category[item] = rng.integers(num_categories)
        else:
            count = 1 if rng.random() < 0.5 else 2
            tags = rng.choice(num_tags, size=count, replace=False).tolist()
            item_category[item] = rng.integers(num_categories)
        item_tags.append(sorted(int(t) for t in tags))
    tag_matrix = np.zeros((num_items, num_tags), dtype=bool)  # [I, T]
    for item, tags in enumerate(item_tags):
        tag_matrix[item, tags] = True
    category_price = rng.integers(0, len(PRICE_BANDS), size=num_categories)
    price_shift = rng.choice(np.array([-1, 0, 1]), size=num_items, p=[0.25, 0.5, 0.25])
    price_band = np.clip(category_price[item_category] + price_shift, 0, len(PRICE_BANDS) - 1)
    ranks = rng.permutation(num_items)
    popularity = (1.0 + ranks) ** (-popularity_exponent)  # [I]
    return item_category, item_tags, tag_matrix, price_band, popularity


def _draw_successor(rng, num_categories):
    """R6: a random permutation of the categories without fixed points."""
    while True:
        successor = rng.permutation(num_categories)
        if not np.any(successor == np.arange(num_categories)):
            return successor


def _draw_cross_table(rng, num_categories):
    """R5: cross[region, age_band, category], at least one category per (region, age_band)."""
    table = rng.random((len(REGIONS), len(AGE_BANDS), num_categories)) < _CROSS_DENSITY
    for region in range(len(REGIONS)):
        for age in range(len(AGE_BANDS)):
            if not table[region, age].any():
                table[region, age, rng.integers(num_categories)] = True
    return table


def _draw_user_themes(uniform, theme_tag_sets):
    """R4: 2-4 themes without a shared tag (theme_tag_sets: list of frozensets of tags)."""
    draw, wanted = uniform(), 2
    for probability in _INTEREST_COUNT_PROBS[:-1]:
        if draw < probability:
            break
        draw -= probability
        wanted += 1
    num_themes = len(theme_tag_sets)
    chosen, used_tags = [], set()
    for _ in range(50 * wanted):
        theme = int(uniform() * num_themes)
        if used_tags.isdisjoint(theme_tag_sets[theme]):
            chosen.append(theme)
            used_tags |= theme_tag_sets[theme]
            if len(chosen) == wanted:
                break
    return np.array(sorted(chosen), dtype=np.int64)


def simulate_demo(num_users=5000, num_items=2000, seed=2023, num_categories=20, num_tags=50,
                  num_themes=120, min_interactions=20, max_interactions=60, p_seq=0.35,
                  p_interest=0.4, p_cross=0.15, liked_boost=6.0, popularity_exponent=0.4):
    """Draw the demo tables in memory (see the module docstring for the rules).

    Args:
        num_users: number of users (>= 1).
        num_items: number of items (>= max_interactions, so no user runs out of items).
        seed: seed of the single numpy Generator; same arguments -> same tables.
        num_categories: number of item categories (>= 2).
        num_tags: size of the tag vocabulary (>= 3).
        num_themes: number of 3-tag themes, the interest clusters (>= 2).
        min_interactions: fewest interactions of a user (>= 2).
        max_interactions: most interactions of a user (>= min_interactions).
        p_seq: probability of a sequential step (R8).
        p_interest: probability of an interest step (R8).
        p_cross: probability of a region x age_band cross step (R8); the rest is noise.
        liked_boost: extra weight of liked items in seq and cross steps (>= 0).
        popularity_exponent: skew of the base popularity pop_i (>= 0).

    Returns:
        (users, items, interactions, latent): three DataFrames in file order and a DemoLatent.
    """
    _check_int("num_users", num_users, 1)
    _check_int("num_categories", num_categories, 2)
    _check_int("num_tags", num_tags, _TAGS_PER_THEME)
    _check_int("num_themes", num_themes, 2)
    _check_int("min_interactions", min_interactions, 2)
    _check_int("max_interactions", max_interactions, min_interactions)
    _check_int("num_items", num_items, max_interactions)
    _check_int("seed", seed, 0)
    for name, value in (("p_seq", p_seq), ("p_interest", p_interest), ("p_cross", p_cross)):
        _check_prob(name, value)
    if p_seq + p_interest + p_cross > 1.0 + 1e-9:
        raise ValueError(f"p_seq + p_interest + p_cross = {p_seq + p_interest + p_cross}: expected <= 1")
    for name, value in (("liked_boost", liked_boost), ("popularity_exponent", popularity_exponent)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}={value!r}: expected a number >= 0")

    rng = np.random.default_rng(seed)
    theme_tags, home_category = _draw_themes(rng, num_themes, num_tags, num_categories)
    item_category, item_tags, tag_matrix, price_band, popularity = _draw_items(
        rng, num_items, num_tags, num_categories, theme_tags, home_category, popularity_exponent)
    successor = _draw_successor(rng, num_categories)
    cross_table = _draw_cross_table(rng, num_categories)

    # Items matching each theme: >= 2 of its 3 tags (R4).
    theme_indicator = np.zeros((num_tags, num_themes), dtype=np.int32)  # [T, G]
    theme_indicator[theme_tags, np.arange(num_themes)[:, None]] = 1
    match_counts = tag_matrix.astype(np.int32) @ theme_indicator  # [I, G]
    theme_items = [np.flatnonzero(match_counts[:, g] >= _MIN_TAG_MATCH) for g in range(num_themes)]
    category_items = [np.flatnonzero(item_category == c) for c in range(num_categories)]

    user_region = rng.integers(0, len(REGIONS), size=num_users)
    user_age = rng.integers(0, len(AGE_BANDS), size=num_users)
    activity = np.round(rng.beta(2.0, 2.0, size=num_users), 4)
    activity = np.clip(activity, 1e-4, 1 - 1e-4)
    span = max_interactions - min_interactions
    lengths = np.clip(np.rint(min_interactions + span * activity + rng.normal(0.0, 2.0, size=num_users)),
                      min_interactions, max_interactions).astype(np.int64)

    step_probs = np.clip(np.array([p_seq, p_interest, p_cross, 1.0 - p_seq - p_interest - p_cross]), 0, None)
    first_probs = step_probs.copy()
    first_probs[0] = 0.0
    if first_probs.sum() <= 0:
        first_probs[3] = 1.0
    # Cumulative thresholds of the step kinds 0..3 without the last one (bisect -> kind).
    step_cum = np.cumsum(step_probs / step_probs.sum())[:3].tolist()
    first_cum = np.cumsum(first_probs / first_probs.sum())[:3].tolist()
    theme_item_lists = [items_of_theme.tolist() for items_of_theme in theme_items]
    item_category_list = item_category.tolist()
    successor_list = successor.tolist()

    uniform = _uniform_stream(rng).__next__
    sampler = _StepSampler(uniform, popularity, category_items, liked_boost)
    theme_tag_sets = [frozenset(tags) for tags in theme_tags.tolist()]
    user_themes = []
    sequences = []
    for user in range(num_users):
        themes = _draw_user_themes(uniform, theme_tag_sets)
        user_themes.append(themes)
        cross_mask = cross_table[user_region[user], user_age[user]]  # [C] bool
        cross_categories = np.flatnonzero(cross_mask).tolist()
        liked = cross_mask[item_category]  # [I] bool
        for theme in themes:
            liked[theme_items[theme]] = True
        theme_lists = [theme_item_lists[theme] for theme in themes]
        sampler.start_user(liked)
        seen = sampler.seen
        sequence = []
        previous = -1
        for step in range(int(lengths[user])):
            kind = bisect.bisect_right(first_cum if step == 0 else step_cum, uniform())
            item = -1
            if kind == 0:  # seq: successor (or same) category of the previous item
                category = item_category_list[previous]
                if uniform() >= _SAME_CATEGORY_PROB:
                    category = successor_list[category]
                item = sampler.pick_in_category(category)
            elif kind == 1:  # interest: OR over the user's themes
                item = sampler.pick_uniform(theme_lists[int(uniform() * len(theme_lists))])
            elif kind == 2:  # cross: a category liked by this region x age_band
                item = sampler.pick_in_category(cross_categories[int(uniform() * len(cross_categories))])
            if item < 0:  # noise, or fallback of an exhausted component
                item = sampler.pick_popular()
            seen[item] = 1
            sequence.append(item)
            previous = item
        sequences.append(sequence)

    starts = START_TIMESTAMP + rng.integers(0, _START_SPREAD_SECONDS, size=num_users)
    total = int(lengths.sum())
    gaps = _GAP_SECONDS_MIN + np.floor(rng.exponential(_GAP_SECONDS_MEAN, size=total)).astype(np.int64)
    user_of_row = np.repeat(np.arange(num_users), lengths)
    first_row = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    gaps[first_row] = 0
    cumulative_gaps = np.cumsum(gaps)
    timestamps = starts[user_of_row] + cumulative_gaps - cumulative_gaps[first_row][user_of_row]

    user_ids = _id_strings("u", num_users)
    item_ids = _id_strings("i", num_items)
    category_names = np.array([f"c{c:02d}" for c in range(num_categories)], dtype=object)
    tag_width = max(2, len(str(num_tags - 1)))
    tag_names = [f"t{t:0{tag_width}d}" for t in range(num_tags)]

    users = pd.DataFrame({
        "user_id": user_ids,
        "age_band": np.array(AGE_BANDS, dtype=object)[user_age],
        "region": np.array(REGIONS, dtype=object)[user_region],
        "activity": activity,
    })
    items = pd.DataFrame({
        "item_id": item_ids,
        "category": category_names[item_category],
        "tags": [TAG_SEPARATOR.join(tag_names[t] for t in tags) for tags in item_tags],
        "price_band": np.array(PRICE_BANDS, dtype=object)[price_band],
    })
    flat_items = np.fromiter((i for seq in sequences for i in seq), dtype=np.int64, count=total)
    interactions = pd.DataFrame({
        "user_id": user_ids[user_of_row],
        "item_id": item_ids[flat_items],
        "timestamp": timestamps.astype(np.int64),
    })
    latent = DemoLatent(theme_tags=theme_tags, theme_home_category=home_category,
                        item_category=item_category, item_tag_matrix=tag_matrix,
                        item_popularity=popularity, theme_items=theme_items, user_themes=user_themes,
                        cross_table=cross_table, successor=successor, user_region=user_region,
                        user_age_band=user_age)
    return users, items, interactions, latent


def _write_csvs_atomic(frames_by_path):
    """Write each DataFrame to a temporary name, then rename all of them into place.

    The renames happen only after every file is complete, in the given order (interactions
    last), so a reader never sees a half-written file and an interrupted run leaves at most
    the temporary files' names behind, which are removed here.
    """
    temp_paths = {path: f"{path}.tmp-{os.getpid()}" for path in frames_by_path}
    try:
        for path, frame in frames_by_path.items():
            frame.to_csv(temp_paths[path], index=False, float_format=_FLOAT_FORMAT, lineterminator="\n")
        for path, temp_path in temp_paths.items():
            os.replace(temp_path, path)
    finally:
        for temp_path in temp_paths.values():
            if os.path.exists(temp_path):
                os.remove(temp_path)


def demo_paths(out_dir):
    """{"users": ..., "items": ..., "interactions": ...} paths of the demo files in out_dir."""
    return {name[:-len(".csv")]: os.path.join(out_dir, name) for name in DEMO_FILES}


def generate_demo(out_dir, num_users=5000, num_items=2000, seed=2023, **options):
    """Generate the demo dataset into out_dir (created if needed), overwriting the three files.

    The three files are written to temporary names first and renamed into place only when all
    are complete, so no reader sees a half-written file.

    Args:
        out_dir: folder to write users.csv, items.csv and interactions.csv into.
        num_users: number of users.
        num_items: number of items.
        seed: random seed; the same arguments always give byte-identical files.
        **options: further keyword arguments of `simulate_demo` (num_categories, num_tags,
            num_themes, min_interactions, max_interactions, p_seq, p_interest, p_cross,
            liked_boost, popularity_exponent).

    Returns:
        dict with keys "users", "items", "interactions" mapping to the written paths.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f"out_dir={out_dir!r}: expected a non-empty folder path")
    users, items, interactions, _ = simulate_demo(num_users=num_users, num_items=num_items,
                                                  seed=seed, **options)
    os.makedirs(out_dir, exist_ok=True)
    paths = demo_paths(out_dir)
    _write_csvs_atomic({paths["users"]: users, paths["items"]: items,
                        paths["interactions"]: interactions})
    return paths


def ensure_demo(raw_dir, **kwargs):
    """Generate the demo dataset into raw_dir unless it is already there, made by this generator.

    Next to the three files, `generator.json` records `DEMO_GENERATOR_VERSION` and the arguments.
    The files are kept when all three exist and the stamp matches; they are regenerated when one
    is missing, or when the stamp is missing or differs (a folder made by an older generator or
    with other arguments), so a stale `data/demo/raw` never survives an upgrade.

    Args:
        raw_dir: folder of the raw demo files.
        **kwargs: arguments of `generate_demo` used when generating.

    Returns:
        dict with keys "users", "items", "interactions" mapping to the paths.
    """
    if not isinstance(raw_dir, (str, os.PathLike)) or not str(raw_dir):
        raise ValueError(f"raw_dir={raw_dir!r}: expected a non-empty folder path")
    paths = demo_paths(raw_dir)
    stamp_path = os.path.join(raw_dir, DEMO_STAMP_FILE)
    stamp = {"generator_version": DEMO_GENERATOR_VERSION, "arguments": {k: kwargs[k] for k in sorted(kwargs)}}
    if all(os.path.isfile(p) for p in paths.values()) and _read_stamp(stamp_path) == stamp:
        return paths
    paths = generate_demo(raw_dir, **kwargs)
    tmp = f"{stamp_path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        json.dump(stamp, fd, indent=1, sort_keys=True)
    os.replace(tmp, stamp_path)
    return paths


def _read_stamp(path):
    """The JSON stamp at path, or None if it is missing or unreadable (then: regenerate)."""
    try:
        with open(path) as fd:
            return json.load(fd)
    except (OSError, ValueError):
        return None
