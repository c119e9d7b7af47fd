"""Trainer: the training loop over a MatchModel, with early stopping, checkpoints and resume.

The model declares its loss (`MatchModel.loss`); the Trainer owns the optimizer, the epochs, the
validation and early stopping on the monitored metric, the best-weights checkpoint, and the training
state that lets a killed run continue. After every completed epoch it writes, atomically,
`<model_dir>/<expid>.state.pt`: model and optimizer state, epoch, global step, early-stopping state,
history, and the random states (torch, numpy, python, the loader's shuffling, the negative sampler).
A rerun with the same config loads it and continues with the next epoch; a finished run is not
trained again (a closed-form model is refitted, which takes seconds). `run_expid.py --fresh` deletes the state
and starts over.

Under torch.distributed (engine/distributed.py) every rank steps through its share of the batches with
DistributedDataParallel; rank 0 alone validates, writes the checkpoint and the state, and broadcasts the
validation metric and a resumed state, so that every rank takes the same decisions.
"""
import hashlib
import itertools
import json
import logging
import os
import random
import resource
import time

import numpy as np
import torch
from fuxictr.pytorch.torch_utils import get_optimizer

from ..base import ClosedForm
from ..retrieval.metrics import format_metrics
from . import distributed
from .progress import progress_bar

STATE_VERSION = 1


def peak_rss_mb():
    """Peak resident memory of this process in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def config_fingerprint(params, data=None,
                       ignored=("gpu", "verbose", "_config_file", "_dataset_config_file", "num_threads")):
    """Hash of the settings a training state depends on (and of the built data); a state saved under another
    config is not resumed. The caller leaves out keys that do not change training (serving keys)."""
    content = {k: v for k, v in params.items() if k not in ignored}
    content["_data"] = data
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_atomic(obj, path):
    """torch.save to a temp name, then rename: a killed process never leaves a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _numpy_state(state, restore=False):
    """numpy RandomState state <-> a form torch.load(weights_only=True) reads (its key array as a tensor)."""
    name, keys, position, has_gauss, cached = state
    keys = keys.numpy().astype(np.uint32) if restore else torch.from_numpy(keys.astype(np.int64))
    return (name, keys, int(position), int(has_gauss), float(cached))


