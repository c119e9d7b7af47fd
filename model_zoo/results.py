"""Result reports of a hyperparameter search: full CSV, BARS leaderboard, BARS-style README.

A *run* is a dict describing one experiment of a tuner (built by `model_zoo.tuner`):

    expid, model, dataset_id, status ("done" | "failed" | "interrupted" | "pending"),
    tuned {key: value}, valid {metric: value}, test {metric: value}, monitor, monitor_mode,
    index_test {metric: value} (through the serving index), wall_seconds, index_sparsity,
    index_average_items, error, reproduce (the command that reruns it),
    config {"dataset_config": {...}, "model_config": {...}}, log_path, result_line

`write_reports(output_dir, summary)` writes, from a tuner summary (`{"runs": [...], ...}`):

- `full_results.csv`: one row per run (expid, status, every tuned key, valid_/test_ metrics,
  index_test_ metrics (through the serving index, SparCode), wall time, index sparsity and items
  per code, error);
- `leaderboard_<dataset_id>.csv`: the BARS candidate-matching leaderboard, the best run of each
  model by its monitored validation metric, test metrics with 4 decimals, sorted by Recall@20;
- `README.md`: BARS-style report of the best run(s): environment, reproduce command, config,
  result line and log excerpt;
- `summary.json`: the summary itself (what `python -m model_zoo.results` merges).

`python -m model_zoo.results --output DIR OUT1 OUT2 ...` merges the summaries of several tuner
output folders (e.g. SparCode and its baselines) into one set of reports.
"""
import argparse
import csv
import io
import json
import os
import platform
import sys
from importlib import metadata

import yaml

LEADERBOARD_HEADER = ("Year", "Publication", "Model", "Paper URL", "Recall@20", "Recall@50", "NDCG@20", "NDCG@50",
                      "HitRate@20", "HitRate@50", "Running Steps", "Contributor")
# Leaderboard column -> metric name in results (FuxiCTR style).
LEADERBOARD_METRICS = {"Recall@20": "Recall(k=20)", "Recall@50": "Recall(k=50)", "NDCG@20": "NDCG(k=20)",
                       "NDCG@50": "NDCG(k=50)", "HitRate@20": "HitRate(k=20)", "HitRate@50": "HitRate(k=50)"}
# Model name -> (Year, Publication, Paper URL) of the paper that introduced it.
MODEL_INFO = {
    "SparCode": ("2023", "SIGIR'23", "https://doi.org/10.1145/3539618.3591643"),
    "DSSM": ("2013", "CIKM'13", "https://doi.org/10.1145/2505515.2505665"),
    "GRU4Rec": ("2016", "ICLR'16", "https://arxiv.org/abs/1511.06939"),
    "SASRec": ("2018", "ICDM'18", "https://arxiv.org/abs/1808.09781"),
    "TDM": ("2018", "KDD'18", "https://arxiv.org/abs/1801.02294"),
    "Popularity": ("", "", ""),
}
DEFAULT_CONTRIBUTOR = "sparcode-model-zoo"
LIBRARIES = ("torch", "fuxictr", "numpy", "pandas", "h5py", "faiss-cpu", "faiss-gpu", "scikit-learn", "polars",
             "PyYAML", "tqdm", "sparcode-model-zoo")
STATUSES = ("done", "failed", "interrupted", "pending")


# ---- small helpers ----------------------------------------------------------------------------
# Result-JSON parameters that may differ without changing what a run computes.
VOLATILE_PARAMS = frozenset({"gpu", "_config_file", "_dataset_config_file", "model_id", "verbose"})


def result_json_path(params, root="."):
    """`<model_root>/<dataset_id>/<model_id>.json` (a relative model_root is taken from `root`), where
    run_expid writes an expid's result."""
    return os.path.join(root, params["model_root"], params["dataset_id"], params["model_id"] + ".json")


def load_result_if_current(params, root="."):
    """The result JSON of `params`' expid if `is_current` (same parameters, newer than the data), else None.

    Benchmark scripts use it to reuse a finished run instead of training again.
    """
    path = result_json_path(params, root)
    try:
        with open(path) as fd:
            result = json.load(fd)
    except (OSError, ValueError):
        return None
    data_dir = os.path.join(root, params["data_root"], params["dataset_id"])
    return result if is_current(result, path, params, data_dir) else None


