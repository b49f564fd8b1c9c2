"""Devices and data-parallel helpers (torchrun + DDP); every collective is the identity in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import ConfigError


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> torch.device | None:
    """Under torchrun (WORLD_SIZE > 1): init the process group (NCCL on CUDA, else gloo); return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors (b, ...) of all ranks in rank order: (world * b, ...)."""
    _, world = dist_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects)."""
    _, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks."""
    _, world = dist_info()
    if world == 1:
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y / world


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
