"""The paper's Table 2 (MovieLens-10M) on the MovieLens data of this repository: ML-100K and ML-1M pairs.

Every row of ROWS below is one expid per dataset; each (dataset, expid, seed) is one `run_expid.py` run of a
copy of the expid named `<expid>__s<seed>` with `seed` set (and, on the datasets of SPLIT_PER_SEED, also
`split_seed`, so every seed draws its own 8:1:1 user split: ML-100K has only 94 test users per split). The run's
result is kept as benchmarks/results/table2_movielens/<dataset_id>/<expid>__s<seed>.json; a rerun skips the
finished runs (resumable; a run killed mid-training continues from its last epoch), reruns a run whose expid
entry changed since, and skips, with a message, the expids not defined yet. Then
benchmarks/results/table2_movielens.md (between its table markers; the notes around them are kept) and .csv
get the mean and sample standard deviation over seeds of test Precision@50, NDCG@50, Recall@50 and Recall@20,
the training seconds per run, the paper's ML-10M numbers for the ordering, and, for each row with a
same-encoder two-tower, the per-seed gap to it where it loses.

    python benchmarks/table2_movielens.py                            # train what is missing, write the table
    python benchmarks/table2_movielens.py --datasets ml1m_pairs --models DSSM GRU4Rec
    python benchmarks/table2_movielens.py --list                     # every run and whether it is done
    python benchmarks/table2_movielens.py --report-only              # the table from the finished runs

Run it under the machine's training lock (one training job at a time).
"""
import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_zoo.config import list_expids, load_model_config  # noqa: E402

DATASETS = {"ml100k_recbole": "ML-100K (RecBole files, sequential protocol, users 8:1:1)",
            "ml1m_pairs": "ML-1M pairs (BARS protocol, given train / valid / test pairs)"}
# Row label -> (label of the same-encoder two-tower it is compared with, {dataset_id: expid}).
ROWS = {
    "Popularity": (None, {"ml100k_recbole": "Popularity_ml100k_recbole_001",
                          "ml1m_pairs": "Popularity_ml1m_pairs_001"}),
    "EASE": (None, {"ml100k_recbole": "EASE_ml100k_recbole_001", "ml1m_pairs": "EASE_ml1m_pairs_001"}),
    "ItemKNN": (None, {"ml100k_recbole": "ItemKNN_ml100k_recbole_001", "ml1m_pairs": "ItemKNN_ml1m_pairs_001"}),
    "DSSM": (None, {"ml100k_recbole": "DSSM_ml100k_recbole_001", "ml1m_pairs": "DSSM_ml1m_pairs_001"}),
    "GRU4Rec": (None, {"ml100k_recbole": "GRU4Rec_ml100k_recbole_001", "ml1m_pairs": "GRU4Rec_ml1m_pairs_001"}),
    "SASRec": (None, {"ml100k_recbole": "SASRec_ml100k_recbole_001", "ml1m_pairs": "SASRec_ml1m_pairs_001"}),
    "SparCode-DNN": ("DSSM", {"ml100k_recbole": "SparCode_ml100k_001", "ml1m_pairs": "SparCode_ml1m_pairs_001"}),
    "SparCode-GRU": ("GRU4Rec", {"ml100k_recbole": "SparCode_ml100k_gru", "ml1m_pairs": "SparCode_ml1m_pairs_gru"}),
    "SparCode-SA": ("SASRec", {"ml100k_recbole": "SparCode_ml100k_sa", "ml1m_pairs": "SparCode_ml1m_pairs_sa"}),
    "AllToAllSA": (None, {"ml100k_recbole": "AllToAllSA_ml100k_recbole_001",
                          "ml1m_pairs": "AllToAllSA_ml1m_pairs_001"}),
}
# The paper's Table 2 (MovieLens-10M, in %): Precision@50, NDCG@50, Recall@50.
PAPER_ML10M = {"DSSM": (8.124, 17.690, 26.534), "GRU4Rec": (8.356, 18.473, 28.261), "SASRec": (8.754, 19.202, 29.828),
               "SparCode-DNN": (8.393, 18.295, 27.184), "SparCode-GRU": (8.888, 20.050, 29.492),
               "SparCode-SA": (9.020, 20.480, 30.142), "AllToAllSA": (9.378, 21.950, 31.946)}
