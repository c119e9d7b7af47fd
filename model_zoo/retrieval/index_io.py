"""File format of the sparse code index: one .npz holding the arrays, JSON metadata and a sha256.

Layout (format "sparcode-sparse-index", version 1): numpy arrays ``keys`` int64 [n_keys], ``indptr``
int64 [n_keys + 1], ``items`` int32 [nnz], ``scores`` float16|float32 [nnz], optionally ``codebooks``
float32 [M, N, D/M]; ``metadata`` (uint8 bytes of a JSON object with "format" and "format_version")
and ``sha256`` (uint8 bytes of the hex digest over the metadata and every array's name, dtype, shape
and bytes, see ``_checksum``). Files are written atomically (temporary file in the same folder,
fsync, rename). Reading refuses a missing, corrupt, tampered, foreign or other-version file, and a
file built for another checkpoint than expected, with an error naming the file.

This module knows the container, not the index: SparseCodeIndex.write / .read turn an index into
arrays + metadata and back.
"""
import hashlib
import json
import os
import threading
import zipfile

import numpy as np

FORMAT_NAME = "sparcode-sparse-index"
FORMAT_VERSION = 1
REQUIRED_ARRAYS = ("keys", "indptr", "items", "scores")
OPTIONAL_ARRAYS = ("codebooks",)


class SparseIndexFileError(ValueError):
    """An index file is missing its parts, corrupt, tampered with, of another format version, or not an index."""


class SparseIndexMismatchError(ValueError):
    """An index file was built for another model checkpoint (or model shape) than the one expected."""


def file_sha256(path):
    """Hex sha256 of a file, streamed; FileNotFoundError naming the file if it is absent."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum(arrays, metadata_bytes):
    """sha256 over the metadata and every array's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256()
    digest.update(len(metadata_bytes).to_bytes(8, "little"))
    digest.update(metadata_bytes)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        header = json.dumps([name, array.dtype.str, list(array.shape)]).encode("utf-8")
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def write_index_file(path, arrays, metadata):
    """Write ``arrays`` (name -> ndarray) and ``metadata`` (JSON-ready dict) to ``path`` atomically.

    "format" and "format_version" are added to the metadata. Returns the path (str).
    """
    path = os.fspath(path)
    metadata = {**metadata, "format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    metadata_bytes = json.dumps(metadata, sort_keys=True).encode("utf-8")
    checksum = _checksum(arrays, metadata_bytes)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp_path, "wb") as handle:
            np.savez(handle, metadata=np.frombuffer(metadata_bytes, dtype=np.uint8),
                     sha256=np.frombuffer(checksum.encode("ascii"), dtype=np.uint8), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


def read_index_file(path, expected_checkpoint_hash=None):
    """Read a file written by ``write_index_file`` and check it.

    Args:
        path: the .npz file.
        expected_checkpoint_hash: if given, metadata["checkpoint_hash"] must equal it.

    Returns:
        (arrays: dict name -> ndarray, metadata: dict).

    Raises:
        FileNotFoundError: no file at path.
        SparseIndexFileError: not an index file, unreadable, checksum mismatch, other format version.
        SparseIndexMismatchError: built for another checkpoint than expected_checkpoint_hash.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sparse index file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise SparseIndexFileError(f"sparse index file {path!r} is corrupt or not an index file: "
                                   f"{type(err).__name__}: {err}") from err
    for required in ("metadata", "sha256") + REQUIRED_ARRAYS:
        if required not in contents:
            raise SparseIndexFileError(f"sparse index file {path!r} lacks the array {required!r}; "
                                       f"expected a file written by SparseCodeIndex.write")
    metadata_bytes = contents.pop("metadata").tobytes()
    stored_checksum = contents.pop("sha256").tobytes().decode("ascii", errors="replace")
    unexpected = sorted(set(contents) - set(REQUIRED_ARRAYS) - set(OPTIONAL_ARRAYS))
    if unexpected:
        raise SparseIndexFileError(f"sparse index file {path!r} holds unexpected arrays {unexpected}")
    actual_checksum = _checksum(contents, metadata_bytes)
    if actual_checksum != stored_checksum:
        raise SparseIndexFileError(f"sparse index file {path!r} failed its sha256 check (stored "
                                   f"{stored_checksum[:16]}..., computed {actual_checksum[:16]}...): "
                                   f"the file is corrupt or was modified")
    try:
        metadata = json.loads(metadata_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SparseIndexFileError(f"sparse index file {path!r} has unreadable metadata: {err}") from err
    if metadata.get("format") != FORMAT_NAME or metadata.get("format_version") != FORMAT_VERSION:
        raise SparseIndexFileError(f"sparse index file {path!r} has format {metadata.get('format')!r} "
                                   f"v{metadata.get('format_version')}, expected {FORMAT_NAME!r} "
                                   f"v{FORMAT_VERSION}: rebuild the index with this version")
    if expected_checkpoint_hash is not None and metadata.get("checkpoint_hash") != expected_checkpoint_hash:
        raise SparseIndexMismatchError(
            f"sparse index file {path!r} was built for checkpoint {metadata.get('checkpoint_hash')!r}, "
            f"expected {expected_checkpoint_hash!r}: rebuild the index for this checkpoint")
    return contents, metadata
