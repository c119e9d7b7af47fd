"""TDM against SparCode in the shape of the SparCode paper's Table 4 (Sec. 4.5): Recall@5/10/20/50 through each
model's own retrieval structure, and query time per user at batch 1.

For every dataset (``demo``, ``ml1m_pairs``) three expids: TDM with the dot-product interaction, TDM with the
MLP interaction, and SparCode, each with a linear user tower over the same user inputs (see the YAML of each
expid). Steps per expid:

1. Train it exactly as ``python run_expid.py --expid <expid>`` does (model_zoo/engine/experiment.py), unless its
   result JSON was written with the current parameters on the current data (then it is reused); a killed run
   resumes from its last epoch. A TDM expid's ``tree_init_expid`` (the two-tower model whose item vectors build
   its tree) is run first the same way.
2. Retrieve the top 50 of every test user (history masked): TDM by layer-wise beam search with the expid's
   ``beam_size`` (engine/serving.py ``tree_search``), SparCode through its sparse index (``<expid>.sparse_index.npz``,
   rebuilt when absent). Recall@5/10/20/50 of that list, Recall@50 of scoring every item exactly, and the share of
   the exact top 50 the retrieval returns.
3. Query time per user at batch 1 on one thread (benchmarks/_timing.py, round robin): the user tower plus the
   retrieval, against the user tower plus scoring every item and a masked top 50, in the same run.

Rows are written after every expid to ``benchmarks/results/tdm_vs_sparcode.{md,csv}``; a rerun reuses the rows
whose checkpoint is unchanged (``--remeasure`` measures again):

    python benchmarks/tdm_vs_sparcode.py                          # both datasets (trains what is missing)
    python benchmarks/tdm_vs_sparcode.py --datasets demo
"""
import argparse
import csv
import datetime
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks._timing import percentiles_us, timed_round_robin  # noqa: E402
from model_zoo import get_model  # noqa: E402
from model_zoo.base import CodeIndexable, TreeRetrievable  # noqa: E402
from model_zoo.config import load_config  # noqa: E402
from model_zoo.engine import serving  # noqa: E402
from model_zoo.engine.experiment import open_data, run_experiment  # noqa: E402
from model_zoo.retrieval.exact import masked_topk  # noqa: E402
from model_zoo.retrieval.metrics import recall_vs_exact, tie_aware_hits, topk_metrics  # noqa: E402
from model_zoo.results import load_result_if_current  # noqa: E402

EXPIDS = {"demo": (("TDM", "dot", "TDM_demo_dot_001"), ("TDM", "mlp", "TDM_demo_001"),
                   ("SparCode", None, "SparCode_demo_001")),
          "ml1m_pairs": (("TDM", "dot", "TDM_ml1m_pairs_dot_001"), ("TDM", "mlp", "TDM_ml1m_pairs_001"),
                         ("SparCode", None, "SparCode_ml1m_pairs_001"))}
KS = (5, 10, 20, 50)
K = max(KS)
FIELDS = ("dataset", "model", "interaction", "expid", "checkpoint_sha256", "Recall@5", "Recall@10", "Recall@20",
          "Recall@50", "exact_Recall@50", "recall_vs_exact@50", "candidates_per_user", "n_items", "test_users",
          "query_us", "score_all_us", "time_ratio", "train_seconds", "epochs", "measured")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "config"))
    parser.add_argument("--datasets", nargs="+", default=list(EXPIDS), choices=list(EXPIDS))
    parser.add_argument("--latency-users", type=int, default=300, help="test users timed at batch 1")
    parser.add_argument("--remeasure", action="store_true", help="measure again rows whose checkpoint is unchanged")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "tdm_vs_sparcode"),
                        help="output path without extension (.md and .csv are written)")
    return parser.parse_args(argv)


def trained(args, expid):
    """(result JSON of a finished run of the current config, model with its best weights, test users)."""
    params = load_config(args.config, expid)
    if params.get("tree_init_expid"):                    # the two-tower whose item vectors build TDM's tree
        run_once(args, params["tree_init_expid"])
    result = run_once(args, expid)
    params = dict(params, gpu=-1)
    data_dir, feature_map, corpus, train, _, test = open_data(params)
    model = get_model(params["model"])(feature_map, **params)
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    model.load_weights(model.checkpoint)
    model.eval()
    return result, params, data_dir, model, test


