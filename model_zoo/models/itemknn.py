"""ItemKNN: item-item cosine similarity of training co-occurrence, the neighbourhood anchor.

S_ij = c_ij / (sqrt(c_ii) sqrt(c_jj) + shrink), c_ij = number of training users with both items; the
diagonal is zero, and with `num_neighbors` each item j keeps only its k most similar items (the top k of
column j). A user is scored by x_u S: the similarity of each item to the user's known items, summed.
"""
import numpy as np
import torch

from ._closed_form import ItemItemModel, cooccurrence_counts

# Rows of S normalised, then columns of S pruned, at a time.
BLOCK_ITEMS = 1024


def cosine_weights(matrix, shrink, num_neighbors, out):
    """S of ItemKNN for the binary training matrix `matrix` (csr [U, I]), written into `out` ([I, I] float32)."""
    cooccurrence_counts(matrix, out)
    norms = np.sqrt(out.diagonal()).astype(np.float32)                                 # [I]
    for start in range(0, len(norms), BLOCK_ITEMS):
        stop = min(start + BLOCK_ITEMS, len(norms))
        denominator = norms[start:stop, None] * norms[None, :] + np.float32(shrink)      # [b, I]
        out[start:stop] /= np.where(denominator > 0, denominator, np.float32(1.0))     # unseen items: 0 / 1
    np.fill_diagonal(out, 0.0)
    if num_neighbors is None or num_neighbors >= len(norms) - 1:
        return
    weights = torch.from_numpy(out)                                                    # shares out's memory
    for start in range(0, len(norms), BLOCK_ITEMS):
        columns = weights[:, start:start + BLOCK_ITEMS]                          # [I, b] view
        values, rows = torch.topk(columns, num_neighbors, dim=0)                       # [k, b]
        columns.zero_()
        columns.scatter_(0, rows, values)


class ItemKNN(ItemItemModel):
    """ItemKNN: score = x_u S with S the item-item cosine similarity of training co-occurrence.

    X is the binary user x item training matrix; x_u a user's known items (see ItemItemModel for which).
    S is kept dense (float32); with the reload of a checkpoint into it, 8 bytes per item pair, checked
    against the free memory before anything is allocated.

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        num_neighbors: each item keeps its k most similar items (the other entries of its column are 0);
            null keeps every item.
        shrink: added to the cosine's denominator (>= 0), which lowers the similarity of items seen by
            few users.
        **kwargs: MatchModel arguments (training keys are accepted and unused).
    """
    bytes_per_entry = 8

    def __init__(self, feature_map, model_id="ItemKNN", num_neighbors=100, shrink=0.0, **kwargs):
        if num_neighbors is not None and (not isinstance(num_neighbors, int) or isinstance(num_neighbors, bool)
                                          or num_neighbors < 1):
            raise ValueError(f"ItemKNN: num_neighbors={num_neighbors!r}; expected an integer >= 1 or null")
        if not isinstance(shrink, (int, float)) or isinstance(shrink, bool) or shrink < 0:
            raise ValueError(f"ItemKNN: shrink={shrink!r}; expected a number >= 0")
        super().__init__(feature_map, model_id=model_id, **kwargs)
        self.num_neighbors, self.shrink = num_neighbors, float(shrink)

    def fit_item_item(self, matrix, out):
        cosine_weights(matrix, self.shrink, self.num_neighbors, out)
