"""Config loading: every key is checked once, at load, and a bad input gives one error naming the file,
the expid and the key."""
import dataclasses
import os

import pytest
import yaml

from model_zoo import MODELS, get_model, list_models
from model_zoo.config import (DATA_SOURCES, DEFAULTS, KEY_TABLE, NEGATIVE_SAMPLERS, NON_MODEL_KEYS,
                              PRECISION_DENOMINATORS, README_END, README_START,
                              args_docs, check_model_keys, list_expids, load_config, load_experiment, main,
                              model_parameters, readme_reference, render_reference, yaml_text)
from model_zoo.errors import ConfigError

REPO = os.path.join(os.path.dirname(__file__), "..")
REPO_CONFIG = os.path.join(REPO, "config")


def write_expid(config, text, name="extra.yaml"):
    """Add model_config/<name> holding `text` (YAML written as a user would, e.g. `-1.e-3`)."""
    path = os.path.join(config, "model_config", name)
    with open(path, "w") as fd:
        fd.write(text)
    return path


def add_dataset(config, name, text):
    path = os.path.join(config, "dataset_config.yaml")
    with open(path, "a") as fd:
        fd.write(f"{name}:\n" + "".join(f"  {line}\n" for line in text.strip().splitlines()))
    return path


def data_root(config):
    with open(os.path.join(config, "dataset_config.yaml")) as fd:
        return yaml.safe_load(fd)["tiny"]["data_root"]


# ---- the repository's configs ------------------------------------------------------------------------
def test_repo_configs_all_load_and_their_model_keys_are_constructor_keywords():
    expids = list_expids(REPO_CONFIG)
    assert "DSSM_demo_001" in expids and "Popularity_demo_001" in expids
    for expid in expids:
        experiment = load_experiment(REPO_CONFIG, expid)
        check_model_keys(experiment, get_model(experiment.model))


def test_every_registered_model_has_a_demo_expid():
    expids = set(list_expids(REPO_CONFIG))
    for name in list_models():
        assert f"{name}_demo_001" in expids, name


# ---- files, expids, dataset ids -------------------------------------------------------------------------
def test_unknown_expid_lists_known_ones(tiny_config):
    with pytest.raises(ConfigError, match="expid=Nope_001.*DSSM_tiny"):
        load_config(tiny_config, "Nope_001")


def test_malformed_yaml_names_file(tiny_config):
    write_expid(tiny_config, "Broken_001: {model: DSSM\n  dataset_id: [tiny\n", "broken.yaml")
    with pytest.raises(ConfigError, match="broken.yaml.*malformed"):
        load_config(tiny_config, "DSSM_tiny")


def test_missing_dataset_id_is_named(tiny_config):
    write_expid(tiny_config, "X_001: {model: DSSM, dataset_id: nowhere}\nY_001: {model: DSSM}\n")
    with pytest.raises(ConfigError, match="dataset_id=nowhere.*tiny"):
        load_config(tiny_config, "X_001")
    with pytest.raises(ConfigError, match="extra.yaml.*no dataset_id"):
        load_config(tiny_config, "Y_001")


def test_unknown_dataset_key_is_named_with_a_suggestion(tiny_config):
    add_dataset(tiny_config, "other", "source: csv\nmax_lenght: 3")
    write_expid(tiny_config, "Z_001: {model: DSSM, dataset_id: other}\n")
    with pytest.raises(ConfigError, match=r"dataset_config.yaml: dataset_id=other has unknown key.*max_lenght.*"
                                          r"did you mean.*'max_len'"):
        load_config(tiny_config, "Z_001")