SEEDS = (2023, 2024, 2025)
# Datasets whose user split is drawn again per seed (split_seed = seed, built under data/split_<seed>/).
SPLIT_PER_SEED = ("ml100k_recbole",)
DEFAULT_SPLIT_SEED = 2023
METRICS = ("Precision(k=50)", "NDCG(k=50)", "Recall(k=50)", "Recall(k=20)")
SHORT = {"Precision(k=50)": "P@50", "NDCG(k=50)": "NDCG@50", "Recall(k=50)": "R@50", "Recall(k=20)": "R@20"}
MODEL_ROOT = "./checkpoints/table2_movielens/"
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=list(ROWS), choices=list(ROWS), help="row labels")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--config", default=os.path.join(ROOT, "config"), help="the repository's config folder")
    parser.add_argument("--runs", default=os.path.join(RESULTS, "table2_movielens"),
                        help="folder of the per-run result JSONs")
    parser.add_argument("--out", default=os.path.join(RESULTS, "table2_movielens"),
                        help="output path without extension (.md and .csv are written)")
    parser.add_argument("--list", action="store_true", help="list the runs and their state, train nothing")
    parser.add_argument("--report-only", action="store_true", help="write the table from the finished runs")
    return parser.parse_args(argv)


# ---- the runs --------------------------------------------------------------------------------------------
def variant_entry(entry, dataset_id, seed):
    """The expid's merged entry with this run's seed (and split seed with its own data_root)."""
    entry = {k: v for k, v in entry.items() if not k.startswith("_") and k != "model_id"}
    entry.update(seed=seed, model_root=MODEL_ROOT, verbose=0)
    if dataset_id in SPLIT_PER_SEED and seed != DEFAULT_SPLIT_SEED:
        entry.update(split_seed=seed, data_root=f"./data/split_{seed}/")
    return entry


def split_seed_of(dataset_id, seed):
    return seed if dataset_id in SPLIT_PER_SEED else DEFAULT_SPLIT_SEED


def run_name(expid, seed):
    return f"{expid}__s{seed}"


def run_path(runs_dir, dataset_id, expid, seed):
    return os.path.join(runs_dir, dataset_id, run_name(expid, seed) + ".json")


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def finished_record(path, entry):
    """The stored record of a run if it exists and was made with this entry, else None."""
    try:
        with open(path) as fd:
            record = json.load(fd)
    except (OSError, ValueError):
        return None
    return record if record.get("entry") == _canonical(entry) and "test" in record else None


def plan_runs(args):
    """[(dataset_id, row, expid, seed, entry or None, why skipped)], in seed-major order."""
    known = set(list_expids(args.config))
    runs = []
    for seed in args.seeds:
        for dataset_id in args.datasets:
            for row in args.models:
                expid = ROWS[row][1][dataset_id]
                if expid not in known:
                    runs.append((dataset_id, row, expid, seed, None, "not defined in config/model_config yet"))
                    continue
                entry = variant_entry(load_model_config(args.config, expid), dataset_id, seed)
                runs.append((dataset_id, row, expid, seed, entry, None))
    return runs