def _python_state(state):
    """random.getstate() comes back from torch.load with lists where random.setstate wants tuples."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class Trainer:
    """Trains a MatchModel with early stopping on a validation metric.

    Args:
        model: the MatchModel (its item corpus and sampler already attached).
        evaluator: an engine.evaluator.Evaluator for the per-epoch validation.
        callbacks: engine.callbacks.Callback objects (model schedules and statistics).
        epochs: maximum number of epochs (>= 1).
        learning_rate: optimizer learning rate.
        optimizer: optimizer name understood by FuxiCTR (`adam`, or a torch.optim class name such as `SGD`).
        monitor: metric used for early stopping and the best checkpoint.
        monitor_mode: `max` or `min`.
        early_stop_patience: epochs without improvement before stopping.
        max_steps_per_epoch: cap on training steps per epoch (None = the whole split).
        state_path: where the training state is written after each epoch (None: no resume).
        fingerprint: config hash stored with the state; a state with another one is not resumed.
        verbose: progress bars (shown only on a terminal).
    """

    def __init__(self, model, evaluator, callbacks=(), epochs=10, learning_rate=1.e-3, optimizer="adam",
                 monitor="Recall(k=20)", monitor_mode="max", early_stop_patience=2, max_steps_per_epoch=None,
                 state_path=None, fingerprint=None, verbose=True):
        self.model, self.evaluator, self.callbacks = model, evaluator, list(callbacks)
        self.epochs, self.monitor, self.monitor_mode = epochs, monitor, monitor_mode
        self.early_stop_patience, self.max_steps_per_epoch = early_stop_patience, max_steps_per_epoch
        self.state_path, self.fingerprint, self.verbose = state_path, fingerprint, verbose
        parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = get_optimizer(optimizer, parameters, learning_rate) if parameters else None
        self.epoch, self.global_step, self.best, self.patience = 0, 0, None, 0
        self.history, self.finished = [], False
        self._loss = None         # model.loss, or its DistributedDataParallel wrapper (built at the first epoch)

    # ---- state ----------------------------------------------------------------------
    def state_dict(self, loader):
        sampler = self.model.sampler
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "epoch": self.epoch,
                "global_step": self.global_step, "best": self.best, "patience": self.patience,
                "history": self.history, "finished": self.finished, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(np.random.get_state()),
                        "python": random.getstate(), "loader": _numpy_state(loader.rng.get_state()),
                        "sampler": sampler.generator.get_state() if sampler is not None else None,
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def load_state_dict(self, state, loader):
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.global_step, self.best = state["epoch"], state["global_step"], state["best"]
        self.patience, self.history, self.finished = state["patience"], state["history"], state["finished"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_state(rng["numpy"], restore=True))
        random.setstate(_python_state(rng["python"]))
        loader.rng.set_state(_numpy_state(rng["loader"], restore=True))
        if rng["sampler"] is not None and self.model.sampler is not None:
            self.model.sampler.generator.set_state(rng["sampler"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _read_state(self):
        """The saved training state if there is one for this config, else None."""
        if not self.state_path or not os.path.exists(self.state_path):
            return None
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a corrupt file
            logging.warning(f"{self.state_path}: unreadable training state ({exc}); training from the start")
            return None
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint:
            logging.warning(f"{self.state_path}: saved under another config; training from the start "
                            f"(--fresh removes it)")
            return None
        return state

    def resume(self, loader):
        """Load the saved training state if there is one for this config (read by rank 0 and broadcast);
        returns True if it was loaded."""
        state = distributed.broadcast_object(self._read_state() if distributed.is_leader() else None)
        if state is None:
            return False
        self.load_state_dict(state, loader)
        logging.info(f"Resumed from {self.state_path}: {self.epoch} epoch(s) done, step {self.global_step}"
                     + (", training finished" if self.finished else ""))
        return True

    def _save_state(self, loader):
        if self.state_path and distributed.is_leader():
            save_atomic(self.state_dict(loader), self.state_path)

    # ---- loop -----------------------------------------------------------------------
    def _call(self, hook, *args):
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def train_epoch(self, loader):
        """One pass over the loader (or max_steps_per_epoch steps); returns (mean loss, examples), both over
        every rank."""
        model = self.model
        model.train()
        if self._loss is None:
            self._loss = distributed.loss_function(model)
        steps = len(loader) if self.max_steps_per_epoch is None else min(len(loader), self.max_steps_per_epoch)
        total, count, examples = 0.0, 0, 0
        with progress_bar(total=steps, desc=f"epoch {self.epoch + 1}", verbose=self.verbose) as bar:
            for step, batch in enumerate(itertools.islice(loader, steps)):
                batch = {name: value.to(model.device) for name, value in batch.items()}
                self._call("on_step_begin")
                self.optimizer.zero_grad()
                loss = self._loss(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{model.model_id}: loss is {loss.item()} at epoch {self.epoch + 1}, "
                                             f"step {step}")
                loss.backward()
                self.optimizer.step()
                self.global_step += 1
                self._call("on_step_end")
                total += loss.item()
                count += 1
                examples += batch[next(iter(batch))].shape[0]
                bar.update(1)
                if count % 20 == 0:
                    bar.set_postfix(loss=f"{total / count:.4f}")
        return distributed.all_mean(total / max(count, 1)), examples * distributed.world_size()

    def _improved(self, value):
        if self.best is None:
            return True
        sign = 1 if self.monitor_mode == "max" else -1
        return sign * value > sign * self.best + 1e-6

    def fit(self, loader, validation_data=None, resume=True):
        """Train until `epochs` or early stopping; the best weights are in `model.checkpoint` and loaded (on
        rank 0 under torch.distributed)."""
        model = self.model
        if not model.trainable or self.optimizer is None:
            if isinstance(model, ClosedForm):
                started = time.time()
                model.fit_closed_form(loader)
                logging.info(f"Fitted {type(model).__name__} in closed form in {time.time() - started:.1f} s")
            if distributed.is_leader():
                model.save_weights(model.checkpoint)
            return self.history
        if resume:
            self.resume(loader)
        self._call("on_train_begin")
        while not self.finished and self.epoch < self.epochs:
            started = time.time()
            loss, examples = self.train_epoch(loader)
            seconds = time.time() - started
            self.epoch += 1
            record = {"epoch": self.epoch, "loss": loss, "examples_per_second": examples / max(seconds, 1e-9),
                      "train_seconds": seconds, "peak_rss_mb": peak_rss_mb()}
            self._call("on_epoch_end", record)
            if validation_data is not None:
                record["valid"] = distributed.broadcast_object(
                    self.evaluator.evaluate(model, validation_data) if distributed.is_leader() else None)
                value = record["valid"][self.monitor]
            else:
                value = -loss if self.monitor_mode == "max" else loss     # no validation: the training loss
            self._log_epoch(record)
            self.history.append(record)
            if self._improved(value):
                self.best, self.patience = value, 0
                if distributed.is_leader():
                    model.save_weights(model.checkpoint)
                    logging.info(f"Save best model: {self.monitor} = {value:.6f} -> {model.checkpoint}")
            else:
                self.patience += 1
                if self.patience >= self.early_stop_patience:
                    logging.info(f"Early stopping at epoch {self.epoch}")
                    self.finished = True
            self.finished = self.finished or self.epoch >= self.epochs
            self._save_state(loader)
        if distributed.is_leader():           # the other ranks keep the last weights
            model.load_weights(model.checkpoint)
        return self.history

    def _log_epoch(self, record):
        shown = ("epoch", "loss", "examples_per_second", "peak_rss_mb", "valid", "train_seconds")
        extra = " - ".join(f"{k}: {v}" for k, v in record.items() if k not in shown)
        logging.info(f"[Epoch {record['epoch']}/{self.epochs}] loss: {record['loss']:.6f} - "
                     f"{record['examples_per_second']:.0f} examples/s - {record['train_seconds']:.1f} s - "
                     f"peak RSS {record['peak_rss_mb']:.0f} MB" + (f" - {extra}" if extra else ""))
        if "valid" in record:
            logging.info(f"[Metrics] {format_metrics(record['valid'])}")