def run_once(args, expid):
    """The result JSON of `expid` (run now unless a run of its current config on the current data exists)."""
    result = load_result_if_current(load_config(args.config, expid), ROOT)
    if result is None:
        result = run_experiment(args.config, expid, command=f"python benchmarks/tdm_vs_sparcode.py ({expid})")
    return result


def retrieval(params, data_dir, model, item_repr):
    """(search(inputs, mask, stats) -> ids [B, K], query_one(inputs [1], mask) for the timing, the stats key
    counting candidates) of the model's retrieval structure."""
    if isinstance(model, TreeRetrievable):
        beam = params["beam_size"] or K
        search = lambda inputs, mask, stats: serving.tree_search(model, inputs, K, beam, mask, stats,  # noqa: E731
                                                                 item_repr)[1]
        return search, lambda inputs, mask: search(inputs, mask, None), "nodes_scored"
    if not isinstance(model, CodeIndexable):
        raise ValueError(f"{type(model).__name__} has no retrieval structure to compare")
    try:
        index = serving.load_code_index(model)
    except (FileNotFoundError, ValueError):                 # absent, or written for another checkpoint
        index = serving.build_code_index(model, data_dir, params["sparsity_bias"], params["target_sparsity"],
                                         params["index_top_l"], params["index_max_keys"],
                                         params["index_score_dtype"], params["unseen_key"])
    lengths = np.diff(index.indptr)

    def search(inputs, mask, stats):
        keys = model.query_codes(inputs).cpu().numpy()                                  # [B, K_u]
        rows = np.minimum(np.searchsorted(index.keys, keys), index.n_keys - 1)
        stats["postings"] = np.where(index.keys[rows] == keys, lengths[rows], 0).sum(1)
        return index.search(keys, K, *mask)[1]

    def query_one(inputs, mask):
        return index.search_one(model.query_codes(inputs).cpu().numpy()[0], K, mask[1])
    return search, query_one, "postings"


@torch.no_grad()
def measure(args, params, data_dir, model, test):
    """Recall@k of the retrieval and of exact scoring, recall of the exact top-50, batch-1 query times."""
    item_repr = model.all_item_repr()
    n_users = len(test)
    search, query_one, candidates = retrieval(params, data_dir, model, item_repr)
    ids, exact, hits, sizes, counts = [], [], [], [], []
    for start in range(0, n_users, 256):
        stop = min(start + 256, n_users)
        inputs, stats = test.batch(start, stop), {}
        found = search(inputs, serving.mask_block(test, start, stop), stats)            # [B, K]
        scores = model.full_scores(inputs, item_repr)                                   # [B, n_items]
        top_scores, top_ids = masked_topk(scores, K, test.mask_indptr, test.mask_items, row_offset=start)
        h, s = tie_aware_hits(found, serving.scores_at(scores, found), top_scores.double().numpy())
        ids.append(found), exact.append(top_ids.numpy()), hits.append(h), sizes.append(s)
        counts.append(stats[candidates])
    ids, exact = np.concatenate(ids), np.concatenate(exact)
    row = {f"Recall@{k}": v for k, v in zip(KS, _recalls(ids, test))}
    row["exact_Recall@50"] = _recalls(exact, test)[-1]
    row["recall_vs_exact@50"] = recall_vs_exact(np.concatenate(hits), np.concatenate(sizes))
    row["candidates_per_user"] = float(np.concatenate(counts).mean())
    row.update(timings(args, model, test, item_repr, query_one))
    return row


