"""Training under torch.distributed (torchrun / accelerate launch): the process group from the
environment, FSDP2 sharding one unit per decoder block, and gradient-sync control for accumulation.
DDP itself is a plain ``DistributedDataParallel`` wrap in :mod:`salr.train.loop`."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from salr.methods.salor.factors import has_factor_masks
from salr.nn.models import find_blocks


def distributed_context() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env(backend: str | None = None) -> torch.device:
    """Joins the process group torchrun / accelerate launch described in the environment.

    Returns the device this rank should put its model on (cuda:LOCAL_RANK, or cpu). A no-op
    returning the default device when WORLD_SIZE is unset or 1.
    """
    if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
        raise ValueError(f"backend: must be None, 'gloo', 'nccl', 'mpi', 'ucc' or 'xccl', got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return device


def _fully_shard_blocks(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """FSDP2 in place: each decoder block is one unit (its parameters gathered just before it runs,
    freed after), the root unit holds the rest (embeddings, final norm, head).

    Only nn.Parameters are sharded: a SALR layer's sparse base (bitmap, values, offsets) is made of
    buffers and stays replicated on every rank; adapters, embeddings and norms are sharded.
    """
    # Imported here: only FSDP runs need them, and not every torch build ships torch.distributed.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return  # sharded by an earlier train() call
    if has_factor_masks(model):  # its mask updates would mix plain mask buffers with DTensor factors
        raise ValueError("TrainConfig.parallel='fsdp': SALOR factor masks are not supported under FSDP; "
                         "use parallel='ddp'")
    try:
        _, blocks = find_blocks(model)
    except ValueError as exc:
        raise ValueError(f"TrainConfig.parallel='fsdp': {exc}") from exc
    mesh = init_device_mesh(device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _grad_sync(train_model: torch.nn.Module, fsdp: bool, sync: bool):
    """Gradient accumulation: ranks exchange gradients only on the micro-batch that ends a step."""
    if fsdp:
        train_model.set_requires_gradient_sync(sync)
    elif not sync:
        return train_model.no_sync()  # DDP
    return contextlib.nullcontext()
