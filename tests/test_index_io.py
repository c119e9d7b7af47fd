"""The sparse code index file format (model_zoo/retrieval/index_io.py): round trip, checksum, refusals."""
import json
import os

import numpy as np
import pytest

from model_zoo.retrieval.index_io import (FORMAT_NAME, FORMAT_VERSION, SparseIndexFileError,
                                          SparseIndexMismatchError, _checksum, file_sha256, read_index_file,
                                          write_index_file)
from model_zoo.retrieval.sparse_index import SparseCodeIndex

M, N, N_ITEMS, K_U = 2, 4, 300, 4


def build(seed=0, **kwargs):
    matrix = np.random.default_rng(seed).standard_normal((N ** M, N_ITEMS)).astype(np.float32)
    params = dict(num_codebooks=M, codebook_size=N, num_query_tokens=K_U, progress=False, checkpoint_hash="ckpt-a")
    params.update(kwargs)
    return SparseCodeIndex.build(lambda keys, a, b: matrix[keys, a:b], np.arange(N ** M), N_ITEMS, -1.0, **params)


@pytest.mark.parametrize("score_dtype", ["float32", "float16"])
def test_write_read_round_trip(tmp_path, score_dtype):
    codebooks = np.random.default_rng(0).standard_normal((M, N, 3)).astype(np.float32)
    index = build(9, score_dtype=score_dtype, top_l=20, codebooks=codebooks, unseen_key="score",
                  extra_metadata={"model": "SparCode"})
    path = index.write(tmp_path / "index.npz")
    assert os.listdir(tmp_path) == ["index.npz"]                                         # no temp file left behind
    loaded = SparseCodeIndex.read(path, expected_checkpoint_hash="ckpt-a")
    for name in ("keys", "indptr", "items", "scores", "codebooks"):
        original, restored = getattr(index, name), getattr(loaded, name)
        assert restored.dtype == original.dtype
        np.testing.assert_array_equal(restored, original)
    assert loaded.metadata() == index.metadata()
    assert loaded.unseen_key == "score" and loaded.scores.dtype == np.dtype(score_dtype)
    queries = np.random.default_rng(1).integers(0, N ** M, size=(10, K_U))
    for got, expected in zip(loaded.search(queries, 15), index.search(queries, 15)):
        np.testing.assert_array_equal(got, expected)


def test_checksum_of_the_stored_format_is_stable():
    """The digest is part of the on-disk format: files written before must keep verifying."""
    arrays = {"keys": np.arange(3, dtype=np.int64), "scores": np.array([0.5, 1.5], np.float32)}
    assert _checksum(arrays, b'{"a": 1}') == "3023aef52da50e1737f7a53c82a26b0d2a7b502d0284d9483069563d7f77ade4"
    assert _checksum(arrays, b'{"a": 2}') != _checksum(arrays, b'{"a": 1}')


def test_container_adds_format_and_version(tmp_path):
    path = write_index_file(tmp_path / "x.npz", {"keys": np.arange(2), "indptr": np.zeros(3, np.int64),
                                                 "items": np.zeros(0, np.int32), "scores": np.zeros(0, np.float32)},
                            {"checkpoint_hash": "h"})
    arrays, metadata = read_index_file(path, expected_checkpoint_hash="h")
    assert metadata == {"checkpoint_hash": "h", "format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    assert sorted(arrays) == ["indptr", "items", "keys", "scores"]


def _rewrite(path, out_path, change):
    """Copy an index file applying change(contents) to its arrays, with a valid checksum."""
    with np.load(path) as archive:
        contents = {name: archive[name] for name in archive.files}
    metadata = json.loads(contents.pop("metadata").tobytes())
    contents.pop("sha256")
    change(contents, metadata)
    metadata_bytes = json.dumps(metadata, sort_keys=True).encode()
    with open(out_path, "wb") as handle:
        np.savez(handle, metadata=np.frombuffer(metadata_bytes, np.uint8),
                 sha256=np.frombuffer(_checksum(contents, metadata_bytes).encode(), np.uint8), **contents)
    return out_path


def test_other_format_version_is_refused_with_a_rebuild_hint(tmp_path):
    path = build().write(tmp_path / "index.npz")
    old = _rewrite(path, tmp_path / "old.npz", lambda arrays, meta: meta.update(format_version=0))
    expected = rf"old\.npz.*v0, expected '{FORMAT_NAME}' v{FORMAT_VERSION}: rebuild"
    with pytest.raises(SparseIndexFileError, match=expected):
        SparseCodeIndex.read(old)


def test_inconsistent_arrays_are_a_file_error(tmp_path):
    path = build().write(tmp_path / "index.npz")
    bad = _rewrite(path, tmp_path / "bad.npz", lambda arrays, meta: arrays.update(items=arrays["items"][::-1].copy()))
    with pytest.raises(SparseIndexFileError, match=r"bad\.npz.*inconsistent.*ascending"):
        SparseCodeIndex.read(bad)


def test_corrupt_tampered_and_mismatched_files_are_refused(tmp_path):
    index = build(10)
    path = str(index.write(tmp_path / "index.npz"))

    with pytest.raises(FileNotFoundError, match="missing.npz"):
        SparseCodeIndex.read(tmp_path / "missing.npz")

    with pytest.raises(SparseIndexMismatchError, match=r"index\.npz.*'ckpt-a'.*'ckpt-b'"):
        SparseCodeIndex.read(path, expected_checkpoint_hash="ckpt-b")

    # flipped bytes inside the stored scores
    raw = bytearray(open(path, "rb").read())
    offset = raw.find(index.scores.tobytes()[:32])
    assert offset > 0
    flipped = bytearray(raw)
    flipped[offset + 5] ^= 0xFF
    flipped_path = tmp_path / "flipped.npz"
    flipped_path.write_bytes(bytes(flipped))
    with pytest.raises(SparseIndexFileError, match="flipped.npz"):
        SparseCodeIndex.read(flipped_path)

    # a well-formed archive whose scores were changed (checksum kept): caught by the sha256
    with np.load(path) as archive:
        contents = {name: archive[name] for name in archive.files}
    contents["scores"] = contents["scores"] * 2
    tampered_path = tmp_path / "tampered.npz"
    with open(tampered_path, "wb") as handle:
        np.savez(handle, **contents)
    with pytest.raises(SparseIndexFileError, match=r"tampered\.npz.*sha256"):
        SparseCodeIndex.read(tampered_path)

    # the metadata rewritten to claim another checkpoint: also a checksum failure
    contents["scores"] = contents["scores"] / 2
    contents["metadata"] = np.frombuffer(contents["metadata"].tobytes().replace(b"ckpt-a", b"ckpt-b"), np.uint8)
    relabelled_path = tmp_path / "relabelled.npz"
    with open(relabelled_path, "wb") as handle:
        np.savez(handle, **contents)
    with pytest.raises(SparseIndexFileError, match=r"relabelled\.npz.*sha256"):
        SparseCodeIndex.read(relabelled_path, expected_checkpoint_hash="ckpt-b")

    truncated_path = tmp_path / "truncated.npz"
    truncated_path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(SparseIndexFileError, match="truncated.npz"):
        SparseCodeIndex.read(truncated_path)

    other_path = tmp_path / "other.npz"
    np.savez(other_path, weights=np.zeros(3))
    with pytest.raises(SparseIndexFileError, match=r"other\.npz.*lacks the array 'metadata'"):
        SparseCodeIndex.read(other_path)


def test_file_sha256(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        file_sha256(tmp_path / "nothing.bin")
