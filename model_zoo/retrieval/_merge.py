"""Merge kernels of the sparse inverted index: sum posting lists, mask, top-k.

Two backends compute the same result bit for bit:

- ``numpy``: vectorised numpy per posting list (always available; the reference).
- ``numba``: compiled loops (optional dependency ``numba``), about 5x faster at batch 1
  (benchmarks/results/retrieval_latency.md), the path measured against the latency target of docs/design.md.

Shared semantics (both backends):
- ``rows`` [K_u] are CSR row numbers of the query's keys; a row of -1 is skipped. A row that
  appears twice is summed twice (Eq. 11 sums over the K_u tokens, not over distinct keys).
- Scores are accumulated in float64, posting list by posting list in the order of ``rows``
  (float16 and float32 postings convert exactly to float64), so both backends add the same
  numbers in the same order.
- Candidates are the union of the posting lists; stored postings are > 0, so every candidate
  has a positive sum and items outside the union (score 0) are never returned.
- Masked items are removed. The top-k is ordered by score descending, then item id ascending
  (deterministic tie break). Scores are returned as float32, unfilled slots as -inf / id -1.

The numpy and numba paths use a caller-owned float64 accumulator ``acc`` [n_items] that is
all zeros on entry and is reset to zeros before returning.
"""
import numpy as np

try:  # optional: numba makes the batch-1 path meet the latency target (see benchmarks/)
    import numba
    from numba.extending import overload

    HAVE_NUMBA = True
    NUMBA_VERSION = numba.__version__
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
    HAVE_NUMBA = False
    NUMBA_VERSION = None

BACKENDS = ("auto", "numpy", "numba")

# Status codes returned by the numba kernels (the caller turns them into ValueErrors).
STATUS_OK = 0
STATUS_BAD_ROW = 1
STATUS_BAD_MASK_ITEM = 2


