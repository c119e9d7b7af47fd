"""Per-query retrieval latency: SparCode sparse inverted index vs faiss, one thread, one process.

Synthetic corpus (latency depends on posting-list lengths and overlap, not on what scores mean):
- n_items item vectors v ~ N(0, I_d) (d=64), used by every index.
- SparCode keys: M=2 codebooks of N=64 codewords of size d/M -> N^M = 4096 keys; the token of a
  key is the unit-normalised concatenation of its codewords t, the raw score S = t . v ~ N(0, 1),
  and b~ is chosen (choose_bias_for_sparsity) so that about `postings` items per key survive
  relu(S + b~) (target sparsity 1 - postings / n_items). A query is K_u=4 random keys.
- faiss: IndexFlatIP (exact), IndexIVFPQ (nlist, m, nbits, nprobe below) and IndexHNSWFlat
  (inner product), all over the same item vectors; a query is one random d-dim user vector.

Timing: every library limited to one thread (OMP/MKL/OpenBLAS/numba env vars, torch, faiss).
Batch 1: each method answers the same queries after a warm-up; per-call wall time
(perf_counter_ns), median and p90. The methods take turns in blocks of 100 queries (warm caches
within a block, machine-load changes spread over all methods). Batch 256: median over several
batches of the batch time / 256. Recall@k of the approximate faiss indexes is measured against
IndexFlatIP. The result table is written to benchmarks/results/retrieval_latency.{md,csv}.

    python benchmarks/retrieval_latency.py          # ~1-2 min on 2 cores
"""
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / torch / faiss are imported

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
from benchmarks._timing import timed_round_robin  # noqa: E402
from model_zoo.retrieval import _merge  # noqa: E402
from model_zoo.retrieval.code_keys import unpack_keys  # noqa: E402
from model_zoo.retrieval.faiss_index import FaissRetriever  # noqa: E402
from model_zoo.retrieval.sparse_index import SparseCodeIndex  # noqa: E402
from model_zoo.retrieval.sparsity import choose_bias_for_sparsity  # noqa: E402

TARGET_US = 10.0  # docs/design.md, "Targets": median batch-1 query of the sparse index on this setting


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-items", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=64, help="item/user vector size for faiss")
    parser.add_argument("--num-codebooks", type=int, default=2, help="M")
    parser.add_argument("--codebook-size", type=int, default=64, help="N")
    parser.add_argument("--num-query-tokens", type=int, default=4, help="K_u")
    parser.add_argument("--postings", type=int, default=500, help="target average items per key")
    parser.add_argument("--mask-size", type=int, default=50, help="masked items per query (masked rows)")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--queries", type=int, default=2000, help="timed batch-1 queries per method")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per method")
    parser.add_argument("--ivf-nlist", type=int, default=256)
    parser.add_argument("--ivf-m", type=int, default=16)
    parser.add_argument("--ivf-nbits", type=int, default=8)
    parser.add_argument("--ivf-nprobe", type=int, default=16)
    parser.add_argument("--ivf-train", type=int, default=20_000, help="IVFPQ training sample size")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--hnsw-ef-search", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "retrieval_latency"),
                        help="output path without extension (.md and .csv are written)")
    return parser.parse_args(argv)


