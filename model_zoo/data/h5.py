"""H5 files, FuxiCTR 2.1 style: one HDF5 dataset per column, written once and atomically."""
import contextlib
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


# What h5py raises on a truncated, overwritten or otherwise corrupt file, when opening or reading it
# (a corrupt shape can also ask for an impossible allocation: MemoryError; a corrupt name or type: TypeError).
H5_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, MemoryError)


def _unreadable(path, exc):
    return DataError(f"{path}: not a readable H5 file ({type(exc).__name__}: {exc}); it is damaged or not an "
                     "H5 file (build_dataset rebuilds a damaged built file when its raw files are available)")


@contextlib.contextmanager
def open_h5(path):
    """Open an H5 file for reading; h5py errors while opening or reading it become DataError.

    Args:
        path: the file.
    Yields:
        the open `h5py.File`; it is closed on leaving the block.
    Raises:
        DataError naming the file when it is missing, or when h5py cannot open or read it.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (run_expid builds it from the raw data)")
    try:
        fd = h5py.File(path, "r")
    except H5_READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    try:
        yield fd
    except DataError:
        raise
    except H5_READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    finally:
        fd.close()


def read_h5(path, required=(), rows=None):
    """Read all columns of an H5 file into memory.

    Args:
        path: the file.
        required: column names that must be present.
        rows: optional `slice` of rows to read from row-aligned columns.

    Raises:
        DataError naming the file when it is missing, corrupt, lacks a column, or holds NaN.
    """
    with open_h5(path) as fd:
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
    for name, array in data.items():
        if array.dtype.kind == "f" and np.isnan(array).any():
            raise DataError(f"{path}: column {name} contains NaN")
    return data


def h5_columns(path):
    """Names of the columns (datasets) of an H5 file."""
    with open_h5(path) as fd:
        return set(fd.keys())


def h5_num_rows(path, column):
    """Number of rows of one column without loading it."""
    with open_h5(path) as fd:
        if column not in fd:
            raise DataError(f"{path}: missing column {column}; found {sorted(fd.keys())}")
        return fd[column].shape[0]
