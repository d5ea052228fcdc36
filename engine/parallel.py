"""Parallelism: the device mesh and, in order, float8 -> TP -> activation checkpointing -> compile -> FSDP2.

`parallelize_model` applies one small function per concern in that order. The mesh is
(pp, dp_replicate, dp_shard, cp, tp) with tp innermost; FSDP2 shards over dp_shard x cp (HSDP:
replicated over dp_replicate as well). Pipeline stages (engine.pipeline) are parallelized one
by one over their pp slice of the mesh. Context-parallel ranks split each row's tokens
(models.context_parallel; the trainer slices the batch). Without a process group only
activation checkpointing and compile apply. The model families' TP plans live with the models
(ModelSpec.parallelize_tp).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from engine.config import ConfigError, ParallelConfig, StrataConfig
from engine.dist import DistContext
from engine.float8 import apply_float8

if TYPE_CHECKING:
    from models.spec import ModelSpec

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


class ParallelDims(NamedTuple):
    """Resolved degrees; ranks are laid out (pp, dp_replicate, dp_shard, cp, tp), tp innermost."""

    dp_replicate: int
    dp_shard: int
    tp: int
    cp: int = 1
    pp: int = 1

    @property
    def dp_size(self) -> int:
        """Data-parallel width: how many different batches one step sees."""
        return self.dp_replicate * self.dp_shard

    @property
    def batch_sharers(self) -> int:
        """Ranks of one pipeline stage that read one batch: a CP group's ranks split its tokens,
        TP ranks share them (every stage of a pipeline reads the same batch too)."""
        return self.cp * self.tp

    @property
    def fsdp_size(self) -> int:
        """Ranks whose gradients FSDP2 averages (dp_replicate x dp_shard x cp)."""
        return self.dp_size * self.cp

    def dp_rank(self, rank: int) -> int:
        """Which data-parallel slice a global rank reads (ranks of one CP x TP group share it,
        and so do the pipeline stages: the pp rank does not enter)."""
        return rank % (self.dp_size * self.batch_sharers) // self.batch_sharers

    def pp_rank(self, rank: int) -> int:
        """Which pipeline stage (of the outermost mesh dimension) a global rank runs."""
        return rank // (self.dp_size * self.batch_sharers)

    def cp_rank(self, rank: int) -> int:
        """This rank's place in its context-parallel group (which part of each row it holds)."""
        return rank // self.tp % self.cp


def resolve_degrees(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    """(dp_replicate, dp_shard, tp, cp, pp) with -1 resolved; raises ConfigError naming the fields."""
    pp = f"pp ({cfg.pp}) x " if cfg.pp > 1 else ""  # named only when used
    fixed = cfg.pp * cfg.dp_replicate * cfg.cp * cfg.tp
    if world_size % fixed:
        raise ConfigError(
            f"parallel: {pp}dp_replicate ({cfg.dp_replicate}) x cp ({cfg.cp}) x tp ({cfg.tp}) does not divide the world size ({world_size})"
        )
    shard = world_size // fixed if cfg.dp_shard == -1 else cfg.dp_shard
    if fixed * shard != world_size:
        names, degrees = ("pp x ", f"{cfg.pp}x") if cfg.pp > 1 else ("", "")
        raise ConfigError(
            f"parallel: {names}dp_replicate x dp_shard x cp x tp = {degrees}{cfg.dp_replicate}x{shard}x{cfg.cp}x{cfg.tp} != world size {world_size}"
        )
    return ParallelDims(cfg.dp_replicate, shard, cfg.tp, cfg.cp, cfg.pp)


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The 5-D named mesh over the whole process group (pp outermost)."""
    shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def fsdp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP2 shards over: dp_shard x cp flattened (the CP ranks hold the same
    parameters), with dp_replicate as the outer (HSDP) dimension when it is > 1."""
    if dims.cp == 1:
        return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
    flat = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else flat


# -- 1. tensor parallel ---------------------------------------------------------------------
def apply_tp(
    model: nn.Module, tp_plan: Callable[..., None] | None, tp_mesh: DeviceMesh, cfg: ParallelConfig, family: str
) -> None:
    """Runs the family's TP plan; options it does not take are a clear error, never ignored.
    A plan raises ValueError naming the field when the model cannot be split tp ways."""
    if tp_plan is None:
        raise ConfigError(f"parallel.tp: model family {family!r} has no tensor-parallel plan")
    options = {"sequence_parallel": cfg.sequence_parallel, "loss_parallel": cfg.loss_parallel}
    accepted = inspect.signature(tp_plan).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for name, enabled in options.items():
        if enabled and not (takes_any or name in accepted):
            raise ConfigError(f"parallel.{name}: model family {family!r} does not support it")
    try:
        tp_plan(model, tp_mesh, **{k: v for k, v in options.items() if v})
    except ValueError as err:  # plans raise ValueError naming the field that cannot be split
        raise ConfigError(str(err)) from None


# -- 2. activation checkpointing ----------------------------------------------------------
_SAVED_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "mm",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
}


