"""Code keys: a user's full code tuple (k_1, ..., k_M) of the product quantizer as one int64.

key = sum_m k_m * N ** (M - 1 - m) (big-endian digits in base N). The quantizer packs the codes of
a batch with it, the sparse index stores its posting lists under it, and the index's key set is
chosen here. Every function takes numpy arrays or torch tensors and returns the same kind.
"""
import warnings

import numpy as np
import torch

KEY_SET_KINDS = ("all", "observed")
INT64_MAX = np.iinfo(np.int64).max


def key_space(num_codebooks, codebook_size):
    """N ** M, the number of possible keys; ValueError if M or N is not a positive int or N^M overflows int64."""
    for name, value in (("num_codebooks", num_codebooks), ("codebook_size", codebook_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive int")
    n_keys = int(codebook_size) ** int(num_codebooks)
    if n_keys > INT64_MAX:
        raise ValueError(f"codebook_size ** num_codebooks = {codebook_size}^{num_codebooks} does not fit an "
                         f"int64 key; expected at most 2^63 - 1")
    return n_keys


def _place_values(num_codebooks, codebook_size, like):
    values = [int(codebook_size) ** (num_codebooks - 1 - m) for m in range(num_codebooks)]
    if torch.is_tensor(like):
        return torch.tensor(values, dtype=torch.long, device=like.device)                # [M]
    return np.asarray(values, dtype=np.int64)                                             # [M]


def _as_int64(values, what, min_ndim=0):
    """`values` (numpy array or torch tensor) as int64 of the same kind; ValueError unless they are integers."""
    if torch.is_tensor(values):
        if values.ndim < min_ndim or values.is_floating_point():
            raise ValueError(f"{what} must be an integer tensor, got dtype {values.dtype} shape {tuple(values.shape)}")
        return values.long()
    values = np.asarray(values)
    if values.ndim < min_ndim or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array, got dtype {values.dtype} shape {values.shape}")
    return values.astype(np.int64, copy=False)


def _check_range(values, what, bound, described):
    """ValueError unless every value is in [0, bound) (`described` is how the bound reads in the message)."""
    if (values.numel() if torch.is_tensor(values) else values.size):
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= bound:
            raise ValueError(f"{what} must be in [0, {described}), found range [{low}, {high}]")


def pack_codes(codes, codebook_size):
    """Codes [..., M] with entries in [0, N) -> int64 keys [...]."""
    codes = _as_int64(codes, "codes [..., M]", min_ndim=1)
    num_codebooks = codes.shape[-1]
    key_space(num_codebooks, codebook_size)
    _check_range(codes, "codes", codebook_size, codebook_size)
    place = _place_values(num_codebooks, codebook_size, codes)                          # [M]
    if torch.is_tensor(codes):
        return (codes * place).sum(dim=-1)                                               # [...]
    return (codes * place).sum(axis=-1, dtype=np.int64)                                 # [...]


def unpack_keys(keys, codebook_size, num_codebooks):
    """Inverse of pack_codes: int64 keys [...] in [0, N^M) -> codes int64 [..., M]."""
    n_keys = key_space(num_codebooks, codebook_size)
    keys = _as_int64(keys, "keys")
    _check_range(keys, "keys", n_keys, f"N^M = {n_keys}")
    place = _place_values(num_codebooks, codebook_size, keys)                           # [M]
    if torch.is_tensor(keys):
        return torch.div(keys.unsqueeze(-1), place, rounding_mode="floor") % codebook_size   # [..., M]
    return (keys[..., None] // place) % codebook_size                                    # [..., M]


def choose_key_set(num_codebooks, codebook_size, observed_keys=None, index_max_keys=1_000_000, counts=None):
    """The keys to index: all N^M keys if N^M <= index_max_keys, else the keys observed on training users.

    When more distinct keys were observed than ``index_max_keys``, the most frequent ones are kept
    (ties: smaller key first) and a warning is issued; the others go through the index's unseen-key policy.

    Args:
        num_codebooks: M.
        codebook_size: N.
        observed_keys: int64 keys [...] seen on training users, with repetitions (the frequency cap
            counts them), or distinct keys with their ``counts``; required when N^M > index_max_keys.
        index_max_keys: largest key set built.
        counts: optional int [...] occurrences of each entry of observed_keys (same shape).

    Returns:
        (keys int64 [n_keys] sorted unique, kind "all" | "observed").
    """
    n_all = key_space(num_codebooks, codebook_size)
    if n_all <= index_max_keys:
        return np.arange(n_all, dtype=np.int64), "all"
    if observed_keys is None:
        raise ValueError(f"N^M = {codebook_size}^{num_codebooks} = {n_all} keys exceed index_max_keys="
                         f"{index_max_keys}: pass the observed_keys of the training users")
    observed = observed_keys.cpu().numpy() if torch.is_tensor(observed_keys) else np.asarray(observed_keys)
    observed = observed.reshape(-1)
    unpack_keys(observed, codebook_size, num_codebooks)  # validates the range
    keys, inverse = np.unique(observed.astype(np.int64), return_inverse=True)
    if keys.size == 0:
        raise ValueError("observed_keys is empty; expected the keys of at least one training user")
    if counts is None:
        counts = np.bincount(inverse.reshape(-1), minlength=keys.size)
    else:
        counts = counts.cpu().numpy() if torch.is_tensor(counts) else np.asarray(counts)
        if counts.size != observed.size:
            raise ValueError(f"counts has {counts.size} entries; expected one per observed key ({observed.size})")
        counts = np.bincount(inverse.reshape(-1), weights=counts.reshape(-1), minlength=keys.size)
    if keys.size > index_max_keys:
        warnings.warn(f"{keys.size} distinct observed keys exceed index_max_keys={index_max_keys}: "
                      f"indexing the {index_max_keys} most frequent", stacklevel=2)
        order = np.lexsort((keys, -counts))[:index_max_keys]
        keys = np.sort(keys[order])
    return keys, "observed"
