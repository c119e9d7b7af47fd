"""Export a trained SparCode index to an existing sparse engine.

    python -m model_zoo.serving.export --expid SparCode_demo_001 --engine opensearch [--output DIR]
    python -m model_zoo.serving.export --expid SparCode_demo_001 --engine qdrant --check-users 500

The index (``<expid>.sparse_index.npz``, built when missing, over ``--build-workers`` processes) becomes one
document per item holding the sparse vector {code key: relu(S + b~)} of the keys whose posting lists hold
the item (the transpose of the index's CSR); items in no posting list are left out (they score 0). A user
is the query {each of its K_u keys: the number of times it occurs}. The engine's dot product of the two is
the sum over the user's keys of the item's postings: what ``SparseCodeIndex.search`` ranks (Eq. 11). A
query key outside an observed key set follows the index's ``unseen_key`` policy before the query is written.

Engines:
- ``opensearch`` (also Elasticsearch): files in the output folder. ``mapping.json`` (the index body:
  ``codes`` a ``rank_features`` field, ``item_index`` integer, ``item_id`` keyword, dynamic mapping off),
  ``bulk-00000.ndjson``... (``_bulk`` bodies, ``--bulk-docs`` documents each), ``queries.ndjson`` (a
  ``_msearch`` body: per user a bool query whose should clauses are ``rank_feature`` queries with the
  ``linear`` function on ``codes.<key>``, boost = the key's count, and whose must_not clause drops the
  user's masked items), ``query_users.json`` (the users in query order) and ``export.json`` (counts and
  the load commands). rank_features keep 9 significant bits of a positive float (Lucene's FeatureField
  keeps the float's top 17 bits: sign, exponent and 8 stored mantissa bits, truncated); the files hold
  the scores already quantized that way (``lucene_feature_value``), so what the engine stores is what
  was written. relu scores are positive, as the field requires.
- ``qdrant``: a collection with one sparse vector ``codes`` (qdrant-client; in-process local mode at
  ``--output``, or a server at ``--qdrant-url``). Qdrant's sparse indices are 32-bit, so a dimension is the
  key's row in the index (``keys`` of the index file maps it back); scores stay float32.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from ..base import CodeIndexable
from ..data.loaders import ItemCorpus, load_feature_map
from ..data.pipeline import data_dir_of
from ..engine.experiment import open_data, prepare
from ..engine.serving import (build_code_index, checkpoint_sha256, code_key_set, code_score_fn, default_index_path,
                              load_code_index, resolve_sparsity_bias)
from ..errors import ConfigError, DataError
from ..retrieval.sharded_build import build_sharded
from ..retrieval.sparsity import check_index_fits, estimate_index_size

ENGINES = ("opensearch", "qdrant")
FIELD = "codes"
_LUCENE_MASK = np.uint32(0xFFFF8000)      # Lucene's FeatureField stores float bits >> 15


def lucene_feature_value(scores):
    """Scores as rank_features store them: float32 truncated to 9 significant bits. scores > 0, finite."""
    values = np.ascontiguousarray(scores, dtype=np.float32)
    bad = ~(np.isfinite(values) & (values >= np.finfo(np.float32).tiny))
    if bad.any():
        raise ValueError(f"rank_features values must be positive normal floats, got {values[bad][0]!r}")
    return (values.view(np.uint32) & _LUCENE_MASK).view(np.float32)


def item_postings(index):
    """The index by item: (indptr int64 [n_items + 1], rows int64 [nnz] of index.keys ascending within an item,
    scores float32 [nnz])."""
    rows = np.repeat(np.arange(index.n_keys), np.diff(index.indptr))                      # [nnz]
    order = np.argsort(index.items, kind="stable")
    indptr = np.zeros(index.n_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(index.items, minlength=index.n_items), out=indptr[1:])
    return indptr, rows[order], index.scores[order].astype(np.float32)


def query_rows(index, query_keys):
    """[(rows int64 [n], counts int64 [n])] per query of query_keys [B, K_u]: the index rows of the user's keys
    (the index's own unseen_key policy; skipped keys dropped) with their multiplicities."""
    resolved = index._rows_for(np.ascontiguousarray(query_keys, dtype=np.int64))           # [B, K_u], -1 = skip
    return [np.unique(row[row >= 0], return_counts=True) for row in resolved]


def _masks(mask_indptr, mask_items, n_queries, row_offset=0):
    if mask_indptr is None:
        return [np.empty(0, np.int64)] * n_queries
    return [np.asarray(mask_items[mask_indptr[row_offset + b]:mask_indptr[row_offset + b + 1]])
            for b in range(n_queries)]


def _write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fd:
        fd.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- OpenSearch / Elasticsearch
def opensearch_mapping():
    """The index body (mappings) the bulk files are written for."""
    return {"mappings": {"dynamic": "strict", "properties": {FIELD: {"type": "rank_features"},
                                                             "item_index": {"type": "integer"},
                                                             "item_id": {"type": "keyword"}}}}


def opensearch_query(keys, counts, k, masked=()):
    """Search body of one user: sum over its keys of the item's stored feature value times the key's count."""
    should = [{"rank_feature": {"field": f"{FIELD}.{int(key)}", "linear": {}, "boost": int(count)}}
              for key, count in zip(keys, counts)]
    query = {"bool": {"should": should}}
    if len(masked):
        query["bool"]["must_not"] = [{"ids": {"values": [str(int(i)) for i in masked]}}]
    return {"size": int(k), "_source": ["item_id"], "track_total_hits": False, "query": query}


def write_opensearch(index, output, index_name, query_keys, k, item_ids=None, user_ids=None, mask_indptr=None,
                     mask_items=None, bulk_docs=10000):
    """Write mapping.json, bulk-*.ndjson, queries.ndjson, query_users.json and export.json into `output`.

    Args:
        index: SparseCodeIndex.
        index_name: the OpenSearch index the files address.
        query_keys: int64 [B, K_u] keys of the users to query.
        k: hits per query.
        item_ids: raw item ids by item index (None: the index); user_ids: raw user ids of the queries.
        mask_indptr, mask_items: CSR of the items each query excludes (None: none).
        bulk_docs: documents per bulk file.
    Returns:
        the manifest written to export.json.
    """
    os.makedirs(output, exist_ok=True)
    indptr, rows, scores = item_postings(index)
    scores = lucene_feature_value(scores)
    names = [str(int(key)) for key in index.keys]                                       # feature name of a row
    items = np.nonzero(np.diff(indptr))[0]
    bulk_files = []
    for part, start in enumerate(range(0, len(items), bulk_docs)):
        lines = []
        for item in items[start:start + bulk_docs].tolist():
            a, b = indptr[item], indptr[item + 1]
            doc = {"item_index": item, "item_id": str(item if item_ids is None else item_ids[item]),
                   FIELD: {names[r]: float(v) for r, v in zip(rows[a:b].tolist(), scores[a:b].tolist())}}
            lines += [json.dumps({"index": {"_index": index_name, "_id": str(item)}}), json.dumps(doc)]
        bulk_files.append(f"bulk-{part:05d}.ndjson")
        _write_atomic(os.path.join(output, bulk_files[-1]), "\n".join(lines) + "\n")
    lines = []
    for (query, counts), masked in zip(query_rows(index, query_keys), _masks(mask_indptr, mask_items,
                                                                               len(query_keys))):
        lines += [json.dumps({"index": index_name}), json.dumps(opensearch_query(index.keys[query], counts, k, masked))]
    _write_atomic(os.path.join(output, "queries.ndjson"), "\n".join(lines) + "\n")
    users = list(range(len(query_keys))) if user_ids is None else [str(u) for u in user_ids]
    _write_atomic(os.path.join(output, "query_users.json"), json.dumps(users))
    _write_atomic(os.path.join(output, "mapping.json"), json.dumps(opensearch_mapping(), indent=2))
    host = "http://localhost:9200"
    manifest = {"engine": "opensearch", "index_name": index_name, "documents": int(len(items)),
                "features": int(len(scores)), "queries": int(len(query_keys)), "k": int(k),
                "quantization": "lucene rank_features: 9 significant bits (float32 bits >> 15)",
                "bulk_files": bulk_files, "index_checkpoint_hash": index.checkpoint_hash,
                "commands": [f"curl -XPUT {host}/{index_name} -H 'Content-Type: application/json' "
                             f"--data-binary @mapping.json"]
                + [f"curl -XPOST {host}/_bulk -H 'Content-Type: application/x-ndjson' --data-binary @{name}"
                   for name in bulk_files]
                + [f"curl -XPOST {host}/_refresh",
                   f"curl -XPOST {host}/_msearch -H 'Content-Type: application/x-ndjson' "
                   f"--data-binary @queries.ndjson"]}
    _write_atomic(os.path.join(output, "export.json"), json.dumps(manifest, indent=2))
    return manifest


# ----------------------------------------------------------------------------- Qdrant
class QdrantSparseEngine:
    """The index as a Qdrant collection of items with one sparse vector, searched like SparseCodeIndex.

    Args:
        client: a qdrant_client.QdrantClient (``QdrantClient(":memory:")`` or ``path=`` for the in-process
            local mode, ``url=`` for a server).
        collection: collection name.
    """

    def __init__(self, client, collection="sparcode"):
        self.client, self.collection, self.index = client, collection, None

    def load(self, index, item_ids=None, quantize=False, batch_size=512):
        """(Re)create the collection with one point per item that has postings. quantize: store the
        rank_features values (lucene_feature_value) instead of float32."""
        from qdrant_client import models
        if self.client.collection_exists(self.collection):
            self.client.delete_collection(self.collection)
        self.client.create_collection(self.collection, vectors_config={},
                                      sparse_vectors_config={FIELD: models.SparseVectorParams()})
        indptr, rows, scores = item_postings(index)
        scores = lucene_feature_value(scores) if quantize else scores
        items = np.nonzero(np.diff(indptr))[0].tolist()
        for start in range(0, len(items), batch_size):
            points = []
            for item in items[start:start + batch_size]:
                a, b = indptr[item], indptr[item + 1]
                vector = models.SparseVector(indices=rows[a:b].tolist(), values=scores[a:b].tolist())
                points.append(models.PointStruct(id=item, vector={FIELD: vector}, payload={
                    "item_id": str(item if item_ids is None else item_ids[item])}))
            self.client.upsert(self.collection, points=points)
        self.index = index
        return len(items)

    def search(self, query_keys, k, mask_indptr=None, mask_items=None, row_offset=0, batch_size=64):
        """(scores float32 [B, k], ids int64 [B, k]) of query_keys [B, K_u], as SparseCodeIndex.search
        (unfilled slots -inf / -1)."""
        from qdrant_client import models
        queries = query_rows(self.index, query_keys)
        masks = _masks(mask_indptr, mask_items, len(queries), row_offset)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        asked = [b for b, (rows, _) in enumerate(queries) if len(rows)]      # a query of no key finds nothing
        for start in range(0, len(asked), batch_size):
            block = asked[start:start + batch_size]
            requests = []
            for b in block:
                rows, counts = queries[b]
                exclude = models.Filter(must_not=[models.HasIdCondition(has_id=masks[b].tolist())])
                requests.append(models.QueryRequest(
                    query=models.SparseVector(indices=rows.tolist(), values=counts.astype(float).tolist()),
                    using=FIELD, limit=k, filter=exclude if len(masks[b]) else None))
            for b, response in zip(block, self.client.query_batch_points(self.collection, requests=requests)):
                hits = response.points
                out_scores[b, :len(hits)] = [point.score for point in hits]
                out_ids[b, :len(hits)] = [point.id for point in hits]
        return out_scores, out_ids


# ----------------------------------------------------------------------------- a trained expid
class ExpidScoreFunction:
    """Picklable factory of a trained expid's code score function (each index-build worker loads the checkpoint)."""

    def __init__(self, config_dir, expid):
        self.config_dir, self.expid = config_dir, expid

    def __call__(self):
        params, model_cls = prepare(self.config_dir, self.expid)
        data_dir = data_dir_of(params)
        feature_map = load_feature_map(data_dir, params["dataset_id"])
        corpus = ItemCorpus(os.path.join(data_dir, "item_corpus.h5"), feature_map)
        model = model_cls(feature_map, **params)
        model.set_item_corpus(corpus, np.ones(corpus.num_items))
        model.load_weights(model.checkpoint)
        model.eval()
        return code_score_fn(model)


def load_trained(config_dir, expid):
    """(params, data_dir, model in eval mode, {"valid": users, "test": users}) of a trained expid."""
    params, model_cls = prepare(config_dir, expid)
    if not issubclass(model_cls, CodeIndexable):
        raise ConfigError(f"expid {expid}: model {params['model']} has no sparse code index to export "
                          f"(CodeIndexable models: SparCode)")
    data_dir, feature_map, corpus, train, valid, test = open_data(params)
    model = model_cls(feature_map, **params)
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    model.load_weights(model.checkpoint)
    model.eval()
    return params, data_dir, model, {"valid": valid, "test": test}


@torch.no_grad()
def build_index(model, data_dir, params, workers=1, score_fn_factory=None, num_query_tokens=None, executor=None):
    """The expid's index as engine/serving.build_code_index builds it (same key set, b~, arrays and metadata
    keys); with workers > 1 the scoring runs in that many processes (retrieval/sharded_build.py, `executor` as
    there), each calling score_fn_factory() for the model. num_query_tokens: K_u stored in the index."""
    args = (params["sparsity_bias"], params["target_sparsity"], params["index_top_l"], params["index_max_keys"],
            params["index_score_dtype"], params["unseen_key"])
    if workers == 1:
        return build_code_index(model, data_dir, *args, num_threads=params["num_threads"])
    sparsity_bias, target_sparsity, top_l, index_max_keys, score_dtype, unseen_key = args
    score_fn, n_items = code_score_fn(model), model.item_corpus.num_items
    started = time.perf_counter()
    keys, kind = code_key_set(model, data_dir, index_max_keys)
    key_set_seconds, started = time.perf_counter() - started, time.perf_counter()
    bias, source = resolve_sparsity_bias(model, score_fn, keys, sparsity_bias, target_sparsity)
    bias_seconds = time.perf_counter() - started
    check_index_fits(estimate_index_size(score_fn, keys, n_items, bias, top_l, score_dtype), bias)
    return build_sharded(score_fn_factory, keys, n_items, bias, workers, top_l=top_l, score_dtype=score_dtype,
                         num_codebooks=model.quantizer.num_codebooks, codebook_size=model.quantizer.codebook_size,
                         num_query_tokens=num_query_tokens, key_set_kind=kind,
                         checkpoint_hash=checkpoint_sha256(model.checkpoint),
                         codebooks=model.quantizer.codebooks.detach().cpu().numpy(), unseen_key=unseen_key,
                         executor=executor, extra_metadata={"model": type(model).__name__, "model_id": model.model_id,
                                         "bias_source": source, "trained_bias": float(model.sparse_bias),
                                         "target_sparsity": target_sparsity, "key_set_seconds": key_set_seconds,
                                         "bias_seconds": bias_seconds})


@torch.no_grad()
def user_keys(model, users, batch_size=512):
    """int64 [n_users, K_u] keys of evaluation users."""
    parts = []
    for start in range(0, len(users), batch_size):
        inputs = users.batch(start, min(start + batch_size, len(users)))
        parts.append(model.query_codes({name: value.to(model.device) for name, value in inputs.items()}))
    return torch.cat(parts).cpu().numpy()


def recall_of(reference_ids, ids):
    """Share of the valid reference ids [B, k] found in ids [B, k] of the same rows."""
    found = sum(len(np.intersect1d(r[r >= 0], i[i >= 0])) for r, i in zip(reference_ids, ids))
    return found / max(int((reference_ids >= 0).sum()), 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="./config/", help="config folder")
    parser.add_argument("--expid", required=True, help="a trained SparCode expid")
    parser.add_argument("--engine", required=True, choices=ENGINES)
    parser.add_argument("--output", default=None, help="output folder (default <model_root>/<dataset_id>/"
                                                        "<expid>.<engine>/); the Qdrant local storage for qdrant")
    parser.add_argument("--index-name", default=None, help="OpenSearch index / Qdrant collection (default: expid)")
    parser.add_argument("--users", default="test", choices=("test", "valid"), help="users whose queries are written")
    parser.add_argument("--k", type=int, default=50, help="hits per query (default 50)")
    parser.add_argument("--bulk-docs", type=int, default=10000, help="documents per bulk file (default 10000)")
    parser.add_argument("--build-workers", type=int, default=1, help="processes building a missing index")
    parser.add_argument("--rebuild", action="store_true", help="build the index even if its file exists")
    parser.add_argument("--qdrant-url", default=None, help="a Qdrant server instead of the local mode")
    parser.add_argument("--check-users", type=int, default=0,
                        help="qdrant: query this many users and report the recall of the index's top k")
    args = parser.parse_args(argv)
    for name in ("k", "bulk_docs", "build_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an int >= 1")
    try:
        params, data_dir, model, users = load_trained(args.config, args.expid)
        users = users[args.users]
        keys = user_keys(model, users)
        path = default_index_path(model.checkpoint)
        if args.rebuild or not os.path.exists(path):
            index = build_index(model, data_dir, params, args.build_workers,
                                ExpidScoreFunction(args.config, args.expid), num_query_tokens=int(keys.shape[1]))
            index.write(path)
            print(f"[export] built {path} ({index.n_keys} keys, {index.nnz} scores, {args.build_workers} process(es), "
                  f"{index.build_seconds:.2f} s)", flush=True)
        index = load_code_index(model, path)
        unseen = np.setdiff1d(keys, index.keys) if index.key_set_kind == "observed" else np.empty(0, np.int64)
        if unseen.size and index.unseen_key == "score":
            index = index.copy().add(code_score_fn(model), unseen)
        output = args.output or os.path.join(params["model_root"], params["dataset_id"], f"{args.expid}.{args.engine}")
        name = (args.index_name or args.expid).lower()
        raw_items = model.item_corpus.raw_ids
        if args.engine == "opensearch":
            manifest = write_opensearch(index, output, name, keys, args.k, raw_items, users.raw_user_ids,
                                        users.mask_indptr, users.mask_items, args.bulk_docs)
            print(f"[export] {manifest['documents']} documents, {manifest['queries']} queries in {output}; load with:")
            print("\n".join(manifest["commands"]))
            return 0
        from qdrant_client import QdrantClient
        client = QdrantClient(url=args.qdrant_url) if args.qdrant_url else QdrantClient(path=output)
        engine = QdrantSparseEngine(client, name)
        print(f"[export] {engine.load(index, raw_items)} items in Qdrant collection {name} "
              f"({args.qdrant_url or output})", flush=True)
        if args.check_users:
            n = min(args.check_users, len(keys))
            _, expected = index.search(keys[:n], args.k, users.mask_indptr, users.mask_items)
            _, got = engine.search(keys[:n], args.k, users.mask_indptr, users.mask_items)
            print(f"[export] recall of the index's top {args.k} on {n} {args.users} users: "
                  f"{recall_of(expected, got):.4f}")
        client.close()
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
