"""One experiment end to end: build data, train, evaluate, serve, write results.

`run_expid.py` is a thin command line over `run_experiment`.
"""
import json
import logging
import os
import sys
import time
from datetime import datetime

import torch
from fuxictr.pytorch.torch_utils import seed_everything

from . import get_model
from .base import peak_rss_mb
from .config import load_config
from .data.loaders import EvalUsers, ItemCorpus, TrainLoader, load_feature_map
from .data.pipeline import build_dataset
from .retrieval.metrics import format_metrics


def set_logger(log_file):
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s P%(process)d %(levelname)s %(message)s",
                        handlers=[logging.FileHandler(log_file, mode="w"), logging.StreamHandler()])


def write_json_atomic(path, data):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        json.dump(data, fd, indent=2, default=str)
    os.replace(tmp, path)


def append_result_line(csv_path, command, expid, dataset_id, valid, test):
    """FuxiCTR's result line: time, command, expid, dataset, train, val and test metrics."""
    line = (f" {datetime.now().strftime('%Y%m%d-%H%M%S')},[command] {command},[exp_id] {expid},"
            f"[dataset_id] {dataset_id},[train] N.A.,[val] {format_metrics(valid)},[test] {format_metrics(test)}\n")
    with open(csv_path, "a") as fd:
        fd.write(line)


def run_experiment(config_dir, expid, gpu=-1, command=None):
    """Run one expid; returns the result dict also written as JSON next to the checkpoint."""
    params = load_config(config_dir, expid)
    params["gpu"] = gpu
    model_cls = get_model(params["model"])
    model_dir = os.path.join(params["model_root"], params["dataset_id"])
    set_logger(os.path.join(model_dir, expid + ".log"))
    logging.info(f"Params: {json.dumps({k: v for k, v in params.items() if k != 'feature_cols'}, default=str)}")
    seed_everything(params["seed"])
    if params.get("num_threads"):
        torch.set_num_threads(int(params["num_threads"]))
    timings = {}
    started = time.time()
    data_dir = build_dataset(params)
    timings["build_data"] = time.time() - started

    feature_map = load_feature_map(data_dir, params["dataset_id"])
    corpus = ItemCorpus(os.path.join(data_dir, "item_corpus.h5"), feature_map)
    train = TrainLoader(os.path.join(data_dir, "train.h5"), feature_map, params["batch_size"],
                        seed=params["seed"], num_items=corpus.num_items)
    valid = EvalUsers(os.path.join(data_dir, "valid.h5"), feature_map, corpus.num_items,
                      params["eval_max_users"], params["seed"])
    test = EvalUsers(os.path.join(data_dir, "test.h5"), feature_map, corpus.num_items,
                     params["eval_max_users"], params["seed"])

    model = model_cls(feature_map, **params)
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    logging.info(f"Model {params['model']}: {sum(p.numel() for p in model.parameters() if p.requires_grad)} "
                 f"trainable parameters")
    started = time.time()
    history = model.fit(train, validation_data=valid)
    timings["train"] = time.time() - started

    started = time.time()
    logging.info("****** Validation evaluation ******")
    valid_result = model.evaluate(valid)
    logging.info(f"[Metrics] {format_metrics(valid_result)}")
    logging.info("******** Test evaluation ********")
    test_result = model.evaluate(test)
    logging.info(f"[Metrics] {format_metrics(test_result)}")
    timings["evaluate"] = time.time() - started

    result = {"expid": expid, "model": params["model"], "dataset_id": params["dataset_id"],
              "valid": valid_result, "test": test_result, "history": history,
              "seconds": {k: round(v, 3) for k, v in timings.items()},
              "examples_per_second": (history[-1]["examples_per_second"] if history else None),
              "peak_rss_mb": peak_rss_mb(), "eval_users": {"valid": len(valid), "test": len(test)},
              "checkpoint": model.checkpoint, "params": {k: v for k, v in params.items()}}
    serve = getattr(model, "serving_report", None)
    if serve is not None:
        started = time.time()
        result["serving"] = serve(test, data_dir=data_dir, params=params)
        timings["serve"] = time.time() - started
        result["seconds"]["serve"] = round(timings["serve"], 3)
    config_name = os.path.basename(os.path.normpath(config_dir))
    append_result_line(f"{config_name}.csv", command or " ".join(sys.argv), expid, params["dataset_id"],
                       valid_result, test_result)
    write_json_atomic(os.path.join(model_dir, expid + ".json"), result)
    return result
