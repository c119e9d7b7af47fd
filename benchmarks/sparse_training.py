"""Training-time sparsity against truncating a dense model: the smallest index that keeps exact accuracy.

For every dataset, two SparCode expids that differ only in training: one trained with `train_sparsity` (the
share of (code, item) scores relu(S + b) sets to 0 is the target at every step) and one with the learned b
of the paper (its index is made sparse after training by b~, Eq. 15). Each is swept with
benchmarks/sparsity_sweep.py (its index built at the trained b and at b~ for each target sparsity, the test
users evaluated through it and exactly), and the table gives, per model, the smallest Average Items
(items per key) whose Recall@50 through the index is within 1% (relative) of the model's own exact scoring,
plus the point at the trained b.

    python benchmarks/sparse_training.py                       # every pair below; resumable per expid
    python benchmarks/sparse_training.py --datasets demo_50k

Each expid is trained first when its checkpoint is missing (as `python run_expid.py --expid <expid>`);
a finished sweep (its csv) is reused unless --rerun. Writes benchmarks/results/sparse_training.md and the
per-expid sweeps under benchmarks/results/sparse_training/.
"""
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread for the latency numbers (before numpy / torch import)

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import sparsity_sweep  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "sparse_training")
# dataset -> (sparsity-trained expid, the same model with the learned b)
PAIRS = {
    "demo_50k": ("SparCode_demo_50k_001", "SparCode_demo_50k_dense"),
    "ml1m_pairs": ("SparCode_ml1m_pairs_sparse", "SparCode_ml1m_pairs_001"),
    "ml100k_recbole": ("SparCode_ml100k_sparse", "SparCode_ml100k_l2"),
}
TARGETS = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.993, 0.995, 0.998)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "config"))
    parser.add_argument("--datasets", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--rerun", action="store_true", help="sweep again even when the expid's csv exists")
    parser.add_argument("--latency-queries", type=int, default=300)
    return parser.parse_args(argv)


def sweep(args, expid):
    """Rows of the expid's sweep csv (running the sweep first when needed)."""
    out = os.path.join(OUT, expid)
    if args.rerun or not os.path.exists(out + ".csv"):
        sparsity_sweep.main(["--config", args.config, "--expid", expid, "--no-plot", "--out", out,
                             "--latency-queries", str(args.latency_queries),
                             "--targets", *[str(t) for t in TARGETS]])
    with open(out + ".csv") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def summary(rows):
    """(exact Recall@50, the trained-b row, the smallest-Average-Items row within 1% of exact or None)."""
    exact = rows[0]["exact_Recall(k=50)"]
    trained = next(r for r in rows if r["bias_source"] == "trained")
    good = [r for r in rows if r["Recall(k=50)"] >= (1.0 - sparsity_sweep.WITHIN) * exact]
    return exact, trained, (min(good, key=lambda r: r["Average Items"]) if good else None)


def main(argv=None):
    args = parse_args(argv)
    lines = ["# Training-time sparsity vs truncating a dense SparCode", "",
             f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by "
             f"`python benchmarks/sparse_training.py --datasets {' '.join(args.datasets)}`; each row's sweep is "
             f"`benchmarks/results/sparse_training/<expid>.md` (benchmarks/sparsity_sweep.py, test users, history "
             f"masked, index without a top-L cap).", "",
             "| dataset | expid | training | exact Recall@50 | trained b: Sparsity | trained b: Average Items | "
             "trained b: Recall@50 | trained b: recall of exact top-50 | smallest Average Items within 1% | "
             "its Sparsity | its Recall@50 | its query us (median) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for dataset in args.datasets:
        smallest = {}
        for expid, kind in zip(PAIRS[dataset], ("train_sparsity", "learned b, truncated")):
            exact, trained, best = summary(sweep(args, expid))
            smallest[kind] = best["Average Items"] if best else None
            best_cells = ([f"{best['Average Items']:.1f}", f"{best['Sparsity']:.4f}", f"{best['Recall(k=50)']:.4f}",
                           f"{best['query_us_median']:.1f}"] if best else ["none", "", "", ""])
            lines.append(f"| {dataset} | `{expid}` | {kind} | {exact:.4f} | {trained['Sparsity']:.4f} | "
                         f"{trained['Average Items']:.1f} | {trained['Recall(k=50)']:.4f} | "
                         f"{trained['recall_vs_exact@50']:.3f} | " + " | ".join(best_cells) + " |")
        if all(smallest.values()):
            ratios.append(f"{dataset}: {smallest['train_sparsity'] / smallest['learned b, truncated']:.2f}")
    lines += ["", "Items per key needed by the sparsity-trained model over the truncated one (smallest Average "
              "Items within 1% of each model's exact Recall@50): " + (", ".join(ratios) or "n/a") + ".", ""]
    os.makedirs(OUT, exist_ok=True)
    path = OUT + ".md"
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
