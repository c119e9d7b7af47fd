"""Test Recall@50 of every model next to the All-to-All SA oracle on demo, ml100k_recbole and ml1m_pairs.

Every run is an expid of ./config run unchanged by `run_experiment` (training with early stopping on the
validation users, then exact full ranking of every test user over every item, history masked), in a
temporary copy of the config where only these keys are set: `seed` (one copy `<expid>_seed<s>` per seed
other than the expid's own), `model_root` (default ./checkpoints/oracle_comparison/, so the repo's
checkpoints are not overwritten), `num_threads` (default 2) and, for the demo, `data_root` (default
./data/oracle_comparison/: a private copy generated from model_zoo/data/demo.py).

Rows: for each dataset, one expid per registered model (`<Model>_<dataset>_001`, else the shortest `*_001`
expid on that dataset). The AllToAllSA rows and every demo row are run here. The other models' ml100k_recbole
and ml1m_pairs rows are read from `--table2` (benchmarks/results/table2_movielens.csv, written by
benchmarks/table2_movielens.py) when that file has them, else run here too. A model fitted in closed form or
with nothing to train (EASE, ItemKNN, Popularity) is run once: its result does not depend on the seed.

Outputs: `<out>.md` (per dataset: mean and std over seeds, the ratio to AllToAllSA, training rows seen,
seconds; AllToAllSA's per-epoch validation curve) and `<out>.csv` (one row per run), rewritten after every run.

    python benchmarks/oracle_comparison.py --reuse                       # everything, seeds 2023 2024 2025
    python benchmarks/oracle_comparison.py --datasets ml1m_pairs --models AllToAllSA --reuse
    python benchmarks/oracle_comparison.py --report-only                 # rewrite the files from the JSONs
    python benchmarks/oracle_comparison.py --form-cost --datasets ml1m_pairs   # cost of the two attention forms

`--form-cost` trains nothing: with each dataset's AllToAllSA expid it times training steps (loss, backward,
Adam step; median over steps after two warm-up steps) and the exact ranking of 20 test users over every item,
for attention_form cached_user and full (same weights), and writes `<out>_form_cost.json`, which the report
shows.
"""
import argparse
import csv
import datetime
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from model_zoo import MODELS  # noqa: E402
from model_zoo.base import ClosedForm  # noqa: E402
from model_zoo.config import list_expids, load_config, load_model_config  # noqa: E402
from model_zoo.results import load_result_if_current  # noqa: E402

DATASETS = ("demo", "ml100k_recbole", "ml1m_pairs")
ORACLE = "AllToAllSA"
METRICS = ("Recall(k=50)", "Recall(k=20)", "NDCG(k=50)")
CSV_COLUMNS = ("dataset_id", "model", "expid", "seed", "source", "test_Recall(k=50)", "test_Recall(k=20)",
               "test_NDCG(k=50)", "valid_Recall(k=50)", "epochs", "training_rows_seen", "train_seconds",
               "eval_seconds", "test_users")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "config"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=None, help="only these models (default: every model)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[2023, 2024, 2025])
    parser.add_argument("--table2", default=os.path.join(REPO, "benchmarks", "results", "table2_movielens.csv"),
                        help="per-run results of the other models on ml100k_recbole / ml1m_pairs ('' = none)")
    parser.add_argument("--model-root", default=os.path.join(REPO, "checkpoints", "oracle_comparison"))
    parser.add_argument("--demo-data-root", default=os.path.join(REPO, "data", "oracle_comparison"))
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="keep a run whose result JSON has the same settings")
    parser.add_argument("--report-only", action="store_true", help="rewrite the outputs from existing JSONs")
    parser.add_argument("--form-cost", action="store_true", help="time the two attention forms (no training)")
    parser.add_argument("--form-cost-steps", type=int, default=6, help="timed training steps per form")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "oracle_comparison"),
                        help="output path without extension (.md and .csv)")
    return parser.parse_args(argv)


