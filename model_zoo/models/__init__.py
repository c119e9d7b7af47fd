"""One file per model. Every public module here (not starting with `_`) is imported and its
MatchModel subclasses are registered in `MODELS` under their class name (the YAML `model:` key).
Shared bases live in `_`-prefixed modules and are not registered."""
import importlib
import inspect
import pkgutil

from ..base import MatchModel

MODELS = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name, _cls in inspect.getmembers(_module, inspect.isclass):
        if issubclass(_cls, MatchModel) and _cls is not MatchModel and _cls.__module__ == _module.__name__:
            MODELS[_name] = _cls
            globals()[_name] = _cls

__all__ = sorted(MODELS) + ["MODELS"]
