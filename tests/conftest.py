"""Shared fixtures: a tiny demo dataset in a temporary config folder."""
import os
import shutil

import pytest
import yaml

from model_zoo.data.demo import generate_demo

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def shared_path(*parts):
    """Path under ../shared/data, or skip the test when that folder is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data {path} is absent (only on the project's machines)")
    return path


TINY_FEATURES = [
    {"name": "age_band", "type": "categorical", "source": "user"},
    {"name": "region", "type": "categorical", "source": "user"},
    {"name": "activity", "type": "numeric", "source": "user", "normalizer": "StandardScaler"},
    {"name": "category", "type": "categorical", "source": "item"},
    {"name": "tags", "type": "sequence", "source": "item", "max_len": 4},
]


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """Raw CSVs of a small demo (300 users, 200 items), generated once per session."""
    raw = tmp_path_factory.mktemp("tiny_raw")
    generate_demo(str(raw), num_users=300, num_items=200, seed=7)
    return str(raw)


def open_tiny(config, expid, batch_size=None):
    """Build (or reuse) the data of `expid` and open it: params, data_dir, feature_map, corpus, the
    training loader (seed 1; batch_size defaults to the expid's) and the valid / test users."""
    from model_zoo.config import load_config
    from model_zoo.data.loaders import EvalUsers, ItemCorpus, TrainLoader, load_feature_map
    from model_zoo.data.pipeline import build_dataset
    params = load_config(config, expid)
    data_dir = build_dataset(params)
    feature_map = load_feature_map(data_dir, params["dataset_id"])
    corpus = ItemCorpus(os.path.join(data_dir, "item_corpus.h5"), feature_map)
    train = TrainLoader(os.path.join(data_dir, "train.h5"), feature_map, batch_size or params["batch_size"], seed=1)
    valid, test = (EvalUsers(os.path.join(data_dir, f"{split}.h5"), feature_map, corpus.num_items)
                   for split in ("valid", "test"))
    return {"params": params, "data_dir": data_dir, "feature_map": feature_map, "corpus": corpus,
            "train": train, "valid": valid, "test": test}


def write_config(root, raw_dir, model_entries, dataset_overrides=None):
    """A config folder with dataset `tiny` (csv source over raw_dir) and the given expids."""
    config = os.path.join(root, "config")
    os.makedirs(os.path.join(config, "model_config"), exist_ok=True)
    dataset = {"source": "csv", "raw_dir": raw_dir, "data_root": os.path.join(root, "data"),
               "max_len": 10, "feature_cols": TINY_FEATURES}
    dataset.update(dataset_overrides or {})
    with open(os.path.join(config, "dataset_config.yaml"), "w") as fd:
        yaml.safe_dump({"tiny": dataset}, fd)
    base = {"model_root": os.path.join(root, "checkpoints"), "verbose": 0, "epochs": 1,
            "max_steps_per_epoch": 5, "batch_size": 64, "num_negatives": 20, "embedding_dim": 16}
    with open(os.path.join(config, "model_config", "models.yaml"), "w") as fd:
        yaml.safe_dump({"Base": base, **model_entries}, fd)
    return config


@pytest.fixture
def tiny_config(tmp_path, tiny_raw):
    """Config folder with DSSM_tiny and Popularity_tiny over a private copy of the tiny raw data."""
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    entries = {
        "DSSM_tiny": {"model": "DSSM", "dataset_id": "tiny", "user_hidden_units": [32],
                      "item_hidden_units": [32]},
        "Popularity_tiny": {"model": "Popularity", "dataset_id": "tiny"},
    }
    return write_config(str(tmp_path), str(raw), entries)


def rank(model, eval_users, k):
    """Exact top-k ids of every evaluation user (engine.evaluator.Evaluator.rank)."""
    from model_zoo.engine.evaluator import Evaluator
    return Evaluator(eval_batch_size=512, verbose=False).rank(model, eval_users, k)


def optimizer_for(model, learning_rate=1.e-3):
    """Adam over the trainable parameters, as the Trainer builds it."""
    import torch
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)


def train_steps(model, loader, steps):
    """`steps` optimizer steps of the Trainer on `loader` (one epoch capped at `steps`)."""
    from model_zoo.engine.evaluator import Evaluator
    from model_zoo.engine.trainer import Trainer
    trainer = Trainer(model, Evaluator(verbose=False), epochs=1, max_steps_per_epoch=steps, verbose=False)
    trainer.train_epoch(loader)
    return trainer
