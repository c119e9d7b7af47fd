"""Retrieval: metrics, exact scoring, faiss and sparse indexes."""
from .exact import csr_rows, exact_search, masked_topk
from .faiss_index import FaissRetriever
from .metrics import KNOWN_METRICS, format_metrics, parse_metric_name, topk_metrics
from .sparse_index import (SparseCodeIndex, choose_bias_for_sparsity, choose_key_set, pack_codes,
                           unpack_keys)
