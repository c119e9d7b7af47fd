"""SparCode vs DSSM on the demo data, and SparCode's two quantizer gradient paths.

Runs each expid through `model_zoo.engine.experiment.run_experiment` (the same code path as
`run_expid.py`: train with early stopping on the validation set, then exact full-ranking
evaluation of the test users) once per seed, and writes a markdown table with test
Recall@50 / NDCG@50, SparCode's codebook usage at the kept epoch, and the training time:

    python benchmarks/sparcode_vs_dssm.py                       # DEFAULT_EXPIDS below, seed 2023
    python benchmarks/sparcode_vs_dssm.py --seeds 2023 2024 2025
    python benchmarks/sparcode_vs_dssm.py --reuse                # reuse run_expid results of the same parameters
    python benchmarks/sparcode_vs_dssm.py --data-root data/bench_sparcode --model-root checkpoints/bench_sparcode

Every expid of a seed gets the same seed (model init, negative sampling, batch order). A seed
other than the config's is run as a derived expid `<expid>_seed<seed>` in a temporary copy of
the config folder. `--data-root` builds (for `source: demo`: generates) the data in a folder of
its own, so a concurrent rebuild of ./data/demo cannot change it mid-run; `--model-root` keeps
the checkpoints apart from ./checkpoints. Output: benchmarks/results/sparcode_vs_dssm.md and
.json (written atomically after every run).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_zoo.config import load_config  # noqa: E402
from model_zoo.engine.experiment import run_experiment  # noqa: E402
from model_zoo.results import load_result_if_current  # noqa: E402

# DSSM with its tuned inputs and with the item-feature history SparCode reads; SparCode in its demo settings
# it (innerp_dnn), its commitment_only twin, and its best variant (the dot scorer); then both trained on
# sampled user histories (dataset demo_sample, `train_history: user_sample`), SparCode also with frozen codes
# after its warm-up (SparCode_demo_sample_frozen).
DEFAULT_EXPIDS = ("DSSM_demo_001", "DSSM_demo_item_history", "SparCode_demo_001", "SparCode_demo_commitment_only",
                  "SparCode_demo_dot", "DSSM_demo_sample", "SparCode_demo_sample", "SparCode_demo_sample_frozen")
# (expid, expid it is compared with, table title): the per-seed difference of each pair is reported.
PAIRS = (("SparCode_demo_dot", "DSSM_demo_001", "SparCode_demo_dot minus DSSM_demo_001"),
         ("SparCode_demo_sample", "DSSM_demo_sample", "SparCode_demo_sample minus DSSM_demo_sample"),
         ("SparCode_demo_sample_frozen", "DSSM_demo_sample", "SparCode_demo_sample_frozen minus DSSM_demo_sample"),
         ("SparCode_demo_sample_frozen", "SparCode_demo_sample",
          "frozen codes after the warm-up (SparCode_demo_sample_frozen) minus SparCode_demo_sample"),
         ("SparCode_demo_001", "SparCode_demo_commitment_only",
          "straight_through (SparCode_demo_001) minus commitment_only"))
METRICS = ("Recall(k=50)", "NDCG(k=50)", "Recall(k=20)", "NDCG(k=20)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "config"), help="config folder")
    parser.add_argument("--expids", nargs="+", default=list(DEFAULT_EXPIDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seeds (default: the seed of the config, run once)")
    parser.add_argument("--data-root", default=None,
                        help="build the datasets under this folder instead of the config's data_root (a demo "
                             "dataset is generated there by the current model_zoo/data/demo.py)")
    parser.add_argument("--model-root", default=None,
                        help="checkpoints and logs under this folder instead of the config's model_root")
    parser.add_argument("--reuse", action="store_true",
                        help="take a run's result JSON instead of training when it was written with the same "
                             "parameters (e.g. by run_expid.py --expid SparCode_demo_001)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sparcode_vs_dssm"),
                        help="output path without extension (.md and .json are written)")
    return parser.parse_args(argv)


def seeded_config(config_dir, expids, seeds, workdir, data_root=None, model_root=None):
    """A copy of `config_dir` with `<expid>_seed<s>` entries (and data_root / model_root replaced when
    given); returns it and the (expid, seed, expid to run) of each run."""
    copy = os.path.join(workdir, os.path.basename(os.path.normpath(config_dir)))
    shutil.copytree(config_dir, copy)
    if model_root is not None:
        for name in os.listdir(os.path.join(copy, "model_config")):
            path = os.path.join(copy, "model_config", name)
            with open(path) as fd:
                content = yaml.safe_load(fd) or {}
            if "Base" in content:
                content["Base"]["model_root"] = os.path.abspath(model_root)
                with open(path, "w") as fd:
                    yaml.safe_dump(content, fd)
    if data_root is not None:
        path = os.path.join(copy, "dataset_config.yaml")
        with open(path) as fd:
            datasets = yaml.safe_load(fd)
        for expid in expids:
            dataset = datasets[load_config(config_dir, expid)["dataset_id"]]
            dataset["data_root"] = os.path.abspath(data_root)
            if dataset.get("source") == "demo":
                dataset.pop("raw_dir", None)          # generated under the new data_root
        with open(path, "w") as fd:
            yaml.safe_dump(datasets, fd)
    entries, runs = {}, []
    for seed in seeds:
        for expid in expids:
            params = load_config(config_dir, expid)
            if seed == params["seed"]:
                runs.append((expid, seed, expid))
                continue
            with_seed = f"{expid}_seed{seed}"
            entry = {k: v for k, v in params.items() if k in _own_entry(config_dir, expid)}
            entries[with_seed] = dict(entry, seed=seed)
            runs.append((expid, seed, with_seed))
    with open(os.path.join(copy, "model_config", "zz_benchmark_seeds.yaml"), "w") as fd:
        yaml.safe_dump(entries, fd)
    return copy, runs


def _own_entry(config_dir, expid):
    """Keys written in the expid's own entry (Base keys are merged again by load_config)."""
    for name in sorted(os.listdir(os.path.join(config_dir, "model_config"))):
        if name.endswith(".yaml"):
            with open(os.path.join(config_dir, "model_config", name)) as fd:
                content = yaml.safe_load(fd) or {}
            if expid in content:
                return set(content[expid])
    raise KeyError(expid)


