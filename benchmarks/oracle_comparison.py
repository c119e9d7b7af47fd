"""Recall@50 of the All-to-All SA oracle, SparCode and DSSM (and Popularity) on the same evaluation users.

Every expid of ./config runs unchanged (run_experiment: train with early stopping on the validation
users, then exact full ranking of the test users over every item, history masked), except for the keys
this script sets identically for all of them:

- eval_max_users and seed: the same seeded random subset of validation and test users for every model
  (EvalUsers draws it from the seed; the report prints a fingerprint of the test rows);
- data_root (default ./data/oracle_comparison/): a private copy of the demo, generated from
  model_zoo/data/demo.py on first use (--fresh-data regenerates it from the current demo.py), so other
  runs on ./data/demo are not disturbed; a result older than the data is stale (rerun, not reported);
- model_root (default ./checkpoints/oracle_comparison/): the repo's checkpoints are not overwritten;
- num_threads (default 1: the machine is shared).

Results: one JSON per expid under <model_root>/<dataset_id>/ and the table in
benchmarks/results/oracle_comparison.md (rewritten from all JSONs present after every run).

    python benchmarks/oracle_comparison.py                                  # the four demo expids
    python benchmarks/oracle_comparison.py --expids SparCode_demo_001 --reuse   # add one, keep the others
    python benchmarks/oracle_comparison.py --report-only                    # just rewrite the table
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from model_zoo.config import load_dataset_config, load_model_config  # noqa: E402
from model_zoo.data.loaders import EvalUsers, ItemCorpus, load_feature_map  # noqa: E402

DEFAULT_EXPIDS = ("Popularity_demo_001", "DSSM_demo_001", "SparCode_demo_001", "AllToAllSA_demo_001")
REPORT_METRICS = ("Recall(k=50)", "Recall(k=20)", "NDCG(k=50)", "HitRate(k=50)")
ORACLE = "AllToAllSA"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "config"))
    parser.add_argument("--expids", nargs="+", default=list(DEFAULT_EXPIDS))
    parser.add_argument("--eval-max-users", type=int, default=200, help="seeded user subset (valid and test)")
    parser.add_argument("--seed", type=int, default=2023, help="seed of the subset and of training")
    parser.add_argument("--data-root", default=os.path.join(REPO, "data", "oracle_comparison"))
    parser.add_argument("--model-root", default=os.path.join(REPO, "checkpoints", "oracle_comparison"))
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="skip an expid whose result JSON has these settings")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from existing JSONs")
    parser.add_argument("--fresh-data", action="store_true",
                        help="delete <data-root>/demo first: regenerate it from the current demo.py (results on "
                             "the old data are then stale and rerun)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "oracle_comparison.md"))
    return parser.parse_args(argv)


def overrides(args):
    return {"eval_max_users": args.eval_max_users, "seed": args.seed, "num_threads": args.num_threads,
            "data_root": os.path.abspath(args.data_root) + os.sep,
            "model_root": os.path.abspath(args.model_root) + os.sep}


def planned_entry(args, expid):
    """The expid's settings (Base merged in, overrides applied) and its dataset entry."""
    entry = {k: v for k, v in load_model_config(args.config, expid).items() if not k.startswith("_")
             and k != "model_id"}
    entry.update(overrides(args))
    dataset = {k: v for k, v in load_dataset_config(args.config, entry["dataset_id"]).items()
               if not k.startswith("_") and k != "dataset_id"}
    if dataset.get("raw_dir") and not os.path.isabs(dataset["raw_dir"]):
        dataset["raw_dir"] = os.path.join(REPO, dataset["raw_dir"])
    return entry, dataset


