"""Full-ranking evaluation: every evaluation user against every item of the corpus, history masked.

The exact path scores with the model's own `full_scores`; the serving path (through an index) lives in
engine/serving.py and reports the same metrics through `Evaluator.metrics`.
"""
import logging
import time

import numpy as np
import torch

from ..retrieval.exact import masked_topk
from ..retrieval.metrics import parse_metric_name, topk_metrics
from .progress import progress_bar


class Evaluator:
    """Ranks every item for each user of an EvalUsers split and computes top-k metrics.

    Args:
        metrics: metric names such as `Recall(k=20)`, `NDCG(k=50)`.
        precision_denominator: `k` (standard) or `min_gt_k` (the Deezer protocol).
        eval_batch_size: users scored at once (a model may lower it: `eval_pairs_per_block`).
        verbose: show a progress bar (on a terminal only).
    """

    def __init__(self, metrics=("Recall(k=20)", "Recall(k=50)"), precision_denominator="k", eval_batch_size=512,
                 verbose=True):
        self.metric_names = list(metrics)
        parsed = [parse_metric_name(name) for name in self.metric_names]
        self.metric_kinds = sorted({name for name, _ in parsed})
        self.metric_ks = sorted({k for _, k in parsed})
        self.precision_denominator = precision_denominator
        self.eval_batch_size, self.verbose = eval_batch_size, verbose

    @classmethod
    def from_params(cls, params):
        """The Evaluator of an expid's merged parameters (metrics, precision_denominator, eval_batch_size, verbose)."""
        return cls(params["metrics"], params.get("precision_denominator", "k"), params["eval_batch_size"],
                   verbose=bool(params.get("verbose", 1)))

    @property
    def max_k(self):
        return max(self.metric_ks)

    def _block_users(self, model):
        """Users per block: eval_batch_size, capped by the model's (user, item) pair budget if it has one."""
        pairs = model.eval_pairs_per_block
        if not pairs:
            return self.eval_batch_size
        return max(1, min(self.eval_batch_size, pairs // max(model.item_corpus.num_items, 1)))

    @torch.no_grad()
    def rank(self, model, eval_users, k):
        """Exact top-k item indices [n_users, k] of every evaluation user (masked items excluded, -1 pads)."""
        was_training = model.training
        model.eval()
        try:
            return self._rank(model, eval_users, k)
        finally:
            model.train(was_training)

    def _rank(self, model, eval_users, k):
        item_repr = model.all_item_repr()
        block, num_users = self._block_users(model), len(eval_users)
        log_seconds = model.ranking_log_seconds
        results, started = [], time.time()
        last_log = started
        with progress_bar(total=num_users, unit="user", desc="rank", verbose=self.verbose) as bar:
            for start in range(0, num_users, block):
                stop = min(start + block, num_users)
                inputs = {name: value.to(model.device) for name, value in eval_users.batch(start, stop).items()}
                scores = model.full_scores(inputs, item_repr)                                # [b, n_items]
                _, ids = masked_topk(scores, k, eval_users.mask_indptr, eval_users.mask_items, row_offset=start)
                results.append(ids.cpu().numpy() if torch.is_tensor(ids) else ids)
                bar.update(stop - start)
                if log_seconds is not None and time.time() - last_log >= log_seconds:
                    last_log = time.time()
                    elapsed = last_log - started
                    logging.info(f"rank: {stop}/{num_users} users x {model.item_corpus.num_items} items, "
                                 f"{elapsed:.0f} s elapsed, about {elapsed * (num_users - stop) / stop:.0f} s left")
        return np.concatenate(results) if results else np.zeros((0, k), dtype=np.int64)

    def metrics(self, topk, eval_users, names=None):
        """Metrics of top-k ids [n_users, >= max k] against the users' ground truth."""
        scores = topk_metrics(topk, eval_users.gt_indptr, eval_users.gt_items, ks=self.metric_ks,
                              metrics=self.metric_kinds, precision_denominator=self.precision_denominator)
        return {name: scores[name] for name in (names or self.metric_names)}

    def evaluate(self, model, eval_users):
        """Exact full-ranking metrics of `model` on `eval_users`."""
        return self.metrics(self.rank(model, eval_users, self.max_k), eval_users)
