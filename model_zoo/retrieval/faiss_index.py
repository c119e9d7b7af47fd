"""Faiss maximum-inner-product retrieval for two-tower models, with per-user masks.

Item ids are faiss' sequential ids, i.e. the order in which vectors were added: add the item
matrix in item_index order (row i = item_index i) to get ids in item_index space.
"""
import json
import logging
import os
import struct
import zlib

import faiss
import numpy as np

from ..errors import DataError
from .exact import csr_rows

INDEX_TYPES = ("flat_ip", "ivfpq", "hnsw")
_MAGIC = b"FXRETR01"  # file layout: magic | uint64 header length | JSON header | faiss index bytes
_MIN_POINTS_PER_CENTROID = 39  # faiss' own k-means guideline


def _as_matrix(vectors, what, dim=None):
    """Return a C-contiguous float32 [n, d] copy/view of a numpy array or torch tensor."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().numpy()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n, dim], got shape {list(vectors.shape)}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{what} have dim {vectors.shape[1]}, expected dim={dim}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{what} contain NaN or inf")
    return vectors


class FaissThreads:
    """Context manager: faiss OpenMP threads set to num_threads inside (None: unchanged), restored after."""

    def __init__(self, num_threads=None):
        self.num_threads, self.previous = num_threads, None

    def __enter__(self):
        if self.num_threads is not None:
            self.previous = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(int(self.num_threads))
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            faiss.omp_set_num_threads(self.previous)
        return False


class FaissRetriever:
    """Top-k inner-product search over item vectors with faiss.

    Args:
        index_type: "flat_ip" (exact IndexFlatIP), "ivfpq" (IndexIVFPQ, inner product) or
            "hnsw" (IndexHNSWFlat with METRIC_INNER_PRODUCT).
        dim: vector dimension; None infers it from the first train()/add() call.
        nlist: ivfpq coarse cells; clamped to max(1, n_train // 39) for small corpora.
        m: ivfpq sub-quantizers (dim must be divisible by m).
        nbits: ivfpq bits per sub-quantizer code (needs >= 2**nbits training vectors).
        nprobe: ivfpq cells visited per query (clamped to the effective nlist).
        hnsw_m: hnsw graph degree M.
        ef_search: hnsw search beam width.
        num_threads: if set, calls faiss.omp_set_num_threads (process-wide) before heavy calls.
    """

    def __init__(self, index_type="flat_ip", dim=None, nlist=100, m=8, nbits=8, nprobe=10,
                 hnsw_m=32, ef_search=128, num_threads=None):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index_type {index_type!r}: expected one of {list(INDEX_TYPES)}")
        for name, value in dict(nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, hnsw_m=hnsw_m,
                                ef_search=ef_search).items():
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim is not None and (not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {dim!r}")
        if num_threads is not None and (not isinstance(num_threads, (int, np.integer)) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        if index_type == "ivfpq" and dim is not None and dim % m != 0:
            raise ValueError(f"ivfpq needs dim % m == 0, got dim={dim}, m={m}")
        self.params = dict(index_type=index_type, dim=dim, nlist=int(nlist), m=int(m), nbits=int(nbits),
                           nprobe=int(nprobe), hnsw_m=int(hnsw_m), ef_search=int(ef_search),
                           num_threads=num_threads)
        self.index_type, self.dim = index_type, dim
        self.nlist_effective = None  # set when an ivfpq index is built
        self.index = None

    @property
    def ntotal(self):
        return 0 if self.index is None else int(self.index.ntotal)

    def _set_threads(self):
        if self.params["num_threads"] is not None:
            faiss.omp_set_num_threads(int(self.params["num_threads"]))

    def _build(self, n_train):
        p, dim = self.params, self.dim
        if self.index_type == "flat_ip":
            self.index = faiss.IndexFlatIP(dim)
        elif self.index_type == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = p["ef_search"]
        else:
            if dim % p["m"] != 0:
                raise ValueError(f"ivfpq needs dim % m == 0, got dim={dim}, m={p['m']}")
            if n_train < 2 ** p["nbits"]:
                raise ValueError(f"ivfpq with nbits={p['nbits']} needs at least {2 ** p['nbits']} training "
                                 f"vectors, got {n_train}; use fewer nbits or index_type='flat_ip'")
            self.nlist_effective = max(1, min(p["nlist"], n_train // _MIN_POINTS_PER_CENTROID))
            if self.nlist_effective < p["nlist"]:
                logging.info("FaissRetriever: nlist clamped from %d to %d for %d training vectors",
                             p["nlist"], self.nlist_effective, n_train)
            quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFPQ(quantizer, dim, self.nlist_effective, p["m"], p["nbits"],
                                          faiss.METRIC_INNER_PRODUCT)
            self.index.nprobe = min(p["nprobe"], self.nlist_effective)

    def train(self, item_vectors):
        """Build the index and train it (k-means + PQ for ivfpq; a no-op for flat_ip / hnsw).

        Args:
            item_vectors: float array [n_items, dim] (a training sample is fine for ivfpq).
        """
        item_vectors = _as_matrix(item_vectors, "item vectors", self.dim)  # [n, d]
        if self.index is not None and self.ntotal > 0:
            raise ValueError("train() called on an index that already holds vectors")
        self.dim = self.params["dim"] = item_vectors.shape[1]
        self._build(item_vectors.shape[0])
        if not self.index.is_trained:
            self._set_threads()
            self.index.train(item_vectors)
        return self

    def add(self, item_vectors):
        """Append item vectors; ids continue from ntotal (first call: 0..n_items-1).

        Args:
            item_vectors: float array [n_items, dim].
        """
        item_vectors = _as_matrix(item_vectors, "item vectors", self.dim)  # [n, d]
        if self.index is None:
            if self.index_type == "ivfpq":
                raise ValueError("ivfpq index is not trained: call train(item_vectors) before add()")
            self.dim = self.params["dim"] = item_vectors.shape[1]
            self._build(item_vectors.shape[0])
        self._set_threads()
        self.index.add(item_vectors)
        return self

    def search(self, user_vectors, k, mask_indptr=None, mask_items=None, row_offset=0):
        """Top-k items per user, excluding each user's masked items.

        Over-fetches k + (longest mask row among these users) results, drops masked ids, and
        keeps the first k survivors per row.

        Args:
            user_vectors: float array [b, dim] for users row_offset .. row_offset + b - 1.
            k: results per user.
            mask_indptr, mask_items: CSR mask over users (item_index space), or None.
            row_offset: user index of the first query row in the mask.

        Returns:
            (scores np.float32 [b, k], ids np.int64 [b, k]); unfilled slots are -inf / -1.
        """
        if self.index is None or self.ntotal == 0:
            raise ValueError("the index is empty: call add(item_vectors) before search()")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        user_vectors = _as_matrix(user_vectors, "user vectors", self.dim)  # [b, d]
        n_queries = user_vectors.shape[0]
        if (mask_indptr is None) != (mask_items is None):
            raise ValueError("mask_indptr and mask_items must be given together (or both None)")
        max_masked, mask_keys = 0, None
        if mask_indptr is not None:
            if row_offset < 0 or row_offset + n_queries > len(mask_indptr) - 1:
                raise ValueError(f"rows [{row_offset}, {row_offset + n_queries}) are outside the mask's "
                                 f"{len(mask_indptr) - 1} users")
            row_ids, col_ids = csr_rows(mask_indptr, mask_items, row_offset, row_offset + n_queries)
            if col_ids.size and (col_ids.min() < 0 or col_ids.max() >= self.ntotal):
                raise ValueError(f"mask items must be in [0, {self.ntotal}) (the indexed items), found "
                                 f"range [{col_ids.min()}, {col_ids.max()}]")
            max_masked = int(np.bincount(row_ids, minlength=1).max()) if row_ids.size else 0
            mask_keys = np.unique(row_ids * (self.ntotal + 1) + col_ids)  # sorted (row, item) keys
        k_fetch = min(int(k) + max_masked, self.ntotal)
        self._set_threads()
        raw_scores, raw_ids = self.index.search(user_vectors, k_fetch)  # [b, k_fetch] each
        keep = raw_ids >= 0  # [b, k_fetch]
        if mask_keys is not None and mask_keys.size:
            query_keys = np.arange(n_queries, dtype=np.int64)[:, None] * (self.ntotal + 1) + raw_ids
            pos = np.minimum(np.searchsorted(mask_keys, query_keys), mask_keys.size - 1)
            keep &= mask_keys[pos] != query_keys
        slot = np.cumsum(keep, axis=1) - 1  # [b, k_fetch] output column of each kept result
        keep &= slot < k
        rows, cols = np.nonzero(keep)
        scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        ids = np.full((n_queries, k), -1, dtype=np.int64)
        scores[rows, slot[rows, cols]] = raw_scores[rows, cols]
        ids[rows, slot[rows, cols]] = raw_ids[rows, cols]
        return scores, ids

    def serialized_bytes(self):
        """Size in bytes of the serialized faiss index (what ``write`` stores, without the header)."""
        if self.index is None:
            raise ValueError("the index has not been built (call train/add first)")
        return int(faiss.serialize_index(self.index).nbytes)

    def write(self, path):
        """Write params + the faiss index to ``path`` atomically (temp file, then os.replace)."""
        if self.index is None:
            raise ValueError("nothing to write: the index has not been built (call train/add first)")
        payload = faiss.serialize_index(self.index).tobytes()
        header = dict(params=self.params, nlist_effective=self.nlist_effective,
                      payload_bytes=len(payload), payload_crc32=zlib.crc32(payload))
        header_bytes = json.dumps(header).encode("utf-8")
        tmp_path = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp_path, "wb") as f:
                f.write(_MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + payload)
            os.replace(tmp_path, path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise

    @classmethod
    def read(cls, path):
        """Load a retriever written by ``write``.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            DataError (a ValueError): if the file is truncated, corrupt or not such a file.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"faiss retriever file not found: {path}")
        with open(path, "rb") as f:
            blob = f.read()
        try:
            if blob[:len(_MAGIC)] != _MAGIC:
                raise ValueError("bad magic bytes (not a FaissRetriever file)")
            (header_len,) = struct.unpack("<Q", blob[len(_MAGIC):len(_MAGIC) + 8])
            header_end = len(_MAGIC) + 8 + header_len
            header = json.loads(blob[len(_MAGIC) + 8:header_end].decode("utf-8"))
            payload = blob[header_end:]
            if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["payload_crc32"]:
                raise ValueError(f"index payload has {len(payload)} bytes / bad checksum, expected "
                                 f"{header['payload_bytes']} bytes")
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8).copy())
            retriever = cls(**header["params"])
            retriever.nlist_effective = header["nlist_effective"]
            if index.d != retriever.dim:
                raise ValueError(f"index dim {index.d} != header dim {retriever.dim}")
        except (ValueError, KeyError, TypeError, struct.error, RuntimeError) as exc:
            raise DataError(f"corrupt or truncated faiss retriever file {path}: {exc}") from exc
        retriever.index = index  # deserialize_index already returns the concrete class (owning it)
        return retriever
