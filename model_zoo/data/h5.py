"""H5 files, FuxiCTR 2.1 style: one HDF5 dataset per column, written once and atomically."""
import os

import h5py
import numpy as np

from ..errors import DataError


def write_h5(path, columns):
    """Write `columns` (name -> array) to `path` via a temp file renamed into place.

    Args:
        path: destination file.
        columns: mapping of column name to a numpy array (any shape, first axis = rows).
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as fd:
            for name, array in columns.items():
                array = np.asarray(array)
                if array.dtype.kind in "UO":
                    fd.create_dataset(name, data=array.astype(object), dtype=h5py.string_dtype())
                else:
                    fd.create_dataset(name, data=array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_h5(path, required=(), rows=None):
    """Read all columns of an H5 file into memory.

    Args:
        path: the file.
        required: column names that must be present.
        rows: optional `slice` of rows to read from row-aligned columns.

    Raises:
        DataError naming the file when it is missing, corrupt, lacks a column, or holds NaN.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (run_expid builds it from the raw data)")
    try:
        with h5py.File(path, "r") as fd:
            missing = [name for name in required if name not in fd]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; found {sorted(fd.keys())}")
            data = {}
            for name in fd.keys():
                dataset = fd[name]
                array = dataset[rows] if rows is not None else dataset[()]
                if dataset.dtype.kind == "O":
                    array = np.asarray([x.decode() if isinstance(x, bytes) else x for x in array])
                data[name] = array
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a readable H5 file ({exc})") from None
    for name, array in data.items():
        if array.dtype.kind == "f" and np.isnan(array).any():
            raise DataError(f"{path}: column {name} contains NaN")
    return data


def h5_num_rows(path, column):
    """Number of rows of one column without loading it."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as fd:
            if column not in fd:
                raise DataError(f"{path}: missing column {column}; found {sorted(fd.keys())}")
            return fd[column].shape[0]
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a readable H5 file ({exc})") from None
