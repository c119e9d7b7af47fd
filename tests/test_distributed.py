"""Training in two processes (gloo on CPU): identical ranks, equal to one process on the union of their batches,
rank 0 alone writing results, resume of a killed run.

The two ranks are started with torch.multiprocessing.spawn (as torchrun would start them: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment, on the loopback interface); they exchange their results through
files in a temporary folder. The step comparison uses SGD: the loss does not depend on b or on the item heads'
bias while every score is positive (they shift every logit alike), so their gradients are float noise, which
Adam turns into steps of +-learning_rate whose sign depends on the order of the sums.
"""
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from fuxictr.pytorch.torch_utils import seed_everything

from model_zoo import get_model
from model_zoo.data.loaders import TrainLoader
from model_zoo.engine import distributed
from model_zoo.engine.callbacks import Callback
from model_zoo.engine.evaluator import Evaluator
from model_zoo.engine.experiment import run_experiment
from model_zoo.engine.trainer import Trainer
from model_zoo.errors import DataError

from .conftest import open_tiny, write_config

WORLD, STEPS, BATCH = 2, 8, 32
SPARCODE = {"model": "SparCode", "dataset_id": "tiny", "interaction": "dot", "num_query_tokens": 2,
            "num_item_tokens": 2, "num_codebooks": 2, "codebook_size": 64, "codebook_decay": 0.3,
            "tokenizer_hidden_units": [16], "hidden_units": [16], "net_dropout": 0.0, "serve": False,
            "embedding_init_std": 1.e-2, "eval_max_users": 30}


class KillAtEpoch(Callback):
    """Raises at the end of an epoch on every rank, as if the run were killed before that epoch's state."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, record):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt(f"killed at epoch {self.epoch}")


def sparcode_and_loader(config, batch_size, num_shards=1, shard=0):
    """A SparCode_tiny model (seeded) and its training loader (seed 1), sharded as asked."""
    data = open_tiny(config, "SparCode_tiny")
    params = data["params"]
    seed_everything(params["seed"])
    model = get_model("SparCode")(data["feature_map"], **params)
    model.set_item_corpus(data["corpus"], data["train"].item_counts(data["corpus"].num_items))
    loader = TrainLoader(os.path.join(data["data_dir"], "train.h5"), data["feature_map"], batch_size, seed=1,
                         num_shards=num_shards, shard=shard)
    return model, loader


def sgd_steps(model, loader, steps):
    """`steps` SGD steps of the Trainer (one epoch capped at `steps`)."""
    Trainer(model, Evaluator(verbose=False), epochs=1, max_steps_per_epoch=steps, optimizer="SGD",
            learning_rate=0.1, verbose=False).train_epoch(loader)


def _worker(rank, port, config, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    distributed.init_process_group(-1)
    try:
        model, loader = sparcode_and_loader(config, BATCH, WORLD, rank)
        sgd_steps(model, loader, STEPS)
        torch.save({"state": model.state_dict(), "restarts": model.quantizer.restart_counts.clone()},
                   os.path.join(out, f"steps_rank{rank}.pt"))
        # run_expid's path: killed after epoch 2's training (state of epoch 1 saved), rerun resumes it.
        try:
            run_experiment(config, "SparCode_tiny", extra_callbacks=[KillAtEpoch(2)])
        except KeyboardInterrupt:
            pass
        resumed = run_experiment(config, "SparCode_tiny")
        uninterrupted = run_experiment(config, "SparCode_tiny_copy")
        torch.save({"resumed": resumed, "uninterrupted": uninterrupted}, os.path.join(out, f"runs_rank{rank}.pt"))
    finally:
        distributed.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_raw):
    """Runs the two ranks once; returns the config folder and their output folder."""
    root = tmp_path_factory.mktemp("distributed")
    raw = root / "raw"
    shutil.copytree(tiny_raw, raw)
    run = {**SPARCODE, "epochs": 2, "max_steps_per_epoch": 3, "early_stop_patience": 5}
    config = write_config(str(root), str(raw), {"SparCode_tiny": run, "SparCode_tiny_copy": run})
    open_tiny(config, "SparCode_tiny")                      # build the data before the ranks start
    out = root / "out"
    out.mkdir()
    mp.spawn(_worker, args=(_free_port(), config, str(out)), nprocs=WORLD, join=True)
    return {"config": config, "out": str(out), "root": str(root)}


def _load(two_ranks, name):
    return [torch.load(os.path.join(two_ranks["out"], f"{name}_rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


def test_ranks_hold_identical_codebooks_and_parameters(two_ranks):
    first, second = _load(two_ranks, "steps")
    assert first["state"].keys() == second["state"].keys()
    for name, tensor in first["state"].items():
        assert torch.equal(tensor, second["state"][name]), name
    assert bool(first["state"]["quantizer.initialized"])
    assert int(first["restarts"].sum()) > 0                  # dead-code restarts were decided and broadcast


def test_two_ranks_equal_one_process_on_the_union_of_their_batches(two_ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                  # as the ranks
    try:
        model, loader = sparcode_and_loader(two_ranks["config"], BATCH * WORLD)   # step s: batches 2s, 2s+1
        sgd_steps(model, loader, STEPS)
    finally:
        torch.set_num_threads(threads)
    ranked = _load(two_ranks, "steps")[0]
    assert torch.equal(model.quantizer.restart_counts, ranked["restarts"])
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor.float(), ranked["state"][name].float(), rtol=1e-4, atol=1e-5), name
    moved = model.quantizer.codebooks - sparcode_and_loader(two_ranks["config"], BATCH)[0].quantizer.codebooks
    assert moved.abs().max() > 1e-3                          # the codebooks did move in those steps


def test_only_rank_zero_writes_results_and_a_killed_run_resumes(two_ranks):
    resumed, uninterrupted = (run[0] for run in [[r["resumed"] for r in _load(two_ranks, "runs")],
                                                 [r["uninterrupted"] for r in _load(two_ranks, "runs")]])
    others = _load(two_ranks, "runs")[1]
    assert others["resumed"] is None and others["uninterrupted"] is None
    assert resumed["training_processes"] == 2 and len(resumed["history"]) == 2
    assert resumed["history"][1]["examples_per_second"] > 0
    assert resumed["test"] == uninterrupted["test"] and resumed["valid"] == uninterrupted["valid"]
    log = open(os.path.join(two_ranks["root"], "checkpoints", "tiny", "SparCode_tiny.log")).read()
    assert "Resumed from" in log and "1 epoch(s) done" in log
    first = torch.load(resumed["checkpoint"], weights_only=True)
    second = torch.load(uninterrupted["checkpoint"], weights_only=True)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_sharded_loader_splits_the_one_process_order(tiny_config):
    data = open_tiny(tiny_config, "DSSM_tiny")
    path, feature_map = os.path.join(data["data_dir"], "train.h5"), data["feature_map"]
    whole = list(TrainLoader(path, feature_map, 16, seed=3))
    shards = [list(TrainLoader(path, feature_map, 16, seed=3, num_shards=3, shard=s)) for s in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == data["train"].num_rows // 16 // 3
    for step in range(len(shards[0])):
        for shard in range(3):
            for name, value in whole[3 * step + shard].items():
                assert torch.equal(shards[shard][step][name], value)
    with pytest.raises(ValueError, match="shard=3"):
        TrainLoader(path, feature_map, 16, num_shards=3, shard=3)
    with pytest.raises(DataError, match="fewer than the"):
        TrainLoader(path, feature_map, data["train"].num_rows, num_shards=2, shard=0)
