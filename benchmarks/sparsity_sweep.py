"""Sparsity sweep of the SparCode index (paper Sec. 4.4, Figure 6): b~ -> Sparsity, Average Items,
Recall@50 / NDCG@50 through the index, query time.

Steps:
0. matplotlib (for the plot) is checked before anything else; ``--no-plot`` skips the figure.
1. A trained SparCode: ``--expid`` (default SparCode_demo_001) of ``--config`` on its dataset (the
   demo data). The expid's checkpoint is reused when present, else the expid is run first exactly as
   ``python run_expid.py --expid <expid>`` does (model_zoo/engine/experiment.py).
2. The raw code-item scores S of every indexed key (key set as in serving: all N^M keys when
   N^M <= index_max_keys) are computed once and cached; exact SparCode scores of the test users
   (Eq. 11 with the trained b) give the exact top-k.
3. For the trained b and for b~ chosen to hit each ``--targets`` sparsity (choose_bias_for_sparsity
   on all scores, exact), a SparseCodeIndex is built (no top-L cap, float32) and the test users are
   evaluated through it (their K_u keys, history masked): Recall/NDCG@20/50, recall of the exact
   top-50 (tie-aware), and batch-1 latency of search_one (median / p90 over the test users, one
   thread, numba kernel; the query tower is excluded like in the paper's Figure 6; benchmarks/_timing.py).
4. Writes ``benchmarks/results/sparsity_sweep.{csv,md,png}``; the markdown names the highest
   sparsity whose Recall@50 through the index is within 1% (relative) of exact scoring.

    python benchmarks/sparsity_sweep.py            # ~5 min on 2 shared cores (training included)
"""
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread for the latency numbers (before numpy / torch import)

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._timing import percentiles_us, time_calls, user_mask  # noqa: E402
from model_zoo import get_model  # noqa: E402
from model_zoo.config import load_config  # noqa: E402
from model_zoo.engine import serving  # noqa: E402
from model_zoo.engine.experiment import open_data, run_experiment  # noqa: E402
from model_zoo.retrieval.exact import masked_topk  # noqa: E402
from model_zoo.retrieval.metrics import recall_vs_exact, tie_aware_hits, topk_metrics  # noqa: E402
from model_zoo.retrieval.sparse_index import SparseCodeIndex  # noqa: E402
from model_zoo.retrieval.sparsity import choose_bias_for_sparsity  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TARGETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.995, 0.998, 0.999,
                   0.9995, 0.9998)
K_REPORT = (20, 50)
WITHIN = 0.01  # relative Recall@50 loss allowed against exact scoring


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "config"))
    parser.add_argument("--expid", default="SparCode_demo_001")
    parser.add_argument("--retrain", action="store_true", help="train from scratch even if the checkpoint exists")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure (no matplotlib needed)")
    parser.add_argument("--targets", type=float, nargs="+", default=DEFAULT_TARGETS)
    parser.add_argument("--latency-queries", type=int, default=500, help="test users timed at batch 1")
    parser.add_argument("--train-threads", type=int, default=2, help="torch threads for training and scoring")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sparsity_sweep"),
                        help="output path without extension (.csv, .md, .png)")
    return parser.parse_args(argv)


def check_plotting(args):
    """Exit with a message before any work when the figure is wanted and matplotlib is missing."""
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        sys.exit(f"benchmarks/sparsity_sweep.py draws {args.out}.png with matplotlib, which is not installed: "
                 f"pip install matplotlib, or pass --no-plot to write only the .csv and .md")


def trained_model(args):
    """(model, params, data_dir, test EvalUsers, train seconds or None if the checkpoint was reused)."""
    params = dict(load_config(args.config, args.expid), gpu=-1)
    data_dir, feature_map, corpus, train, _, test = open_data(params)
    model = get_model(params["model"])(feature_map, **params)
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    train_seconds = None
    if args.retrain or not os.path.exists(model.checkpoint):
        started = time.time()
        run_experiment(args.config, args.expid, fresh=args.retrain,
                       command=f"python benchmarks/sparsity_sweep.py --expid {args.expid}")
        train_seconds = time.time() - started
    model.load_weights(model.checkpoint)
    model.eval()
    return model, params, data_dir, test, train_seconds