def kept_epoch(result):
    """The history record of the epoch whose weights were kept (first best validation monitor)."""
    history = result["history"]
    if not history:
        return {}
    monitor = result["params"]["monitor"]
    sign = 1 if result["params"]["monitor_mode"] == "max" else -1
    return max(history, key=lambda record: (sign * record["valid"][monitor], -record["epoch"]))


def summarize(expid, seed, result):
    epoch = kept_epoch(result)
    row = {"expid": expid, "seed": seed, "model": result["model"],
           "quantizer_grad": result["params"].get("quantizer_grad", ""),
           "epochs_run": len(result["history"]), "kept_epoch": epoch.get("epoch"),
           "train_seconds": result["seconds"]["train"],
           "seconds_per_epoch": round(result["seconds"]["train"] / max(len(result["history"]), 1), 1)}
    row.update({name: result["test"][name] for name in METRICS})
    for key in ("codebook_perplexity", "dead_codewords", "codeword_restarts", "distinct_codes",
                "zero_score_fraction", "sparse_bias"):
        if key in epoch:
            row[key] = epoch[key]
    if "codebook_perplexity" in epoch:
        row["codebook_size"] = result["params"].get("codebook_size")
    return row


def _usage(row):
    if "codebook_perplexity" not in row:
        return "-"
    perplexity = "/".join(f"{p:.1f}" for p in row["codebook_perplexity"])
    dead = "/".join(str(d) for d in row["dead_codewords"])
    return f"ppl {perplexity} of {row['codebook_size']}; dead {dead}; {row['distinct_codes']} codes"


