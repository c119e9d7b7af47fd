"""EASE^R (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): the closed-form anchor.

B = argmin ||X - X B||^2 + lambda ||B||^2 subject to diag(B) = 0 has the closed form
P = (X^T X + lambda I)^-1, B = I - P / diag(P) (column j divided by P_jj), so B_ij = -P_ij / P_jj and
B_jj = 0. A user is scored by x_u B.
"""
import numpy as np
from scipy.linalg import lapack

from ..errors import DataError
from ._closed_form import ItemItemModel, cooccurrence_counts

# Bytes of the float64 rows of P gathered at a time while B is written.
ROW_BLOCK_BYTES = 2 ** 26


def ease_weights(matrix, regularization, out):
    """B of EASE^R for the binary training matrix `matrix` (csr [U, I]), written into `out` ([I, I] float32).

    The Gram matrix is built and inverted in place in float64 (Cholesky: LAPACK dpotrf + dpotri), so the
    fit needs one float64 [I, I] array besides `out`.
    """
    num_items = matrix.shape[1]
    gram = np.zeros((num_items, num_items), dtype=np.float64)                        # [I, I]
    cooccurrence_counts(matrix, gram)
    gram.flat[::num_items + 1] += regularization
    # gram is symmetric: its transpose is the same matrix in Fortran order, which LAPACK overwrites in place.
    factor, info = lapack.dpotrf(gram.T, lower=0, clean=0, overwrite_a=1)
    if info == 0:
        factor, info = lapack.dpotri(factor, lower=0, overwrite_c=1)
    if info != 0:
        raise DataError(f"EASE: X^T X + {regularization} I is not positive definite (LAPACK info {info}); "
                        f"expected a regularization > 0 and finite training data")
    if not np.shares_memory(factor, gram):      # LAPACK worked on a copy: take its result
        gram = factor.T
    # P is in the lower triangle of gram (row >= column); B_ij = -P_ij / P_jj, B_jj = 0.
    diagonal = gram.diagonal().copy()                                                   # [I] P_jj
    block = max(1, ROW_BLOCK_BYTES // (8 * max(num_items, 1)))
    for start in range(0, num_items, block):
        stop = min(start + block, num_items)
        rows = np.empty((stop - start, num_items))                                      # [b, I] rows of P
        rows[:, :start] = gram[start:stop, :start]
        rows[:, stop:] = gram[stop:, start:stop].T
        square = gram[start:stop, start:stop]
        rows[:, start:stop] = np.tril(square) + np.tril(square, -1).T
        out[start:stop] = -rows / diagonal
    np.fill_diagonal(out, 0.0)


class EASE(ItemItemModel):
    """EASE^R: score = x_u B, B = I - P / diag(P), P = (X^T X + lambda I)^-1, fitted in closed form.

    X is the binary user x item training matrix; x_u a user's known items (see ItemItemModel for which).
    The fit needs an item x item float64 work matrix and the float32 B: 12 bytes per item pair, checked
    against the free memory before anything is allocated.

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        regularization: lambda, the L2 weight on B (> 0); Steck uses 200 to 1000 on MovieLens-20M,
            Netflix and MSD.
        **kwargs: MatchModel arguments (training keys are accepted and unused).
    """
    bytes_per_entry = 12

    def __init__(self, feature_map, model_id="EASE", regularization=1000.0, **kwargs):
        if not isinstance(regularization, (int, float)) or isinstance(regularization, bool) or regularization <= 0:
            raise ValueError(f"EASE: regularization={regularization!r}; expected a number > 0")
        super().__init__(feature_map, model_id=model_id, **kwargs)
        self.regularization = float(regularization)

    def fit_item_item(self, matrix, out):
        ease_weights(matrix, self.regularization, out)
