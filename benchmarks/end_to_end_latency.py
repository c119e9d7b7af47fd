"""End-to-end query time of one user's request: input features -> top-k item ids, SparCode vs DSSM + faiss.

A request is one row of the test split as the loaders give it (EvalUsers.batch(u, u + 1)) plus the user's
history mask; it ends with the top-k item ids (history removed). Batch 1, one thread everywhere (OMP / MKL /
OpenBLAS / numba env vars before the imports, torch.set_num_threads(1), faiss.omp_set_num_threads(1)):

- SparCode: tokenizer + quantizer (``model.query_codes`` on the 1-row batch -> K_u keys), then the merge of
  the K_u posting lists of the sparse code index (``SparseCodeIndex.search_one`` with the history mask). The
  index is the one ``run_expid.py`` wrote next to the checkpoint (engine/serving.py ``load_code_index``);
  when it is missing or belongs to another checkpoint it is built with the expid's serving keys
  (``build_code_index``, as ``code_index_report`` does) and written there.
- DSSM: user tower (``model.encode_users`` on the 1-row batch -> one vector), then faiss through the
  serving wrapper ``FaissRetriever.search`` (over-fetches k + history length and drops masked ids), with
  the serving parameters of the expid (engine/serving.py ``faiss_retrievers``): IndexFlatIP (exact) and
  IndexHNSWFlat (``--indexes`` adds ivfpq).

Both expids must be on the same dataset (same corpus); both answer the same test users (the SparCode expid's
test split). Timing (benchmarks/_timing.py ``timed_round_robin``): every method answers the same
``--warmup`` untimed then ``--queries`` timed requests, the methods taking turns in blocks of 100 so load
changes hit them alike; per-request wall time (median, p90), thread CPU time, and the median of each stage
(query tower, index). Recall@k of each method over the timed users is a sanity check. Checkpoints are never
trained here: a missing one stops the script with the command that trains it.

    python benchmarks/end_to_end_latency.py     # SparCode_demo_50k_001 vs DSSM_demo_50k_001
"""
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / torch / faiss / numba are imported

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._timing import percentiles_us, timed_round_robin, user_mask  # noqa: E402
from benchmarks.sparsity_sweep import postings_per_query  # noqa: E402
from model_zoo.base import CodeIndexable, VectorServable  # noqa: E402
from model_zoo.engine import serving  # noqa: E402
from model_zoo.engine.experiment import open_data, prepare  # noqa: E402
from model_zoo.retrieval import _merge  # noqa: E402
from model_zoo.retrieval.faiss_index import INDEX_TYPES  # noqa: E402
from model_zoo.retrieval.index_io import SparseIndexMismatchError  # noqa: E402
from model_zoo.retrieval.metrics import topk_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAISS_NAMES = {"flat_ip": "IndexFlatIP", "ivfpq": "IndexIVFPQ", "hnsw": "IndexHNSWFlat"}
BLOCK = 100  # requests a method answers in a row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "config"), help="config folder")
    parser.add_argument("--sparcode-expid", default="SparCode_demo_50k_001")
    parser.add_argument("--dssm-expid", default="DSSM_demo_50k_001")
    parser.add_argument("--queries", type=int, default=1000, help="timed requests per method")
    parser.add_argument("--warmup", type=int, default=100, help="untimed leading requests per method")
    parser.add_argument("--k", type=int, default=50, help="items returned per request")
    parser.add_argument("--indexes", nargs="+", default=["flat_ip", "hnsw"], choices=INDEX_TYPES,
                        help="faiss indexes behind the DSSM user tower")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "end_to_end_latency"),
                        help="output path without extension (.md and .csv are written)")
    args = parser.parse_args(argv)
    for name in ("queries", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def trained_model(config_dir, expid, capability):
    """(model in eval mode with its corpus and weights, params, data_dir, test EvalUsers); exits when the
    checkpoint is missing, naming the command that trains it."""
    params, model_cls = prepare(config_dir, expid)
    data_dir, feature_map, corpus, train, _, test = open_data(params)
    model = model_cls(feature_map, **params)
    if not isinstance(model, capability):
        sys.exit(f"{expid}: model {params['model']} is not {capability.__name__}; pass an expid of the right model")
    if not os.path.isfile(model.checkpoint):
        config = "" if os.path.abspath(config_dir) == os.path.join(ROOT, "config") else f" --config {config_dir}"
        sys.exit(f"{expid}: no checkpoint at {model.checkpoint}; train it first (under the shared lock on a shared "
                 f"machine): python run_expid.py{config} --expid {expid}")
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    model.load_weights(model.checkpoint)
    model.eval()
    return model, params, data_dir, test


def code_index(model, params, data_dir):
    """(SparseCodeIndex of the checkpoint, where it came from): the file run_expid wrote, else built and written
    with the expid's serving keys (engine/serving.py)."""
    path = serving.default_index_path(model.checkpoint)
    try:
        return serving.load_code_index(model, path), f"loaded from `{os.path.relpath(path, ROOT)}`"
    except (FileNotFoundError, SparseIndexMismatchError) as exc:
        reason = "missing" if isinstance(exc, FileNotFoundError) else "built for another checkpoint"
    index = serving.build_code_index(model, data_dir, params["sparsity_bias"], params["target_sparsity"],
                                     params["index_top_l"], params["index_max_keys"], params["index_score_dtype"],
                                     params["unseen_key"], num_threads=os.cpu_count())
    index.write(path)
    return index, f"{reason}: built with the expid's serving keys and written to `{os.path.relpath(path, ROOT)}`"


def sparcode_request(model, index, inputs, masks, k, stages):
    """request(u) -> top-k ids [k]: query_codes on u's row, then the posting-list merge; appends (tower, index)
    nanoseconds to ``stages``."""
    def request(u):
        started = time.perf_counter_ns()
        keys = model.query_codes(inputs[u]).numpy()[0]                                   # [K_u]
        encoded = time.perf_counter_ns()
        _, ids = index.search_one(keys, k, masks[u])                                     # [k]
        stages.append((encoded - started, time.perf_counter_ns() - encoded))
        return ids
    return request


def dssm_request(model, retriever, inputs, test, k, stages):
    """request(u) -> top-k ids [k]: the user tower on u's row, then FaissRetriever.search with u's mask."""
    def request(u):
        started = time.perf_counter_ns()
        with torch.no_grad():
            vector = model.encode_users(inputs[u]).numpy()                               # [1, d]
        encoded = time.perf_counter_ns()
        _, ids = retriever.search(vector, k, test.mask_indptr, test.mask_items, row_offset=u)  # [1, k]
        stages.append((encoded - started, time.perf_counter_ns() - encoded))
        return ids[0]
    return request


def recall_at_k(ids, test, users, k):
    """Recall@k of ids [n, k] for the given test users (their ground truth rows)."""
    lengths = test.gt_indptr[users + 1] - test.gt_indptr[users]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    items = np.concatenate([test.gt_items[test.gt_indptr[u]:test.gt_indptr[u + 1]] for u in users])
    return float(topk_metrics(ids, indptr, items, ks=(k,), metrics=("Recall",))[f"Recall(k={k})"])


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    sparcode, sp_params, data_dir, test = trained_model(args.config, args.sparcode_expid, CodeIndexable)
    dssm, ds_params, ds_data_dir, _ = trained_model(args.config, args.dssm_expid, VectorServable)
    if ds_data_dir != data_dir:
        sys.exit(f"{args.sparcode_expid} reads {data_dir} and {args.dssm_expid} reads {ds_data_dir}: "
                 f"the two expids must be on the same dataset (same corpus)")
    n_items = sparcode.item_corpus.num_items
    if args.k > n_items:
        sys.exit(f"--k {args.k} exceeds the corpus of {n_items} items")

    index, index_source = code_index(sparcode, sp_params, data_dir)
    stats = index.stats()
    with torch.no_grad():
        item_vectors = np.ascontiguousarray(dssm.all_item_repr().float().numpy())        # [n_items, d]
    retrievers = serving.faiss_retrievers(item_vectors, ds_params, num_threads=os.cpu_count())
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    print(f"indexes ready ({time.perf_counter() - started:.0f} s): {index}", flush=True)

    n_users = len(test)
    sequence = [i % n_users for i in range(args.warmup + args.queries)]
    timed_users = np.unique(sequence[args.warmup:])
    inputs = {u: {name: value.to(sparcode.device) for name, value in test.batch(u, u + 1).items()}
              for u in set(sequence)}
    masks = {u: user_mask(test, u) for u in set(sequence)}
    query_keys = sparcode.query_codes(test.batch(0, n_users)).numpy()                  # [n_users, K_u]
    unseen = np.setdiff1d(query_keys, index.keys) if index.key_set_kind == "observed" else np.empty(0, np.int64)
    if unseen.size and index.unseen_key == "score":  # as evaluate_code_index: scored once, before any request
        index = index.copy().add(serving.code_score_fn(sparcode), unseen)

    stages = {"SparCode": []}
    methods = {"SparCode": sparcode_request(sparcode, index, inputs, masks, args.k, stages["SparCode"])}
    for name in args.indexes:
        method = f"DSSM + {FAISS_NAMES[name]}"
        stages[method] = []
        methods[method] = dssm_request(dssm, retrievers[name][0], inputs, test, args.k, stages[method])
    for fn in methods.values():  # JIT / first-touch warm-up outside the timed loop
        fn(sequence[0])
    for record in stages.values():
        record.clear()
    timings = timed_round_robin(methods, sequence, args.warmup, block=BLOCK)
    load_after = os.getloadavg()
    stage_us = {name: np.asarray(record[args.warmup:], dtype=np.float64) * 1e-3 for name, record in stages.items()}

    rows = []
    for name, fn in methods.items():
        wall, cpu = timings[name]
        ids = np.stack([fn(u) for u in timed_users])                                    # [n_timed_users, k]
        rows.append({"method": name, **{f"{key}_us": value for key, value in percentiles_us(wall).items()},
                     "mean_us": float(wall.mean() * 1e6), "cpu_us": float(np.median(cpu) * 1e6),
                     "tower_median_us": float(np.median(stage_us[name][:, 0])),
                     "index_median_us": float(np.median(stage_us[name][:, 1])),
                     f"Recall@{args.k}": recall_at_k(ids, test, timed_users, args.k)})
    flat = next((row for row in rows if row["method"] == f"DSSM + {FAISS_NAMES['flat_ip']}"), None)
    for row in rows:
        row["ratio_to_dssm_flatip"] = row["median_us"] / flat["median_us"] if flat else float("nan")
    info = {"sparcode": sparcode, "dssm": dssm, "sp_params": sp_params, "ds_params": ds_params, "stats": stats,
            "index": index, "index_source": index_source, "retrievers": retrievers, "n_items": n_items,
            "dim": item_vectors.shape[1], "n_users": n_users, "timed_users": timed_users.size,
            "postings": postings_per_query(index, query_keys[timed_users]), "unseen": int(unseen.size),
            "masked": float(np.mean([masks[u].size for u in timed_users])), "load_before": load_before,
            "load_after": load_after, "elapsed": time.perf_counter() - started}
    write_results(args, rows, info)


def _atomic_write(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _load(values):
    return "/".join(f"{v:.2f}" for v in values)


def _csv_text(rows):
    fields = list(rows[0])
    lines = [",".join(fields)]
    for row in rows:
        lines.append(",".join(f"{row[f]:.6g}" if isinstance(row[f], float) else str(row[f]) for f in fields))
    return "\n".join(lines) + "\n"


def write_results(args, rows, info):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _atomic_write(args.out + ".csv", _csv_text(rows))
    stats, index, k = info["stats"], info["index"], args.k
    sp, ds = info["sp_params"], info["ds_params"]
    command = "python benchmarks/end_to_end_latency.py" + "".join(f" {arg}" for arg in sys.argv[1:])
    faiss_params = "; ".join(f"{FAISS_NAMES[name]}: " + (", ".join(f"{key}={value}" for key, value in
                                                                   info["retrievers"][name][2].items()) or "exact")
                             for name in args.indexes)
    lines = [
        "# End-to-end query time: SparCode vs DSSM + faiss (batch 1, one thread)",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `{command}` ({info['elapsed']:.0f} s; "
        f"load average before {_load(info['load_before'])}, after {_load(info['load_after'])} on {os.cpu_count()} "
        f"cores). Python {platform.python_version()}, torch {torch.__version__}, faiss {faiss.__version__}, "
        f"numba {_merge.NUMBA_VERSION}.",
        "",
        f"Corpus: `{sp['dataset_id']}`, {info['n_items']} items. Requests: {args.queries} timed per method after "
        f"{args.warmup} warm-up, over {info['timed_users']} distinct test users of {info['n_users']} "
        f"({info['masked']:.1f} history items masked per user on average); top-{k}; methods interleaved in blocks "
        f"of {BLOCK} requests (benchmarks/_timing.py).",
        "",
        f"- SparCode `{args.sparcode_expid}` (checkpoint `{os.path.relpath(info['sparcode'].checkpoint, ROOT)}`): "
        f"query_codes on the 1-row batch (K_u={index.num_query_tokens}, M={index.num_codebooks}, "
        f"N={index.codebook_size}) + SparseCodeIndex.search_one ({index.backend} kernel). Index {info['index_source']}; "
        f"{stats['n_keys']} keys ({index.key_set_kind}), b~={index.sparsity_bias:.4f}, top-L {index.top_l}, "
        f"{index.score_dtype}: Sparsity {stats['Sparsity']:.5f}, **Average Items {stats['Average Items']:.1f}** "
        f"(max {stats['max_items']}), {stats['index_bytes'] / 2 ** 20:.1f} MiB; postings merged per request: median "
        f"{np.median(info['postings']):.0f}" + (f"; {info['unseen']} test keys outside the index "
                                                 f"({index.unseen_key})" if info["unseen"] else "") + ".",
        f"- DSSM `{args.dssm_expid}` (checkpoint `{os.path.relpath(info['dssm'].checkpoint, ROOT)}`): encode_users on "
        f"the 1-row batch (d={info['dim']}) + FaissRetriever.search with the history mask (over-fetch k + history "
        f"length, then filter), serving parameters of the expid: {faiss_params}.",
        "",
        f"| method | median (us) | p90 (us) | mean (us) | CPU (us/request) | query tower median (us) | "
        f"index median (us) | median / DSSM + IndexFlatIP | Recall@{k} (timed users) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['median_us']:.1f} | {row['p90_us']:.1f} | {row['mean_us']:.1f} | "
                     f"{row['cpu_us']:.1f} | {row['tower_median_us']:.1f} | {row['index_median_us']:.1f} | "
                     f"{row['ratio_to_dssm_flatip']:.3f} | {row[f'Recall@{k}']:.4f} |")
    lines.append("")
    flat = next((row for row in rows if row["method"] == f"DSSM + {FAISS_NAMES['flat_ip']}"), None)
    if flat is not None:
        ratio = rows[0]["ratio_to_dssm_flatip"]
        lines.append(f"**SparCode's median request time is {ratio:.3f} x that of DSSM + IndexFlatIP** "
                     f"({rows[0]['median_us']:.1f} us vs {flat['median_us']:.1f} us): "
                     + ("at most" if ratio <= 1.0 else "more than") + " the two-tower exact search on this corpus.")
        lines.append("")
    lines += [
        "Notes:",
        "- A request starts from the user's input row (tensors as EvalUsers.batch gives them) and its history, and "
        "ends with the top-k item ids; item-side work (item tower, index build) is done before, as in serving.",
        "- Stages: query tower = tokenizer + quantizer (SparCode) or user tower (DSSM), torch eager on one thread; "
        "index = posting-list merge with the mask (SparCode) or faiss search + mask filter (DSSM). Stage medians "
        "do not add up exactly to the request median.",
        "- Wall time is what a caller sees on this shared machine; CPU time is this thread's work (median over "
        "blocks). Recall@k is over the distinct timed users, through each method (a sanity check, not the "
        "benchmark of accuracy).",
        f"- Raw numbers: {os.path.basename(args.out)}.csv.",
    ]
    _atomic_write(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