def is_current(result, result_path, params, data_dir):
    """Whether a finished result (dict with "test") at result_path belongs to a run of `params` on the
    data now in data_dir: written with the same parameters (JSON round trip, VOLATILE_PARAMS ignored)
    and not older than the dataset's last build (`build_info.json`), e.g. a new demo generator version."""
    if not isinstance(result, dict) or "test" not in result:
        return False
    old = {k: v for k, v in result.get("params", {}).items() if k not in VOLATILE_PARAMS}
    new = json.loads(json.dumps({k: v for k, v in params.items() if k not in VOLATILE_PARAMS}, default=str))
    if old != new:
        return False
    build_info = os.path.join(data_dir, "build_info.json")
    return not (os.path.exists(build_info) and os.path.getmtime(build_info) > os.path.getmtime(result_path))


def _write_text_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as fd:
        fd.write(text)
    os.replace(tmp, path)


def _csv_text(header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value):
    """A CSV cell: lists/dicts as compact JSON, None as empty, floats as given."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def _metric_cell(value):
    """Metrics with 6 decimals, as in FuxiCTR's result lines."""
    number = _number(value)
    return "" if number is None else f"{number:.6f}"


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _find_serving_stat(result, names):
    """First number under `result["serving"]` whose key (case-insensitive, spaces as _) is in names.

    `serving.index` is looked at first, then the rest of `serving` breadth first.
    """
    serving = (result or {}).get("serving")
    if not isinstance(serving, dict):
        return None
    index = serving.get("index")
    queue = ([index] if isinstance(index, dict) else []) + [serving]
    while queue:
        node = queue.pop(0)
        for key, value in node.items():
            if str(key).strip().lower().replace(" ", "_") in names and _number(value) is not None:
                return _number(value)
        queue += [v for k, v in node.items() if isinstance(v, dict) and v is not index]
    return None


def find_index_sparsity(result):
    """The sparse index's sparsity reported under `result["serving"]` (e.g. serving.index.Sparsity), or None."""
    return _find_serving_stat(result, ("sparsity", "index_sparsity"))


def find_index_metrics(result):
    """Test metrics computed through the serving index (`serving.metrics_index`), or {}."""
    serving = (result or {}).get("serving")
    metrics = serving.get("metrics_index") if isinstance(serving, dict) else None
    return {k: v for k, v in metrics.items() if _number(v) is not None} if isinstance(metrics, dict) else {}


def find_index_average_items(result):
    """Cached items per code ("Average Items" of the paper's Sec. 4.4) under `result["serving"]`, or None."""
    return _find_serving_stat(result, ("average_items", "avg_items", "index_average_items"))


# ---- selection --------------------------------------------------------------------------------
def monitored_value(run):
    """The run's monitored validation metric as a float, or None."""
    return _number((run.get("valid") or {}).get(run.get("monitor") or "Recall(k=20)"))


def best_runs(runs):
    """Best finished run of each (dataset_id, model) by its monitored validation metric.

    Ties keep the earlier run. Returns {(dataset_id, model): run}.
    """
    best = {}
    for run in runs:
        value = monitored_value(run)
        if run.get("status") != "done" or value is None:
            continue
        key = (run["dataset_id"], run["model"])
        current = best.get(key)
        if current is None:
            best[key] = run
            continue
        maximize = (run.get("monitor_mode") or "max") == "max"
        old = monitored_value(current)
        if (value > old) if maximize else (value < old):
            best[key] = run
    return best


def leaderboard_rows(runs, contributor=DEFAULT_CONTRIBUTOR):
    """{dataset_id: [row dict keyed by LEADERBOARD_HEADER]}, rows sorted by Recall@20 descending."""
    tables = {}
    for (dataset_id, model), run in best_runs(runs).items():
        year, publication, url = MODEL_INFO.get(model, ("", "", ""))
        row = {"Year": year, "Publication": publication, "Model": model, "Paper URL": url,
               "Running Steps": run.get("reproduce", ""), "Contributor": contributor}
        for column, metric in LEADERBOARD_METRICS.items():
            value = _number((run.get("test") or {}).get(metric))
            row[column] = "" if value is None else f"{value:.4f}"
        tables.setdefault(dataset_id, []).append(row)
    for rows in tables.values():
        rows.sort(key=lambda r: (r["Recall@20"] == "", -float(r["Recall@20"] or 0.0), r["Model"]))
    return tables


