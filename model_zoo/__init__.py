"""SparCode and matching baselines as FuxiCTR-compatible models.

`model_zoo.<Name>` is a model class; `get_model(name)` finds one by its YAML name and
lists the known names when it is unknown. This file makes `model_zoo` a regular package,
which wins over the namespace package of the same name that the fuxictr wheel installs.
"""
from .models import MODELS
from .models import *  # noqa: F401,F403  (re-export the model classes)

__version__ = "0.1.0"


def get_model(name):
    """The model class registered under `name` (the `model:` key of a config)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def list_models():
    return sorted(MODELS)