# ---- values out of type, range or choices: the error names file, expid and key, before any data -------
@pytest.mark.parametrize("line, message", [
    # the three a user is most likely to get wrong
    ("epochs: 0", r"epochs=0; expected an int >= 1"),
    ("learning_rate: -1.e-3", r"learning_rate=-0.001; expected a number > 0"),
    ("target_sparsity: 1.5", r"target_sparsity=1.5; expected null or a number in \(0, 1\)"),
    # more ranges
    ("epochs: -3", r"epochs=-3; expected an int >= 1"),
    ("epochs: 2.5", r"epochs=2.5; expected an int >= 1"),
    ("batch_size: 0", r"batch_size=0; expected an int >= 1"),
    ("temperature: 0", r"temperature=0; expected a number > 0"),
    ("embedding_init_std: 0.0", r"embedding_init_std=0.0; expected a number > 0"),
    ("early_stop_patience: 0", r"early_stop_patience=0; expected an int >= 1"),
    ("num_negatives: 0", r"num_negatives=0; expected an int >= 1"),
    ("max_steps_per_epoch: 0", r"max_steps_per_epoch=0; expected null or an int >= 1"),
    ("gpu: -2", r"gpu=-2; expected an int >= -1"),
    ("history_ratio: 1.0", r"history_ratio=1.0; expected a number in \(0, 1\)"),
    ("min_history: -1", r"min_history=-1; expected an int >= 0"),
    ("valid_fraction: 0", r"valid_fraction=0; expected null or a number in \(0, 1\)"),
    ("split_ratios: [0.5, 0.3, 0.3]", r"split_ratios=\[0.5, 0.3, 0.3\]; expected three numbers .* summing to 1"),
    ("max_len: 0", r"max_len=0; expected an int >= 1"),
    ("index_top_l: 0", r"index_top_l=0; expected null or an int >= 1"),
    ("faiss_m: 2.5", r"faiss_m=2.5; expected an int >= 1"),
    # choices
    ("negative_sampler: random", r"negative_sampler='random'; expected one of uniform, popularity, in_batch"),
    ("monitor_mode: maximum", r"monitor_mode='maximum'; expected one of max, min"),
    ("precision_denominator: gt", r"precision_denominator='gt'; expected one of k, min_gt_k"),
    ("train_history: future", r"train_history='future'; expected one of past, user_sample"),
    ("history_features: tags", r"history_features='tags'; expected one of id, item"),
    ("index_score_dtype: float64", r"index_score_dtype='float64'; expected one of float16, float32"),
    ("unseen_key: random", r"unseen_key='random'; expected one of nearest, skip, score"),
    ("source: sql", r"source='sql'; expected one of csv, demo"),
    ("optimizer: sgd", r"optimizer='sgd'; expected adam or a torch.optim optimizer class name"),
    ("serve: 'yes'", r"serve='yes'; expected true or false"),
    # metric names and the keys that depend on each other
    ("metrics: ['Recall@20']", r"metrics\[0\]='Recall@20'; expected a list of metric names like Recall\(k=20\)"),
    ("metrics: ['MAP(k=10)']", r"metrics\[0\]='MAP\(k=10\)'; expected one of Recall, NDCG, HitRate, Precision"),
    ("monitor: 'Recall(k=10)'", r"monitor='Recall\(k=10\)'; expected one of metrics \['Recall\(k=20\)'"),
    ("{sparsity_bias: -0.5, target_sparsity: 0.9}", r"sparsity_bias=-0.5 and target_sparsity=0.9 are both set"),
    ("feature_cols: [{name: colour, type: cat, source: item}]",
     r"feature_cols\[0\].type='cat'; expected one of categorical, numeric, sequence, embedding"),
    ("callbacks: [quantizer_warmup]", r"callbacks=\['quantizer_warmup'\]; expected null or a mapping callback name"),
    # PyYAML reads 1e-3 as a string: the error says how to write it
    ("learning_rate: 1e-3", r"learning_rate='1e-3'; expected a number > 0 \(write floats as 1.e-3"),
    ("sparsity_bias: 1e-3", r"sparsity_bias='1e-3'; expected null or a finite number \(write floats as 1.e-3"),
])
def test_a_bad_value_fails_at_load_naming_file_expid_and_key(tiny_config, line, message):
    if line.startswith("{"):
        entry = "{model: DSSM, dataset_id: tiny, " + line[1:]
    else:
        entry = "{model: DSSM, dataset_id: tiny, " + line + "}"
    path = write_expid(tiny_config, f"Bad_001: {entry}\n")
    for load in (load_experiment, load_config):
        with pytest.raises(ConfigError, match=f"^{path}: expid=Bad_001: {message}"):
            load(tiny_config, "Bad_001")
    assert not os.path.exists(data_root(tiny_config)), "nothing is built before the config is checked"


