"""One file per model; `MODELS` maps the YAML `model:` name to its class."""
from .dssm import DSSM
from .popularity import Popularity

__all__ = ["DSSM", "Popularity", "MODELS"]

MODELS = {cls.__name__: cls for cls in (DSSM, Popularity)}