# ---- writers ----------------------------------------------------------------------------------
def _metric_names(runs, split):
    names = []
    for run in runs:
        for name in run.get(split) or {}:
            if name not in names:
                names.append(name)
    return names


def write_full_csv(path, runs, tuned_keys=None):
    """One row per run; columns: expid, model, dataset_id, status, tuned keys, metrics, timings, error."""
    if tuned_keys is None:
        tuned_keys = []
        for run in runs:
            tuned_keys += [k for k in run.get("tuned") or {} if k not in tuned_keys]
    valid_names, test_names = _metric_names(runs, "valid"), _metric_names(runs, "test")
    index_names = _metric_names(runs, "index_test")
    header = (["expid", "model", "dataset_id", "status"] + list(tuned_keys)
              + [f"valid_{m}" for m in valid_names] + [f"test_{m}" for m in test_names]
              + [f"index_test_{m}" for m in index_names]
              + ["wall_seconds", "index_sparsity", "index_average_items", "error"])
    rows = []
    for run in runs:
        tuned, valid, test = run.get("tuned") or {}, run.get("valid") or {}, run.get("test") or {}
        wall = _number(run.get("wall_seconds"))
        rows.append([run["expid"], run.get("model", ""), run.get("dataset_id", ""), run.get("status", "")]
                    + [_cell(tuned.get(k)) for k in tuned_keys]
                    + [_metric_cell(valid.get(m)) for m in valid_names]
                    + [_metric_cell(test.get(m)) for m in test_names]
                    + [_metric_cell((run.get("index_test") or {}).get(m)) for m in index_names]
                    + ["" if wall is None else round(wall, 1), _cell(run.get("index_sparsity")),
                       _cell(run.get("index_average_items")),
                       (run.get("error") or "").replace("\n", " ")])
    _write_text_atomic(path, _csv_text(header, rows))
    return path


def write_leaderboards(output_dir, runs, contributor=DEFAULT_CONTRIBUTOR):
    """`leaderboard_<dataset_id>.csv` for each dataset with a finished run. Returns the paths."""
    paths = []
    for dataset_id, rows in sorted(leaderboard_rows(runs, contributor).items()):
        path = os.path.join(output_dir, f"leaderboard_{dataset_id}.csv")
        _write_text_atomic(path, _csv_text(LEADERBOARD_HEADER, [[r[c] for c in LEADERBOARD_HEADER] for r in rows]))
        paths.append(path)
    return paths


def environment_info():
    """Python, OS, CPU/GPU and library versions of the current environment."""
    info = {"python": platform.python_version(), "os": platform.platform(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count()}
    try:
        import torch
        info["cuda"] = torch.version.cuda or "none"
        info["gpu"] = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                       if torch.cuda.is_available() else "none")
    except ImportError:
        pass
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    info["libraries"] = versions
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fd:
            for line in fd:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def log_excerpt(log_path, max_lines=40):
    """The last lines of a run log, progress-bar carriage returns removed."""
    if not log_path or not os.path.exists(log_path):
        return ""
    with open(log_path, encoding="utf-8", errors="replace") as fd:
        lines = [line.rstrip("\n").split("\r")[-1] for line in fd]
    lines = [line for line in lines if line.strip()]
    return "\n".join(lines[-max_lines:])


