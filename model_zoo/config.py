"""Experiment configuration: FuxiCTR-style YAML folders, parsed once into typed sections.

A config folder holds `dataset_config.yaml` (one entry per dataset_id) and
`model_config/*.yaml` (a `Base` entry plus one entry per expid). `load_experiment(config_dir, expid)`
reads the expid, its `Base` and its dataset entry, checks every key against `KEY_TABLE` (type, range,
choices, and the keys that depend on each other) and returns an `ExperimentConfig` with three frozen
sections, `DatasetConfig`, `TrainingConfig` and `ServingConfig`, plus the model keys as written. This
happens before any data is built, and code downstream takes the values as they are.

Every error is a ConfigError naming the YAML file, the expid (and dataset_id), the key, the bad value and
what the key accepts, e.g. a float written as `1e-3` (PyYAML reads it as a string) gets that hint.
A key of an expid that is neither a dataset, training nor serving key is a model key; `check_model_keys`
checks those against the constructor keywords of the model class (the caller passes the class: this
module imports nothing of the models).

`KEY_TABLE` is also the source of the README's configuration reference:
`python -m model_zoo.config --reference` prints it, `--write-readme README.md` replaces the part of
README.md between the `config-reference` markers.
"""
import argparse
import dataclasses
import difflib
import glob
import inspect
import math
import os
import re
import sys
import typing

import yaml

from .errors import ConfigError

DATASET, TRAINING, SERVING = "dataset", "training", "serving"
SECTIONS = (DATASET, TRAINING, SERVING)

# Values of the keys that take one of a few names. The modules implementing them use these tuples.
DATA_SOURCES = ("csv", "demo", "movielens", "recbole", "deezer", "bars", "pairs")   # data/sources.py
FEATURE_TYPES = ("categorical", "numeric", "sequence", "embedding")               # data/feature_processor.py
FEATURE_SIDES = ("user", "item")
FEATURE_DTYPES = ("str", "int", "float")
TRAIN_HISTORIES = ("past", "user_sample")                                          # data/pipeline.py
PRECISION_DENOMINATORS = ("k", "min_gt_k")                                         # retrieval/metrics.py
NEGATIVE_SAMPLERS = ("uniform", "popularity", "in_batch")                          # data/samplers.py
HISTORY_FEATURES = ("id", "item")                                                  # layers/field_embedding.py
MONITOR_MODES = ("max", "min")
SCORE_DTYPES = ("float16", "float32")                                              # retrieval/sparse_index.py
UNSEEN_KEY_POLICIES = ("nearest", "skip", "score")                                 # retrieval/sparse_index.py

# libyaml's parser when PyYAML was built with it: the same values as yaml.safe_load, several times faster
# (the tuner loads every generated expid).
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
FLOAT_HINT = " (write floats as 1.e-3: PyYAML reads 1e-3 as a string)"
README_START, README_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


# ---- what a key accepts ------------------------------------------------------------------------------
class Rejected(Exception):
    """A value its key does not accept: `expected` says what it takes; `part` locates the bad element
    inside a list or mapping value (e.g. "[2].type") and `value` is that element."""

    def __init__(self, expected, part="", value=None):
        super().__init__(expected)
        self.expected, self.part, self.value = expected, part, value


class Accepts:
    """The values of one key. `text` reads in 'expected <text>' and in the reference's table;
    calling it returns the value to use (ints as int, numbers as float) or raises Rejected.
    `annotation` is the type of that value (the field type of the section dataclass)."""
    text = ""
    annotation = object
    numeric = False          # a string value gets the `1.e-3` hint

    def __call__(self, value):
        raise NotImplementedError


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Int(Accepts):
    annotation = int
    numeric = True

    def __init__(self, at_least=None):
        self.at_least = at_least
        self.text = "an int" if at_least is None else f"an int >= {at_least}"

    def __call__(self, value):
        if not _is_number(value) or not float(value).is_integer():
            raise Rejected(self.text)
        if self.at_least is not None and value < self.at_least:
            raise Rejected(self.text)
        return int(value)


class Real(Accepts):
    """A finite number, optionally bounded: `above` < value, `at_least` <= value, value < `below`.
    `as_float=False` keeps an int as written (e.g. a rating threshold of 4)."""
    numeric = True

    def __init__(self, above=None, at_least=None, below=None, as_float=True):
        self.above, self.at_least, self.below, self.as_float = above, at_least, below, as_float
        self.annotation = float if as_float else typing.Union[int, float]
        bounds = [f"{sign} {bound}" for sign, bound in ((">", above), (">=", at_least), ("<", below))
                  if bound is not None]
        if above is not None and below is not None and at_least is None:
            self.text = f"a number in ({above}, {below})"
        else:
            self.text = "a number " + " and ".join(bounds) if bounds else "a finite number"

    def __call__(self, value):
        if not _is_number(value):
            raise Rejected(self.text)
        if ((self.above is not None and not value > self.above)
                or (self.at_least is not None and not value >= self.at_least)
                or (self.below is not None and not value < self.below)):
            raise Rejected(self.text)
        return float(value) if self.as_float else value


