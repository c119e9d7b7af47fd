"""The training split of a built dataset as a sparse user x item matrix (input of closed-form models).

A training user's items are the targets (`item_index`) of its rows in train.h5 plus the items of those
rows' histories (`hist_item_id`, codes item_index + 1, 0 = padding). On given splits (pairs, BARS) a
history holds only the user's other training items, so the union is its training pairs; on the
sequential protocol it adds the first items of a timeline, which are never a target (`min_history`).
"""
import os
from typing import NamedTuple, Optional

import numpy as np
import scipy.sparse as sp

from ..errors import DataError
from .feature_processor import HISTORY_FEATURE
from .h5 import open_h5, read_h5


class TrainingInteractions(NamedTuple):
    """The binary training matrix and who its rows are.

    matrix: csr [n_users, n_items] float32, 1 where the user has the item; row r = the r-th training user
        in `user_row` order.
    user_rows: [n_users] int64, the `user_row` of each matrix row.
    keys: [n_users] int64, the value of the requested key column (e.g. the `user_id` code) of each
        matrix row; None when no key column was asked for.
    """
    matrix: sp.csr_matrix
    user_rows: np.ndarray
    keys: Optional[np.ndarray]


def training_interactions(path, num_items, key_column=None, block_rows=1_000_000):
    """Read train.h5 block by block into a `TrainingInteractions`.

    Args:
        path: the built train.h5.
        num_items: size of the item corpus (columns of the matrix).
        key_column: a user-side column with one value per user (e.g. the `user_id` feature code) to
            return per matrix row; read from train.h5, or from users.h5 by `user_row` when the dataset
            stores user features once per user (`train_user_table`).
        block_rows: train.h5 rows read at a time.
    Raises:
        DataError naming the file when a column is missing, an item id is outside [0, num_items), or the
        key column has several values for one user.
    """
    blocks, row_keys = [], []                   # csr per block [users, I]; (user_row, key) per block
    with open_h5(path) as fd:
        for name in ("user_row", "item_index"):
            if name not in fd:
                raise DataError(f"{path}: missing column {name}; found {sorted(fd.keys())}")
        key_in_rows = key_column is not None and key_column in fd
        num_rows = fd["item_index"].shape[0]
        for start in range(0, num_rows, block_rows):
            stop = min(start + block_rows, num_rows)
            users = fd["user_row"][start:stop].astype(np.int64)                        # [R]
            items = [fd["item_index"][start:stop].astype(np.int64)]                   # [R]
            owners = [users]
            if HISTORY_FEATURE in fd:
                history = fd[HISTORY_FEATURE][start:stop].astype(np.int64)             # [R, L] codes, 0 = pad
                rows, positions = np.nonzero(history)
                items.append(history[rows, positions] - 1)
                owners.append(users[rows])
            items, owners = np.concatenate(items), np.concatenate(owners)
            if items.size and (items.min() < 0 or items.max() >= num_items):
                raise DataError(f"{path}: item ids in [{items.min()}, {items.max()}], outside the corpus "
                                f"[0, {num_items - 1}]")
            if users.size and users.min() < 0:
                raise DataError(f"{path}: column user_row has negative values")
            blocks.append(sp.csr_matrix((np.ones(len(items), dtype=np.float32), (owners, items)),
                                        shape=(int(users.max(initial=-1)) + 1, num_items)))
            if key_in_rows:
                keys = fd[key_column][start:stop].reshape(stop - start, -1)[:, 0].astype(np.int64)   # [R]
                row_keys.append(_one_key_per_user(path, key_column, users, keys))
    num_users = max((block.shape[0] for block in blocks), default=0)
    matrix = sp.csr_matrix((num_users, num_items), dtype=np.float32)
    for block in blocks:
        block.resize((num_users, num_items))
        matrix = matrix + block
    matrix.sum_duplicates()
    matrix.data[:] = 1.0                       # repeated (user, item) rows count once
    user_rows = np.flatnonzero(np.diff(matrix.indptr))                                 # users with items
    matrix = matrix[user_rows]
    keys = None
    if key_column is not None:
        if key_in_rows:
            pairs = np.concatenate(row_keys)
            users, keys = _one_key_per_user(path, key_column, pairs[:, 0], pairs[:, 1]).T
            keys = keys[np.searchsorted(users, user_rows)]
        else:
            keys = _keys_from_users_table(path, key_column, user_rows)
    return TrainingInteractions(matrix, user_rows, keys)


def _one_key_per_user(path, key_column, users, keys):
    """[n_users, 2] (user_row, key) sorted by user_row; DataError when a user has several keys."""
    unique, first, inverse = np.unique(users, return_index=True, return_inverse=True)
    if not np.array_equal(keys, keys[first][inverse]):
        bad = np.unique(users[keys != keys[first][inverse]])[:5].tolist()
        raise DataError(f"{path}: column {key_column} has several values for user_row {bad}; "
                        f"expected one value per user")
    return np.stack([unique, keys[first]], 1)


def _keys_from_users_table(path, key_column, user_rows):
    """[n_users] key of each user of `user_rows`, read from the users.h5 beside train.h5."""
    users_path = os.path.join(os.path.dirname(path), "users.h5")
    if not os.path.exists(users_path):
        raise DataError(f"{path}: no column {key_column} and no users.h5 beside it")
    column = read_h5(users_path, required=(key_column,))[key_column]
    if len(column) <= user_rows.max(initial=-1):
        raise DataError(f"{users_path}: {len(column)} users, train.h5 names user_row {user_rows.max()}")
    return column.reshape(len(column), -1)[user_rows, 0].astype(np.int64)
