"""DSSM vs GRU4Rec vs SASRec: test Recall@50 and NDCG@50 on the demo data and on ML-100K.

Each (benchmark, model, seed) is one `run_expid.py` run of the model's expid (listed in
BENCHMARKS below). The configured seed with no `--set` override runs the expid as it is, so
that number is reproduced by `python run_expid.py --expid <expid>`; other seeds / overrides run
a copy of the expid (`<expid>__s<seed>`) from a temporary config folder that holds the
repository's config plus those copies. Results are read from
`<model_root>/<dataset_id>/<expid>.json`; `--reuse` skips a run whose JSON was written with the
same parameters. One row per run goes to `benchmarks/results/sequential_baselines.csv` (the rows of
the benchmarks run now replace theirs; other benchmarks' rows are kept), and the table (mean and
sample std over seeds) is rewritten between the table markers of
`benchmarks/results/sequential_baselines.md` (the rest of that file, the notes, is kept). With
`--paired`, every checkpoint is reloaded, per-user test Recall@50 / NDCG@50 are averaged over seeds
and the paired model differences get a bootstrap 95% CI over test users (the paired block of the
markdown, and `sequential_baselines_paired.csv`).

    python benchmarks/sequential_baselines.py --benchmarks ml100k --seeds 2023 2024 2025 --paired
    python benchmarks/sequential_baselines.py --benchmarks demo --set epochs=6 max_steps_per_epoch=300
    python benchmarks/sequential_baselines.py --report-only ...   # same --seeds/--set: table from the JSONs
"""
import argparse
import csv
import glob
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_zoo import get_model  # noqa: E402
from model_zoo.config import load_config  # noqa: E402
from model_zoo.engine.evaluator import Evaluator  # noqa: E402
from model_zoo.engine.experiment import open_data  # noqa: E402
from model_zoo.results import load_result_if_current, result_json_path  # noqa: E402
from model_zoo.retrieval.metrics import topk_metrics  # noqa: E402

# Benchmark name -> the expids compared on it (DSSM first: the paper's order DSSM < GRU4Rec < SASRec).
BENCHMARKS = {
    "demo": ("DSSM_demo_001", "GRU4Rec_demo_001", "SASRec_demo_001"),
    "ml100k": ("DSSM_ml100k_001", "GRU4Rec_ml100k_001", "SASRec_ml100k_001"),
}
METRICS = ("Recall(k=50)", "NDCG(k=50)", "Recall(k=20)", "NDCG(k=20)")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"
PAIRED_START, PAIRED_END = "<!-- paired:start -->", "<!-- paired:end -->"
PAIRED_METRICS = ("Recall", "NDCG")
PAIRED_K = 50
BOOTSTRAP_SAMPLES = 10000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", nargs="+", default=sorted(BENCHMARKS), choices=sorted(BENCHMARKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seeds (default: the expid's configured seed only)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override applied to every expid (YAML value, e.g. epochs=5 max_steps_per_epoch=null)")
    parser.add_argument("--config", default=os.path.join(ROOT, "config"), help="the repository's config folder")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose result JSON has the same parameters")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table from existing results")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of each run (threads only; the results do not depend on it)")
    parser.add_argument("--paired", action="store_true",
                        help="also reload every checkpoint, compute per-user test Recall@50 / NDCG@50 and "
                             "bootstrap the paired differences between models (95%% CI over test users)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "sequential_baselines"),
                        help="output path without extension (.csv and .md are written)")
    return parser.parse_args(argv)


def parse_overrides(pairs):
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def raw_entry(config_dir, expid):
    """The expid's own YAML entry (not merged with Base) and its file."""
    for path in sorted(glob.glob(os.path.join(config_dir, "model_config", "*.yaml"))):
        with open(path) as fd:
            content = yaml.safe_load(fd) or {}
        if expid in content:
            return dict(content[expid] or {}), path
    raise SystemExit(f"expid {expid} is not defined in {config_dir}/model_config (needed by this benchmark)")


class Plan:
    """The runs of the benchmark and the config folder each one is run from."""

    def __init__(self, args):
        self.args = args
        self.overrides = parse_overrides(args.set)
        self.tmp = None
        self.runs = []          # (benchmark, expid, seed, run_expid, config_dir)
        variants = {}
        for bench in args.benchmarks:
            for expid in BENCHMARKS[bench]:
                entry, _ = raw_entry(args.config, expid)
                configured = load_config(args.config, expid)["seed"]
                for seed in args.seeds or [configured]:
                    if seed == configured and not self.overrides:
                        self.runs.append((bench, expid, seed, expid, args.config))
                        continue
                    name = f"{expid}__s{seed}"
                    variants[name] = dict(entry, seed=seed, **self.overrides)
                    self.runs.append((bench, expid, seed, name, None))
        if variants:
            self.tmp = tempfile.mkdtemp(prefix="seqbench_")
            config = os.path.join(self.tmp, "config")
            shutil.copytree(args.config, config, ignore=shutil.ignore_patterns("tuner"))
            with open(os.path.join(config, "model_config", "zz_sequential_baselines.yaml"), "w") as fd:
                yaml.safe_dump(variants, fd, sort_keys=False)
            self.runs = [(b, e, s, r, c or config) for b, e, s, r, c in self.runs]

    def cleanup(self):
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def command(self, bench, seeds, plain_expid=None):
        """The command that reproduces a table line."""
        if plain_expid is not None:
            return f"python run_expid.py --expid {plain_expid}"
        sets = " ".join(f"{k}={json.dumps(v)}" for k, v in self.overrides.items())
        return (f"python benchmarks/sequential_baselines.py --benchmarks {bench} --seeds {' '.join(map(str, seeds))}"
                + (f" --set {sets}" if sets else ""))


