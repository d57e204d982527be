"""Multi-device training on torch.distributed (gloo on CPUs, NCCL on GPUs).

The training loop stays one loop. With a process group of R ranks, every global minibatch of B
subjects is split into R disjoint shards; rank r evaluates the ELBO on its shard with the subsample
plate scaled by N / B_r, gradients are averaged across ranks (all-reduce), and every rank takes the
same optimiser step, so parameters stay identical. The average over ranks of N / B_r times a shard's
sum is N / B times the global minibatch sum: the same unbiased estimate of the full-data ELBO as
single-process training; global terms (the output layer's KL) appear once per rank and are averaged.

Launch: ``inva fit --devices N`` starts N local processes; a cluster job starts one process per
device with ``torchrun`` (which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), see README.
"""
from __future__ import annotations

import os
import socket
from contextlib import closing

import torch
import torch.distributed as dist


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when there is a device, else the CPU; ``cuda`` without one is the user's error."""
    from ..errors import InputError
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return torch.device(device)


def fits_on_device(nbytes: int, device: torch.device, share: float = 0.5) -> bool:
    """Whether a cohort of ``nbytes`` should live on ``device``: CUDA devices only (the CPU path
    of ``--lazy`` keeps host memory bounded by the batch), and only within ``share`` of the
    memory free there, so the networks and their activations keep room."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


def join_if_launched(device: torch.device) -> torch.device:
    """Inside a ``torchrun`` job: this rank's device (its LOCAL_RANK's GPU), after joining the process
    group; elsewhere ``device`` as it is."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    init_from_environment(device)
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_from_environment(device: torch.device) -> None:
    """Join the process group described by torchrun's environment variables."""
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global minibatch (strided, so shards differ in size by at most one)."""
    return idx[rank()::world_size()]


def average_gradients(module: torch.nn.Module) -> None:
    if not is_distributed():
        return
    size = float(world_size())
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= size


def sum_across_ranks(value: float) -> float:
    if not is_distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, nprocs: int, *args) -> None:
    """Run ``worker(rank, world_size, port, *args)`` in ``nprocs`` local processes."""
    import torch.multiprocessing as mp
    port = free_port()
    mp.spawn(_entry, args=(nprocs, port, worker, args), nprocs=nprocs, join=True)


def _entry(local_rank: int, nprocs: int, port: int, worker, args) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(local_rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(local_rank)})
    # Share the CPU cores between the local processes instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        worker(*args)
    finally:
        if is_distributed():
            dist.destroy_process_group()
