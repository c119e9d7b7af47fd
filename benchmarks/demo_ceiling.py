"""How far the demo data lets a model go: Recall@k of reference scorers that need no training by gradient.

The demo generator (model_zoo/data/demo.py) is deterministic, so its latent structure (each user's 2-4
interest themes, the items matching each theme) can be regenerated and used to rank the held-out users'
items under the exact evaluation protocol of the models (history masked, full ranking over the corpus,
`masked_topk` and `topk_metrics`). Scorers:

- Popularity: training counts, the same ranking as Popularity_demo_001 (a check of the protocol);
- themes x popularity: items matching one of the user's themes first, by popularity (the R4 rule alone);
- themes + cross x popularity: the same with the user's region x age_band categories (R5) added;
- ItemKNN: no latent knowledge, only the data a model sees. Item-item cosine similarity of training
  co-occurrence (two items co-occur when one training user has both as targets), a user scored by the
  sum of the similarity rows of the history items the models get (`hist_item_id`, the last 20), ties
  broken by popularity. A full-rank item-item table: what a low-rank dot product of towers approximates.

Writes benchmarks/results/demo_ceiling.md (or --out).

    python benchmarks/demo_ceiling.py
"""
import argparse
import os
import sys

import h5py
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_zoo.config import load_config  # noqa: E402
from model_zoo.data.demo import simulate_demo  # noqa: E402
from model_zoo.engine.experiment import open_data  # noqa: E402
from model_zoo.retrieval.exact import masked_topk  # noqa: E402
from model_zoo.retrieval.metrics import topk_metrics  # noqa: E402

KS = (20, 50)
OUTPUT = os.path.join(ROOT, "benchmarks", "results", "demo_ceiling.md")


def liked_items(latent, user, with_cross):
    """[I] bool: items of the user's themes (R4), plus its cross categories (R5) if asked."""
    liked = np.zeros(len(latent.item_category), dtype=bool)
    for theme in latent.user_themes[user]:
        liked[latent.theme_items[theme]] = True
    if with_cross:
        liked |= latent.cross_table[latent.user_region[user], latent.user_age_band[user]][latent.item_category]
    return liked


def item_cosine(train_path, num_items):
    """[I, I] cosine similarity of the items' training-user incidence vectors, zero diagonal."""
    with h5py.File(train_path, "r") as fd:
        rows, items = fd["user_row"][()], fd["item_index"][()]
    _, users = np.unique(rows, return_inverse=True)
    incidence = np.zeros((users.max() + 1, num_items), dtype=np.float32)            # [U_train, I]
    incidence[users, items] = 1.0
    co_counts = incidence.T @ incidence                                               # [I, I]
    norms = np.sqrt(np.diag(co_counts)) + 1e-9
    np.fill_diagonal(co_counts, 0.0)
    return co_counts / norms[:, None] / norms[None, :]


def split_scores(path, latent, counts, similarity):
    """{scorer: [U, I] scores} and the ground truth / mask arrays of one held-out split."""
    with h5py.File(path, "r") as fd:
        users = [int(raw.decode()[1:]) - 1 for raw in fd["raw_user_id"][()]]      # "u0001" -> user 0
        arrays = {k: fd[k][()] for k in ("gt_indptr", "gt_items", "mask_indptr", "mask_items")}
        history = fd["hist_item_id"][()]                                            # [U, L], item id + 1, 0 = pad
    pop = latent.item_popularity
    knn = np.stack([similarity[row[row > 0] - 1].sum(0) for row in history])        # [U, I]
    scores = {"Popularity (training counts)": np.tile(counts, (len(users), 1)),
              "themes x popularity": np.stack([liked_items(latent, u, False) * pop + 1e-6 * pop for u in users]),
              "themes + cross x popularity": np.stack([liked_items(latent, u, True) * pop + 1e-6 * pop
                                                       for u in users]),
              "ItemKNN (last 20 history items, no latent knowledge)": knn + 1e-6 * counts / counts.max()}
    return scores, arrays


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "config"),
                        help="config folder; its Popularity_demo_001 expid names the demo dataset")
    parser.add_argument("--out", default=OUTPUT, help="markdown file written")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    params = load_config(args.config, "Popularity_demo_001")
    data_dir, _, corpus, train, _, _ = open_data(params)
    _, _, _, latent = simulate_demo()               # the pipeline generates the demo with the defaults
    if corpus.num_items != len(latent.item_category):
        raise ValueError(f"{data_dir}: {corpus.num_items} items, the generator made {len(latent.item_category)}")
    counts = train.item_counts(corpus.num_items).astype(np.float64)
    similarity = item_cosine(os.path.join(data_dir, "train.h5"), corpus.num_items)
    rows = {}
    for split in ("valid", "test"):
        scores, arrays = split_scores(os.path.join(data_dir, f"{split}.h5"), latent, counts, similarity)
        for name, matrix in scores.items():
            _, top = masked_topk(torch.tensor(matrix, dtype=torch.float32), max(KS),
                                 arrays["mask_indptr"], arrays["mask_items"])
            metrics = topk_metrics(top.numpy(), arrays["gt_indptr"], arrays["gt_items"], ks=KS, metrics=("Recall",))
            rows.setdefault(name, {}).update({f"{split} R@{k}": metrics[f"Recall(k={k})"] for k in KS})
    columns = [f"{s} R@{k}" for s in ("valid", "test") for k in KS]
    lines = ["# Demo data: Recall of reference scorers (latent-structure oracles and ItemKNN)", "",
             "From `python benchmarks/demo_ceiling.py` (module docstring: what each scorer knows). Models are "
             "compared in sparcode_vs_dssm.md and oracle_comparison.md.", "",
             "| scorer | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |" for name, row in rows.items()]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        fd.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