def _metrics_table(run):
    names = [m for m in _metric_names([run], "test")] or list(LEADERBOARD_METRICS.values())
    lines = ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for split in ("valid", "test"):
        values = run.get(split) or {}
        cells = [("" if _number(values.get(m)) is None else f"{values[m]:.6f}") for m in names]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_readme(runs, environment=None, title=None, notes=None):
    """Markdown text of the BARS-style report of the best run of each (dataset, model)."""
    environment = environment or environment_info()
    best = best_runs(runs)
    counts = {s: sum(r.get("status") == s for r in runs) for s in STATUSES}
    out = [f"# {title or 'Hyperparameter search results'}", ""]
    if notes:
        out += [notes, ""]
    out += [f"Runs: {len(runs)} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}). "
            "The best run of each model is chosen by its monitored validation metric; "
            "`full_results.csv` lists every run.", ""]
    out += ["## Environment", "", "| | |", "|---|---|"]
    for key in ("python", "os", "cpu", "cpu_count", "cuda", "gpu"):
        if key in environment:
            out.append(f"| {key} | {environment[key]} |")
    for name, version in environment.get("libraries", {}).items():
        out.append(f"| {name} | {version} |")
    out.append("")
    if not best:
        out += ["No run finished successfully.", ""]
    for (dataset_id, model), run in sorted(best.items(), key=lambda kv: (kv[0][0], -(monitored_value(kv[1])
                                                                                       or 0.0))):
        out += [f"## {model} on {dataset_id}: {run['expid']}", "",
                f"Best of {sum(1 for r in runs if r.get('model') == model and r.get('dataset_id') == dataset_id)} "
                f"run(s) by validation {run.get('monitor')} ({run.get('monitor_mode', 'max')}).", ""]
        if run.get("tuned"):
            out += ["Tuned values: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in run["tuned"].items()), ""]
        out += ["### Reproduce", "", "```bash", run.get("reproduce", ""), "```", ""]
        if run.get("config"):
            out += ["### Configuration", "", "```yaml",
                    yaml.safe_dump(run["config"], sort_keys=False, default_flow_style=None).rstrip(), "```", ""]
        out += ["### Results", "", _metrics_table(run), ""]
        if run.get("index_sparsity") is not None:
            out += [f"Sparse index: sparsity {run['index_sparsity']:.4f}"
                    + (f", {run['index_average_items']:.1f} items per code"
                       if run.get("index_average_items") is not None else ""), ""]
        if run.get("wall_seconds") is not None:
            out += [f"Wall time: {float(run['wall_seconds']):.1f} s", ""]
        if run.get("result_line"):
            out += ["Result line:", "", "```", run["result_line"].strip(), "```", ""]
        excerpt = log_excerpt(run.get("log_path"))
        if excerpt:
            out += ["### Log excerpt", "", "```", excerpt, "```", ""]
    return "\n".join(out)


def write_reports(output_dir, summary, contributor=DEFAULT_CONTRIBUTOR, title=None):
    """Full CSV, leaderboard CSV(s), README.md and summary.json in output_dir. Returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    runs = summary.get("runs", [])
    paths = {"full": write_full_csv(os.path.join(output_dir, "full_results.csv"), runs, summary.get("tuned_keys")),
             "leaderboards": write_leaderboards(output_dir, runs, contributor)}
    readme = render_readme(runs, title=title or summary.get("title"), notes=summary.get("notes"))
    paths["readme"] = os.path.join(output_dir, "README.md")
    _write_text_atomic(paths["readme"], readme + "\n")
    paths["summary"] = os.path.join(output_dir, "summary.json")
    _write_text_atomic(paths["summary"], json.dumps(summary, indent=2, default=str) + "\n")
    return paths


def load_summary(path):
    """A summary.json, given the file or its tuner output folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no summary.json (run run_param_tuner.py first)")
    with open(path, encoding="utf-8") as fd:
        return json.load(fd)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Merge tuner output folders into one set of reports.")
    parser.add_argument("inputs", nargs="+", help="tuner output folders (or their summary.json)")
    parser.add_argument("--output", required=True, help="folder for the merged reports")
    parser.add_argument("--contributor", default=DEFAULT_CONTRIBUTOR)
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        summaries = [load_summary(p) for p in args.inputs]
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    runs = [run for s in summaries for run in s.get("runs", [])]
    merged = {"title": args.title or "Merged hyperparameter search results", "runs": runs,
              "sources": [s.get("tuner_file") for s in summaries],
              "tuned_keys": None}
    paths = write_reports(args.output, merged, contributor=args.contributor)
    for path in [paths["full"], *paths["leaderboards"], paths["readme"]]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