def data_provenance(result):
    """Raw files (sha256 prefix) and sizes of the dataset a result was trained on."""
    info_path = os.path.join(result["params"]["data_root"], result["dataset_id"], "build_info.json")
    if not os.path.exists(info_path):
        return ""
    with open(info_path) as fd:
        info = json.load(fd)
    files = ", ".join(f"{os.path.basename(f['path'])} {f['sha256'][:12]}" for f in info.get("files", []))
    return f"{info['params'].get('source')} data in {os.path.dirname(info_path)}: {files}; sizes {info.get('sizes')}"


def markdown(rows, command, seeds, provenance=""):
    lines = ["# SparCode vs DSSM on the demo data", "",
             f"Command: `{command}`", "", f"Data: {provenance}", "",
             "Test metrics: exact full ranking over the whole item corpus, history items masked, best "
             "validation epoch (each expid's `monitor`). Codebook usage of the kept epoch's training batches: "
             "perplexity of each codebook out of N codewords, codewords never used in that epoch, distinct "
             "full codes (keys) seen in that epoch. Train seconds are wall-clock and depend on the machine "
             "load.", "",
             "| expid | seed | test Recall@50 | test NDCG@50 | test Recall@20 | codebook usage | zero scores "
             "| train s (epochs) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        zero = f"{row['zero_score_fraction']:.3f}" if "zero_score_fraction" in row else "-"
        lines.append(f"| {row['expid']} | {row['seed']} | {row['Recall(k=50)']:.4f} | {row['NDCG(k=50)']:.4f} | "
                     f"{row['Recall(k=20)']:.4f} | {_usage(row)} | {zero} | "
                     f"{row['train_seconds']:.0f} ({row['epochs_run']}) |")
    expids = list(dict.fromkeys(row["expid"] for row in rows))
    if len(seeds) > 1:
        lines += ["", f"Mean (population std) over seeds {', '.join(map(str, seeds))}:", "",
                  "| expid | test Recall@50 | test NDCG@50 |", "|---|---|---|"]
        for expid in expids:
            own = [row for row in rows if row["expid"] == expid]
            cells = []
            for name in ("Recall(k=50)", "NDCG(k=50)"):
                values = [row[name] for row in own]
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}")
            lines.append(f"| {expid} | {' | '.join(cells)} |")
    for left_expid, right_expid, title in PAIRS:
        left = {row["seed"]: row for row in rows if row["expid"] == left_expid}
        right = {row["seed"]: row for row in rows if row["expid"] == right_expid}
        common = sorted(set(left) & set(right))
        if common:
            lines += ["", f"{title}, same seeds:", "", "| seed | Δ test Recall@50 | Δ test NDCG@50 |", "|---|---|---|"]
            for seed in common:
                lines.append(f"| {seed} | {left[seed]['Recall(k=50)'] - right[seed]['Recall(k=50)']:+.4f} | "
                             f"{left[seed]['NDCG(k=50)'] - right[seed]['NDCG(k=50)']:+.4f} |")
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        fd.write(text)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    command = "python benchmarks/sparcode_vs_dssm.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    seeds = args.seeds or [load_config(args.config, args.expids[0])["seed"]]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        config, runs = seeded_config(args.config, args.expids, seeds, workdir, args.data_root,
                                     args.model_root)
        for expid, seed, run_id in runs:
            started = time.time()
            result = load_result_if_current(load_config(config, run_id)) if args.reuse else None
            if result is None:
                result = run_experiment(config, run_id, command=command)
            rows.append(summarize(expid, seed, result))
            provenance = data_provenance(result)
            print(f"{run_id}: test Recall@50 {rows[-1]['Recall(k=50)']:.4f} "
                  f"({time.time() - started:.0f} s)", flush=True)
            write_atomic(args.out + ".json", json.dumps({"command": command, "data": provenance, "rows": rows},
                                                        indent=2))
            write_atomic(args.out + ".md", markdown(rows, command, seeds, provenance))
    print(open(args.out + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