def run_one(config_dir, run_expid, reuse, num_threads=None):
    params = load_config(config_dir, run_expid)
    path = result_json_path(params, ROOT)
    if reuse:
        result = load_result_if_current(params, ROOT)
        if result is not None:
            return result, False
    started = time.time()
    env = dict(os.environ)
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    proc = subprocess.run([sys.executable, "run_expid.py", "--config", config_dir, "--expid", run_expid],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"run_expid.py --expid {run_expid} failed (exit {proc.returncode}):\n{tail}")
    with open(path) as fd:
        result = json.load(fd)
    result["_wall_seconds"] = time.time() - started
    return result, True


def summarise(rows):
    """Mean and sample std of each metric over seeds, per (benchmark, expid)."""
    table = []
    keys = sorted({(r["benchmark"], r["expid"]) for r in rows},
                  key=lambda k: (k[0], BENCHMARKS[k[0]].index(k[1])))
    for bench, expid in keys:
        group = [r for r in rows if r["benchmark"] == bench and r["expid"] == expid]
        line = {"benchmark": bench, "dataset_id": group[0]["dataset_id"], "model": group[0]["model"],
                "expid": expid, "seeds": " ".join(str(r["seed"]) for r in group), "n": len(group),
                "test_users": group[0]["test_users"], "epochs": " ".join(str(r["epochs"]) for r in group),
                "train_minutes": round(statistics.mean(float(r["train_seconds"]) for r in group) / 60, 1),
                "command": group[0].get("command", "")}
        for metric in METRICS:
            values = [float(r[metric]) for r in group]
            line[metric] = statistics.mean(values)
            line[metric + " std"] = statistics.stdev(values) if len(values) > 1 else None
        table.append(line)
    return table