def score_matrix(model, keys, key_block=256):
    """Raw S of every key against every item: float32 [n_keys, n_items]."""
    return np.concatenate([model.score_codes(torch.from_numpy(keys[s:s + key_block])).numpy()
                           for s in range(0, keys.size, key_block)])


def exact_topk(model, test, k):
    """Exact Eq. 11 scores of the test users [n_users, n_items] and their masked top-k (scores, ids)."""
    with torch.no_grad():
        item_repr = model.all_item_repr()
        scores = torch.cat([model.full_scores(test.batch(s, min(s + 256, len(test))), item_repr)
                            for s in range(0, len(test), 256)])                          # [n_users, n_items]
    top_scores, top_ids = masked_topk(scores, k, test.mask_indptr, test.mask_items)
    return scores, top_scores.double().numpy(), top_ids.numpy()


def metrics_of(ids, test):
    values = topk_metrics(ids, test.gt_indptr, test.gt_items, ks=K_REPORT, metrics=("Recall", "NDCG"))
    return {name: float(value) for name, value in values.items()}


def postings_per_query(index, query_keys):
    """Postings summed by each query [n_users]: the lengths of its K_u keys' lists (0 for an unindexed key)."""
    lengths = np.diff(index.indptr)                                                     # [n_keys]
    rows = np.minimum(np.searchsorted(index.keys, query_keys), index.n_keys - 1)      # [n_users, K_u]
    return np.where(index.keys[rows] == query_keys, lengths[rows], 0).sum(axis=1)


def sweep_point(matrix, keys, bias, source, target, model, test, query_keys, exact, args):
    """Build the index at b~ = bias from the cached scores and evaluate the test users through it."""
    n_items = matrix.shape[1]
    index = SparseCodeIndex.build(lambda kb, a, b: matrix[np.searchsorted(keys, kb), a:b], keys, n_items, bias,
                                  num_codebooks=model.quantizer.num_codebooks,
                                  codebook_size=model.quantizer.codebook_size,
                                  num_query_tokens=query_keys.shape[1], progress=False,
                                  checkpoint_hash=serving.checkpoint_sha256(model.checkpoint),
                                  codebooks=model.quantizer.codebooks.detach().cpu().numpy())  # [M, N, D_T/M]
    stats = index.stats()
    k = max(K_REPORT)
    _, ids = index.search(query_keys, k, test.mask_indptr, test.mask_items)             # [n_users, k]
    scores, top_scores, _ = exact
    hits, sizes = tie_aware_hits(ids, serving.scores_at(scores, ids), top_scores, min_score=0.0)
    users = list(range(min(args.latency_queries, len(test))))
    masks = [user_mask(test, u) for u in users]
    latency = percentiles_us(time_calls(lambda u: index.search_one(query_keys[u], k, masks[u]), users))
    row = {"bias_source": source, "target_sparsity": target, "sparsity_bias": bias,
           "Sparsity": stats["Sparsity"], "Average Items": stats["Average Items"], "nnz": stats["nnz"],
           "index_bytes": stats["index_bytes"], "build_seconds_from_cache": stats["build_seconds"]}
    row.update(metrics_of(ids, test))
    row.update({"recall_vs_exact@50": recall_vs_exact(hits, sizes),
                "query_us_median": latency["median"], "query_us_p90": latency["p90"],
                "postings_per_query_median": float(np.median(postings_per_query(index, query_keys)))})
    return row


