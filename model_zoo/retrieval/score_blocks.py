"""Block-wise calls of a code score function, shared by the index build and the sparsity selection.

A *score function* stands for the model: ``score_fn(keys int64 [kb], item_start, item_stop)`` returns
the raw code-item scores S (before the ReLU of Eq. 15) of a block of keys against the items
item_start..item_stop-1, as a torch tensor or a numpy array [kb, item_stop - item_start].
"""
import numpy as np
import torch


def check_keys(keys):
    """keys as a 1-D int64 array; ValueError for any other shape or dtype."""
    keys = np.asarray(keys)
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"keys must be a 1-D integer array, got dtype {keys.dtype} shape {keys.shape}")
    return keys.astype(np.int64, copy=False)


def score_block(score_fn, keys_block, item_start, item_stop, key_start=0):
    """score_fn on one block, as float32 numpy [kb, item_stop - item_start]; ValueError on a wrong shape,
    a non-float dtype or NaN / inf (``key_start`` only names the block in the message)."""
    block = score_fn(keys_block, item_start, item_stop)
    if torch.is_tensor(block):
        block = block.detach().float().cpu().numpy()
    block = np.asarray(block)
    where = f"score_fn(keys[{key_start}:{key_start + keys_block.shape[0]}], {item_start}, {item_stop})"
    if block.shape != (keys_block.shape[0], item_stop - item_start):
        raise ValueError(f"{where} returned shape {tuple(block.shape)}, expected "
                         f"({keys_block.shape[0]}, {item_stop - item_start})")
    if not np.issubdtype(block.dtype, np.floating):
        raise ValueError(f"{where} returned dtype {block.dtype}; expected float scores")
    block = block.astype(np.float32, copy=False)
    if not np.isfinite(block).all():
        raise ValueError(f"{where} returned NaN or inf scores")
    return block


def iter_score_blocks(score_fn, keys, n_items, key_block=256, item_block=16384, bar=None):
    """Yield (key_start, item_start, S float32 [kb, ib]) over every block, keys outer, under torch.no_grad().

    Args:
        score_fn: see the module docstring.
        keys: int64 [n_keys].
        n_items: items 0..n_items-1 are scored.
        key_block, item_block: block shape; memory ~ 4 bytes x key_block x item_block.
        bar: optional tqdm bar advanced by one per block.
    """
    with torch.no_grad():
        for key_start in range(0, keys.shape[0], key_block):
            keys_block = keys[key_start:key_start + key_block]                          # [kb]
            for item_start in range(0, n_items, item_block):
                item_stop = min(item_start + item_block, n_items)
                yield key_start, item_start, score_block(score_fn, keys_block, item_start, item_stop, key_start)
                if bar is not None:
                    bar.update(1)


class TorchThreads:
    """Context manager: torch.set_num_threads(num_threads) inside (None: unchanged), previous value after."""

    def __init__(self, num_threads=None):
        self.num_threads = num_threads
        self.previous = None

    def __enter__(self):
        if self.num_threads is not None:
            self.previous = torch.get_num_threads()
            torch.set_num_threads(int(self.num_threads))
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            torch.set_num_threads(self.previous)
        return False