def resolve_backend(backend):
    """Map "auto" to "numba" when numba is importable, else "numpy"; validate the name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {list(BACKENDS)}")
    if backend == "auto":
        return "numba" if HAVE_NUMBA else "numpy"
    if backend == "numba" and not HAVE_NUMBA:
        raise ValueError("backend='numba' requested but numba is not installed "
                         "(pip install numba), use backend='numpy' or 'auto'")
    return backend


def kernel_scores_view(scores):
    """The array handed to the numba kernels: float32 as is, float16 as its uint16 bit pattern
    (numba has no float16 type; the kernel decodes the bits exactly)."""
    if scores.dtype == np.float16:
        return scores.view(np.uint16)
    return scores


# ----------------------------------------------------------------------------- numpy backend

def select_topk_numpy(cand_ids, cand_vals, k):
    """Top-k of (ids, float64 values) by value desc, id asc. Returns (float32 [k], int64 [k])."""
    out_scores = np.full(k, -np.inf, dtype=np.float32)
    out_ids = np.full(k, -1, dtype=np.int64)
    n_cand = cand_vals.shape[0]
    if n_cand > k:
        part = np.argpartition(cand_vals, n_cand - k)  # the k largest sit at [n_cand - k:]
        threshold = cand_vals[part[n_cand - k]]  # the k-th largest value
        above = np.flatnonzero(cand_vals > threshold)
        tied = np.flatnonzero(cand_vals == threshold)
        n_from_tied = k - above.shape[0]
        if tied.shape[0] > n_from_tied:  # keep the smallest ids among equal scores
            tied = tied[np.argsort(cand_ids[tied], kind="stable")[:n_from_tied]]
        chosen = np.concatenate([above, tied])
        cand_ids, cand_vals = cand_ids[chosen], cand_vals[chosen]
    order = np.lexsort((cand_ids, -cand_vals))  # score desc, then id asc
    n_out = order.shape[0]
    out_scores[:n_out] = cand_vals[order]
    out_ids[:n_out] = cand_ids[order]
    return out_scores, out_ids


def query_numpy(rows, indptr, items, scores, mask, k, acc):
    """One query with numpy. rows: iterable of ints (-1 skipped); mask: int array or None."""
    touched = []
    for row in rows:
        if row < 0:
            continue
        start, stop = indptr[row], indptr[row + 1]
        if start == stop:
            continue
        ids = items[start:stop]  # [L_row], unique within one posting list
        acc[ids] += scores[start:stop]  # float16/32 -> float64, exact
        touched.append(ids)
    if mask is not None and mask.shape[0]:
        acc[mask] = 0.0  # masked items drop out of the candidates below
    cand_ids, cand_vals = [], []
    for ids in touched:
        vals = acc[ids]
        acc[ids] = 0.0  # later lists see 0 for items already collected -> no duplicates
        keep = vals > 0.0
        cand_ids.append(ids[keep])
        cand_vals.append(vals[keep])
    if not cand_ids:
        return select_topk_numpy(np.empty(0, np.int64), np.empty(0, np.float64), k)
    cand_ids = np.concatenate(cand_ids).astype(np.int64, copy=False)
    cand_vals = np.concatenate(cand_vals)
    return select_topk_numpy(cand_ids, cand_vals, k)


# ----------------------------------------------------------------------------- numba backend

def _posting_value(x):
    """float64 value of one stored score (float32, or float16 given as uint16 bits)."""
    raise NotImplementedError("only callable from numba-compiled code")


if HAVE_NUMBA:
    from numba import types

    # 2**(e - 25) for the 5-bit half-precision exponent e (e = 0 uses the subnormal scale 2**-24).
    _HALF_SCALE = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], dtype=np.float64)

    @overload(_posting_value)
    def _posting_value_impl(x):
        if isinstance(x, types.Integer) and x.bitwidth == 16:
            def decode_half(x):
                bits = np.int64(x)
                exponent = (bits >> 10) & 0x1F
                mantissa = bits & 0x3FF
                if exponent != 0:
                    mantissa += 1024
                value = mantissa * _HALF_SCALE[exponent]  # exact in float64
                if bits >> 15:
                    value = -value
                return value  # exponent 31 (inf/nan) is never stored: the index rejects it
            return decode_half
        if isinstance(x, types.Float):
            return lambda x: np.float64(x)
        return None

    _SORT_RUN = 16  # insertion-sorted run length of the merge sort below

    @numba.njit(cache=True, nogil=True)
    def _sort_best_first(vals, ids, size):
        """Sort buf[:size] in place by value desc, then id asc (ids are unique).

        Insertion sort of runs of _SORT_RUN entries, then bottom-up merges through a scratch copy:
        O(size log size), no recursion, and cheap to compile (numba's np.argsort adds several
        seconds to the first, uncached compilation).
        """
        for lo in range(0, size, _SORT_RUN):
            for j in range(lo + 1, min(lo + _SORT_RUN, size)):
                value, item = vals[j], ids[j]
                i = j - 1
                while i >= lo and (vals[i] < value or (vals[i] == value and ids[i] > item)):
                    vals[i + 1] = vals[i]
                    ids[i + 1] = ids[i]
                    i -= 1
                vals[i + 1] = value
                ids[i + 1] = item
        if size <= _SORT_RUN:
            return
        src_vals, src_ids = vals[:size], ids[:size]
        dst_vals, dst_ids = np.empty(size, dtype=vals.dtype), np.empty(size, dtype=ids.dtype)
        width = _SORT_RUN
        while width < size:
            for lo in range(0, size, 2 * width):
                mid = min(lo + width, size)
                hi = min(lo + 2 * width, size)
                left, right = lo, mid
                for out in range(lo, hi):
                    take_left = left < mid and (right >= hi or not (
                        src_vals[left] < src_vals[right]
                        or (src_vals[left] == src_vals[right] and src_ids[left] > src_ids[right])))
                    if take_left:
                        dst_vals[out] = src_vals[left]
                        dst_ids[out] = src_ids[left]
                        left += 1
                    else:
                        dst_vals[out] = src_vals[right]
                        dst_ids[out] = src_ids[right]
                        right += 1
            src_vals, dst_vals = dst_vals, src_vals
            src_ids, dst_ids = dst_ids, src_ids
            width *= 2
        if src_vals.ctypes.data != vals.ctypes.data:  # the result is in the scratch copy
            vals[:size] = src_vals
            ids[:size] = src_ids

    @numba.njit(cache=True, nogil=True)
    def _kth_largest(vals, size, k, scratch):
        """k-th largest of vals[:size] (1 <= k <= size) by quickselect on a scratch copy."""
        for j in range(size):
            scratch[j] = vals[j]
        lo, hi, target = 0, size - 1, size - k  # target: ascending rank
        while lo < hi:
            first, middle, last = scratch[lo], scratch[(lo + hi) >> 1], scratch[hi]
            if first > middle:
                first, middle = middle, first
            if middle > last:
                middle = last
            if first > middle:
                middle = first
            pivot = middle  # median of three
            i, j = lo, hi
            while i <= j:
                while scratch[i] < pivot:
                    i += 1
                while scratch[j] > pivot:
                    j -= 1
                if i <= j:
                    scratch[i], scratch[j] = scratch[j], scratch[i]
                    i += 1
                    j -= 1
            if target <= j:
                hi = j
            elif target >= i:
                lo = i
            else:
                break
        return scratch[target]

    @numba.njit(cache=True, nogil=True)
    def _compact(vals, ids, size, k, scratch):
        """Shrink buf[:size] (size > k) towards the k best. Returns (new size, threshold): every
        entry kept is >= threshold and every entry dropped ranks below the k best kept."""
        threshold = _kth_largest(vals, size, k, scratch)
        kept = 0
        for j in range(size):
            if vals[j] >= threshold:
                vals[kept] = vals[j]
                ids[kept] = ids[j]
                kept += 1
        if kept >= vals.shape[0]:  # so many ties at the threshold that the buffer stays full
            _sort_best_first(vals, ids, kept)
            kept = k
        return kept, threshold

    @numba.njit(cache=True, nogil=True)
    def _query_into(rows, min_row, indptr, items, scores, mask, k, acc, cand, buf_vals, buf_ids,
                    out_scores, out_ids):
        """One query; writes out_scores [k] / out_ids [k]. Returns a STATUS_* code.

        Rows must be in [min_row, n_rows); min_row = -1 allows the skip marker -1. Top-k selection:
        candidates at or above a running threshold go to a buffer of capacity buf_vals.shape[0]
        (> k); a full buffer is compacted with a quickselect that raises the threshold: expected
        O(n_candidates) work with few unpredictable branches.
        """
        n_rows = indptr.shape[0] - 1
        n_items = acc.shape[0]
        for t in range(rows.shape[0]):
            if rows[t] < min_row or rows[t] >= n_rows:
                return STATUS_BAD_ROW
        for j in range(mask.shape[0]):
            if mask[j] < 0 or mask[j] >= n_items:
                return STATUS_BAD_MASK_ITEM
        n_cand = 0
        for t in range(rows.shape[0]):
            row = rows[t]
            if row < 0:
                continue
            for p in range(indptr[row], indptr[row + 1]):
                item = items[p]
                if acc[item] == 0.0:  # first time this item is touched (postings are > 0)
                    cand[n_cand] = item
                    n_cand += 1
                acc[item] += _posting_value(scores[p])
        for j in range(mask.shape[0]):
            acc[mask[j]] = -1.0  # marks masked items; reset below
        capacity = buf_vals.shape[0]
        scratch = np.empty(capacity, dtype=np.float64)
        size = 0
        threshold = -np.inf
        for c in range(n_cand):
            item = cand[c]
            value = acc[item]
            acc[item] = 0.0
            if value >= threshold and value > 0.0:  # value <= 0: masked
                buf_vals[size] = value
                buf_ids[size] = item
                size += 1
                if size == capacity:
                    size, threshold = _compact(buf_vals, buf_ids, size, k, scratch)
        for j in range(mask.shape[0]):
            acc[mask[j]] = 0.0
        if size > k:
            size, threshold = _compact(buf_vals, buf_ids, size, k, scratch)
        _sort_best_first(buf_vals, buf_ids, size)
        n_out = min(k, size)
        for slot in range(n_out):
            out_scores[slot] = np.float32(buf_vals[slot])
            out_ids[slot] = buf_ids[slot]
        for slot in range(n_out, k):
            out_scores[slot] = -np.inf
            out_ids[slot] = -1
        return STATUS_OK

    @numba.njit(cache=True, nogil=True)
    def _buffer_capacity(k):
        return max(4 * k, 256)

    @numba.njit(cache=True, nogil=True)
    def query_one_numba(rows, min_row, indptr, items, scores, mask, k, acc, cand, out_scores, out_ids):
        """One query (see module docstring); returns a STATUS_* code."""
        capacity = _buffer_capacity(k)
        buf_vals = np.empty(capacity, dtype=np.float64)
        buf_ids = np.empty(capacity, dtype=np.int64)
        return _query_into(rows, min_row, indptr, items, scores, mask, k, acc, cand, buf_vals, buf_ids,
                           out_scores, out_ids)

    @numba.njit(cache=True, nogil=True)
    def query_batch_numba(rows, min_row, indptr, items, scores, mask_indptr, mask_items, mask_row_offset, k,
                          acc, cand, out_scores, out_ids):
        """rows [B, K_u]; mask row of query b is mask_row_offset + b (mask_indptr empty = no mask).
        Returns (STATUS_* code, index of the failing query or -1)."""
        capacity = _buffer_capacity(k)
        buf_vals = np.empty(capacity, dtype=np.float64)
        buf_ids = np.empty(capacity, dtype=np.int64)
        no_mask = mask_items[:0]
        for b in range(rows.shape[0]):
            if mask_indptr.shape[0] > 0:
                row = mask_row_offset + b
                mask = mask_items[mask_indptr[row]:mask_indptr[row + 1]]
            else:
                mask = no_mask
            status = _query_into(rows[b], min_row, indptr, items, scores, mask, k, acc, cand, buf_vals,
                                 buf_ids, out_scores[b], out_ids[b])
            if status != STATUS_OK:
                return status, b
        return STATUS_OK, -1

    @numba.njit(cache=True, nogil=True)
    def lookup_rows_numba(sorted_keys, query_keys, out_rows):
        """Binary search of each query key; out_rows = row or -2 when absent. Returns #absent."""
        n = sorted_keys.shape[0]
        n_absent = 0
        for t in range(query_keys.shape[0]):
            key = query_keys[t]
            lo, hi = 0, n
            while lo < hi:
                mid = (lo + hi) >> 1
                if sorted_keys[mid] < key:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < n and sorted_keys[lo] == key:
                out_rows[t] = lo
            else:
                out_rows[t] = -2
                n_absent += 1
        return n_absent