def Fraction():
    """A share strictly between 0 and 1."""
    return Real(above=0, below=1)


class Bool(Accepts):
    text = "true or false"
    annotation = bool

    def __call__(self, value):
        if not isinstance(value, bool):
            raise Rejected(self.text)
        return value


class Text(Accepts):
    text = "a non-empty string"
    annotation = str

    def __call__(self, value):
        if not isinstance(value, str) or not value:
            raise Rejected(self.text)
        return value


class OneOf(Accepts):
    annotation = str

    def __init__(self, choices):
        self.choices = tuple(choices)
        self.text = "one of " + ", ".join(self.choices)

    def __call__(self, value):
        if not isinstance(value, str) or value not in self.choices:
            raise Rejected(self.text)
        return value


class Nullable(Accepts):
    """null, or what `inner` accepts."""

    def __init__(self, inner):
        self.inner = inner
        self.numeric = inner.numeric
        self.annotation = typing.Optional[inner.annotation]
        self.text = f"null or {inner.text}"

    def __call__(self, value):
        if value is None:
            return None
        try:
            return self.inner(value)
        except Rejected as exc:
            raise Rejected(f"null or {exc.expected}" if not exc.part else exc.expected, exc.part, exc.value) from None


class Optimizer(Accepts):
    """What FuxiCTR's get_optimizer takes: `adam` (any case) or the name of a torch.optim class."""
    text = "adam or a torch.optim optimizer class name (SGD, Adagrad, RMSprop, ...)"
    annotation = str

    def __call__(self, value):
        import torch.optim      # torch is loaded with the models anyway; not needed to import this module
        if isinstance(value, str) and value.lower() == "adam":
            return value
        optimizer = getattr(torch.optim, value, None) if isinstance(value, str) else None
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise Rejected(self.text)
        return value


class MetricNames(Accepts):
    """A non-empty list of FuxiCTR metric names such as `Recall(k=20)`; returned as a tuple."""
    annotation = tuple

    @property
    def text(self):
        from .retrieval.metrics import KNOWN_METRICS   # the metric library owns the names; loaded when used
        return f"a list of metric names like Recall(k=20): one of {', '.join(KNOWN_METRICS)} with a cutoff k >= 1"

    def __call__(self, value):
        from .retrieval.metrics import KNOWN_METRICS, parse_metric_name
        if not isinstance(value, (list, tuple)) or not value:
            raise Rejected(self.text)
        for position, name in enumerate(value):
            try:
                metric, _ = parse_metric_name(name)
            except ValueError:
                raise Rejected(self.text, f"[{position}]", name) from None
            if metric not in KNOWN_METRICS:
                raise Rejected(f"one of {', '.join(KNOWN_METRICS)} (with its cutoff k)", f"[{position}]", name)
        return tuple(value)


class SplitRatios(Accepts):
    text = "three numbers in (0, 1) summing to 1 (train, valid, test)"
    annotation = tuple
    numeric = True

    def __call__(self, value):
        shares = value if isinstance(value, (list, tuple)) and len(value) == 3 else None
        if shares is None or not all(_is_number(v) and 0 < v < 1 for v in shares) or abs(sum(shares) - 1.0) > 1e-6:
            raise Rejected(self.text)
        return tuple(float(v) for v in value)


class FeatureColumns(Accepts):
    """FuxiCTR feature specs: `name` (or a list of names), `type`, `source` and optionally `dtype`; the
    other spec keys (normalizer, max_len, pretrain_dim, ...) go to FuxiCTR as written."""
    text = (f"a list of feature specs with name (or a list of names), type ({', '.join(FEATURE_TYPES)}), "
            f"source ({', '.join(FEATURE_SIDES)}) and optional dtype ({', '.join(FEATURE_DTYPES)})")
    annotation = tuple

    def __call__(self, value):
        if not isinstance(value, (list, tuple)):
            raise Rejected(self.text)
        specs = []
        for position, spec in enumerate(value):
            where = f"[{position}]"
            if not isinstance(spec, dict):
                raise Rejected("a mapping with name, type and source", where, spec)
            for field in ("name", "type", "source"):
                if field not in spec:
                    raise Rejected(f"a mapping with name, type and source (no {field!r})", where, spec)
            names = spec["name"] if isinstance(spec["name"], (list, tuple)) else [spec["name"]]
            if not names or not all(isinstance(n, str) and n for n in names):
                raise Rejected("a column name or a non-empty list of column names", f"{where}.name", spec["name"])
            for field, choices in (("type", FEATURE_TYPES), ("source", FEATURE_SIDES), ("dtype", FEATURE_DTYPES)):
                if field in spec and spec[field] not in choices:
                    raise Rejected("one of " + ", ".join(choices), f"{where}.{field}", spec[field])
            specs.append(dict(spec))
        return tuple(specs)