def timings(args, model, test, item_repr, query_one):
    """Median microseconds per user at batch 1 (user tower included) of the retrieval and of scoring everything."""
    users = list(range(min(args.latency_users, len(test))))
    inputs = {u: test.batch(u, u + 1) for u in users}
    masks = {u: serving.mask_block(test, u, u + 1) for u in users}

    def score_all(u):
        scores = model.full_scores(inputs[u], item_repr)                                # [1, n_items]
        return masked_topk(scores, K, masks[u][0], masks[u][1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            times = timed_round_robin({"query": lambda u: query_one(inputs[u], masks[u]), "score_all": score_all},
                                      users, warmup=min(20, len(users) // 4), block=50)
    finally:
        torch.set_num_threads(threads)
    query, score_all_us = (percentiles_us(times[name][0])["median"] for name in ("query", "score_all"))
    return {"query_us": query, "score_all_us": score_all_us, "time_ratio": query / score_all_us}


def _recalls(ids, test):
    values = topk_metrics(ids, test.gt_indptr, test.gt_items, ks=KS, metrics=("Recall",))
    return [float(values[f"Recall(k={k})"]) for k in KS]


def read_rows(path):
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as handle:
        return {row["expid"]: row for row in csv.DictReader(handle)}


def write(args, rows):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    ordered = [rows[expid] for dataset in EXPIDS for _, _, expid in EXPIDS[dataset] if expid in rows]
    _atomic(args.out + ".csv", lambda handle: _write_csv(handle, ordered))
    lines = ["# TDM vs SparCode (the SparCode paper's Table 4 shape)", "",
             f"Written {datetime.datetime.now().isoformat(timespec='seconds')} by "
             f"`python benchmarks/tdm_vs_sparcode.py --datasets {' '.join(args.datasets)}` (rows of other datasets "
             f"kept from earlier runs; each row says when it was measured). One run of each expid, seed of its "
             f"config; every expid is also `OMP_NUM_THREADS=2 python run_expid.py --expid <expid>`.", "",
             "Recall@k: the top 50 each model's retrieval structure returns for every test user (history masked): "
             "TDM by layer-wise beam search (`beam_size` of the expid), SparCode through its sparse index. "
             "`exact R@50`: scoring every item with the same model. `of exact top-50`: share of that exact top 50 "
             "the retrieval returns. `candidates`: tree nodes scored (TDM) or postings merged (SparCode) per user. "
             "Query time: median microseconds per test user at batch 1 on one thread, user tower included, against "
             "the same model scoring every item plus a masked top 50 in the same run (round robin, "
             f"{args.latency_users} users); the machine is shared, so times are indicative.", ""]
    for dataset in EXPIDS:
        own = [row for row in ordered if row["dataset"] == dataset]
        if not own:
            continue
        lines += [f"## {dataset}", "",
                  "| model | interaction | expid | R@5 | R@10 | R@20 | R@50 | exact R@50 | of exact top-50 | "
                  "candidates / items | query us | score-all us | ratio | train s (epochs) | measured |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in own:
            f = {key: float(row[key]) for key in FIELDS if key not in ("dataset", "model", "interaction", "expid",
                                                                       "checkpoint_sha256", "measured")}
            lines.append(f"| {row['model']} | {row['interaction']} | `{row['expid']}` | {f['Recall@5']:.4f} | "
                         f"{f['Recall@10']:.4f} | {f['Recall@20']:.4f} | {f['Recall@50']:.4f} | "
                         f"{f['exact_Recall@50']:.4f} | {f['recall_vs_exact@50']:.3f} | "
                         f"{f['candidates_per_user']:.0f} / {f['n_items']:.0f} | {f['query_us']:.0f} | "
                         f"{f['score_all_us']:.0f} | {f['time_ratio']:.2f} | {f['train_seconds']:.0f} "
                         f"({f['epochs']:.0f}) | {row['measured']} |")
        lines.append("")
    _atomic(args.out + ".md", lambda handle: handle.write("\n".join(lines)))
    print("\n".join(lines))


def _write_csv(handle, rows):
    writer = csv.DictWriter(handle, fieldnames=FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})


def _atomic(path, fill):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as handle:
        fill(handle)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    rows = read_rows(args.out + ".csv")
    for dataset in args.datasets:
        for model_name, interaction, expid in EXPIDS[dataset]:
            result, params, data_dir, model, test = trained(args, expid)
            sha = serving.checkpoint_sha256(model.checkpoint)
            if not args.remeasure and rows.get(expid, {}).get("checkpoint_sha256") == sha:
                print(f"{expid}: checkpoint unchanged, row kept")
                continue
            started = time.time()
            row = {"dataset": dataset, "model": model_name, "interaction": interaction or params["interaction"],
                   "expid": expid, "checkpoint_sha256": sha, "n_items": model.item_corpus.num_items,
                   "test_users": len(test), "train_seconds": result["seconds"]["train"],
                   "epochs": len(result["history"]), "measured": datetime.date.today().isoformat()}
            row.update(measure(args, params, data_dir, model, test))
            rows[expid] = row
            print(f"{expid}: measured in {time.time() - started:.0f} s")
            write(args, rows)


if __name__ == "__main__":
    main()
