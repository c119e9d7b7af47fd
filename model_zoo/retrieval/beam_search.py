"""Layer-wise beam search over a tree whose leaves are the items (TDM, Zhu et al. KDD 2018, Sec. 3.2).

Starting from the root, every query scores the children of the nodes in its beam, keeps the `beam_size`
best of them as the next beam, and at the leaf level returns the k best unmasked leaves. A batch of
queries is searched together: candidates are [B, beam * b] (children of each beam node, -1 where a node
has fewer than b children or the beam is not full) and the score function sees only valid ids.

With a beam at least as wide as every level (e.g. >= the number of leaves) every leaf is scored and the
result is the exhaustive masked top-k. When a node's score is the maximum of its leaves' (the max-heap
tree of the paper), a beam of k already returns the exhaustive top-k of an unmasked search.
"""
import numpy as np
import torch


def beam_search(score_fn, children, num_queries, k, beam_size, leaf_mask=None, stats=None):
    """Top-k leaves of each query by layer-wise beam search.

    Args:
        score_fn: callable (level, nodes LongTensor [B, C]) -> float tensor [B, C], the scores of level-`level`
            nodes (ids within the level; 1 = the root's children, len(children) = the leaves) for each query.
        children: list of D int arrays; children[l] [n_l, b] are the level-(l + 1) ids of the children of each
            level-l node (level 0: the root, one row), -1 padding.
        num_queries: B.
        k: leaves returned per query (>= 1).
        beam_size: nodes kept per level (>= 1).
        leaf_mask: None, or CSR (indptr int [B + 1], leaves int [nnz]) of leaves each query must not return.
        stats: optional dict; "nodes_scored" gets int64 [B], the valid nodes scored per query.

    Returns:
        (scores float [B, k], leaf ids int64 [B, k]), best first; slots that cannot be filled hold -inf / -1.
    """
    for name, value in (("k", k), ("beam_size", beam_size), ("num_queries", num_queries)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"beam_search: {name}={value!r}; expected an int >= 1")
    tables = [torch.as_tensor(np.asarray(table), dtype=torch.long) for table in children]
    if not tables or tables[0].shape[0] != 1:
        raise ValueError("beam_search: children[0] must be the root's row [1, b]")
    beam = torch.zeros(num_queries, 1, dtype=torch.long)                                 # [B, 1] the root
    scored = torch.zeros(num_queries, dtype=torch.long)
    for level, table in enumerate(tables, start=1):
        candidates = table[beam.clamp_min(0)]                                            # [B, W, b]
        candidates = candidates.masked_fill((beam < 0).unsqueeze(-1), -1).flatten(1)    # [B, W * b]
        valid = candidates >= 0
        scores = score_fn(level, candidates.clamp_min(0)).float()                        # [B, W * b]
        if tuple(scores.shape) != tuple(candidates.shape):
            raise ValueError(f"beam_search: score_fn({level}, nodes {tuple(candidates.shape)}) returned shape "
                             f"{tuple(scores.shape)}")
        scored += valid.sum(1).cpu()
        scores = scores.cpu().masked_fill(~valid, float("-inf"))
        if level == len(tables):
            if leaf_mask is not None:
                scores = scores.masked_fill(_masked(candidates, leaf_mask), float("-inf"))
            return _top(scores, candidates, k, stats, scored)
        width = min(beam_size, candidates.shape[1])
        top_scores, top_at = torch.topk(scores, width, dim=1)                           # [B, width]
        beam = torch.gather(candidates, 1, top_at).masked_fill(torch.isneginf(top_scores), -1)
    raise AssertionError("unreachable")


def _masked(candidates, leaf_mask):
    """bool [B, C]: the candidate leaf of row r is listed in row r of the CSR mask."""
    indptr, leaves = (np.asarray(part, dtype=np.int64) for part in leaf_mask)
    if indptr.shape[0] != candidates.shape[0] + 1:
        raise ValueError(f"beam_search: leaf_mask indptr has {indptr.shape[0]} entries, expected "
                         f"{candidates.shape[0] + 1}")
    key_base = max(int(leaves.max()) + 1 if leaves.size else 0, int(candidates.max()) + 1)    # > every leaf id
    rows = np.repeat(np.arange(candidates.shape[0], dtype=np.int64), np.diff(indptr))
    mask_keys = torch.from_numpy(rows * key_base + leaves)
    keys = torch.arange(candidates.shape[0]).unsqueeze(1) * key_base + candidates       # [B, C]
    return torch.isin(keys, mask_keys) & (candidates >= 0)


def _top(scores, candidates, k, stats, scored):
    width = min(k, candidates.shape[1])
    top_scores, top_at = torch.topk(scores, width, dim=1)                               # [B, width]
    ids = torch.gather(candidates, 1, top_at).masked_fill(torch.isneginf(top_scores), -1)
    if width < k:
        pad = k - width
        top_scores = torch.cat([top_scores, top_scores.new_full((len(ids), pad), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((len(ids), pad), -1)], dim=1)
    if stats is not None:
        stats["nodes_scored"] = scored.numpy()
    return top_scores, ids
