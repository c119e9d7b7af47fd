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

Import the modules themselves (`from model_zoo.retrieval.sparse_index import SparseCodeIndex`): this
package imports nothing, so the layers that use code_keys do not load faiss or numba.
"""