def test_a_bad_dataset_value_names_the_dataset_file_and_id(tiny_config):
    dataset_file = add_dataset(tiny_config, "other", "source: csv\nvalid_fraction: 1.5")
    write_expid(tiny_config, "V_001: {model: DSSM, dataset_id: other}\n")
    with pytest.raises(ConfigError, match=f"^{dataset_file}: dataset_id=other \\(expid=V_001\\): "
                                          r"valid_fraction=1.5; expected null or a number in \(0, 1\)"):
        load_experiment(tiny_config, "V_001")


def test_a_bad_value_in_base_names_the_base_file(tiny_config):
    path = write_expid(tiny_config, "Base: {epochs: 0}\nB_001: {model: DSSM, dataset_id: tiny}\n", "zz_base.yaml")
    with pytest.raises(ConfigError, match=f"^{path}: expid=B_001: epochs=0"):
        load_experiment(tiny_config, "B_001")


def test_every_default_is_accepted_by_its_own_key():
    for key in KEY_TABLE:
        if key.name in ("dataset_id", "model", "model_id"):
            continue                                  # given by the expid, not defaults
        assert key.accepts(key.default) == key.default, key.name
        assert key.doc and key.accepts.text, key.name


# ---- a good config ------------------------------------------------------------------------------------
def test_a_good_config_gives_typed_frozen_sections_and_the_flat_params(tiny_config):
    path = write_expid(tiny_config, "G_001: {model: DSSM, dataset_id: tiny, epochs: 3.0, learning_rate: 1,\n"
                                    "        target_sparsity: 0.99, max_len: 7, user_hidden_units: [8]}\n")
    experiment = load_experiment(tiny_config, "G_001")
    assert experiment.expid == "G_001" and experiment.model == "DSSM"
    assert experiment.training.epochs == 3 and isinstance(experiment.training.epochs, int)
    assert experiment.training.learning_rate == 1.0 and isinstance(experiment.training.learning_rate, float)
    assert experiment.training.batch_size == 64                                  # from the fixture's Base
    assert experiment.training.model_id == "G_001"
    assert experiment.serving.target_sparsity == 0.99 and experiment.serving.unseen_key == "nearest"
    assert experiment.dataset.max_len == 7 and experiment.dataset.dataset_id == "tiny"
    assert experiment.dataset.raw_dir.endswith("raw") and experiment.dataset.split_ratios == (0.8, 0.1, 0.1)
    assert experiment.model_params == {"user_hidden_units": [8]}
    assert experiment.config_file == path and experiment.dataset_config_file.endswith("dataset_config.yaml")
    assert experiment.key_files["epochs"] == path and experiment.key_files["batch_size"].endswith("models.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        experiment.training.epochs = 5
    params = load_config(tiny_config, "G_001")
    assert params == experiment.params
    assert params["epochs"] == 3 and params["user_hidden_units"] == [8] and params["dataset_id"] == "tiny"
    assert set(DEFAULTS) <= set(params) and params["_config_file"] == path
    assert set(params) - set(experiment.model_params) <= NON_MODEL_KEYS


def test_a_good_config_builds_its_model_from_the_flat_params(tiny_config):
    from .conftest import open_tiny
    data = open_tiny(tiny_config, "DSSM_tiny")
    model = get_model("DSSM")(data["feature_map"], **data["params"])
    assert model.model_id == "DSSM_tiny"


# ---- model keys -----------------------------------------------------------------------------------------
def test_model_parameters_walk_the_model_and_its_matchmodel_bases_only():
    dssm = model_parameters(get_model("DSSM"))
    assert dssm["user_hidden_units"] == (256, 256, 256) and dssm["similarity"] == "dot"
    assert "temperature" in dssm                                   # a MatchModel keyword
    assert "task" not in dssm and "reduce_lr_on_plateau" not in dssm   # FuxiCTR BaseModel's, set by MatchModel
    assert "feature_map" not in dssm and "kwargs" not in dssm
    sasrec = model_parameters(get_model("SASRec"))
    assert "num_heads" in sasrec and "gru_hidden_dim" not in sasrec     # GRU4Rec's keyword, not a base's


def test_a_model_key_that_is_no_constructor_keyword_is_named(tiny_config):
    path = write_expid(tiny_config, "M_001: {model: DSSM, dataset_id: tiny, hidden_unitz: [8]}\n"
                                    "M_002: {model: DSSM, dataset_id: tiny, user_hidden_units: [8]}\n")
    experiment = load_experiment(tiny_config, "M_001")
    assert experiment.model_params == {"hidden_unitz": [8]}
    with pytest.raises(ConfigError, match=f"^{path}: expid=M_001: unknown key.*'hidden_unitz'.*DSSM keywords"):
        check_model_keys(experiment, get_model("DSSM"))
    check_model_keys(load_experiment(tiny_config, "M_002"), get_model("DSSM"))
    with pytest.raises(ConfigError, match="'user_hidden_units'.*Popularity"):
        check_model_keys(load_experiment(tiny_config, "M_002"), get_model("Popularity"))


# ---- vocabularies: each value the config accepts is implemented by the module that uses it -------------
def test_the_choices_of_the_table_are_the_implemented_ones():
    import numpy as np
    from model_zoo.data.samplers import NegativeSampler
    from model_zoo.data.sources import SOURCES
    from model_zoo.retrieval.metrics import topk_metrics
    assert set(DATA_SOURCES) == set(SOURCES)
    for kind in NEGATIVE_SAMPLERS:
        NegativeSampler(kind, num_items=3, num_negatives=2, item_counts=[1, 2, 3])
    for denominator in PRECISION_DENOMINATORS:
        topk_metrics(np.array([[0, 1]]), np.array([0, 1]), np.array([1]), ks=[2], metrics=["Precision"],
                     precision_denominator=denominator)


# ---- the configuration reference -------------------------------------------------------------------------
def test_readme_configuration_reference_is_the_generated_one():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fd:
        section = readme_reference(fd.read())
    assert section is not None, f"README.md lacks the {README_START} / {README_END} markers"
    assert section == render_reference(MODELS), "run: python -m model_zoo.config --write-readme README.md"


def test_reference_lists_every_key_and_every_model_keyword_with_its_default():
    reference = render_reference(MODELS)
    for key in KEY_TABLE:
        assert f"| `{key.name}` |" in reference, key.name
    assert "| `learning_rate` | `0.001` |" in reference and "| `serve` | `true` |" in reference
    for name, cls in MODELS.items():
        assert f"#### {name}" in reference
        for key, default in model_parameters(cls).items():
            if key not in DEFAULTS and key != "model_id":
                assert f"| `{key}` | `{yaml_text(default)}` |" in reference, (name, key)
    assert "| `similarity` | `dot` | `dot` or `cosine`. |" in reference        # its Args: line


def test_args_docs_take_the_first_sentence_of_each_entry():
    class Example:
        """Summary.

        Args:
            width: size of the layer. Default 3.
            mode: "a" | "b", how the thing is
                done (continued). More text.
            **kwargs: the rest.

        Returns:
            nothing: not an argument.
        """
    assert args_docs(Example) == {"width": "size of the layer.", "mode": '"a" | "b", how the thing is done '
                                  "(continued).", "kwargs": "the rest."}


def test_yaml_text_writes_floats_that_yaml_reads_as_floats():
    for value in (1e-6, 1.e-3, 0.75, 1e20, [0.8, 0.1, 0.1]):
        assert yaml.safe_load(yaml_text(value)) == (list(value) if isinstance(value, list) else value)
    assert yaml_text(None) == "null" and yaml_text(True) == "true" and yaml_text((256, 256)) == "[256, 256]"


def test_reference_cells_escape_pipes_and_html_tags_outside_code():
    from model_zoo.config import _cell
    assert _cell('"dnn" | "gru"') == '"dnn" \\| "gru"'
    assert _cell("go to <data_root>/x, `<data_root>/x` and N <= 3") == "go to &lt;data_root>/x, `<data_root>/x` and N <= 3"


def test_write_readme_replaces_only_the_marked_section(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Configuration reference\n{README_START}\nold\n{README_END}\n\n## After\n")
    assert main(["--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Configuration reference\n") and text.endswith(f"{README_END}\n\n## After\n")
    assert readme_reference(text) == render_reference(MODELS) and "\nold\n" not in text
    readme.write_text("# No markers\n")
    assert main(["--write-readme", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err and readme.read_text() == "# No markers\n"
