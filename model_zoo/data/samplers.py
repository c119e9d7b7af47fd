"""Negative samplers for the sampled softmax of Eq. 12."""
import numpy as np
import torch

from ..config import NEGATIVE_SAMPLERS as SAMPLERS


class NegativeSampler:
    """Draws negatives shared by a mini-batch, with their log sampling probability.

    Args:
        kind: `uniform` (every item equally likely), `popularity` (proportional to
            training count ** alpha) or `in_batch` (the other positives of the batch are the
            negatives; no extra draw).
        num_items: size of the item corpus.
        num_negatives: negatives drawn per batch (ignored by `in_batch`).
        item_counts: training frequency per item (needed by `popularity` and by the logQ
            correction of `in_batch`).
        alpha: popularity exponent.
        seed: random seed.
    """

    def __init__(self, kind="uniform", num_items=0, num_negatives=100, item_counts=None, alpha=0.75, seed=2023):
        if kind not in SAMPLERS:
            raise ValueError(f"negative_sampler={kind!r}; expected one of {SAMPLERS}")
        if num_items <= 1:
            raise ValueError(f"num_items={num_items}; expected at least 2 items")
        if kind != "in_batch" and not 0 < num_negatives:
            raise ValueError(f"num_negatives={num_negatives}; expected a positive count")
        self.kind, self.num_items, self.num_negatives = kind, num_items, num_negatives
        self.generator = torch.Generator().manual_seed(seed)
        if kind == "uniform":
            probs = np.full(num_items, 1.0 / num_items)
        else:
            if item_counts is None or len(item_counts) != num_items:
                raise ValueError(f"negative_sampler={kind} needs item_counts of length {num_items}")
            weights = np.power(np.asarray(item_counts, dtype=np.float64) + (1.0 if kind == "popularity" else 0.0),
                               alpha if kind == "popularity" else 1.0)
            if weights.sum() <= 0:
                raise ValueError("item_counts are all zero")
            probs = weights / weights.sum()
        self.probs = torch.as_tensor(probs, dtype=torch.float32)
        self.log_probs = torch.log(self.probs.clamp_min(1e-12))       # [num_items]

    def sample(self):
        """Shared negatives `[num_negatives]` (long), or None for `in_batch`."""
        if self.kind == "in_batch":
            return None
        if self.kind == "uniform":
            return torch.randint(0, self.num_items, (self.num_negatives,), generator=self.generator)
        return torch.multinomial(self.probs, self.num_negatives, replacement=True, generator=self.generator)