class Mapping(Accepts):
    """A mapping from names to `values` (an Accepts); `text` describes it."""
    annotation = dict

    def __init__(self, text, values):
        self.text, self.values = text, values

    def __call__(self, value):
        if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
            raise Rejected(self.text)
        checked = {}
        for name, item in value.items():
            try:
                checked[name] = self.values(item)
            except Rejected as exc:
                raise Rejected(exc.expected, f".{name}{exc.part}", item if not exc.part else exc.value) from None
        return checked


class _ArgumentsOrNull(Accepts):
    text = "a mapping of arguments or null"
    annotation = typing.Optional[dict]

    def __call__(self, value):
        if value is not None and not isinstance(value, dict):
            raise Rejected(self.text)
        return value


# ---- the key table -----------------------------------------------------------------------------------
class _Given:
    """A default that is not a value: the key is required, or set by the loader."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


REQUIRED = _Given("required")
FROM_EXPID = _Given("the expid")


@dataclasses.dataclass(frozen=True)
class Key:
    """One configuration key: its section, default, accepted values and a one-line description."""
    name: str
    section: str
    default: object
    accepts: Accepts
    doc: str


KEY_TABLE = (
    # dataset keys: config/dataset_config.yaml, under a dataset_id (an expid may override them)
    Key("dataset_id", DATASET, REQUIRED, Text(), "the entry of dataset_config.yaml the expid uses"),
    Key("data_root", DATASET, "./data/", Text(), "built datasets go to `<data_root>/<dataset_id>/`"),
    Key("source", DATASET, "csv", OneOf(DATA_SOURCES), "how the raw files are read (model_zoo/data/sources.py)"),
    Key("raw_dir", DATASET, None, Nullable(Text()), "folder of the raw files; null = `<data_root>/<dataset_id>/raw`"),
    Key("release", DATASET, None, Nullable(Text()),
        "official release that `python -m model_zoo.data.download <release>` fetches; null = none"),
    Key("files", DATASET, None, Nullable(Mapping("a mapping role -> file name", Text())),
        "{role: file name} replacing the source's default raw file names"),
    Key("demo_num_users", DATASET, 5000, Int(at_least=1), "users the `demo` source generates"),
    Key("demo_num_items", DATASET, 2000, Int(at_least=60), "items the `demo` source generates"),
    Key("rating_col", DATASET, "rating", Text(), "rating column of the interactions"),
    Key("rating_threshold", DATASET, None, Nullable(Real(at_least=0, as_float=False)),
        "keep interactions rated >= this; null = the source's default (movielens: 4); 0 = keep all"),
    Key("valid_fraction", DATASET, None, Nullable(Fraction()),
        "given splits without a validation file: null = validate on test (BARS), else this share of the "
        "training users get their last items held out for validation"),
    Key("train_user_table", DATASET, False, Bool(),
        "train.h5 holds user_row + item_index and the user features sit once per user in users.h5 "
        "(Deezer at full scale)"),
    Key("feature_cols", DATASET, (), FeatureColumns(),
        "side features (FuxiCTR specs); the item id and the history feature hist_item_id are added"),
    Key("user_id_col", DATASET, "user_id", Text(), "user id column of the raw files"),
    Key("item_id_col", DATASET, "item_id", Text(), "item id column of the raw files"),
    Key("time_col", DATASET, "timestamp", Text(), "time column ordering a user's interactions"),
    Key("split_ratios", DATASET, (0.8, 0.1, 0.1), SplitRatios(),
        "shares of the users in train, valid and test (sequential sources)"),
    Key("history_ratio", DATASET, 0.8, Fraction(),
        "share of a held-out user's interactions (in time order) given as history; the rest is the ground truth"),
    Key("max_len", DATASET, 20, Int(at_least=1), "length of the history sequence fed to the model"),
    Key("min_history", DATASET, 1, Int(at_least=0),
        "a training target needs this many earlier items (0 also keeps each user's first item)"),
    Key("train_history", DATASET, "past", OneOf(TRAIN_HISTORIES),
        "past: a training row's history is the max_len items before its target; user_sample: a fresh random "
        "sample of the user's other training items (time order) every epoch"),
    Key("split_seed", DATASET, 2023, Int(at_least=0), "seed of the user split"),
    Key("min_user_interactions", DATASET, 2, Int(at_least=1), "users with fewer interactions are dropped"),
    Key("precision_denominator", DATASET, "k", OneOf(PRECISION_DENOMINATORS),
        "Precision@k = hits / k, or hits / min(|ground truth|, k) with min_gt_k (the Deezer protocol)"),

    # training keys: an expid or Base of config/model_config/*.yaml
    Key("model", TRAINING, REQUIRED, Text(), "model class name (`python -c \"import model_zoo; "
                                             "print(model_zoo.list_models())\"`)"),
    Key("model_id", TRAINING, FROM_EXPID, Text(), "set to the expid; names the checkpoint and the result files"),
    Key("seed", TRAINING, 2023, Int(at_least=0), "seed of the run (initialisation, shuffling, negative sampling)"),
    Key("epochs", TRAINING, 10, Int(at_least=1), "maximum number of training epochs"),
    Key("batch_size", TRAINING, 256, Int(at_least=1), "training rows per optimizer step"),
    Key("eval_batch_size", TRAINING, 512, Int(at_least=1), "users ranked at once at evaluation"),
    Key("learning_rate", TRAINING, 1.e-3, Real(above=0), "learning rate of the optimizer"),
    Key("optimizer", TRAINING, "adam", Optimizer(), "optimizer, by its FuxiCTR / torch.optim name"),
    Key("temperature", TRAINING, 1.0, Real(above=0), "the sampled softmax divides the logits by it"),
    Key("num_negatives", TRAINING, 100, Int(at_least=1), "negatives drawn per batch (uniform, popularity)"),
    Key("negative_sampler", TRAINING, "uniform", OneOf(NEGATIVE_SAMPLERS),
        "uniform, popularity (count ** sampler_alpha) or in_batch (the batch's positives, logQ-corrected)"),
    Key("sampler_alpha", TRAINING, 0.75, Real(at_least=0), "exponent of the popularity sampler"),
    Key("embedding_dim", TRAINING, 64, Int(at_least=1), "width of the feature embeddings (every model but Popularity)"),
    Key("embedding_init_std", TRAINING, 1.e-4, Real(above=0),
        "standard deviation of the normal initialiser of the feature embeddings"),
    Key("history_features", TRAINING, "id", OneOf(HISTORY_FEATURES),
        "id: a history position is its item id embedding; item: the mean of the item's field embeddings"),
    Key("embedding_regularizer", TRAINING, 0.0, Real(at_least=0), "L2 weight on the feature embeddings (0 = off)"),
    Key("net_regularizer", TRAINING, 0.0, Real(at_least=0), "L2 weight on the other parameters (0 = off)"),
    Key("metrics", TRAINING, ("Recall(k=20)", "Recall(k=50)", "NDCG(k=20)", "NDCG(k=50)", "HitRate(k=20)",
                              "HitRate(k=50)", "Precision(k=20)", "Precision(k=50)"), MetricNames(),
        "metrics of the full-ranking evaluation"),
    Key("monitor", TRAINING, "Recall(k=20)", Text(),
        "metric (one of metrics) on the validation users for early stopping and the best checkpoint"),
    Key("monitor_mode", TRAINING, "max", OneOf(MONITOR_MODES), "whether a larger or a smaller monitor is better"),
    Key("early_stop_patience", TRAINING, 2, Int(at_least=1), "epochs without improvement before training stops"),
    Key("max_steps_per_epoch", TRAINING, None, Nullable(Int(at_least=1)),
        "cap on the training steps of an epoch; null = the whole training split"),
    Key("eval_max_users", TRAINING, None, Nullable(Int(at_least=1)),
        "evaluate a random sample of this many users per split; null = every user"),
    Key("model_root", TRAINING, "./checkpoints/", Text(),
        "checkpoints, logs and result JSON go to `<model_root>/<dataset_id>/`"),
    Key("num_threads", TRAINING, None, Nullable(Int(at_least=1)),
        "CPU threads of torch and faiss; null = their default"),
    Key("verbose", TRAINING, 1, Int(at_least=0), "0 hides the progress bars"),
    Key("gpu", TRAINING, -1, Int(at_least=-1), "GPU index, -1 = CPU (`run_expid.py --gpu` sets it)"),
    Key("callbacks", TRAINING, None, Nullable(Mapping("a mapping callback name -> arguments", _ArgumentsOrNull())),
        "Trainer callbacks {name: {argument: value}}, merged over the model's defaults "
        "(model_zoo/engine/callbacks.py)"),

    # serving keys: an expid or Base; read after training
    Key("serve", SERVING, True, Bool(),
        "after training, serve the model: SparCode's sparse index, the two-tower models' faiss indexes, "
        "TDM's beam search"),
    Key("sparsity_bias", SERVING, None, Nullable(Real()),
        "b~ of Eq. 15; null = the trained b (unless target_sparsity is set)"),
    Key("target_sparsity", SERVING, None, Nullable(Fraction()),
        "choose b~ so that this share of the (key, item) scores is dropped, e.g. 0.99"),
    Key("index_top_l", SERVING, None, Nullable(Int(at_least=1)),
        "keep at most L items per key; null = every positive score"),
    Key("index_max_keys", SERVING, 1_000_000, Int(at_least=1),
        "index all N^M keys if N^M <= this, else the keys seen on the training users"),
    Key("index_score_dtype", SERVING, "float32", OneOf(SCORE_DTYPES), "precision of the posting scores"),
    Key("unseen_key", SERVING, "nearest", OneOf(UNSEEN_KEY_POLICIES),
        "a query key missing from the index: use the nearest indexed key, skip it, or score it with the model"),
    Key("faiss_nlist", SERVING, None, Nullable(Int(at_least=1)), "IVFPQ cells; null = round(4 * sqrt(items))"),
    Key("faiss_m", SERVING, 8, Int(at_least=1), "IVFPQ sub-quantizers"),
    Key("faiss_nprobe", SERVING, 16, Int(at_least=1), "IVFPQ cells visited per query"),
    Key("hnsw_m", SERVING, 32, Int(at_least=1), "HNSW graph degree"),
    Key("hnsw_ef_search", SERVING, 128, Int(at_least=1), "HNSW search beam width"),
    Key("beam_size", SERVING, None, Nullable(Int(at_least=1)),
        "TDM: nodes kept per tree level by the beam search; null = the largest metric cutoff k"),
)
KEYS = {key.name: key for key in KEY_TABLE}
INTERNAL_KEYS = ("_config_file", "_dataset_config_file")    # set by the loader: the files a config came from


def _defaults(*sections):
    return {k.name: (None if isinstance(k.default, _Given) else k.default) for k in KEY_TABLE if k.section in sections}


DATASET_DEFAULTS = _defaults(DATASET)
SERVING_DEFAULTS = _defaults(SERVING)
# The keys an expid or Base sets besides dataset and model keys: the training and the serving section
# (model_zoo/base.py reads them under this name).
TRAINING_DEFAULTS = _defaults(TRAINING, SERVING)
DEFAULTS = _defaults(*SECTIONS)
# Keys of the merged config that are not model hyperparameters; a model takes them as **kwargs and ignores them.
NON_MODEL_KEYS = frozenset(KEYS) | frozenset(INTERNAL_KEYS)


def _section_class(name, section, doc):
    fields = [(k.name, k.accepts.annotation) for k in KEY_TABLE if k.section == section]
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__, cls.__doc__ = __name__, doc
    return cls


DatasetConfig = _section_class("DatasetConfig", DATASET, "The dataset keys of an expid, checked (KEY_TABLE).")
TrainingConfig = _section_class("TrainingConfig", TRAINING, "The training keys of an expid, checked (KEY_TABLE).")
ServingConfig = _section_class("ServingConfig", SERVING, "The serving keys of an expid, checked (KEY_TABLE).")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One expid, parsed and checked.

    Attributes:
        expid: the experiment id.
        dataset, training, serving: the typed sections.
        model_params: the model keys (neither dataset, training nor serving keys) as written.
        config_file: the model_config YAML that defines the expid.
        dataset_config_file: the dataset_config YAML that defines its dataset_id.
        params: everything as one flat dict (FuxiCTR's convention): the models are built as
            `model_cls(feature_map, **params)` and the data pipeline reads `params[...]`.
        key_files: key -> the YAML file it was written in (keys left at their default are absent).
    """
    expid: str
    dataset: DatasetConfig
    training: TrainingConfig
    serving: ServingConfig
    model_params: dict
    config_file: str
    dataset_config_file: str
    params: dict
    key_files: dict

    @property
    def model(self):
        """The model class name (the `model:` key)."""
        return self.training.model


