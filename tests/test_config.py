"""Config loading: every bad input gives one clear error naming the file and key."""
import os

import pytest

from model_zoo import get_model, list_models
from model_zoo.config import load_config
from model_zoo.errors import ConfigError

REPO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "config")


def test_repo_configs_all_load_and_name_known_models():
    from model_zoo.config import list_expids
    expids = list_expids(REPO_CONFIG)
    assert "DSSM_demo_001" in expids and "Popularity_demo_001" in expids
    for expid in expids:
        params = load_config(REPO_CONFIG, expid)
        get_model(params["model"])


def test_every_registered_model_has_a_demo_expid():
    from model_zoo.config import list_expids
    expids = set(list_expids(REPO_CONFIG))
    for name in list_models():
        assert f"{name}_demo_001" in expids, name


def test_unknown_expid_lists_known_ones(tiny_config):
    with pytest.raises(ConfigError, match="expid=Nope_001.*DSSM_tiny"):
        load_config(tiny_config, "Nope_001")


def test_malformed_yaml_names_file(tiny_config):
    path = os.path.join(tiny_config, "model_config", "broken.yaml")
    with open(path, "w") as fd:
        fd.write("Broken_001: {model: DSSM\n  dataset_id: [tiny\n")
    with pytest.raises(ConfigError, match="broken.yaml.*malformed"):
        load_config(tiny_config, "DSSM_tiny")


def test_missing_dataset_id_is_named(tiny_config):
    with open(os.path.join(tiny_config, "model_config", "extra.yaml"), "w") as fd:
        fd.write("X_001: {model: DSSM, dataset_id: nowhere}\nY_001: {model: DSSM}\n")
    with pytest.raises(ConfigError, match="dataset_id=nowhere.*tiny"):
        load_config(tiny_config, "X_001")
    with pytest.raises(ConfigError, match="extra.yaml.*no dataset_id"):
        load_config(tiny_config, "Y_001")


def test_unknown_dataset_key_is_named(tiny_config):
    path = os.path.join(tiny_config, "dataset_config.yaml")
    with open(path, "a") as fd:
        fd.write("other:\n  source: csv\n  max_lenght: 3\n")
    with open(os.path.join(tiny_config, "model_config", "extra.yaml"), "w") as fd:
        fd.write("Z_001: {model: DSSM, dataset_id: other}\n")
    with pytest.raises(ConfigError, match="max_lenght"):
        load_config(tiny_config, "Z_001")


def test_float_written_as_string_is_rejected(tiny_config):
    with open(os.path.join(tiny_config, "model_config", "extra.yaml"), "w") as fd:
        fd.write("F_001: {model: DSSM, dataset_id: tiny, learning_rate: 1e-3}\n")
    with pytest.raises(ConfigError, match="learning_rate.*1.e-3"):
        load_config(tiny_config, "F_001")


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="unknown model 'Foo'.*DSSM"):
        get_model("Foo")


def test_readme_configuration_reference_lists_every_key_with_its_default():
    """Every training key and every model constructor keyword is in the README with its default."""
    import inspect
    from model_zoo.base import MatchModel
    from model_zoo.config import TRAINING_DEFAULTS as training
    from model_zoo.models import MODELS
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    for key, default in training.items():
        assert f"| `{key}` | `{default!r}` |" in reference, key
    base_keys = set(inspect.signature(MatchModel.__init__).parameters)
    for name, cls in MODELS.items():
        line = next((ln for ln in reference.splitlines() if ln.startswith(f"- **{name}**:")), None)
        assert line is not None, name
        for key, param in inspect.signature(cls.__init__).parameters.items():
            if key in base_keys or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or key == "feature_map":
                continue
            assert f"`{key}`=`{param.default!r}`" in line, (name, key)
