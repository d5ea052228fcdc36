"""Process-group setup from the environment (torchrun / our launchers) and the device choice.

Owns: reading RANK/WORLD_SIZE/LOCAL_RANK, picking nccl on GPU and gloo on CPU, and the
`DistContext` passed explicitly to the rest of the engine. No global state besides the
process group itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Joins the process group named by the environment (no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = pick_device(device_preference, local_rank)
    # Under torchrun/our launchers (MASTER_ADDR set) join a group even at world size 1, so that
    # FSDP2's mixed precision applies on a single GPU too.
    launched = "MASTER_ADDR" in os.environ
    if (world_size > 1 or launched) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=int(os.environ.get("STRATA_DIST_TIMEOUT_MIN", "10"))),
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float | int, ctx: DistContext) -> float:
    """Sum of a Python number over all ranks (identity in a single process)."""
    if not ctx.distributed:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.item()


def all_gather_object(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's (picklable) `value`, by rank ([value] in a single process)."""
    if not ctx.distributed:
        return [value]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
