"""Parallelism: the device mesh and, in order, TP -> activation checkpointing -> compile -> FSDP2.

One function per concern, applied in that order by `parallelize_model`. Without a process
group only activation checkpointing and compile apply; with one (even of size 1 on a GPU, for
the bf16 mixed-precision policy) FSDP2 shards every block and the root.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from engine.config import ParallelConfig
from engine.dist import DistContext


def resolve_degrees(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) with -1 resolved; raises ValueError naming the field."""
    fixed = cfg.dp_replicate * cfg.tp
    if world_size % fixed:
        raise ValueError(
            f"parallel: dp_replicate ({cfg.dp_replicate}) x tp ({cfg.tp}) does not divide the world size ({world_size})"
        )
    shard = world_size // fixed if cfg.dp_shard == -1 else cfg.dp_shard
    if cfg.dp_replicate * shard * cfg.tp != world_size:
        raise ValueError(
            f"parallel: dp_replicate x dp_shard x tp = {cfg.dp_replicate}x{shard}x{cfg.tp} != world size {world_size}"
        )
    return cfg.dp_replicate, shard, cfg.tp


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> None:
    if cfg.activation_checkpointing == "none":
        return
    for index, (name, block) in enumerate(list(model.layers.items())):
        if cfg.activation_checkpointing == "full" or index % cfg.ac_every == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=False)


def apply_fsdp(model: nn.Module, ctx: DistContext, cfg: ParallelConfig) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _, shard, _ = resolve_degrees(cfg, ctx.world_size)
    mesh = init_device_mesh(ctx.device.type, (shard,), mesh_dim_names=("dp_shard",))
    mp = None
    if ctx.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's params are needed at once by the root's backward: keep them gathered
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)


def parallelize_model(model: nn.Module, cfg: ParallelConfig, ctx: DistContext) -> nn.Module:
    apply_activation_checkpointing(model, cfg)
    if cfg.compile:
        apply_compile(model)
    if dist.is_initialized():
        apply_fsdp(model, ctx, cfg)
    return model