def write_json_atomic(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        json.dump(content, fd, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def make_record(result, dataset_id, row, expid, seed, entry):
    """The compact per-run record kept under benchmarks/results (no checkpoint paths, no serving report)."""
    return {"dataset_id": dataset_id, "row": row, "expid": expid, "seed": seed,
            "split_seed": split_seed_of(dataset_id, seed), "run_expid": run_name(expid, seed), "model": result["model"],
            "entry": _canonical(entry), "valid": result["valid"], "test": result["test"],
            "seconds": result["seconds"], "epochs_run": len(result["history"]), "eval_users": result["eval_users"],
            "history": result["history"]}


def train_one(config_dir, dataset_id, expid, seed, entry, log_tail=25):
    """Run `run_expid.py` on the variant, echoing its epoch lines; returns its result dict."""
    name = run_name(expid, seed)
    command = [sys.executable, "run_expid.py", "--config", config_dir, "--expid", name]
    tail = deque(maxlen=log_tail)
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if "[Epoch" in line or "Early stopping" in line or "ERROR" in line:
                print(f"    {line.split(' INFO ')[-1].rstrip()}", flush=True)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"run_expid.py --expid {name} exited with {code}:\n" + "\n".join(tail))
    path = os.path.join(ROOT, entry["model_root"], dataset_id, name + ".json")
    with open(path) as fd:
        return json.load(fd)


def variant_config(config_dir, runs, workdir):
    """A copy of the config folder (without tuner files) plus one file with every variant entry."""
    copy = os.path.join(workdir, "config")
    shutil.copytree(config_dir, copy, ignore=shutil.ignore_patterns("tuner"))
    variants = {run_name(expid, seed): entry for _, _, expid, seed, entry, _ in runs if entry is not None}
    with open(os.path.join(copy, "model_config", "zz_table2_movielens.yaml"), "w") as fd:
        yaml.safe_dump(variants, fd, sort_keys=False)
    return copy


def execute(args, runs):
    """Train the runs that have no current record (one at a time); returns the failures
    [(dataset_id, expid, seed, first line of the error)]."""
    todo = [r for r in runs if r[4] is not None
            and finished_record(run_path(args.runs, r[0], r[2], r[3]), r[4]) is None]
    failures = []
    if not todo or args.report_only or args.list:
        return failures
    workdir = tempfile.mkdtemp(prefix="table2_")
    try:
        config_dir = variant_config(args.config, todo, workdir)
        started = time.time()
        for number, (dataset_id, row, expid, seed, entry, _) in enumerate(todo, 1):
            elapsed = time.time() - started
            eta = f", about {elapsed / (number - 1) * (len(todo) - number + 1) / 60:.0f} min left" if number > 1 else ""
            print(f"[{number}/{len(todo)}] {dataset_id} {row} {expid} seed {seed}{eta}", flush=True)
            try:
                result = train_one(config_dir, dataset_id, expid, seed, entry)
            except (RuntimeError, OSError, ValueError) as exc:
                print(f"  FAILED: {exc}", flush=True)
                failures.append((dataset_id, expid, seed, str(exc).splitlines()[0]))
                continue
            record = make_record(result, dataset_id, row, expid, seed, entry)
            write_json_atomic(run_path(args.runs, dataset_id, expid, seed), record)
            test = record["test"]
            print(f"  done in {record['seconds'].get('train', 0.0):.0f} s training: " +
                  " ".join(f"{SHORT[m]} {test[m]:.4f}" for m in METRICS), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return failures


# ---- the table -------------------------------------------------------------------------------------------
def _mean_std(values):
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(records):
    """{(dataset_id, row): summary} with mean / std of each metric and of the training seconds over seeds."""
    groups = {}
    for record in records:
        groups.setdefault((record["dataset_id"], record["row"]), []).append(record)
    table = {}
    for key, group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        line = {"expid": group[0]["expid"], "seeds": [r["seed"] for r in group],
                "test_users": sorted({r["eval_users"]["test"] for r in group}),
                "per_seed": {r["seed"]: {m: r["test"][m] for m in METRICS} for r in group}}
        for metric in METRICS:
            line[metric] = _mean_std([r["test"][metric] for r in group])
        line["train_seconds"] = _mean_std([float(r["seconds"].get("train", 0.0)) for r in group])
        line["epochs_run"] = [r["epochs_run"] for r in group]
        table[key] = line
    return table


def gap_to(line, reference):
    """{metric: (mean, std) of row - reference over the seeds both have}, or None without common seeds."""
    seeds = sorted(set(line["per_seed"]) & set(reference["per_seed"]))
    if not seeds:
        return None
    return {m: _mean_std([line["per_seed"][s][m] - reference["per_seed"][s][m] for s in seeds]) for m in METRICS}


def gap_note(line, reference, reference_label):
    """Text of the gap column: where the row loses to its two-tower, by how much (per-seed differences)."""
    gaps = gap_to(line, reference)
    if gaps is None:
        return f"no common seed with {reference_label}"
    losing = [m for m in METRICS if gaps[m][0] < 0]
    if not losing:
        return f">= {reference_label} on all four"
    parts = []
    for metric in losing:
        mean, std = gaps[metric]
        base = reference[metric][0]
        relative = f", {100 * mean / base:+.1f}%" if base else ""
        parts.append(f"{SHORT[metric]} {mean:+.4f}{f' ± {std:.4f}' if std is not None else ''}{relative}")
    return f"**loses to {reference_label}**: " + "; ".join(parts)


def _cell(mean_std, digits=4):
    mean, std = mean_std
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def ordering(table, dataset_id, rows):
    """Row labels with a result, best first by mean Recall@50."""
    done = [r for r in rows if (dataset_id, r) in table]
    return sorted(done, key=lambda r: -table[(dataset_id, r)]["Recall(k=50)"][0])


def markdown(table, runs, datasets, rows, seeds):
    missing = {(d, r): why for d, r, _, _, entry, why in runs if entry is None}
    lines = []
    for dataset_id in datasets:
        lines += [f"### {DATASETS[dataset_id]}", "",
                  f"`python benchmarks/table2_movielens.py --datasets {dataset_id} --seeds "
                  f"{' '.join(map(str, seeds))}`" +
                  (" (split_seed = seed)" if dataset_id in SPLIT_PER_SEED else ""), "",
                  "| Model | expid | seeds | test users | Precision@50 | NDCG@50 | Recall@50 | Recall@20 | "
                  "train s/run | vs same-encoder two-tower | paper ML-10M P@50 / NDCG@50 / R@50 (%) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            reference_label, expids = ROWS[row]
            paper = " / ".join(f"{v:.3f}" for v in PAPER_ML10M[row]) if row in PAPER_ML10M else ""
            line = table.get((dataset_id, row))
            if line is None:
                why = missing.get((dataset_id, row), "no finished run yet")
                lines.append(f"| {row} | {expids[dataset_id]} | 0 | | {why} | | | | | | {paper} |")
                continue
            reference = table.get((dataset_id, reference_label)) if reference_label else None
            gap = gap_note(line, reference, reference_label) if reference else ("" if not reference_label else
                                                                               f"{reference_label} not run")
            users = "/".join(str(u) for u in line["test_users"])
            lines.append(f"| {row} | {line['expid']} | {' '.join(map(str, line['seeds']))} | {users} | "
                         + " | ".join(_cell(line[m]) for m in METRICS)
                         + f" | {_cell(line['train_seconds'], 1)} | {gap} | {paper} |")
        order = ordering(table, dataset_id, rows)
        if order:
            lines += ["", "Order by mean Recall@50 here: " + " > ".join(order) + ". The paper's on ML-10M: "
                      + " > ".join(sorted(PAPER_ML10M, key=lambda r: -PAPER_ML10M[r][2])) + "."]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


CSV_COLUMNS = (["dataset_id", "model", "expid", "seeds", "test_users"]
               + [f"{m} {s}" for m in METRICS for s in ("mean", "std")]
               + ["train_seconds mean", "train_seconds std", "epochs_run", "vs_two_tower",
                  "paper_ml10m P@50 %", "paper_ml10m NDCG@50 %", "paper_ml10m R@50 %"])


def csv_rows(table, datasets, rows):
    out = []
    for dataset_id in datasets:
        for row in rows:
            line = table.get((dataset_id, row))
            if line is None:
                continue
            reference_label = ROWS[row][0]
            reference = table.get((dataset_id, reference_label)) if reference_label else None
            record = {"dataset_id": dataset_id, "model": row, "expid": line["expid"],
                      "seeds": " ".join(map(str, line["seeds"])),
                      "test_users": " ".join(map(str, line["test_users"])),
                      "epochs_run": " ".join(map(str, line["epochs_run"])),
                      "vs_two_tower": gap_note(line, reference, reference_label).replace("**", "") if reference else ""}
            for metric in METRICS + ("train_seconds",):
                mean, std = line[metric]
                record[f"{metric} mean"], record[f"{metric} std"] = mean, ("" if std is None else std)
            for name, value in zip(CSV_COLUMNS[-3:], PAPER_ML10M.get(row, ("", "", ""))):
                record[name] = value
            out.append(record)
    return out


def write_text_atomic(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        fd.write(text)
    os.replace(tmp, path)


def replace_block(text, block):
    """`text` with the part between the table markers replaced (appended when there are none)."""
    wrapped = f"{TABLE_START}\n{block}\n{TABLE_END}"
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        return head + wrapped + rest.split(TABLE_END, 1)[1]
    return text.rstrip("\n") + "\n\n" + wrapped + "\n"


def write_outputs(out, table, runs, datasets, rows, seeds):
    md_path = out + ".md"
    text = "# The paper's Table 2 on MovieLens\n"
    if os.path.exists(md_path):
        with open(md_path) as fd:
            text = fd.read()
    write_text_atomic(md_path, replace_block(text, markdown(table, runs, datasets, rows, seeds)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(table, datasets, rows))
    write_text_atomic(out + ".csv", buffer.getvalue())


def main(argv=None):
    args = parse_args(argv)
    os.chdir(ROOT)                  # the config's relative paths (data, raw files, checkpoints) are from here
    runs = plan_runs(args)
    for dataset_id, row, expid, seed, entry, why in runs:
        if entry is None:
            if seed == args.seeds[0]:
                print(f"[skip] {dataset_id} {row}: expid {expid} is {why}; rerun this script once it is", flush=True)
        elif args.list:
            done = finished_record(run_path(args.runs, dataset_id, expid, seed), entry) is not None
            print(f"{'done   ' if done else 'pending'} {dataset_id} {row} {expid} seed {seed}")
    failures = execute(args, runs)
    if args.list:
        return 0
    # The table covers every dataset and row (the finished runs of every seed asked for).
    every = plan_runs(argparse.Namespace(**dict(vars(args), datasets=list(DATASETS), models=list(ROWS))))
    records = [rec for d, _, e, s, entry, _ in every if entry is not None
               for rec in [finished_record(run_path(args.runs, d, e, s), entry)] if rec is not None]
    table = summarise(records)
    write_outputs(args.out, table, every, list(DATASETS), list(ROWS), args.seeds)
    print(f"{len(records)} finished run(s) in {args.out}.md / .csv"
          + (f"; {len(failures)} failed: " + ", ".join(f"{d} {e} seed {s}" for d, e, s, _ in failures)
             if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