def markdown_table(table):
    lines = ["| Benchmark | Model | test Recall@50 | test NDCG@50 | test Recall@20 | test NDCG@20 | seeds | "
             "test users | epochs run | train min/run | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(line, metric):
        std = line[metric + " std"]
        return f"{line[metric]:.4f}" + (f" ± {std:.4f}" if std is not None else "")

    for line in table:
        lines.append(f"| {line['benchmark']} | {line['model']} | {cell(line, 'Recall(k=50)')} | "
                     f"{cell(line, 'NDCG(k=50)')} | {cell(line, 'Recall(k=20)')} | {cell(line, 'NDCG(k=20)')} | "
                     f"{line['seeds']} | {line['test_users']} | {line['epochs']} | {line['train_minutes']} | "
                     f"`{line['command']}` |")
    return "\n".join(lines)


def per_user_metrics(config_dir, run_expid):
    """Per-user test Recall@50 and NDCG@50 of a trained run, from its checkpoint: {metric: [n_users]}."""
    params = dict(load_config(config_dir, run_expid), verbose=0)
    _, feature_map, corpus, train, _, test = open_data(params)
    model = get_model(params["model"])(feature_map, **params)
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    model.load_weights(model.checkpoint)
    evaluator = Evaluator(eval_batch_size=params["eval_batch_size"], verbose=False)
    topk = evaluator.rank(model, test, PAIRED_K)                                       # [n_users, 50]
    out = {m: np.empty(len(test)) for m in PAIRED_METRICS}
    for u in range(len(test)):
        lo, hi = test.gt_indptr[u], test.gt_indptr[u + 1]
        scores = topk_metrics(topk[u:u + 1], np.array([0, hi - lo]), test.gt_items[lo:hi], ks=(PAIRED_K,),
                              metrics=PAIRED_METRICS, precision_denominator=params["precision_denominator"])
        for m in PAIRED_METRICS:
            out[m][u] = scores[f"{m}(k={PAIRED_K})"]
    return out


def paired_differences(plan, rows):
    """Bootstrap over test users of the per-user metric differences (seed-averaged) between models."""
    lines = []
    for bench in plan.args.benchmarks:
        per_model = {}
        for row in rows:
            if row["benchmark"] != bench:
                continue
            config_dir = next(c for b, e, s_, r, c in plan.runs if r == row["run_expid"])
            values = per_user_metrics(config_dir, row["run_expid"])
            per_model.setdefault(row["model"], []).append(values)
        means = {model: {m: np.mean([v[m] for v in runs], axis=0) for m in PAIRED_METRICS}
                 for model, runs in per_model.items()}
        models = [m for m in ("DSSM", "GRU4Rec", "SASRec") if m in means]
        n_users = len(next(iter(means.values()))["Recall"])
        rng = np.random.default_rng(0)
        samples = rng.integers(0, n_users, size=(BOOTSTRAP_SAMPLES, n_users))
        for i, first in enumerate(models):
            for second in models[i + 1:]:
                cells = []
                for m in PAIRED_METRICS:
                    diff = means[second][m] - means[first][m]                          # [n_users]
                    boot = diff[samples].mean(axis=1)
                    low, high = np.percentile(boot, [2.5, 97.5])
                    cells.append(f"{diff.mean():+.4f} [{low:+.4f}, {high:+.4f}]")
                lines.append({"benchmark": bench, "difference": f"{second} - {first}", "recall": cells[0],
                              "ndcg": cells[1], "test_users": n_users})
    return lines


def markdown_paired(lines):
    out = [f"| Benchmark | Difference (seed-averaged per user) | test Recall@{PAIRED_K} [95% CI] | "
           f"test NDCG@{PAIRED_K} [95% CI] | test users |", "|---|---|---|---|---|"]
    out += [f"| {x['benchmark']} | {x['difference']} | {x['recall']} | {x['ndcg']} | {x['test_users']} |"
            for x in lines]
    return "\n".join(out)


def replace_block(text, start, end, block):
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        fd.write(text)
    os.replace(tmp, path)


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fd:
        return list(csv.DictReader(fd))


def write_csv(path, rows, columns):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def write_outputs(out, benchmarks, rows, paired=None):
    """Rows of `benchmarks` replace theirs in `<out>.csv` (other benchmarks' rows are kept); the
    markdown table (and the paired block, if computed) is rebuilt from the merged rows."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    columns = ["benchmark", "dataset_id", "model", "expid", "seed", "run_expid", "command", "test_users",
               "epochs", "train_seconds"] + list(METRICS)
    rows = [r for r in read_csv(out + ".csv") if r["benchmark"] not in benchmarks] + rows
    rows.sort(key=lambda r: (order.get(r["benchmark"], 99), r["benchmark"]))
    write_csv(out + ".csv", rows, columns)
    paired_rows = None
    if paired is not None:
        paired_rows = [r for r in read_csv(out + "_paired.csv") if r["benchmark"] not in benchmarks] + paired
        paired_rows.sort(key=lambda r: (order.get(r["benchmark"], 99), r["benchmark"]))
        write_csv(out + "_paired.csv", paired_rows, ["benchmark", "difference", "recall", "ndcg", "test_users"])
    md_path = out + ".md"
    text = "# Sequential two-tower baselines\n"
    if os.path.exists(md_path):
        with open(md_path) as fd:
            text = fd.read()
    table = summarise(rows)
    text = replace_block(text, TABLE_START, TABLE_END, f"{TABLE_START}\n{markdown_table(table)}\n{TABLE_END}")
    if paired_rows is not None:
        text = replace_block(text, PAIRED_START, PAIRED_END,
                             f"{PAIRED_START}\n{markdown_paired(paired_rows)}\n{PAIRED_END}")
    write_atomic(md_path, text)
    return table, paired_rows


def collect(plan, run):
    rows = []
    for bench, expid, seed, run_expid, config_dir in plan.runs:
        params = load_config(config_dir, run_expid)
        if run:
            print(f"[{bench}] {run_expid} ...", flush=True)
            result, ran = run_one(config_dir, run_expid, plan.args.reuse, plan.args.num_threads)
            print(f"[{bench}] {run_expid}: {'ran' if ran else 'reused'}; test Recall@50 "
                  f"{result['test']['Recall(k=50)']:.4f} NDCG@50 {result['test']['NDCG(k=50)']:.4f}", flush=True)
        else:
            path = result_json_path(params, ROOT)
            if not os.path.exists(path):
                print(f"[{bench}] {run_expid}: no result at {path}; skipped", flush=True)
                continue
            with open(path) as fd:
                result = json.load(fd)
        rows.append({"benchmark": bench, "dataset_id": result["dataset_id"], "model": result["model"],
                     "expid": expid, "seed": seed, "run_expid": run_expid,
                     "test_users": result["eval_users"]["test"], "epochs": len(result["history"]),
                     "train_seconds": result["seconds"]["train"],
                     **{m: result["test"][m] for m in METRICS}})
    for row in rows:                                     # the command that reproduces the table line
        group = [r for r in rows if r["benchmark"] == row["benchmark"] and r["expid"] == row["expid"]]
        plain = all(r["run_expid"] == r["expid"] for r in group)
        row["command"] = plan.command(row["benchmark"], [r["seed"] for r in group], row["expid"] if plain else None)
    return rows


def main(argv=None):
    args = parse_args(argv)
    plan = Plan(args)
    try:
        rows = collect(plan, run=not args.report_only)
        if not rows:
            raise SystemExit("no result to report")
        paired = paired_differences(plan, rows) if args.paired else None
    finally:
        plan.cleanup()
    table, paired_rows = write_outputs(args.out, args.benchmarks, rows, paired)
    print(markdown_table(table))
    if paired_rows:
        print(markdown_paired(paired_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