def main(argv=None):
    args = parse_args(argv)
    check_plotting(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.train_threads)
    started = time.time()
    load_before = os.getloadavg()
    model, params, data_dir, test, train_seconds = trained_model(args)
    keys, kind = serving.code_key_set(model, data_dir, params["index_max_keys"])
    t0 = time.time()
    with torch.no_grad():
        matrix = score_matrix(model, keys)                                               # [n_keys, n_items]
    score_seconds = time.time() - t0
    k = max(K_REPORT)
    exact = exact_topk(model, test, k)
    exact_metrics = metrics_of(exact[2], test)
    query_keys = np.concatenate([model.query_codes(test.batch(s, min(s + 256, len(test)))).numpy()
                                 for s in range(0, len(test), 256)])                    # [n_users, K_u]
    torch.set_num_threads(1)
    points = [(float(model.sparse_bias), "trained", None)]
    for target in args.targets:
        bias = choose_bias_for_sparsity(lambda kb, a, b: matrix[np.searchsorted(keys, kb), a:b], keys,
                                        matrix.shape[1], target, max_sample_values=matrix.size)
        points.append((bias, "target_sparsity", target))
    rows = []
    for bias, source, target in points:
        row = sweep_point(matrix, keys, bias, source, target, model, test, query_keys, exact, args)
        rows.append(row)
        logging.info("b~=%.4f (%s): Sparsity %.5f - Average Items %.1f - Recall@50 %.4f (exact %.4f) - "
                     "NDCG@50 %.4f - query %.1f us", bias, "trained b" if target is None else f"target {target:g}",
                     row["Sparsity"], row["Average Items"],
                     row["Recall(k=50)"], exact_metrics["Recall(k=50)"], row["NDCG(k=50)"], row["query_us_median"])
    info = {"expid": args.expid, "dataset_id": params["dataset_id"], "n_keys": int(keys.size), "key_set": kind,
            "n_items": int(matrix.shape[1]), "n_users": len(test), "K_u": int(query_keys.shape[1]),
            "masked_per_user": float(np.diff(test.mask_indptr).mean()),
            "M": model.quantizer.num_codebooks, "N": model.quantizer.codebook_size,
            "trained_bias": float(model.sparse_bias), "train_seconds": train_seconds,
            "score_seconds": score_seconds, "checkpoint": model.checkpoint, "exact": exact_metrics,
            "elapsed": time.time() - started, "load_before": load_before, "load_after": os.getloadavg()}
    write_results(args, rows, info)


def within_one_percent(rows, exact_recall):
    """Rows whose Recall@50 through the index is >= (1 - WITHIN) x exact, and the highest-sparsity one."""
    good = [r for r in rows if r["Recall(k=50)"] >= (1.0 - WITHIN) * exact_recall]
    return good, (max(good, key=lambda r: r["Sparsity"]) if good else None)