def build_sparse_index(args, rng):
    """SparCode index over synthetic unit-norm key tokens (see module docstring)."""
    M, N, d = args.num_codebooks, args.codebook_size, args.dim
    if d % M:
        raise ValueError(f"--dim {d} must be divisible by --num-codebooks {M}")
    codebooks = rng.standard_normal((M, N, d // M)).astype(np.float32)  # [M, N, d/M]
    codes = unpack_keys(np.arange(N ** M), N, M)  # [N^M, M]
    tokens = np.concatenate([codebooks[m][codes[:, m]] for m in range(M)], axis=1)  # [N^M, d]
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    return codebooks, torch.from_numpy(tokens)


def recall_against(reference_ids, ids):
    hits = [len(set(r[r >= 0]) & set(g[g >= 0])) / max(1, (r >= 0).sum()) for r, g in zip(reference_ids, ids)]
    return float(np.mean(hits))


def machine_info():
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return cpu, os.cpu_count()


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    load_before = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    n_items, d, k = args.n_items, args.dim, args.k
    items = rng.standard_normal((n_items, d)).astype(np.float32)  # [n_items, d]
    items_t = torch.from_numpy(items)

    # ---- SparCode sparse index
    codebooks, tokens = build_sparse_index(args, rng)  # tokens [N^M, d]
    keys = np.arange(tokens.shape[0])

    def score_fn(key_block, start, stop):
        return tokens[torch.from_numpy(key_block)] @ items_t[start:stop].T  # [kb, ib]

    target_sparsity = 1.0 - args.postings / n_items
    bias = choose_bias_for_sparsity(score_fn, keys, n_items, target_sparsity, sample_keys=256, seed=args.seed,
                                    num_threads=1)
    index = SparseCodeIndex.build(score_fn, keys, n_items, bias, num_codebooks=args.num_codebooks,
                                  codebook_size=args.codebook_size, num_query_tokens=args.num_query_tokens,
                                  codebooks=codebooks, checkpoint_hash="synthetic", num_threads=1,
                                  progress=False)
    stats = index.stats()
    stats["min_items"] = int(np.diff(index.indptr).min())
    print(f"sparse index built ({time.perf_counter() - started:.0f} s): {index}", flush=True)

    # ---- faiss indexes over the same items (built with every core; searched with one below)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    build_seconds = {}
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(items)
    build_seconds["flat"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, args.ivf_nlist, args.ivf_m, args.ivf_nbits,
                             faiss.METRIC_INNER_PRODUCT)
    train_rows = rng.choice(n_items, size=min(n_items, args.ivf_train), replace=False)
    ivfpq.train(items[np.sort(train_rows)])  # a sample is standard for IVF/PQ training
    ivfpq.add(items)
    ivfpq.nprobe = args.ivf_nprobe
    build_seconds["ivfpq"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = args.hnsw_ef_construction
    hnsw.add(items)
    hnsw.hnsw.efSearch = args.hnsw_ef_search
    build_seconds["hnsw"] = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    print(f"faiss indexes built ({time.perf_counter() - started:.0f} s)", flush=True)

    n_total = args.warmup + args.queries
    query_keys = rng.integers(0, tokens.shape[0], size=(n_total, args.num_query_tokens))  # [Q, K_u]
    user_vectors = rng.standard_normal((n_total, d)).astype(np.float32)  # [Q, d]
    masks = [rng.choice(n_items, size=args.mask_size, replace=False) for _ in range(n_total)]
    postings_per_query = np.diff(index.indptr)[query_keys].sum(axis=1)  # [Q]

    # ---- batch 1, round-robin
    numba_ok = _merge.HAVE_NUMBA
    sparse_nb = SparseCodeIndex(**_index_arrays(index), backend="numba") if numba_ok else None
    sparse_np = SparseCodeIndex(**_index_arrays(index), backend="numpy")
    methods, descriptions = {}, {}
    if numba_ok:
        methods["SparseCodeIndex (numba)"] = lambda i: sparse_nb.search_one(query_keys[i], k)
        methods["SparseCodeIndex + mask (numba)"] = lambda i: sparse_nb.search_one(query_keys[i], k, mask=masks[i])
        methods["SparseCodeIndex via search() (numba)"] = lambda i: sparse_nb.search(query_keys[i:i + 1], k)
    methods["SparseCodeIndex (numpy)"] = lambda i: sparse_np.search_one(query_keys[i], k)
    methods["faiss IndexFlatIP"] = lambda i: flat.search(user_vectors[i:i + 1], k)
    methods["faiss IndexIVFPQ"] = lambda i: ivfpq.search(user_vectors[i:i + 1], k)
    methods["faiss IndexHNSWFlat"] = lambda i: hnsw.search(user_vectors[i:i + 1], k)
    retriever = FaissRetriever("flat_ip", dim=d, num_threads=1).add(items)
    methods["FaissRetriever(flat_ip)"] = lambda i: retriever.search(user_vectors[i:i + 1], k)
    sparse_params = (f"M={args.num_codebooks}, N={args.codebook_size}, K_u={args.num_query_tokens}, "
                     f"b~={bias:.4f}, avg {stats['Average Items']:.0f} items/key")
    for name in methods:
        if name.startswith("SparseCodeIndex"):
            descriptions[name] = sparse_params + (f", mask {args.mask_size} items" if "mask" in name else "")
    descriptions["faiss IndexFlatIP"] = f"exact, d={d}"
    descriptions["faiss IndexIVFPQ"] = (f"nlist={args.ivf_nlist}, m={args.ivf_m}, nbits={args.ivf_nbits}, "
                                        f"nprobe={args.ivf_nprobe}, trained on {min(n_items, args.ivf_train)}")
    descriptions["faiss IndexHNSWFlat"] = (f"M={args.hnsw_m}, efConstruction={args.hnsw_ef_construction}, "
                                           f"efSearch={args.hnsw_ef_search}")
    descriptions["FaissRetriever(flat_ip)"] = "project wrapper (validation + mask logic) around IndexFlatIP"
    for fn in methods.values():  # JIT / first-touch warm-up outside the timed loop
        fn(0)
    batch1 = timed_round_robin(methods, range(n_total), args.warmup)

    print(f"batch-1 timing done ({time.perf_counter() - started:.0f} s)", flush=True)

    # ---- batch of batch_size, round-robin over batches
    bs = args.batch_size
    batch_keys = rng.integers(0, tokens.shape[0], size=(args.batches + 1, bs, args.num_query_tokens))
    batch_vectors = rng.standard_normal((args.batches + 1, bs, d)).astype(np.float32)
    batch_methods = {}
    if numba_ok:
        batch_methods["SparseCodeIndex (numba)"] = lambda b: sparse_nb.search(batch_keys[b], k)
        batch_methods["SparseCodeIndex via search() (numba)"] = batch_methods["SparseCodeIndex (numba)"]
    batch_mask_rows = [[rng.choice(n_items, size=args.mask_size, replace=False) for _ in range(bs)]
                       for _ in range(args.batches + 1)]
    batch_mask_indptr = np.arange(bs + 1, dtype=np.int64) * args.mask_size
    batch_mask_items = [np.concatenate(rows_) for rows_ in batch_mask_rows]
    if numba_ok:
        batch_methods["SparseCodeIndex + mask (numba)"] = lambda b: sparse_nb.search(
            batch_keys[b], k, batch_mask_indptr, batch_mask_items[b])
    batch_methods["SparseCodeIndex (numpy)"] = lambda b: sparse_np.search(batch_keys[b], k)
    batch_methods["faiss IndexFlatIP"] = lambda b: flat.search(batch_vectors[b], k)
    batch_methods["faiss IndexIVFPQ"] = lambda b: ivfpq.search(batch_vectors[b], k)
    batch_methods["faiss IndexHNSWFlat"] = lambda b: hnsw.search(batch_vectors[b], k)
    batch_methods["FaissRetriever(flat_ip)"] = lambda b: retriever.search(batch_vectors[b], k)
    unique_batch = {name: fn for name, fn in batch_methods.items() if name != "SparseCodeIndex via search() (numba)"}
    batched = timed_round_robin(unique_batch, range(args.batches + 1), 1, block=1)
    if numba_ok:
        batched["SparseCodeIndex via search() (numba)"] = batched["SparseCodeIndex (numba)"]

    # ---- recall of the approximate faiss indexes against exact inner product
    recall_queries = batch_vectors[0]
    exact_ids = flat.search(recall_queries, k)[1]
    recalls = {"faiss IndexFlatIP": 1.0,
               "faiss IndexIVFPQ": recall_against(exact_ids, ivfpq.search(recall_queries, k)[1]),
               "faiss IndexHNSWFlat": recall_against(exact_ids, hnsw.search(recall_queries, k)[1])}
    # the sparse index (no top-L cap) is exact for its own scoring: check 32 queries against a dense sum
    check_keys = batch_keys[0][:32]  # [32, K_u]
    used = np.unique(check_keys)
    dense = np.maximum(score_fn(used, 0, n_items).numpy() + np.float32(bias), 0).astype(np.float64)  # [U, n]
    exact_sparse = np.full((len(check_keys), k), -1, dtype=np.int64)
    for b, row in enumerate(check_keys):
        total = dense[np.searchsorted(used, row)].sum(axis=0)  # [n_items]
        top = np.flatnonzero(total > 0)
        top = top[np.lexsort((top, -total[top]))][:k]
        exact_sparse[b, :len(top)] = top
    recalls_sparse = recall_against(exact_sparse, sparse_np.search(check_keys, k)[1])

    # ---- report
    flat_median = np.median(batch1["faiss IndexFlatIP"][0])
    rows = []
    for name in methods:
        t, cpu_per_query = batch1[name]
        if name in batched:
            per_query_batch = np.median(batched[name][0]) / bs
            cpu_per_query_batch = np.median(batched[name][1]) / bs
        else:
            per_query_batch = cpu_per_query_batch = float("nan")
        recall = recalls.get(name, recalls_sparse if name.startswith("SparseCodeIndex") else
                             (1.0 if name == "FaissRetriever(flat_ip)" else float("nan")))
        rows.append({
            "method": name,
            "params": descriptions.get(name, ""),
            "batch1_median_us": np.median(t) * 1e6,
            "batch1_p90_us": np.percentile(t, 90) * 1e6,
            "batch1_mean_us": t.mean() * 1e6,
            "batch1_cpu_us": np.median(cpu_per_query) * 1e6,
            f"batch{bs}_per_query_us": per_query_batch * 1e6,
            f"batch{bs}_cpu_per_query_us": cpu_per_query_batch * 1e6,
            "ratio_to_flatip_batch1_median": np.median(t) / flat_median,
            f"recall@{k}_vs_exact": recall,
        })
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    write_results(args, rows, stats, bias, build_seconds, postings_per_query, load_before, load_after, elapsed)
    for row in rows:
        print(f"{row['method']:36s} median {row['batch1_median_us']:9.1f} us  p90 {row['batch1_p90_us']:9.1f} us  "
              f"batch{bs} {row[f'batch{bs}_per_query_us']:8.1f} us/query  "
              f"ratio {row['ratio_to_flatip_batch1_median']:.3f}")
    print(f"wrote {args.out}.md and {args.out}.csv in {elapsed:.0f} s")


def _index_arrays(index):
    """Constructor arguments that recreate `index` (to hold one copy per backend)."""
    return dict(keys=index.keys, indptr=index.indptr, items=index.items, scores=index.scores,
                num_codebooks=index.num_codebooks, codebook_size=index.codebook_size, n_items=index.n_items,
                num_query_tokens=index.num_query_tokens, sparsity_bias=index.sparsity_bias,
                key_set_kind=index.key_set_kind, checkpoint_hash=index.checkpoint_hash,
                build_seconds=index.build_seconds, codebooks=index.codebooks)


def write_results(args, rows, stats, bias, build_seconds, postings_per_query, load_before, load_after, elapsed):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    bs, k = args.batch_size, args.k
    fields = list(rows[0])
    tmp_csv = f"{args.out}.csv.tmp"
    with open(tmp_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.4f}" if isinstance(value, float) else value)
                             for key, value in row.items()})
    os.replace(tmp_csv, f"{args.out}.csv")

    cpu, cores = machine_info()
    main_row = next((r for r in rows if r["method"] == "SparseCodeIndex (numba)"),
                    next(r for r in rows if r["method"] == "SparseCodeIndex (numpy)"))
    verdict = "meets" if main_row["batch1_median_us"] <= TARGET_US else "MISSES"
    command = "python benchmarks/retrieval_latency.py" + "".join(
        f" {arg}" for arg in sys.argv[1:])
    lines = [
        "# Retrieval latency: SparCode sparse index vs faiss (one thread)",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `{command}` "
        f"({elapsed:.0f} s).",
        "",
        f"Machine: {cpu}, {cores} logical cores; load average (1/5/15 min) before "
        f"{load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}. Python {platform.python_version()}, "
        f"numpy {np.__version__}, numba {_merge.NUMBA_VERSION}, faiss {faiss.__version__}, torch {torch.__version__}.",
        "",
        f"Corpus: {args.n_items} items; top-{k}; every library on one thread; batch-1 numbers over "
        f"{args.queries} queries per method after {args.warmup} warm-up queries, methods interleaved "
        f"block-wise round-robin (blocks of 100 queries); batch {bs}: median of {args.batches} batches / {bs}.",
        "",
        f"Sparse index: M={args.num_codebooks}, N={args.codebook_size} -> {stats['n_keys']} keys (all), "
        f"K_u={args.num_query_tokens}, b~={bias:.4f} (target sparsity {1 - args.postings / args.n_items:.4f}); "
        f"Sparsity {stats['Sparsity']:.5f}, Average Items {stats['Average Items']:.1f} "
        f"(min {stats['min_items']}, max {stats['max_items']} per key), "
        f"postings summed per query: median {np.median(postings_per_query):.0f}; "
        f"{stats['index_bytes'] / 2 ** 20:.1f} MiB, built in {stats['build_seconds']:.1f} s "
        f"(1 thread). faiss build ({os.cpu_count()} threads): "
        + ", ".join(f"{n} {s:.1f} s" for n, s in build_seconds.items()) + ".",
        "",
        f"| method | parameters | batch 1 median (us) | batch 1 p90 (us) | batch 1 mean (us) | "
        f"batch 1 CPU (us/query) | batch {bs} (us/query) | batch {bs} CPU (us/query) | "
        f"batch-1 median / IndexFlatIP | recall@{k} vs exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['params']} | {row['batch1_median_us']:.1f} | "
                     f"{row['batch1_p90_us']:.1f} | {row['batch1_mean_us']:.1f} | {row['batch1_cpu_us']:.1f} | "
                     f"{row[f'batch{bs}_per_query_us']:.1f} | {row[f'batch{bs}_cpu_per_query_us']:.1f} | "
                     f"{row['ratio_to_flatip_batch1_median']:.3f} | {row[f'recall@{k}_vs_exact']:.3f} |")
    lines += [
        "",
        f"Target of docs/design.md (sparse index, batch 1, one thread, median <= {TARGET_US:.0f} us): "
        f"**{verdict}** ({main_row['method']}: wall-clock median {main_row['batch1_median_us']:.1f} us, "
        f"{main_row['ratio_to_flatip_batch1_median']:.3f} x IndexFlatIP's median; CPU time "
        f"{main_row['batch1_cpu_us']:.1f} us/query).",
        "",
        "Notes:",
        "- The sparse index answers with the K_u=4 keys of a query (quantised tokens); faiss with one "
        "d-dim user vector. Query-tower time (model inference) is excluded for both.",
        "- Recall of the sparse rows: its top-k against a dense relu(S + b~) sum over all items for 32 queries "
        "(the index has no top-L cap, so it is exact for its own scoring; 1.000 expected).",
        "- Batch 1 calls `search_one(keys, k, mask=...)`, except the `via search()` row, which sends a batch "
        "of one through `search()` (validation, key lookup, CSR mask slicing). The batch column always calls "
        f"`search(query_keys [{bs}, K_u], k[, mask CSR])`, so the `via search()` row repeats the plain "
        "numba number.",
        f"- The batch-{bs} column is a batch's wall time / {bs}, i.e. a mean that includes the slow tail; compare "
        "it with the batch-1 mean rather than the median. The sparse index has no batch-level vectorisation "
        "(one merge per query), so batching only removes the per-call Python overhead.",
        "- faiss recall is measured on isotropic Gaussian vectors, a hard case for IVFPQ/HNSW; on real embeddings "
        "with cluster structure the same settings recall more. The parameters are typical defaults, not tuned.",
        "- The machine is shared; absolute numbers move with the load shown above (a load average above the "
        "core count means the process waits for a core, which inflates wall-clock times and their tail). The "
        "CPU columns (thread CPU time per query, read once per block of 100 queries / per batch, median over "
        "blocks) are less sensitive to waiting for a core, not to cache pollution by other processes. Ratios "
        "are measured in one process with the methods interleaved.",
        "",
        "Reproduce: `" + command + "`",
        "",
    ]
    tmp_md = f"{args.out}.md.tmp"
    with open(tmp_md, "w") as handle:
        handle.write("\n".join(lines))
    os.replace(tmp_md, f"{args.out}.md")


if __name__ == "__main__":
    main()