def model_expid(config_dir, model, dataset_id):
    """The expid of `model` on `dataset_id`: `<Model>_<dataset>_001`, else the shortest `*_001` one (or None)."""
    own = [e for e in list_expids(config_dir) if e.endswith("_001")
           and load_model_config(config_dir, e)["model"] == model
           and load_model_config(config_dir, e)["dataset_id"] == dataset_id]
    preferred = f"{model}_{dataset_id}_001"
    return preferred if preferred in own else min(own, key=lambda e: (len(e), e), default=None)


def seed_free(model):
    return not MODELS[model].trainable or issubclass(MODELS[model], ClosedForm)


def read_table2(path):
    """{(dataset_id, model): [row dict in CSV_COLUMNS terms]} of the other models' runs in the table2 CSV."""
    if not path or not os.path.exists(path):
        return {}
    with open(path, newline="") as fd:
        rows = list(csv.DictReader(fd))
    found = {}
    for row in rows:
        model, dataset_id = row.get("model"), row.get("dataset_id") or row.get("dataset")
        if not model or model == ORACLE or dataset_id not in DATASETS or row.get("status", "done") != "done":
            continue
        entry = {"dataset_id": dataset_id, "model": model, "expid": row.get("expid", ""), "seed": row.get("seed", ""),
                 "source": os.path.relpath(path, REPO)}
        for name in METRICS + ("valid_Recall(k=50)",):
            column = name if name.startswith("valid_") else f"test_{name}"
            value = row.get(column, row.get(column.replace("_", " ", 1)))
            entry[column] = float(value) if value not in (None, "") else None
        for column, options in (("train_seconds", ("train_seconds", "train_s", "seconds_train")),
                                ("eval_seconds", ("eval_seconds", "evaluate_seconds")),
                                ("epochs", ("epochs", "epochs_run")),
                                ("training_rows_seen", ("training_rows_seen", "examples"))):
            entry[column] = next((float(row[o]) for o in options if row.get(o) not in (None, "")), None)
        if entry["test_Recall(k=50)"] is not None:
            found.setdefault((dataset_id, model), []).append(entry)
    return found


def plan(args):
    """[(dataset_id, model, expid, seeds)] to run here and the table2 rows {(dataset_id, model): rows}."""
    table2, runs, borrowed = read_table2(args.table2), [], {}
    for dataset_id in args.datasets:
        for model in sorted(MODELS):
            if args.models and model not in args.models:
                continue
            expid = model_expid(args.config, model, dataset_id)
            if expid is None:
                continue
            if dataset_id != "demo" and model != ORACLE and (dataset_id, model) in table2:
                borrowed[(dataset_id, model)] = table2[(dataset_id, model)]
                continue
            runs.append((dataset_id, model, expid, args.seeds[:1] if seed_free(model) else args.seeds))
    return runs, borrowed


def seeded_config(args, runs, workdir):
    """A copy of the config with model_root / num_threads / the demo's data_root set and `<expid>_seed<s>`
    entries; returns its folder and {(expid, seed): name to run}."""
    copy = os.path.join(workdir, "config")
    shutil.copytree(args.config, copy)
    entries, names = {}, {}
    for _, _, expid, seeds in runs:
        own = load_config(args.config, expid)
        for seed in seeds:
            name = expid if seed == own["seed"] else f"{expid}_seed{seed}"
            entry = {k: v for k, v in load_model_config(args.config, expid).items()
                     if not k.startswith("_") and k != "model_id"}
            entry.update(seed=seed, num_threads=args.num_threads, model_root=os.path.abspath(args.model_root) + os.sep)
            entries[name], names[(expid, seed)] = entry, name
    for name in os.listdir(os.path.join(copy, "model_config")):       # the seeded entries replace the originals
        path = os.path.join(copy, "model_config", name)
        with open(path) as fd:
            content = yaml.safe_load(fd) or {}
        kept = {k: v for k, v in content.items() if k not in entries}
        with open(path, "w") as fd:
            yaml.safe_dump(kept, fd, sort_keys=False)
    with open(os.path.join(copy, "model_config", "zz_oracle_comparison.yaml"), "w") as fd:
        yaml.safe_dump(entries, fd, sort_keys=False)
    path = os.path.join(copy, "dataset_config.yaml")
    with open(path) as fd:
        datasets = yaml.safe_load(fd)
    for dataset_id, dataset in datasets.items():
        if dataset.get("raw_dir") and not os.path.isabs(dataset["raw_dir"]):
            dataset["raw_dir"] = os.path.normpath(os.path.join(REPO, dataset["raw_dir"]))
        dataset["data_root"] = os.path.join(REPO, dataset.get("data_root", "./data/"))
        if dataset_id == "demo":
            dataset["data_root"] = os.path.abspath(args.demo_data_root) + os.sep
            dataset.pop("raw_dir", None)                                # generated under the private root
    with open(path, "w") as fd:
        yaml.safe_dump(datasets, fd, sort_keys=False)
    return copy, names


