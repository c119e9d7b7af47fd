"""Build cost of the SparCode sparse index against keys x items (it should be linear in keys x items).

A synthetic score function stands in for the model: key k gets a token t_k (unit-normalised Gaussian,
d=64) and item i a vector v_i ~ N(0, I_d); S = t_k . v_i, computed block by block by numpy exactly as
a model's `score_codes` would be called. b~ keeps about 2% of the scores (Sparsity ~0.98). The build
time (`SparseCodeIndex.build`, one thread, no top-L cap) is measured for a grid of key and item counts;
time per million scores stays flat when the cost is linear in keys x items. The scoring's own cost
(the matrix product) is timed separately and reported, so the index's part shows. Output:
benchmarks/results/index_build_scaling.{md,csv}.

    python benchmarks/index_build_scaling.py          # ~1 min on one core
"""
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_zoo.retrieval.sparse_index import SparseCodeIndex  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIAS = -2.054  # P(N(0, 1) > 2.054) = 0.02: about 2% of the scores are kept


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--items", type=int, nargs="+", default=[12_500, 25_000, 50_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="builds per grid point (the median is kept)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "index_build_scaling"))
    return parser.parse_args(argv)


def make_score_fn(n_keys, n_items, dim, seed=0):
    """Scores S[k, i] = t_k . v_i over blocks: (key block [b] int64, item start, item stop) -> [b, stop - start]."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n_keys, dim)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)                              # [n_keys, d]
    items = rng.standard_normal((n_items, dim)).astype(np.float32)                      # [n_items, d]
    return lambda key_block, start, stop: tokens[key_block] @ items[start:stop].T


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for n_keys in args.keys:
        for n_items in args.items:
            score_fn = make_score_fn(n_keys, n_items, args.dim)
            keys = np.arange(n_keys, dtype=np.int64)
            build = lambda: SparseCodeIndex.build(score_fn, keys, n_items, BIAS, num_threads=1,  # noqa: E731
                                                  progress=False, num_codebooks=2, codebook_size=n_keys,
                                                  unseen_key="skip")
            score_only = lambda: [score_fn(keys[k:k + 256], i, min(i + 16384, n_items))  # noqa: E731
                                  for k in range(0, n_keys, 256) for i in range(0, n_items, 16384)]
            build_s, score_s = median_seconds(build, args.repeats), median_seconds(score_only, args.repeats)
            stats = build().stats()
            millions = n_keys * n_items / 1e6
            rows.append({"keys": n_keys, "items": n_items, "scores_millions": millions,
                         "build_seconds": build_s, "scoring_seconds": score_s,
                         "index_ms_per_million": 1e3 * (build_s - score_s) / millions,
                         "sparsity": stats["Sparsity"]})
            print(f"{n_keys} keys x {n_items} items: build {build_s:.2f} s (scoring {score_s:.2f} s), "
                  f"{rows[-1]['index_ms_per_million']:.1f} ms of index work per million scores", flush=True)
    write(args, rows)
    return 0


def write(args, rows):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    columns = ["keys", "items", "scores_millions", "build_seconds", "scoring_seconds", "index_ms_per_million",
               "sparsity"]
    tmp = f"{args.out}.csv.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as fd:
        writer = csv.DictWriter(fd, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, args.out + ".csv")
    per_million = [r["build_seconds"] / r["scores_millions"] for r in rows]
    fit = np.polyfit([r["scores_millions"] for r in rows], [r["build_seconds"] for r in rows], 1)
    lines = ["# SparCode index build cost against keys x items", "",
             f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by "
             f"`python benchmarks/index_build_scaling.py` (one thread; median of {args.repeats} builds; "
             f"load average {os.getloadavg()[0]:.2f}).", "",
             "| keys | items | scores (M) | build s | of which scoring s | index ms / M scores | build s / M scores |"
             " Sparsity |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, per in zip(rows, per_million):
        lines.append(f"| {row['keys']} | {row['items']} | {row['scores_millions']:.1f} | {row['build_seconds']:.2f} | "
                     f"{row['scoring_seconds']:.2f} | {row['index_ms_per_million']:.1f} | {per:.4f} | "
                     f"{row['sparsity']:.4f} |")
    lines += ["", f"Build seconds per million scores: min {min(per_million):.4f}, max {max(per_million):.4f} "
              f"(max / min {max(per_million) / min(per_million):.2f}) over a {min(r['scores_millions'] for r in rows):.0f}"
              f"-{max(r['scores_millions'] for r in rows):.0f} M range of keys x items; a least-squares line "
              f"build_s = {fit[0]:.4f} x M {fit[1]:+.3f}.",
              "", "The score function here is a numpy matrix product; with a model it is the scorer's forward "
              "pass, whose cost is also linear in keys x items and usually dominates."]
    tmp = f"{args.out}.md.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        fd.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out + ".md")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
