"""run_param_tuner.py --ray-address local: the same result files as local processes, resume, and the fallback
without Ray.

The runs are a stand-in for run_expid.py that imports nothing of the project (a few ms per run): it writes
the result JSON with the parameters the tuner resolved for its expid, so that only the launcher differs.
"""
import csv
import importlib.util
import json
import os
import shutil

import pytest

import run_param_tuner
from model_zoo.tuner import prepare

from .conftest import write_config
from .test_tuner import write_tuner

STAND_IN = r'''
"""Stand-in for run_expid.py: reads its parameters from FAKE_PARAMS, writes the result and a FuxiCTR line."""
import argparse, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--config")
parser.add_argument("--expid")
parser.add_argument("--gpu", type=int)
args = parser.parse_args()
params = json.load(open(os.environ["FAKE_PARAMS"]))[args.expid]
with open(os.environ["FAKE_RUN_LOG"], "a") as fd:
    fd.write(f"{args.expid} {os.environ.get('OMP_NUM_THREADS')}\n")
score = params["embedding_dim"] / 100.0
metrics = {f"{m}(k={k})": round(score * k / 20.0 * f, 6) for m, f in (("Recall", 1.0), ("NDCG", 0.8),
                                                                       ("HitRate", 3.0)) for k in (20, 50)}
result = {"expid": args.expid, "model": params["model"], "dataset_id": params["dataset_id"], "params": params,
          "valid": metrics, "test": {k: v * 0.9 for k, v in metrics.items()}, "seconds": {"train": 0.5}}
folder = os.path.join(params["model_root"], params["dataset_id"])
os.makedirs(folder, exist_ok=True)
path = os.path.join(folder, args.expid + ".json")
with open(path + ".tmp", "w") as fd:
    json.dump(result, fd)
os.replace(path + ".tmp", path)
with open(os.path.basename(os.path.normpath(args.config)) + ".csv", "a") as fd:
    fd.write(f" 20260101-000000,[command] stand-in,[exp_id] {args.expid},[dataset_id] {params['dataset_id']},"
             f"[train] N.A.,[val] Recall(k=20): {metrics['Recall(k=20)']:.6f},[test] N.A.\n")
'''
_find_spec = importlib.util.find_spec


@pytest.fixture
def grid(tmp_path, tiny_raw, monkeypatch):
    """A 2-combination grid over DSSM_tiny, the stand-in run script and its FAKE_PARAMS / FAKE_RUN_LOG."""
    raw = str(tmp_path / "raw")
    shutil.copytree(tiny_raw, raw)
    monkeypatch.chdir(tmp_path)
    write_config(str(tmp_path), raw, {"DSSM_tiny": {"model": "DSSM", "dataset_id": "tiny",
                                                    "user_hidden_units": [16], "item_hidden_units": [16]}})
    tuner = write_tuner(str(tmp_path), {"embedding_dim": [8, 16]})
    plan = prepare(tuner, str(tmp_path / "plan"))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({c.expid: json.loads(json.dumps(c.params, default=str)) for c in plan.combinations}))
    monkeypatch.setenv("FAKE_PARAMS", str(params))
    monkeypatch.setenv("FAKE_RUN_LOG", str(tmp_path / "calls.txt"))
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return {"root": tmp_path, "tuner": tuner, "script": str(script), "results": plan.result_path(plan.combinations[0])}


def _run(grid, output, *extra):
    output = os.path.join(str(grid["root"]), output)
    return run_param_tuner.main(["--config", grid["tuner"], "--output", output, "--script", grid["script"],
                                 *extra]), output


def _rows(path, dropped=("wall_seconds",)):
    with open(path, newline="") as fd:
        return [{k: v for k, v in row.items() if k not in dropped} for row in csv.DictReader(fd)]


def _calls(grid):
    path = grid["root"] / "calls.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install -e '.[ray]'); CI installs only '.[test]'")
def test_ray_tasks_write_the_same_reports_as_local_processes_and_resume(grid, capsys):
    code, local = _run(grid, "out_local", "--workers", "2")
    assert code == 0 and len(_calls(grid)) == 2
    shutil.rmtree(os.path.dirname(grid["results"]))              # the runs' results: Ray runs them again
    code, ray = _run(grid, "out_ray", "--ray-address", "local", "--ray-cpus", "1")
    out = capsys.readouterr().out
    assert code == 0 and "on ray (1 CPU, 0 GPU)" in out and "done 2/2 | running 0 | failed 0" in out
    board = "leaderboard_tiny.csv"
    assert open(os.path.join(local, board)).read() == open(os.path.join(ray, board)).read()
    lines = [sorted(open(os.path.join(folder, "tuner.csv")).read().splitlines()) for folder in (local, ray)]
    assert lines[0] == lines[1] and len(lines[0]) == 2             # FuxiCTR lines, in the order the runs ended
    assert _rows(os.path.join(local, "full_results.csv")) == _rows(os.path.join(ray, "full_results.csv"))
    assert len(_calls(grid)) == 4 and [threads for _, threads in _calls(grid)[2:]] == ["1", "1"]

    # Resume: a rerun with the Ray launcher finds both results and starts nothing (nor Ray: --workers is given).
    assert _run(grid, "out_ray", "--ray-address", "local", "--workers", "2")[0] == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out and len(_calls(grid)) == 4


def test_without_ray_the_tuner_runs_local_processes(grid, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else _find_spec(name, *a))
    code, output = _run(grid, "out", "--ray-address", "auto")
    assert code == 0 and "Ray is not installed" in capsys.readouterr().err and len(_calls(grid)) == 2
    assert os.path.exists(os.path.join(output, "leaderboard_tiny.csv"))