def summary_row(dataset_id, model, expid, seed, result):
    history = result.get("history", [])
    return {"dataset_id": dataset_id, "model": model, "expid": expid, "seed": seed, "source": "this script",
            **{f"test_{m}": result["test"].get(m) for m in METRICS},
            "valid_Recall(k=50)": result["valid"].get("Recall(k=50)"), "epochs": len(history),
            "training_rows_seen": round(sum(h.get("examples_per_second", 0) * h.get("train_seconds", 0)
                                            for h in history)),
            "train_seconds": round(result["seconds"].get("train", 0.0), 1),
            "eval_seconds": round(result["seconds"].get("evaluate", 0.0), 1),
            "test_users": result.get("eval_users", {}).get("test"),
            "curve": [(h["epoch"], h["valid"].get("Recall(k=20)"), h["valid"].get("Recall(k=50)"),
                       h.get("train_seconds")) for h in history if "valid" in h]}


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def dataset_section(dataset_id, rows):
    """Markdown of one dataset: the per-model table (mean over seeds), the oracle's gap, its training curve."""
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    means = {model: _mean_std([r["test_Recall(k=50)"] for r in own])[0] for model, own in by_model.items()}
    oracle = means.get(ORACLE)
    lines = [f"## {dataset_id}", "",
             "| model | expid | seeds | test Recall@50 (mean ± std) | test Recall@20 | test NDCG@50 | R@50 / AllToAllSA "
             "| valid Recall@50 | epochs | training rows seen | train s | eval s | source |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for model in sorted(by_model, key=lambda m: -(means[m] or 0.0)):
        own = by_model[model]
        mean, std = _mean_std([r["test_Recall(k=50)"] for r in own])
        cells = [_fmt(_mean_std([r[f"test_{m}"] for r in own])[0]) for m in METRICS[1:]]
        per_run = {c: _mean_std([r.get(c) for r in own])[0] for c in
                   ("valid_Recall(k=50)", "epochs", "training_rows_seen", "train_seconds", "eval_seconds")}
        lines.append(f"| {model} | {own[0]['expid']} | {', '.join(str(r['seed']) for r in own)} | "
                     f"{_fmt(mean)} ± {_fmt(std)} | {' | '.join(cells)} | "
                     f"{_fmt(mean / oracle, 2) if oracle and mean is not None else '-'} | "
                     f"{_fmt(per_run['valid_Recall(k=50)'])} | {_fmt(per_run['epochs'], 1)} | "
                     + " | ".join("-" if per_run[c] is None else f"{per_run[c]:,.0f}"
                                  for c in ("training_rows_seen", "train_seconds", "eval_seconds"))
                     + f" | {own[0]['source']} |")
    lines.append("")
    if oracle is None:
        return lines + ["No AllToAllSA result on this dataset.", ""]
    best = max(means, key=lambda m: means[m] or 0.0)
    if best == ORACLE:
        runner_up = max((m for m in means if m != ORACLE), key=lambda m: means[m] or 0.0, default=None)
        lines.append(f"AllToAllSA has the highest mean test Recall@50 ({oracle:.4f})" +
                     (f", {oracle - means[runner_up]:+.4f} over {runner_up} ({means[runner_up]:.4f})."
                      if runner_up else "."))
    else:
        lines.append(f"AllToAllSA ({oracle:.4f}) trails {best} ({means[best]:.4f}) by {means[best] - oracle:.4f} "
                     f"test Recall@50 ({(means[best] - oracle) / means[best]:.1%}).")
    lines += ["", "AllToAllSA per-epoch validation (Recall@20 / Recall@50, train seconds of the epoch):", ""]
    for row in by_model[ORACLE]:
        curve = "; ".join(f"{e}: {_fmt(r20)} / {_fmt(r50)} ({_fmt(s, 0)} s)" for e, r20, r50, s in row.get("curve", []))
        lines.append(f"- seed {row['seed']}: {curve}")
    return lines + [""]


def write_outputs(args, rows, failures, seconds):
    lines = ["# Every model next to the All-to-All SA oracle (demo, ml100k_recbole, ml1m_pairs)", "",
             f"Generated {datetime.datetime.now().isoformat(timespec='seconds')}; python {platform.python_version()}, "
             f"{os.cpu_count()} cores shared with other jobs, {args.num_threads} torch threads per run, one run at a "
             "time.", "", "Command (from the repo root):", "", "```",
             "python benchmarks/oracle_comparison.py --datasets " + " ".join(args.datasets) + " --seeds " +
             " ".join(map(str, args.seeds)) + " --reuse", "```", "",
             "Protocol: each expid of config/model_config/ as committed (its own early stopping on the validation "
             "users), then exact full ranking of every test user over every item with the user's history (and, on "
             "ml1m_pairs, training and validation pairs) masked; the same users for every model. Rows marked "
             "`this script` were run by this command (result JSONs under "
             f"{os.path.relpath(os.path.abspath(args.model_root), REPO)}/); rows marked with a CSV path were read "
             "from that file (benchmarks/table2_movielens.py's per-run results, same protocol). `training rows "
             "seen` = (user, positive) rows over all epochs (mean over seeds); train s and eval s (validation + "
             "test ranking after training) are wall-clock seconds per run on a shared machine.", ""]
    for dataset_id in args.datasets:
        own = [r for r in rows if r["dataset_id"] == dataset_id]
        lines += dataset_section(dataset_id, own) if own else [f"## {dataset_id}", "", "No results.", ""]
    lines += form_cost_section(args)
    if failures:
        lines += ["Failed runs:", ""] + [f"- {name}: {problem}" for name, problem in failures.items()] + [""]
    if seconds is not None:
        lines += [f"This invocation took {seconds:.0f} s.", ""]
    _write_atomic(args.out + ".md", "\n".join(lines))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(args.out + ".csv", buffer.getvalue())


def form_cost(args):
    """Seconds per training step and per ranked user of AllToAllSA's two forms on each dataset (same weights)."""
    import json
    import numpy as np
    import torch
    from model_zoo.data.loaders import EvalUsers
    from model_zoo.engine.evaluator import Evaluator
    from model_zoo.engine.experiment import open_data
    torch.set_num_threads(args.num_threads)
    rows = []
    for dataset_id in args.datasets:
        expid = model_expid(args.config, ORACLE, dataset_id)
        params = dict(load_config(args.config, expid), data_root=os.path.join(REPO, "data") + os.sep)
        if dataset_id == "demo":
            params.update(data_root=os.path.abspath(args.demo_data_root) + os.sep, raw_dir=None)
        elif params.get("raw_dir") and not os.path.isabs(params["raw_dir"]):
            params["raw_dir"] = os.path.normpath(os.path.join(REPO, params["raw_dir"]))
        data_dir, feature_map, corpus, train, _, _ = open_data(params)
        users = EvalUsers(os.path.join(data_dir, "test.h5"), feature_map, corpus.num_items, 20, params["seed"])
        weights = None
        for form in ("cached_user", "full"):
            torch.manual_seed(params["seed"])
            model = MODELS[ORACLE](feature_map, **dict(params, attention_form=form))
            model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
            weights = weights or model.state_dict()
            model.load_state_dict(weights)
            optimizer = torch.optim.Adam(model.parameters(), lr=params["learning_rate"])
            model.train()
            seconds = []
            for step, batch in zip(range(args.form_cost_steps + 2), train):
                started = time.perf_counter()
                optimizer.zero_grad()
                model.loss(batch).backward()
                optimizer.step()
                seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            Evaluator(eval_batch_size=params["eval_batch_size"], verbose=False).rank(model, users, 50)
            rows.append({"dataset_id": dataset_id, "expid": expid, "attention_form": form,
                         "batch_size": params["batch_size"], "num_negatives": params["num_negatives"],
                         "negative_sampler": params["negative_sampler"], "num_items": corpus.num_items,
                         "step_seconds": float(np.median(seconds[2:])),
                         "rank_ms_per_user": 1000 * (time.perf_counter() - started) / len(users)})
            print(rows[-1], flush=True)
    _write_atomic(args.out + "_form_cost.json", json.dumps({"num_threads": args.num_threads, "rows": rows},
                                                           indent=2))


def form_cost_section(args):
    """Markdown of `<out>_form_cost.json` (empty if absent)."""
    import json
    path = args.out + "_form_cost.json"
    if not os.path.exists(path):
        return []
    with open(path) as fd:
        rows = json.load(fd)["rows"]
    lines = ["## Cost of the two attention forms", "",
             "`python benchmarks/oracle_comparison.py --form-cost --datasets " +
             " ".join(dict.fromkeys(r["dataset_id"] for r in rows)) + "` (no training: each dataset's AllToAllSA "
             "expid, the same initial weights in both forms; median training step after two warm-up steps, exact "
             "ranking of 20 test users over every item). `cached_user` encodes the user tokens once per user and "
             "scores a candidate with its own tokens; `full` encodes one [user; item] sequence per pair (the "
             "paper's form, user tokens attending to the item).", "",
             "| dataset | attention_form | batch x (1 + negatives) | s per training step | ms per ranked user "
             "(all items) | full / cached_user (step, ranking) |", "|---|---|---|---:|---:|---|"]
    cached = {r["dataset_id"]: r for r in rows if r["attention_form"] == "cached_user"}
    for r in rows:
        base = cached.get(r["dataset_id"])
        ratio = (f"{r['step_seconds'] / base['step_seconds']:.0f}x, {r['rank_ms_per_user'] / base['rank_ms_per_user']:.0f}x"
                 if base and r is not base else "-")
        negatives = "in-batch" if r["negative_sampler"] == "in_batch" else str(r["num_negatives"])
        lines.append(f"| {r['dataset_id']} | {r['attention_form']} | {r['batch_size']} x (1 + {negatives}) | "
                     f"{r['step_seconds']:.3f} | {r['rank_ms_per_user']:.1f} | {ratio} |")
    return lines + [""]


def _write_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        fd.write(text)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    if args.form_cost:
        form_cost(args)
        return 0
    from model_zoo.engine.experiment import run_experiment
    started, failures, rows = time.time(), {}, []
    runs, borrowed = plan(args)
    for own in borrowed.values():
        rows += own
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="oracle_comparison_") as workdir:
        config, names = seeded_config(args, runs, workdir)
        os.chdir(workdir)                                    # run_experiment's result CSV line lands here
        try:
            for dataset_id, model, expid, seeds in runs:
                for seed in seeds:
                    name = names[(expid, seed)]
                    result = load_result_if_current(load_config(config, name)) if args.reuse or args.report_only \
                        else None
                    if result is None and not args.report_only:
                        try:
                            result = run_experiment(config, name, command=f"oracle_comparison.py: {name}")
                        except Exception as exc:     # the table names the failure; the other runs go on
                            traceback.print_exc()
                            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if result is not None:
                        rows.append(summary_row(dataset_id, model, expid, seed, result))
                        print(f"{name}: test Recall@50 {result['test']['Recall(k=50)']:.4f}", flush=True)
                    write_outputs(args, rows, failures, None)
        finally:
            os.chdir(here)
    write_outputs(args, rows, failures, None if args.report_only else time.time() - started)
    print(open(args.out + ".md").read())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
