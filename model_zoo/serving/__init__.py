"""Serving a trained model outside this project: export of the SparCode index to existing sparse engines.

- export.py  `python -m model_zoo.serving.export --expid X --engine opensearch|qdrant`: items as documents
             with sparse vectors {code key: score}, users as queries {key: count}; OpenSearch / Elasticsearch
             files (mapping, bulk, multi-search bodies) and Qdrant collections (in-process local mode or a server).

This package sits above the engine (it loads trained expids with engine/experiment.py); nothing below imports it.
"""