def _op_level_policy(ctx, op, *args, **kwargs):
    """Op-level selective AC: keep matmul and attention outputs, recompute the cheap rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1, op_level: bool = False) -> None:
    """none | selective (every `every`-th block, or op-level in every block) | full."""
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ConfigError(f"parallel.activation_checkpointing: unknown mode {mode!r}")
    kwargs = {"preserve_rng_state": False}
    if mode == "selective" and op_level:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _op_level_policy)
    for index, (name, block) in enumerate(list(model.layers.items())):
        if mode == "full" or op_level or index % every == 0:
            model.layers[name] = checkpoint_wrapper(block, **kwargs)


# -- 3. compile ---------------------------------------------------------------------------
def apply_compile(model: nn.Module) -> None:
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=False)


# -- 4. FSDP2 -----------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, device_type: str) -> None:
    """fully_shard per block and at the root; a 2-D dp mesh = HSDP. bf16/fp32-reduce on GPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": dp_mesh}
    if device_type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's params are needed at once by the root's backward: keep them gathered
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)


def set_microbatch_grad_sync(model: nn.Module, last: bool, accumulate_unsharded: bool) -> None:
    """Before each micro-batch's backward: communicate gradients fully only on the last one.
    HSDP skips the cross-replica all-reduce before it (free: FSDP2 sums the reduce-scattered
    shards and all-reduces the sum once); `accumulate_unsharded` also skips the reduce-scatter."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return
    if accumulate_unsharded:
        model.set_requires_gradient_sync(last)
    else:
        model.set_requires_all_reduce(last)


def parallelize_model(
    model: nn.Module, cfg: ParallelConfig, ctx: DistContext, spec: ModelSpec | None = None,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """float8 Linears -> TP -> activation checkpointing -> compile -> FSDP2, as the config and world ask.

    `spec` is the family's ModelSpec (looked up from `model.cfg.family` if None); its
    `parallelize_tp(model, tp_mesh, **options)` may take `sequence_parallel` / `loss_parallel`.
    `mesh` is built here when not given (the trainer passes its own: it needs the CP group too).
    """
    dims = resolve_degrees(cfg, ctx.world_size)
    if mesh is None and dist.is_initialized():
        mesh = build_mesh(dims, ctx.device.type)
    apply_float8(model, cfg.float8, ctx.device, fsdp=mesh is not None and dims.dp_shard * dims.cp > 1)  # first: swaps Linears
    if dims.tp > 1:
        if spec is None:
            from models.spec import get_spec

            spec = get_spec(model.cfg.family)
        apply_tp(model, spec.parallelize_tp, mesh["tp"], cfg, spec.name)
    elif cfg.sequence_parallel or cfg.loss_parallel:
        raise ConfigError("parallel.sequence_parallel / loss_parallel need parallel.tp > 1")
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every, op_level=cfg.ac_selective == "op")
    if cfg.compile:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, fsdp_mesh(mesh, dims), ctx.device.type)
    return model


# -- context parallel ------------------------------------------------------------------------
def context_parallel_plan(cfg: StrataConfig, dims: ParallelDims, mesh: DeviceMesh | None, rank: int):
    """None without CP; else `shard_for(micro_batch, device) -> SequenceShard` for this rank,
    in the layout the model family asks for. Checks the config against CP first."""
    if dims.cp == 1:
        return None
    from models.context_parallel import SequenceShard, local_positions
    from models.spec import get_spec

    if cfg.data.decomposition is not None:
        raise ConfigError("parallel.cp: data.decomposition changes the row length every step; train it without context parallelism")
    layout = get_spec(cfg.model.family).cp_layout
    try:
        local_positions(cfg.data.seq_len, dims.cp, 0, layout)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    group = mesh["cp"].get_group() if mesh is not None else None  # None: a check only (strata doctor)
    cp_rank = dims.cp_rank(rank)
    documents = not cfg.data.cross_document_attention

    def shard_for(micro_batch: dict, device: torch.device) -> SequenceShard:
        position_ids = micro_batch.get("position_ids") if documents else None
        seq_len = micro_batch["input_ids"].shape[1]
        return SequenceShard(group, cp_rank, dims.cp, seq_len, layout, position_ids, device)

    return shard_for


# -- helpers for the training step ----------------------------------------------------------
def loss_context(logits: torch.Tensor) -> contextlib.AbstractContextManager:
    """`loss_parallel()` when the logits are vocab-sharded DTensors, else a no-op context.
    Both the loss and its backward must run inside it."""
    from torch.distributed.tensor import DTensor

    if isinstance(logits, DTensor):
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


def total_grad_norm(parameters: Iterable[torch.Tensor], pp_group: dist.ProcessGroup | None = None,
                    counted_elsewhere: Iterable[torch.Tensor] = ()) -> torch.Tensor:  # fmt: skip
    """Global L2 norm of the gradients, plain tensors and DTensors on any meshes together.

    DTensors are grouped by (mesh, placements) so each group is one foreach norm and one
    collective; the result is a plain 0-d tensor, the same on every rank. `pp_group`: the
    ranks holding the other pipeline stages' parameters, whose squared norms are added in.
    `counted_elsewhere`: parameters left out (a pipeline stage's copy of a tied weight, which
    another stage counts).
    """
    from torch.distributed.tensor import DTensor

    skipped = {id(p) for p in counted_elsewhere}
    groups: dict = defaultdict(list)
    for p in parameters:
        if p.grad is None or id(p) in skipped:
            continue
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else (None, g.device)
        groups[key].append(g)
    norms = []
    for (mesh, _), grads in groups.items():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append((norm.full_tensor() if mesh is not None else norm).float().cpu())
    total = torch.stack(norms).pow(2).sum().sqrt() if len(norms) > 1 else norms[0] if norms else torch.zeros(())
    if pp_group is not None:  # every stage's share (on the device: nccl reduces device tensors)
        device = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
        squared = total.pow(2).to(device)
        dist.all_reduce(squared, group=pp_group)
        total = squared.sqrt().cpu()
    return total


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None,
    counted_elsewhere: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """Scales gradients so their global norm (over every pipeline stage with `pp_group`; see
    total_grad_norm for `counted_elsewhere`, scaled all the same) is at most `max_norm`;
    returns the norm before."""
    parameters = [p for p in parameters if p.grad is not None]
    total = total_grad_norm(parameters, pp_group, counted_elsewhere)
    by_mesh: dict = defaultdict(list)
    for p in parameters:
        by_mesh[getattr(p.grad, "device_mesh", None)].append(p)
    for params in by_mesh.values():
        device = params[0].grad.device
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(device))
    return total