def write_run_config(args, expid, folder):
    """A config folder holding only the expid and its dataset entry."""
    entry, dataset = planned_entry(args, expid)
    os.makedirs(os.path.join(folder, "model_config"), exist_ok=True)
    with open(os.path.join(folder, "dataset_config.yaml"), "w") as fd:
        yaml.safe_dump({entry["dataset_id"]: dataset}, fd, sort_keys=False)
    with open(os.path.join(folder, "model_config", "oracle_comparison.yaml"), "w") as fd:
        yaml.safe_dump({expid: entry}, fd, sort_keys=False)
    return entry


def result_path(args, entry, expid):
    return os.path.join(os.path.abspath(args.model_root), entry["dataset_id"], expid + ".json")


def matches(result, wanted, path):
    """The result has the wanted settings and is newer than the dataset it was computed on."""
    info = os.path.join(wanted["data_root"], wanted["dataset_id"], "build_info.json")
    if not os.path.exists(info) or os.path.getmtime(info) > os.path.getmtime(path):
        return False
    return all(result["params"].get(k) == v for k, v in wanted.items() if k not in ("data_root", "model_root"))


def run_one(args, expid):
    """Run one expid in a temporary config folder (FuxiCTR's result csv lands there too)."""
    from model_zoo.engine.experiment import run_experiment
    folder = tempfile.mkdtemp(prefix="oracle_comparison_")
    here = os.getcwd()
    try:
        entry = write_run_config(args, expid, folder)
        path = result_path(args, entry, expid)
        if args.reuse and os.path.exists(path):
            with open(path) as fd:
                if matches(json.load(fd), entry, path):
                    print(f"{expid}: reusing {path}", flush=True)
                    return None
        started = time.time()
        os.chdir(folder)
        run_experiment(folder, expid, gpu=-1, command=" ".join(["python"] + sys.argv))
        print(f"{expid}: done in {time.time() - started:.0f} s", flush=True)
        return None
    except Exception as exc:  # report the failure in the table and go on with the next expid
        traceback.print_exc()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        os.chdir(here)
        shutil.rmtree(folder, ignore_errors=True)


def subset_fingerprint(data_dir, dataset_id, max_users, seed):
    feature_map = load_feature_map(data_dir, dataset_id)
    num_items = ItemCorpus(os.path.join(data_dir, "item_corpus.h5"), feature_map).num_items
    test = EvalUsers(os.path.join(data_dir, "test.h5"), feature_map, num_items, max_users, seed)
    total = len(EvalUsers(os.path.join(data_dir, "test.h5"), feature_map, num_items))
    return len(test), total, hashlib.sha1(test.rows.astype("int64").tobytes()).hexdigest()[:12], num_items