def write_results(args, rows, info):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["Sparsity"], r["bias_source"]))
    fields = list(rows[0])
    _atomic_write(args.out + ".csv", lambda handle: _write_csv(handle, fields, rows, info))
    exact_recall = info["exact"]["Recall(k=50)"]
    good, best = within_one_percent(rows, exact_recall)
    # the first sparsity beyond which Recall@50 stays below the bound (a contiguous "safe" range)
    safe = None
    for row in rows:
        if row["Recall(k=50)"] < (1.0 - WITHIN) * exact_recall:
            break
        safe = row
    info["safe_sparsity"] = None if safe is None else safe["Sparsity"]
    if not args.no_plot:
        _plot(args.out + ".png", rows, info)
    lines = [
        "# SparCode sparsity sweep (paper Sec. 4.4, Figure 6)",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `python benchmarks/sparsity_sweep.py` "
        f"({info['elapsed']:.0f} s; load average before {_load(info['load_before'])}, after "
        f"{_load(info['load_after'])} on {os.cpu_count()} cores).",
        "",
        f"Model: `{info['expid']}` on `{info['dataset_id']}` (checkpoint `{os.path.relpath(info['checkpoint'], ROOT)}`"
        + (f", trained in {info['train_seconds']:.0f} s" if info["train_seconds"] else ", reused") + f"); "
        f"M={info['M']}, N={info['N']} -> {info['n_keys']} keys ({info['key_set']}), K_u={info['K_u']}, "
        f"{info['n_items']} items, trained b = {info['trained_bias']:.4f}. Test users: {info['n_users']} "
        f"(history masked). Scores of all keys x items computed once in {info['score_seconds']:.1f} s; each "
        f"index below is built from that cache (no top-L cap, float32).",
        "",
        f"Exact SparCode scoring (Eq. 11, trained b): Recall@50 {exact_recall:.4f}, NDCG@50 "
        f"{info['exact']['NDCG(k=50)']:.4f}, Recall@20 {info['exact']['Recall(k=20)']:.4f}, "
        f"NDCG@20 {info['exact']['NDCG(k=20)']:.4f}.",
        "",
        "| b~ | source | Sparsity | Average Items | index MiB | Recall@50 | NDCG@50 | Recall@20 | NDCG@20 | "
        "recall of exact top-50 | query us (median) | query us (p90) | postings/query |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        source = "trained b" if row["bias_source"] == "trained" else f"target {row['target_sparsity']:g}"
        sparsity = f"**{row['Sparsity']:.5f}**" if row is safe else f"{row['Sparsity']:.5f}"
        lines.append(f"| {row['sparsity_bias']:.4f} | {source} | {sparsity} | "
                     f"{row['Average Items']:.1f} | {row['index_bytes'] / 2 ** 20:.2f} | {row['Recall(k=50)']:.4f} | "
                     f"{row['NDCG(k=50)']:.4f} | {row['Recall(k=20)']:.4f} | {row['NDCG(k=20)']:.4f} | "
                     f"{row['recall_vs_exact@50']:.3f} | {row['query_us_median']:.1f} | {row['query_us_p90']:.1f} | "
                     f"{row['postings_per_query_median']:.0f} |")
    lines.append("")
    if best is not None and safe is None:
        lines.append(f"**Recall@50 through the index is within 1% (relative) of exact scoring at Sparsity "
                     f"{best['Sparsity']:.5f}** ({best['Average Items']:.1f} items per key, Recall@50 "
                     f"{best['Recall(k=50)']:.4f} vs exact {exact_recall:.4f}) but not at the lowest sparsities: "
                     f"this model was trained with a sparsity target, and a b~ above its trained b adds scores "
                     f"that training never ranked.")
    elif best is not None:
        lines.append(f"**Recall@50 through the index stays within 1% (relative) of exact scoring up to Sparsity "
                     f"{safe['Sparsity']:.5f}** (b~ = {safe['sparsity_bias']:.4f}, {safe['Average Items']:.1f} items "
                     f"per key, Recall@50 {safe['Recall(k=50)']:.4f} vs exact {exact_recall:.4f}, query "
                     f"{safe['query_us_median']:.1f} us)."
                     + ("" if safe is best else
                        f" The highest sparsity meeting the bound at all is {best['Sparsity']:.5f} (Recall@50 "
                        f"{best['Recall(k=50)']:.4f}); between the two some points fall below it (noise of "
                        f"{info['n_users']} test users)."))
    else:
        lines.append("No sweep point reaches Recall@50 within 1% of exact scoring.")
    lines += [
        "",
        f"Why the bound sits where it does: a query ranks only the union of its K_u={info['K_u']} posting lists "
        f"(at most K_u x Average Items candidates, see postings/query), minus its history (here "
        f"{info['masked_per_user']:.1f} masked items per test user on average). While that union still holds the "
        f"exact top-50, the index returns it exactly (relu(S + b~) with b~ < b only drops items of low score on a "
        f"key; with every S + b > 0, as here, the ranking of the remaining items is unchanged). Once the lists get "
        f"shorter than about k + history, top-50 lists come back short and Recall@50 falls, while Recall@20 "
        f"holds a little longer. The limit is therefore a number of items per key, not a sparsity: on a corpus "
        f"of n items the same {safe['Average Items'] if safe else float('nan'):.0f} items per key is Sparsity "
        f"1 - {safe['Average Items'] if safe else float('nan'):.0f} / n (e.g. "
        f"{1 - (safe['Average Items'] if safe else 0) / 50000:.4f} at 50k items, the Deezer corpus of the paper, "
        f"where the paper reports comparable accuracy at 99% sparsity = 500 items per key).",
        "",
        "Notes:",
        "- Sparsity = 1 - nnz / (keys x items), Average Items = nnz / keys (Sec. 4.4, over the indexed keys).",
        "- At b~ = b the index holds relu(S + b) exactly, so its top-k is the exact top-k among items with a "
        "positive score (recall of the exact top-50 = 1, metrics equal up to float near-ties) for every user whose "
        "keys are indexed. With an 'observed' key set (N^M > index_max_keys: the most frequent training keys), a "
        "test key outside it is served by the nearest indexed key (unseen_key='nearest'), so those users' lists "
        "differ from exact scoring and the recall of the exact top-50 stays below 1 even at b~ = b. A larger |b~| "
        "keeps fewer, higher scores; a query then ranks only the union of its K_u posting lists.",
        "- Recall of the exact top-50: share of the exact top-50 (items with positive score) the index returns, "
        "counting float near-ties at the cut-off as found.",
        "- Query time: `SparseCodeIndex.search_one(keys, 50, mask)` per test user, one thread (numba kernel), "
        "after warm-up; the query tower (tokenizer + quantizer) is excluded. The machine is shared, so absolute "
        "times are noisy; the trend with sparsity is the point (paper Figure 6(d)).",
        (f"- The plot is {os.path.basename(args.out)}.png; the raw numbers are in {os.path.basename(args.out)}.csv."
         if not args.no_plot else f"- The raw numbers are in {os.path.basename(args.out)}.csv (no plot: --no-plot)."),
    ]
    _atomic_write(args.out + ".md", lambda handle: handle.write("\n".join(lines) + "\n"))
    print("\n".join(lines))


def _load(values):
    return "/".join(f"{v:.2f}" for v in values)


def _write_csv(handle, fields, rows, info):
    writer = csv.DictWriter(handle, fieldnames=fields + ["exact_Recall(k=50)", "exact_NDCG(k=50)"])
    writer.writeheader()
    for row in rows:
        out = {key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()}
        out["exact_Recall(k=50)"] = f"{info['exact']['Recall(k=50)']:.6g}"
        out["exact_NDCG(k=50)"] = f"{info['exact']['NDCG(k=50)']:.6g}"
        writer.writerow(out)


def _atomic_write(path, write):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as handle:
        write(handle)
    os.replace(tmp, path)


def _plot(path, rows, info):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["bias_source"] == "trained"]
    rows = [r for r in rows if r["bias_source"] != "trained"]
    cached = np.array([max(1.0 - r["Sparsity"], 1e-6) for r in rows])                  # share of scores kept
    cached_trained = np.array([max(1.0 - r["Sparsity"], 1e-6) for r in trained])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, label in ((axes[0], "Recall(k=50)", "Recall@50"), (axes[0], "NDCG(k=50)", "NDCG@50")):
        line, = ax.plot(cached, [r[metric] for r in rows], marker="o", label=f"{label} (index)")
        ax.axhline(info["exact"][metric], color=line.get_color(), linestyle="--", label=f"{label} (exact)")
        ax.plot(cached_trained, [r[metric] for r in trained], marker="*", markersize=12, linestyle="none",
                color=line.get_color(), label=f"{label} (index, trained b)")
    if info.get("safe_sparsity") is not None:
        for ax in axes:
            ax.axvline(max(1.0 - info["safe_sparsity"], 1e-6), color="grey", linestyle=":", linewidth=1)
    exact_recall = info["exact"]["Recall(k=50)"]
    axes[0].axhline((1 - WITHIN) * exact_recall, color="grey", linestyle=":", label="99% of exact Recall@50")
    axes[0].set_ylabel("metric")
    axes[0].set_title("(a) accuracy vs sparsity")
    axes[0].legend(fontsize=8)
    axes[1].plot(cached, [r["query_us_median"] for r in rows], marker="o", label="median")
    axes[1].plot(cached, [r["query_us_p90"] for r in rows], marker=".", linestyle="--", label="p90")
    axes[1].plot(cached_trained, [r["query_us_median"] for r in trained], marker="*", markersize=12,
                 linestyle="none", label="median, trained b")
    axes[1].set_ylabel("query time (us, batch 1, one thread)")
    axes[1].set_title("(b) query time vs sparsity")
    axes[1].legend(fontsize=8)
    axes[2].plot(cached, [r["Average Items"] for r in rows], marker="o")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("Average Items (cached scores per key)")
    axes[2].set_title("(c) index size vs sparsity")
    for ax in axes:
        ax.set_xscale("log")
        ax.invert_xaxis()
        ticks = [t for t in (1.0, 0.1, 0.01, 0.001, 0.0001) if cached.min() / 2 <= t <= 1.0]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{1 - t:g}" for t in ticks])
        ax.set_xlabel("Sparsity")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(f"SparCode {info['expid']} on {info['dataset_id']}: M={info['M']}, N={info['N']}, "
                 f"{info['n_items']} items, {info['n_users']} test users")
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