# ---- reading the YAML files --------------------------------------------------------------------------
def _read_yaml(path):
    try:
        with open(path, "r", encoding="utf-8") as fd:
            content = yaml.load(fd, Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of ids to settings, got {type(content).__name__}")
    return content


def _entry(content, name, path):
    entry = content[name]
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: {name} must be a mapping of keys to values, got {entry!r}")
    return dict(entry)


def _model_config_files(config_dir):
    files = sorted(glob.glob(os.path.join(config_dir, "model_config.yaml")))
    files += sorted(glob.glob(os.path.join(config_dir, "model_config", "*.yaml")))
    if not files:
        raise ConfigError(f"{config_dir}: no model_config.yaml or model_config/*.yaml found")
    return files


def list_expids(config_dir):
    """All expids defined in `config_dir/model_config/*.yaml` (without `Base`)."""
    expids = []
    for path in _model_config_files(config_dir):
        expids += [k for k in _read_yaml(path) if k != "Base"]
    return sorted(expids)


def _read_model_entry(config_dir, expid):
    """(Base merged with the expid's entry, {key: file it was written in}, the expid's file)."""
    base, base_file, found, where = {}, None, None, None
    for path in _model_config_files(config_dir):
        content = _read_yaml(path)
        if "Base" in content:
            base, base_file = _entry(content, "Base", path), path
        if expid in content:
            if found is not None:
                raise ConfigError(f"expid={expid} is defined twice: in {where} and {path}")
            found, where = _entry(content, expid, path), path
    if found is None:
        known = list_expids(config_dir)
        raise ConfigError(f"expid={expid} is not defined in {config_dir}/model_config; "
                          f"known expids: {', '.join(known)}")
    key_files = {key: base_file for key in base}
    key_files.update({key: where for key in found})
    merged = dict(base)
    merged.update(found)
    for key in ("dataset_id", "model"):
        if key not in merged:
            raise ConfigError(f"{where}: expid={expid} has no {key}")
    return merged, key_files, where


def load_model_config(config_dir, expid):
    """`Base` merged with the expid's entry, as written, plus `model_id` and `_config_file`.

    Raises ConfigError naming the files searched (unknown expid) or the file (no dataset_id / model).
    """
    params, _, where = _read_model_entry(config_dir, expid)
    params["model_id"] = expid
    params["_config_file"] = where
    return params


def check_dataset_keys(entry, where):
    """ConfigError naming `where` (file and dataset_id) if the dataset entry has a key that is no dataset key."""
    unknown = sorted(set(entry) - set(DATASET_DEFAULTS))
    if unknown:
        matches = {key: difflib.get_close_matches(key, DATASET_DEFAULTS, n=1) for key in unknown}
        hints = ", ".join(f"{match[0]!r} for {key!r}" for key, match in matches.items() if match)
        raise ConfigError(f"{where} has unknown key(s) {unknown}{f' (did you mean {hints}?)' if hints else ''}; "
                          f"known keys: {sorted(DATASET_DEFAULTS)}")


def load_dataset_config(config_dir, dataset_id):
    """The dataset's entry as written, plus `dataset_id` and `_dataset_config_file`; unknown keys are errors."""
    files = sorted(glob.glob(os.path.join(config_dir, "dataset_config.yaml")))
    files += sorted(glob.glob(os.path.join(config_dir, "dataset_config", "*.yaml")))
    known = []
    for path in files:
        content = _read_yaml(path)
        if dataset_id in content:
            params = _entry(content, dataset_id, path)
            check_dataset_keys(params, f"{path}: dataset_id={dataset_id}")
            params["dataset_id"] = dataset_id
            params["_dataset_config_file"] = path
            return params
        known += list(content)
    raise ConfigError(f"dataset_id={dataset_id} is not defined in {files or config_dir}; "
                      f"known dataset ids: {', '.join(sorted(map(str, known)))}")


# ---- checking ----------------------------------------------------------------------------------------
def _accept(key, value, where):
    """The checked value of `key` as written in `where` ("<file>: expid=<expid>"), or a ConfigError."""
    try:
        return key.accepts(value)
    except Rejected as exc:
        shown = value if not exc.part else exc.value
        hint = FLOAT_HINT if key.accepts.numeric and isinstance(shown, str) and _parses_as_float(shown) else ""
        raise ConfigError(f"{where}: {key.name}{exc.part}={shown!r}; expected {exc.expected}{hint}") from None


def _parses_as_float(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_experiment(config_dir, expid):
    """Read, merge and check one expid: defaults < dataset entry < Base < expid entry.

    Returns:
        ExperimentConfig (see its attributes).
    Raises:
        ConfigError naming the YAML file, the expid (and dataset_id), the key, the bad value and what the key
        accepts: a missing file, expid or dataset_id, malformed YAML, an unknown dataset key, a value outside
        its key's type, range or choices, `monitor` not among `metrics`, both `sparsity_bias` and
        `target_sparsity` set.
    """
    if not os.path.isdir(config_dir):
        raise ConfigError(f"config folder {config_dir} does not exist")
    entry, key_files, config_file = _read_model_entry(config_dir, expid)
    dataset_id = _accept(KEYS["dataset_id"], entry["dataset_id"], f"{key_files['dataset_id']}: expid={expid}")
    dataset_entry = load_dataset_config(config_dir, dataset_id)
    dataset_file = dataset_entry.pop("_dataset_config_file")
    dataset_entry.pop("dataset_id")

    where = {key: f"{dataset_file}: dataset_id={dataset_id} (expid={expid})" for key in dataset_entry}
    written = dict(dataset_entry)
    model_params = {}
    for key, value in entry.items():
        if key in KEYS:
            written[key] = value
            where[key] = f"{key_files[key]}: expid={expid}"
        else:
            model_params[key] = value
    written["model_id"] = expid
    values = {key.name: _accept(key, written[key.name], where.get(key.name)) if key.name in written else key.default
              for key in KEY_TABLE}
    if values["raw_dir"] is None:
        values["raw_dir"] = os.path.join(values["data_root"], dataset_id, "raw")
    _check_together(values, where, expid)

    sections = {section: {k.name: values[k.name] for k in KEY_TABLE if k.section == section} for section in SECTIONS}
    params = dict(values)
    params.update(model_params)
    params["_config_file"] = config_file
    params["_dataset_config_file"] = dataset_file
    files = {key: dataset_file for key in dataset_entry}
    files.update(key_files)
    return ExperimentConfig(expid=expid, dataset=DatasetConfig(**sections[DATASET]),
                            training=TrainingConfig(**sections[TRAINING]), serving=ServingConfig(**sections[SERVING]),
                            model_params=model_params, config_file=config_file, dataset_config_file=dataset_file,
                            params=params, key_files=files)


def _check_together(values, where, expid):
    """Checks of keys that depend on each other."""
    if values["monitor"] not in values["metrics"]:
        source = where.get("monitor") or where.get("metrics") or f"expid={expid}"
        raise ConfigError(f"{source}: monitor={values['monitor']!r}; expected one of metrics "
                          f"{list(values['metrics'])}")
    if values["sparsity_bias"] is not None and values["target_sparsity"] is not None:
        raise ConfigError(f"{where['target_sparsity']}: sparsity_bias={values['sparsity_bias']!r} and "
                          f"target_sparsity={values['target_sparsity']!r} are both set; expected at most one "
                          f"of them (the other null)")


def load_config(config_dir, expid):
    """The checked, merged parameters of one experiment as a flat dict (`load_experiment(...).params`)."""
    return load_experiment(config_dir, expid).params


# ---- model keys --------------------------------------------------------------------------------------
def model_parameters(model_cls):
    """{name: default} of the constructor keywords of `model_cls` and of its bases up to FuxiCTR's BaseModel.

    BaseModel's own keywords (task, monitor, ...) are set by MatchModel, not by a config, so the walk stops
    there. Positional-only parameters, `*args` / `**kwargs` and `feature_map` are left out; a keyword
    without a default maps to None.
    """
    from fuxictr.pytorch.models import BaseModel     # loaded with every model class
    params = {}
    for cls in model_cls.__mro__:
        if cls is BaseModel or not issubclass(cls, BaseModel):
            continue
        if "__init__" not in vars(cls):
            continue
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name in ("self", "feature_map") or parameter.kind in (parameter.VAR_POSITIONAL,
                                                                     parameter.VAR_KEYWORD,
                                                                     parameter.POSITIONAL_ONLY):
                continue
            params.setdefault(name, parameter.default if parameter.default is not parameter.empty else None)
    return params


def check_model_keys(experiment, model_cls):
    """ConfigError naming the file, the expid and the key for a model key of `experiment` that is not a
    constructor keyword of `model_cls` (or of its MatchModel bases)."""
    accepted = model_parameters(model_cls)
    unknown = [key for key in experiment.model_params if key not in accepted]
    if not unknown:
        return
    first = unknown[0]
    match = difflib.get_close_matches(first, sorted(set(accepted) | set(KEYS)), n=1)
    hint = f" (did you mean {match[0]!r}?)" if match else ""
    keywords = sorted(k for k in accepted if k not in KEYS)
    raise ConfigError(f"{experiment.key_files.get(first, experiment.config_file)}: expid={experiment.expid}: "
                      f"unknown key(s) {unknown}{hint}; expected dataset, training or serving keys (README, "
                      f"configuration reference) or {model_cls.__name__} keywords {keywords}")


# ---- the configuration reference ---------------------------------------------------------------------
SECTION_TITLES = {
    DATASET: "Dataset keys (`config/dataset_config.yaml`, under a dataset_id; an expid may override them)",
    TRAINING: "Training keys (an expid or `Base` in `config/model_config/*.yaml`)",
    SERVING: "Serving keys (an expid or `Base`)",
}


def yaml_text(value):
    """`value` as it is written in YAML: null, true, [0.8, 0.1, 0.1], 1.e-4 (a float with a dot, see FLOAT_HINT)."""
    if isinstance(value, _Given):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa if '.' in mantissa else mantissa + '.'}e{int(exponent):+d}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _cell(text):
    """`text` for a markdown table cell: `|` escaped, and a `<` that would open an HTML tag outside code spans."""
    parts = str(text).replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(part if i % 2 else _TAG_START.sub("&lt;", part) for i, part in enumerate(parts))


def _code(value):
    return f"`{_cell(yaml_text(value))}`" if not isinstance(value, _Given) else f"*{value.text}*"


_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")
_ARG_LINE = re.compile(r"^(\s*)\**(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")
_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z])")