def write_report(args, failures, seconds):
    rows, settings = [], None
    for expid in args.expids:
        try:
            entry, _ = planned_entry(args, expid)
        except Exception as exc:
            rows.append((expid, None, f"config: {exc}"))
            continue
        path = result_path(args, entry, expid)
        result = None
        if os.path.exists(path):
            with open(path) as fd:
                result = json.load(fd)
            if not matches(result, entry, path):
                result = None
        rows.append((expid, result, failures.get(expid) or (None if result else "not run")))
        settings = settings or entry
    lines = ["# All-to-All SA oracle vs SparCode vs DSSM on the demo data (same users)", ""]
    lines.append(f"Generated {datetime.datetime.now().isoformat(timespec='seconds')}; python "
                 f"{platform.python_version()}, {os.cpu_count()} cores shared with other jobs "
                 f"(load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}), one torch thread per run.")
    lines.append("")
    lines += ["Command (from the repo root):", "", "```",
              f"python benchmarks/oracle_comparison.py --expids {' '.join(args.expids)} "
              f"--eval-max-users {args.eval_max_users} --seed {args.seed} --reuse", "```", "",
              "(--reuse keeps a model's finished result when its settings are unchanged, so the models can "
              "be run one at a time; --report-only rewrites this file from the result JSONs.)", ""]
    ok = [r for r in rows if r[1]]
    if ok:
        first = ok[0][1]
        data_dir = os.path.join(first["params"]["data_root"], first["dataset_id"])
        n_eval, n_total, digest, num_items = subset_fingerprint(data_dir, first["dataset_id"],
                                                                args.eval_max_users, args.seed)
        info_path = os.path.join(data_dir, "build_info.json")
        raw = {}
        if os.path.exists(info_path):
            with open(info_path) as fd:
                raw = {os.path.basename(f["path"]): f["sha256"][:12] for f in json.load(fd).get("files", [])}
        lines.append(f"Evaluation: exact full ranking over all {num_items} items (history masked) of the same "
                     f"{n_eval} of {n_total} test users for every model (eval_max_users={args.eval_max_users}, "
                     f"seed={args.seed}; test rows sha1 {digest}); model selection on the same-size seeded "
                     f"subset of the validation users. Data: demo generated by model_zoo/data/demo.py into "
                     f"{os.path.relpath(data_dir, REPO)} (raw sha256 " +
                     ", ".join(f"{k} {v}" for k, v in sorted(raw.items())) + ").")
        lines.append("")
        for expid, result, _ in ok:
            users = result.get("eval_users", {})
            if users.get("test") != n_eval:
                lines.append(f"WARNING: {expid} was evaluated on {users.get('test')} test users, not {n_eval}.")
    oracle = next((r[1]["test"]["Recall(k=50)"] for r in ok if r[1]["model"] == ORACLE), None)
    head = ["model", "expid"] + [f"test {m}" for m in REPORT_METRICS] + \
        ["R@50 / AllToAllSA", "valid Recall(k=50)", "epochs", "training rows seen", "train s",
         "eval s (valid+test)", "test users"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for expid, result, problem in rows:
        if result is None:
            lines.append(f"| {expid.split('_')[0]} | {expid} | " + " | ".join(["-"] * (len(head) - 3)) +
                         f" | {problem} |")
            continue
        test, valid = result["test"], result["valid"]
        share = f"{test['Recall(k=50)'] / oracle:.2f}" if oracle else "-"
        best_valid = valid.get("Recall(k=50)", float("nan"))
        seen = sum(h.get("examples_per_second", 0) * h.get("train_seconds", 0) for h in result.get("history", []))
        lines.append(f"| {result['model']} | {expid} | " + " | ".join(f"{test[m]:.4f}" for m in REPORT_METRICS) +
                     f" | {share} | {best_valid:.4f} | {len(result.get('history', []))} | {seen:,.0f} | "
                     f"{result['seconds'].get('train', 0):.0f} | {result['seconds'].get('evaluate', 0):.0f} | "
                     f"{result.get('eval_users', {}).get('test', '-')} |")
    lines += ["", "Columns: test metrics after early stopping on the validation subset (best epoch's weights); "
              "`valid Recall(k=50)` of those weights; `epochs` trained; `training rows seen` = (user, positive) "
              "training rows over all epochs (the oracle encodes batch_size x (1 + num_negatives) user-item "
              "sequences per step, so on a CPU it sees far fewer rows than the two-tower models).",
              "", "Each model's own hyperparameters are those of its expid in config/model_config/ (the "
              "JSON next to each checkpoint under " + os.path.relpath(os.path.abspath(args.model_root), REPO) +
              " holds the merged parameters and per-epoch history). Times are wall-clock on a shared "
              "machine and only indicative.", ""]
    if seconds is not None:
        lines.append(f"This invocation took {seconds:.0f} s.")
        lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        fd.write("\n".join(lines))
    os.replace(tmp, args.out)
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    started, failures = time.time(), {}
    if args.fresh_data and not args.report_only:
        shutil.rmtree(os.path.join(os.path.abspath(args.data_root), "demo"), ignore_errors=True)
    if not args.report_only:
        for expid in args.expids:
            problem = run_one(args, expid)
            if problem:
                failures[expid] = problem
    write_report(args, failures, None if args.report_only else time.time() - started)


if __name__ == "__main__":
    main()
