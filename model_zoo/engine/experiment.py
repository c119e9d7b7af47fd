"""One experiment end to end: build data, train, evaluate, serve, write results.

`run_expid.py` is a thin command line over `run_experiment`. Rerunning an expid whose run was killed
continues from its last completed epoch (engine/trainer.py); `fresh=True` starts over. Under torchrun
(`torchrun --nproc_per_node N run_expid.py --expid X`) every process trains its share of the batches and
rank 0 alone builds the data, evaluates, serves and writes the results (engine/distributed.py).
"""
import hashlib
import json
import logging
import os
import sys
import time
from datetime import datetime

import torch
from fuxictr.pytorch.torch_utils import seed_everything

from .. import get_model
from ..config import SERVING_DEFAULTS, check_model_keys, load_experiment
from ..data.loaders import EvalUsers, ItemCorpus, TrainLoader, load_feature_map
from ..data.pipeline import build_dataset
from ..retrieval.metrics import format_metrics
from . import distributed, serving
from .callbacks import build_callbacks, check_callbacks
from .evaluator import Evaluator
from .trainer import Trainer, config_fingerprint, peak_rss_mb


def set_logger(log_file, append=False):
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s P%(process)d %(levelname)s %(message)s",
                        handlers=[logging.FileHandler(log_file, mode="a" if append else "w"), logging.StreamHandler()])


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


def open_data(params, num_shards=1, shard=0):
    """Build (or reuse) the dataset; returns (data_dir, feature_map, corpus, train, valid, test). The training
    loader serves shard `shard` of `num_shards` (one per training process)."""
    data_dir = build_dataset(params)
    feature_map = load_feature_map(data_dir, params["dataset_id"])
    corpus = ItemCorpus(os.path.join(data_dir, "item_corpus.h5"), feature_map)
    train = TrainLoader(os.path.join(data_dir, "train.h5"), feature_map, params["batch_size"],
                        seed=params["seed"], num_items=corpus.num_items, num_shards=num_shards, shard=shard)
    valid = EvalUsers(os.path.join(data_dir, "valid.h5"), feature_map, corpus.num_items,
                      params["eval_max_users"], params["seed"])
    test = EvalUsers(os.path.join(data_dir, "test.h5"), feature_map, corpus.num_items,
                     params["eval_max_users"], params["seed"])
    return data_dir, feature_map, corpus, train, valid, test


def serving_report(model, test, data_dir, params):
    """Serving report of a trained model (engine/serving.py), logged; None if the model declares no
    serving capability (VectorServable: faiss comparators; CodeIndexable: sparse inverted index)."""
    report = serving.serving_report(model, test, data_dir, params)
    if report is not None:
        for line in serving.report_lines(report):
            logging.info(line)
    return report


def prepare(config_dir, expid, gpu=-1):
    """Load and check everything that can be checked before any data is built: the config, the model
    name and its keys, the callbacks. Returns (params, model class)."""
    experiment = load_experiment(config_dir, expid)
    model_cls = get_model(experiment.model)
    check_model_keys(experiment, model_cls)
    check_callbacks(experiment.training.callbacks, model_cls, source=f"{experiment.config_file}: expid={expid}: ")
    params = dict(experiment.params)
    params["gpu"] = gpu
    return params, model_cls


def _data_fingerprint(data_dir):
    path = os.path.join(data_dir, "build_info.json")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as fd:
        return hashlib.sha256(fd.read()).hexdigest()[:16]


def run_experiment(config_dir, expid, gpu=-1, command=None, fresh=False, extra_callbacks=()):
    """Run one expid; returns the result dict also written as JSON next to the checkpoint.

    Under torchrun (WORLD_SIZE > 1) the processes join one process group; ranks other than 0 return None
    after training.

    Args:
        config_dir: config folder (dataset_config.yaml, model_config/).
        expid: experiment id.
        gpu: GPU index, -1 for CPU (under torchrun on GPUs, each rank uses GPU LOCAL_RANK).
        command: command line recorded in the result CSV line.
        fresh: ignore a saved training state and train from the first epoch.
        extra_callbacks: Callback objects added to the expid's (programmatic use, e.g. tests).
    """
    with distributed.process_group(gpu) as device:
        return _run_experiment(config_dir, expid, device, command, fresh, extra_callbacks)