def args_docs(cls):
    """{argument: first sentence of its entry} from the `Args:` section of `cls`'s docstring."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    docs, current, indent = {}, None, None
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return docs
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break                                   # the next section (Returns:, ...)
        match = _ARG_LINE.match(line)
        if depth == indent and match:
            current = match.group(2)
            docs[current] = match.group(3).strip()
        elif current is not None:
            docs[current] += " " + line.strip()
    return {name: _SENTENCE_END.split(text, maxsplit=1)[0] for name, text in docs.items()}


def model_keys(model_cls):
    """[(name, default, doc)] of the model keys of `model_cls`: its constructor keywords that are not table keys."""
    docs = {}
    for cls in reversed(model_cls.__mro__):
        docs.update(args_docs(cls))
    return [(name, default, docs.get(name, "")) for name, default in model_parameters(model_cls).items()
            if name not in KEYS]


def render_reference(models=None):
    """The configuration reference (markdown): a table per section from KEY_TABLE and one per model class.

    Args:
        models: mapping name -> model class (e.g. `model_zoo.MODELS`); None leaves the model tables out.
    """
    out = ["Generated from `KEY_TABLE` in `model_zoo/config.py` (`python -m model_zoo.config --reference`). "
           "An expid's keys merge as defaults < dataset entry < `Base` < expid. A key of an expid that is none "
           "of the keys below is a model key: a constructor keyword of the model class (tables at the end)."]
    for section in SECTIONS:
        out += ["", f"### {SECTION_TITLES[section]}", "", "| key | default | accepts | meaning |", "|---|---|---|---|"]
        out += [f"| `{k.name}` | {_code(k.default)} | {_cell(k.accepts.text)} | {_cell(k.doc)} |"
                for k in KEY_TABLE if k.section == section]
    if models:
        out += ["", "### Model keys (constructor keywords of the model class, in the expid)"]
        for name in sorted(models):
            keys = model_keys(models[name])
            out += ["", f"#### {name}", ""]
            if not keys:
                out.append("No model keys.")
                continue
            out += ["| key | default | meaning |", "|---|---|---|"]
            out += [f"| `{key}` | {_code(default)} | {_cell(doc)} |" for key, default, doc in keys]
    return "\n".join(out) + "\n"


def replace_reference(readme_text, reference):
    """`readme_text` with the part between README_START and README_END replaced by `reference`."""
    if README_START not in readme_text or README_END not in readme_text:
        raise ConfigError(f"README has no {README_START} ... {README_END} markers around the configuration reference")
    head, rest = readme_text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{reference}{README_END}{tail}"


def readme_reference(readme_text):
    """The text between README_START and README_END (None without the markers)."""
    if README_START not in readme_text or README_END not in readme_text:
        return None
    return readme_text.split(README_START, 1)[1].split(README_END, 1)[0].lstrip("\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m model_zoo.config",
                                     description="Print or update the configuration reference of the README.")
    parser.add_argument("--reference", action="store_true", help="print the configuration reference (markdown)")
    parser.add_argument("--write-readme", metavar="README", help="replace the reference between the markers of README")
    args = parser.parse_args(argv)
    if not (args.reference or args.write_readme):
        parser.print_help()
        return 2
    from . import MODELS     # the command line is where the registry meets the table; the functions take classes
    reference = render_reference(MODELS)
    if args.reference:
        sys.stdout.write(reference)
    if args.write_readme:
        with open(args.write_readme, encoding="utf-8") as fd:
            text = fd.read()
        try:
            text = replace_reference(text, reference)
        except ConfigError as exc:
            print(f"ERROR: {args.write_readme}: {exc}", file=sys.stderr)
            return 2
        with open(args.write_readme, "w", encoding="utf-8") as fd:
            fd.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
