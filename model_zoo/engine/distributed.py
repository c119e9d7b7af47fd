"""Training in several processes with torch.distributed: `torchrun --nproc_per_node N run_expid.py --expid X`.

torchrun starts N copies of the command with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in
their environment; `process_group` (used by engine/experiment.py) joins them with the gloo backend on CPU or
nccl on GPU (each rank on GPU LOCAL_RANK). Without WORLD_SIZE > 1 every function here is the one-process
identity, so the Trainer and the experiment run unchanged.

What runs where:
- every rank builds the same model (same seed), reads its share of the training batches (data/loaders.py:
  batch i of the one-process order goes to rank i mod N, so the union of the ranks' batches at a step is
  the one-process batches of that step) and steps the optimizer under DistributedDataParallel, which
  averages the gradients;
- the product quantizer's EMA statistics (assignments and sums per codeword) are summed over the ranks
  before every update (`ProcessGroupStatistics`, installed with `layers.quantizer.set_batch_statistics`),
  so every rank applies the same EMA step and holds the same codebooks (vector-quantize-pytorch's
  `sync_codebook`). The k-means initialisation and the dead-code restarts are computed by rank 0 from the
  rows of every rank and broadcast. Every rank makes the same collective calls, decided by state that is
  identical on all ranks (the `initialized` flag, the EMA cluster sizes): the k-means initialisation under
  DDP of vector-quantize-pytorch hangs when only some ranks enter it (its issues 25 and 105);
- rank 0 alone builds the data (the others wait, then open it), validates after each epoch (the metric is
  broadcast so that every rank takes the same early-stopping decision), writes checkpoints, the training
  state, the log and the results, and serves. A resumed run reads the state on rank 0 and broadcasts it.
"""
import contextlib
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..layers.quantizer import BatchStatistics, set_batch_statistics

BACKENDS = ("gloo", "nccl")
# Rank 0 validates and serves while the other ranks wait in a collective call: allow it time.
TIMEOUT = timedelta(hours=2)


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_leader():
    return rank() == 0


def env_world_size():
    """WORLD_SIZE set by torchrun (1 without it); ValueError naming the variable when it is not an int >= 1."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE={value!r}; expected an int >= 1 (set by torchrun)")
    return int(value)


class ProcessGroupStatistics(BatchStatistics):
    """The quantizer's view of the union of the ranks' batches (layers/quantizer.py, BatchStatistics)."""

    @property
    def is_leader(self):
        return dist.get_rank() == 0

    def all_sum(self, tensor):
        tensor = tensor.contiguous()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_rows(self, tensor):
        """Rows [P_r, ...] of every rank r -> [sum_r P_r, ...] in rank order (ranks may hold different P_r)."""
        tensor = tensor.contiguous()
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
        sizes = [int(s) for s in sizes]
        padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def from_leader(self, tensor):
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=0)
        return tensor


def init_process_group(gpu=-1, backend=None):
    """Join the processes started by torchrun (env:// rendezvous) and make the quantizers sync.

    Args:
        gpu: -1 for CPU (gloo); >= 0 for GPU (nccl, each rank on GPU LOCAL_RANK).
        backend: "gloo" or "nccl"; None picks by device.

    Returns:
        the device index of this rank (-1 on CPU, LOCAL_RANK on GPU).
    """
    backend = backend or ("nccl" if gpu >= 0 else "gloo")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {list(BACKENDS)}")
    device = -1
    if gpu >= 0:
        device = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", timeout=TIMEOUT)
    set_batch_statistics(ProcessGroupStatistics())
    return device


def destroy_process_group():
    set_batch_statistics(None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(gpu=-1):
    """Inside: a process group when torchrun started several processes (yields this rank's device), else
    nothing changes (yields `gpu`). A group created here is destroyed on exit; one the caller created is kept."""
    if env_world_size() == 1:
        yield gpu
        return
    created = not dist.is_initialized()
    device = init_process_group(gpu)
    try:
        yield device
    finally:
        if created:
            destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def leader_first():
    """Rank 0 runs the block first (e.g. builds the data), then the other ranks run it."""
    if not is_leader():
        barrier()
    yield
    if is_leader():
        barrier()


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable object) on every rank."""
    if not is_distributed():
        return obj
    holder = [obj if is_leader() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_mean(value):
    """Mean of a float over the ranks."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def quiet_logging():
    """Ranks other than 0 log warnings and errors to stderr only (rank 0 writes the log file)."""
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {rank()} %(levelname)s %(message)s")


class _Loss(nn.Module):
    """MatchModel.loss as a module forward, so that DistributedDataParallel sees the training step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def loss_function(model):
    """fn(batch) -> loss: `model.loss` in one process, its DistributedDataParallel wrapper under a group.

    DDP broadcasts rank 0's parameters and buffers when it is built and rank 0's buffers before every
    forward (buffers a model updates outside the quantizer follow rank 0); unused parameters are allowed
    (frozen codes stop the user side's gradients).
    """
    if not is_distributed():
        return model.loss
    device_ids = [model.device.index] if model.device.type == "cuda" else None
    return DistributedDataParallel(_Loss(model), device_ids=device_ids, find_unused_parameters=True)
