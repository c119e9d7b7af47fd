"""Retrieval libraries (no model or engine import): code keys, metrics, exact top-k, faiss, sparse code index.

- code_keys.py      code tuples <-> int64 keys, key sets
- metrics.py        Recall/NDCG/HitRate/Precision@k, recall against exact search
- exact.py          masked exact top-k
- faiss_index.py    faiss inner-product retrievers for two-tower models
- sparse_index.py   the sparse code index: structure, build from a score function, query
- index_io.py       its file format
- sparsity.py       b~ for a target sparsity, index size estimate, memory check
- score_blocks.py   block-wise calls of a score function
- _merge.py         query kernels (numpy / numba)
"""
from .code_keys import choose_key_set, key_space, pack_codes, unpack_keys
from .exact import csr_rows, exact_search, masked_topk
from .faiss_index import FaissRetriever
from .index_io import SparseIndexFileError, SparseIndexMismatchError
from .metrics import KNOWN_METRICS, format_metrics, parse_metric_name, topk_metrics
from .sparse_index import SCORE_DTYPES, UNSEEN_KEY_POLICIES, SparseCodeIndex
from .sparsity import choose_bias_for_sparsity, estimate_index_size
