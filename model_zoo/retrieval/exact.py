"""Exact (brute-force) retrieval: score every item per user block, mask, top-k.

Masks are CSR matrices over users (indptr int64 [n_users + 1], items [nnz]) in item_index space;
row u lists the items that must never be returned for user u (e.g. the training history).
Result slots that cannot be filled (fewer than k retrievable items) hold id -1 and score -inf.
"""
import numpy as np
import torch
from tqdm import tqdm


def csr_rows(indptr, items, start, stop):
    """Expand CSR rows start..stop-1 into coordinate form.

    Args:
        indptr: int array [n_rows + 1], CSR row pointer.
        items: int array [nnz], column (item) indices.
        start, stop: row range, 0 <= start <= stop <= n_rows.

    Returns:
        (row_ids, col_ids): int64 arrays [nnz_block]; row_ids are local to the block
        (0 .. stop-start-1), col_ids are the item indices.
    """
    indptr = np.asarray(indptr)
    n_rows = indptr.shape[0] - 1
    if not 0 <= start <= stop <= n_rows:
        raise ValueError(f"row range [{start}, {stop}) is outside the CSR's rows [0, {n_rows}]")
    row_lengths = np.diff(indptr[start:stop + 1]).astype(np.int64)  # [stop - start]
    row_ids = np.repeat(np.arange(stop - start, dtype=np.int64), row_lengths)
    col_ids = np.asarray(items[int(indptr[start]):int(indptr[stop])], dtype=np.int64)
    return row_ids, col_ids


def masked_topk(scores, k, mask_indptr=None, mask_items=None, row_offset=0, inplace=False):
    """Top-k items per row after excluding masked items.

    Masked entries are set to -inf before ``torch.topk``; any returned entry whose score is -inf
    (a masked item, or a row with fewer than k retrievable items) gets id -1. Consequently an
    unmasked item the model itself scored -inf is treated as not retrievable.

    Args:
        scores: float tensor [b, n_items] for users row_offset .. row_offset + b - 1.
        k: number of items to return per row (k > n_items is allowed; the tail is -1).
        mask_indptr, mask_items: CSR mask over users (both None for no mask).
        row_offset: user index of the first row of ``scores`` in the mask.
        inplace: if False (default) the caller's tensor is left untouched (a copy is masked);
            if True masked entries of ``scores`` are overwritten with -inf (saves one copy of
            [b, n_items]; only use it when the tensor is not needed afterwards).

    Returns:
        (top_scores float [b, k] same dtype/device as scores, top_ids int64 [b, k]).
    """
    if not torch.is_tensor(scores) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float torch tensor [b, n_items], got "
                         f"{type(scores).__name__} {getattr(scores, 'shape', None)}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; cannot rank items")
    n_rows, n_items = scores.shape
    if (mask_indptr is None) != (mask_items is None):
        raise ValueError("mask_indptr and mask_items must be given together (or both None)")
    if mask_indptr is not None:
        if row_offset < 0 or row_offset + n_rows > len(mask_indptr) - 1:
            raise ValueError(f"rows [{row_offset}, {row_offset + n_rows}) are outside the mask's "
                             f"{len(mask_indptr) - 1} users")
        row_ids, col_ids = csr_rows(mask_indptr, mask_items, row_offset, row_offset + n_rows)
        if col_ids.size:
            if col_ids.min() < 0 or col_ids.max() >= n_items:
                raise ValueError(f"mask items must be in [0, {n_items}), found range "
                                 f"[{col_ids.min()}, {col_ids.max()}]")
            if not inplace:
                scores = scores.clone()
            rows_t = torch.from_numpy(row_ids).to(scores.device)
            cols_t = torch.from_numpy(col_ids).to(scores.device)
            scores[rows_t, cols_t] = float("-inf")
    k_fetch = min(int(k), n_items)
    top_scores, top_ids = torch.topk(scores, k_fetch, dim=1)  # [b, k_fetch]
    top_ids = top_ids.masked_fill(torch.isneginf(top_scores), -1)
    if k_fetch < k:
        pad = k - k_fetch
        top_scores = torch.cat([top_scores, top_scores.new_full((n_rows, pad), float("-inf"))], dim=1)
        top_ids = torch.cat([top_ids, top_ids.new_full((n_rows, pad), -1)], dim=1)
    return top_scores, top_ids


def exact_search(score_fn, n_users, k, batch_size, mask_indptr=None, mask_items=None, progress=False):
    """Brute-force top-k for all users, block by block.

    Args:
        score_fn: callable (start, stop) -> float tensor [stop - start, n_items] of scores for
            users start..stop-1 (any device). The returned tensor is not modified.
        n_users: number of users (rows of the mask, if any).
        k: number of items per user.
        batch_size: users per block.
        mask_indptr, mask_items: CSR mask [n_users + 1] / [nnz] of items to exclude, or None.
        progress: show a tqdm progress bar.

    Returns:
        (scores np.float32 [n_users, k], ids np.int64 [n_users, k]); unfilled slots are -inf / -1.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(n_users, (int, np.integer)) or n_users < 0:
        raise ValueError(f"n_users must be a non-negative int, got {n_users!r}")
    if mask_indptr is not None and len(mask_indptr) != n_users + 1:
        raise ValueError(f"mask_indptr has length {len(mask_indptr)}, expected n_users + 1 = {n_users + 1}")
    all_scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    all_ids = np.full((n_users, k), -1, dtype=np.int64)
    n_items = None
    with torch.no_grad(), tqdm(total=n_users, desc="exact search", unit="user",
                               disable=not progress) as bar:
        for start in range(0, n_users, batch_size):
            stop = min(start + batch_size, n_users)
            block = score_fn(start, stop)  # [stop - start, n_items]
            if not torch.is_tensor(block) or block.dim() != 2 or block.shape[0] != stop - start:
                raise ValueError(f"score_fn({start}, {stop}) must return a tensor [{stop - start}, n_items], "
                                 f"got {type(block).__name__} {getattr(block, 'shape', None)}")
            if n_items is None:
                n_items = block.shape[1]
            elif block.shape[1] != n_items:
                raise ValueError(f"score_fn({start}, {stop}) returned {block.shape[1]} items, "
                                 f"previous blocks had {n_items}")
            top_scores, top_ids = masked_topk(block, k, mask_indptr, mask_items, row_offset=start)
            all_scores[start:stop] = top_scores.float().cpu().numpy()
            all_ids[start:stop] = top_ids.cpu().numpy()
            bar.update(stop - start)
    return all_scores, all_ids