def _run_experiment(config_dir, expid, gpu, command, fresh, extra_callbacks):
    params, model_cls = prepare(config_dir, expid, gpu)
    model_dir = os.path.join(params["model_root"], params["dataset_id"])
    state_path = os.path.join(model_dir, expid + ".state.pt")
    leader = distributed.is_leader()
    if fresh and leader and os.path.exists(state_path):
        os.remove(state_path)
    if leader:
        set_logger(os.path.join(model_dir, expid + ".log"), append=os.path.exists(state_path))
    else:
        distributed.quiet_logging()
    logging.info(f"Params: {json.dumps({k: v for k, v in params.items() if k != 'feature_cols'}, default=str)}")
    seed_everything(params["seed"])
    if params.get("num_threads"):
        torch.set_num_threads(int(params["num_threads"]))
    timings = {}
    started = time.time()
    with distributed.leader_first():
        data_dir, feature_map, corpus, train, valid, test = open_data(params, distributed.world_size(),
                                                                       distributed.rank())
    timings["build_data"] = time.time() - started

    model = model_cls(feature_map, **params)
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    logging.info(f"Model {params['model']}: {sum(p.numel() for p in model.parameters() if p.requires_grad)} "
                 f"trainable parameters")
    evaluator = Evaluator.from_params(params)
    callbacks = build_callbacks(model, params.get("callbacks")) + list(extra_callbacks)
    fingerprinted = {k: v for k, v in params.items() if k not in SERVING_DEFAULTS and k != "eval_batch_size"}
    if distributed.world_size() > 1:      # batches per step and their order depend on the number of processes
        fingerprinted["_world_size"] = distributed.world_size()
    trainer = Trainer(model, evaluator, callbacks, epochs=params["epochs"], learning_rate=params["learning_rate"],
                      optimizer=params["optimizer"], monitor=params["monitor"], monitor_mode=params["monitor_mode"],
                      early_stop_patience=params["early_stop_patience"],
                      max_steps_per_epoch=params["max_steps_per_epoch"], state_path=state_path,
                      fingerprint=config_fingerprint(fingerprinted, data=_data_fingerprint(data_dir)),
                      verbose=bool(params.get("verbose", 1)) and leader)
    started = time.time()
    history = trainer.fit(train, validation_data=valid)
    timings["train"] = time.time() - started
    if not leader:
        return None

    started = time.time()
    logging.info("****** Validation evaluation ******")
    valid_result = evaluator.evaluate(model, valid)
    logging.info(f"[Metrics] {format_metrics(valid_result)}")
    logging.info("******** Test evaluation ********")
    test_result = evaluator.evaluate(model, test)
    logging.info(f"[Metrics] {format_metrics(test_result)}")
    timings["evaluate"] = time.time() - started

    result = {"expid": expid, "model": params["model"], "dataset_id": params["dataset_id"],
              "valid": valid_result, "test": test_result, "history": history,
              "seconds": {k: round(v, 3) for k, v in timings.items()},
              "examples_per_second": (history[-1]["examples_per_second"] if history else None),
              "training_processes": distributed.world_size(),
              "peak_rss_mb": peak_rss_mb(), "eval_users": {"valid": len(valid), "test": len(test)},
              "checkpoint": model.checkpoint, "params": dict(params)}
    if params.get("serve", True):
        started = time.time()
        try:
            report = serving_report(model, test, data_dir, params)
        except (ValueError, MemoryError) as exc:  # keep the trained model's results; serve later
            logging.error(f"Serving failed: {exc} (rerun it with serve_experiment after changing the serving keys)")
            report = {"error": f"{type(exc).__name__}: {exc}"}
        if report is not None:
            result["serving"] = report
            timings["serve"] = time.time() - started
            result["seconds"]["serve"] = round(timings["serve"], 3)
    config_name = os.path.basename(os.path.normpath(config_dir))
    append_result_line(f"{config_name}.csv", command or " ".join(sys.argv), expid, params["dataset_id"],
                       valid_result, test_result)
    write_json_atomic(os.path.join(model_dir, expid + ".json"), result)
    return result


def serve_experiment(config_dir, expid, gpu=-1):
    """Serving report of an expid that was already trained (its checkpoint), without training again.

    Use it to rebuild the index with other serving keys (sparsity_bias, target_sparsity, index_top_l, ...).
    Logs to `<expid>.serve.log`, stores the report under "serving" in `<expid>.json` (if that file exists)
    and returns it.
    """
    params, model_cls = prepare(config_dir, expid, gpu)
    model_dir = os.path.join(params["model_root"], params["dataset_id"])
    set_logger(os.path.join(model_dir, expid + ".serve.log"))
    seed_everything(params["seed"])
    if params.get("num_threads"):
        torch.set_num_threads(int(params["num_threads"]))
    data_dir, feature_map, corpus, train, _, test = open_data(params)
    model = model_cls(feature_map, **params)
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    model.load_weights(model.checkpoint)
    model.eval()
    started = time.time()
    report = serving_report(model, test, data_dir, params)
    json_path = os.path.join(model_dir, expid + ".json")
    if report is not None and os.path.exists(json_path):
        with open(json_path) as fd:
            result = json.load(fd)
        result["serving"] = report
        result.setdefault("seconds", {})["serve"] = round(time.time() - started, 3)
        write_json_atomic(json_path, result)
    return report
