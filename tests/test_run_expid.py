"""run_expid end to end on a tiny dataset, and its error paths."""
import json
import os
import subprocess
import sys

import pytest
import yaml

import run_expid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_expid_trains_evaluates_and_writes_results(tiny_config, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    for expid in ("Popularity_tiny", "DSSM_tiny"):
        assert run_expid.main(["--config", tiny_config, "--expid", expid]) == 0
        result_path = os.path.join(tmp_path, "checkpoints", "tiny", f"{expid}.json")
        with open(result_path) as fd:
            result = json.load(fd)
        assert set(result["test"]) >= {"Recall(k=20)", "NDCG(k=50)", "HitRate(k=20)", "Precision(k=50)"}
        assert 0.0 <= result["test"]["Recall(k=50)"] <= 1.0
        assert {"build_data", "train", "evaluate"} <= set(result["seconds"])
        assert result["peak_rss_mb"] > 0
        assert os.path.exists(result["checkpoint"])
        log = open(os.path.join(tmp_path, "checkpoints", "tiny", f"{expid}.log")).read()
        assert "[Metrics] Recall(k=20)" in log
    lines = open(tmp_path / "config.csv").read().splitlines()
    assert len(lines) == 2 and "[exp_id] DSSM_tiny" in lines[1] and "[test] Recall(k=20)" in lines[1]
    dssm = json.load(open(tmp_path / "checkpoints" / "tiny" / "DSSM_tiny.json"))
    assert "examples/s" in open(tmp_path / "checkpoints" / "tiny" / "DSSM_tiny.log").read()
    assert dssm["history"][0]["examples_per_second"] > 0


def test_unknown_expid_exits_2_with_message(tiny_config, capsys):
    assert run_expid.main(["--config", tiny_config, "--expid", "Nope_001"]) == 2
    err = capsys.readouterr().err
    assert "expid=Nope_001" in err and "DSSM_tiny" in err and "Traceback" not in err


def test_unknown_hyperparameter_is_named(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = os.path.join(tiny_config, "model_config", "extra.yaml")
    with open(path, "w") as fd:
        yaml.safe_dump({"DSSM_bad": {"model": "DSSM", "dataset_id": "tiny", "hiden_units": [8]}}, fd)
    assert run_expid.main(["--config", tiny_config, "--expid", "DSSM_bad"]) == 2
    assert "hiden_units" in capsys.readouterr().err


def test_missing_raw_file_exits_2_naming_it(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load(open(os.path.join(tiny_config, "dataset_config.yaml")))["tiny"]
    os.remove(os.path.join(params["raw_dir"], "interactions.csv"))
    assert run_expid.main(["--config", tiny_config, "--expid", "DSSM_tiny"]) == 2
    assert "interactions.csv" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints" / "tiny" / "DSSM_tiny.json")


def test_import_from_outside_the_repo_finds_our_package(tmp_path):
    """fuxictr installs a namespace package `model_zoo`; ours must win from any directory."""
    code = "import model_zoo, sys; print(model_zoo.__file__); model_zoo.DSSM; model_zoo.get_model('DSSM')"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert os.path.realpath(out.stdout.strip()).startswith(os.path.realpath(ROOT))
