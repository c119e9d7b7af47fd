"""Query timing shared by the benchmark scripts (speed is measured here, never in the library or the tests).

- ``time_calls``: wall time of fn(query) per query after untimed warm-up calls.
- ``timed_round_robin``: several methods answer the same queries in turns of a block each, so load
  changes on a shared machine hit them alike; wall and thread CPU time.
- ``percentiles_us``: median / p90 in microseconds.
- ``user_mask``: the masked items of one evaluation user (EvalUsers CSR).
"""
import time

import numpy as np

WARMUP_CALLS = 20


def time_calls(fn, queries, warmup=WARMUP_CALLS):
    """Wall seconds of fn(query) for each query [n], after ``warmup`` untimed calls on the first queries."""
    queries = list(queries)
    for query in queries[:warmup]:
        fn(query)
    seconds = []
    for query in queries:
        started = time.perf_counter_ns()
        fn(query)
        seconds.append((time.perf_counter_ns() - started) * 1e-9)
    return np.array(seconds)


def timed_round_robin(methods, queries, warmup, block=100):
    """Time fn(query) for every method.

    The first ``warmup`` queries are run but not recorded. The queries are split into blocks of ``block``;
    each method answers a whole block in a row (warm caches, like a server doing only that), and the
    methods take turns block by block, so load changes on a shared machine hit them alike.

    Args:
        methods: {name: fn(query)}.
        queries: the queries, in order.
        warmup: untimed leading queries (run by every method).
        block: queries a method answers in a row.

    Returns:
        {name: (wall seconds per call [n_timed], thread CPU seconds per call averaged per block [n_blocks])}.
        Wall time is the latency a caller sees (it includes time the process waits for a core on a
        loaded machine); CPU time is the work done by this thread (read once per block, so the clock
        call costs nothing per query).
    """
    queries = list(queries)
    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    for fn in methods.values():
        for query in queries[:warmup]:
            fn(query)
    timed = queries[warmup:]
    for start in range(0, len(timed), block):
        chunk = timed[start:start + block]
        for name, fn in methods.items():
            cpu_start = time.thread_time_ns()
            for query in chunk:
                started = time.perf_counter_ns()
                fn(query)
                wall[name].append((time.perf_counter_ns() - started) * 1e-9)
            cpu[name].append((time.thread_time_ns() - cpu_start) * 1e-9 / len(chunk))
    return {name: (np.array(wall[name]), np.array(cpu[name])) for name in methods}


def percentiles_us(seconds):
    """{"median", "p90"} of per-call seconds, in microseconds."""
    seconds = np.asarray(seconds)
    return {"median": float(np.median(seconds) * 1e6), "p90": float(np.percentile(seconds, 90) * 1e6)}


def user_mask(eval_users, user):
    """Item ids masked for one evaluation user (its history): int [n_masked]."""
    return eval_users.mask_items[eval_users.mask_indptr[user]:eval_users.mask_indptr[user + 1]]
