"""Pipeline parallelism (`parallel.pp`): the layers split into stages over the pp ranks and run
by a `torch.distributed.pipelining` schedule (GPipe, 1F1B, interleaved 1F1B).

Owns the split (each stage keeps the original parameter FQNs, so DCP checkpoints load at any pp
degree), the per-rank container of the stages' modules that the optimizer, checkpoints and grad
norm see, one training step through the schedule, and a forward-only pass for eval (stage to
stage with plain send/recv). Not the mesh (engine.parallel) nor the loss and its scale (trainer).

Layers split by index, as evenly as possible, earlier stages taking the extra ones (the last
stage also runs the output projection and the loss). position_ids reach every stage as a
schedule keyword argument, so each stage rebuilds RoPE / GLA's cu_seqlens from them. Every rank
initializes the whole model once (the same weights as at pp = 1, as build_model does before
FSDP2 shards it) and keeps its stages' modules. Each stage is parallelized on its own over the
pp rank's slice of the mesh: TP (the family's plan skips the parts a stage lacks; under
sequence parallelism hidden states travel sequence-sharded; loss_parallel runs the whole
schedule inside loss_parallel()), then FSDP2, which reduce-scatters a stage's gradients once,
after its last micro-batch (the schedule's choice, whatever parallel.accumulate_unsharded_grads).
Context parallelism: the trainer slices the rows; a pre-hook on each stage builds the
SequenceShard of the micro-batch the schedule hands it from the full rows' position_ids (a
schedule keyword argument split with the rows), so shards match micro-batches whatever
parallel.pp_microbatches. Eval (val sets and train.eval_tasks) runs stage to stage; ranks
before the last stage score nothing. Continual runs check the source against the whole model
(PipelineParts.whole_model_shapes) and load each stage's share.
Tied embeddings (model.tie_embeddings): the first stage owns `tok_embeddings.weight`, the last
stage holds a copy as its output projection (`output_embeddings` here; the looped layout puts
the two stages on pp ranks 0 and pp - 1, never on one rank). After each step's backward the two
copies' gradients are summed over a 2-rank group (pp rank 0 and pp - 1 of the same dp/cp/tp
coordinates; under FSDP2/TP both are sharded alike, so the local shards are summed); both then
take identical AdamW updates and stay bitwise equal. The grad norm counts the weight once (the
copy is left out of it), and checkpoints keep only `tok_embeddings.weight` and its optimizer
state, as at pp = 1: loading fills the copy from it (PipelineParts.tied_copy_names).
Not supported (ConfigError naming the field): data.decomposition (the schedule's shapes are
fixed at the first step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.config import ConfigError, StrataConfig
from engine.dist import DistContext
from engine.parallel import ParallelDims, parallelize_model

if TYPE_CHECKING:
    from models.context_parallel import SequenceShard

LossFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
ShardFor = Callable[[dict, torch.device], "SequenceShard"]


# -- the plan -----------------------------------------------------------------------------
def stages_per_rank(cfg: StrataConfig) -> int:
    if cfg.parallel.pp_schedule != "interleaved_1f1b":
        return 1
    return cfg.parallel.pp_stages_per_rank or 2


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Layer indices of each stage: contiguous, as even as possible, the extra ones first."""
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for stage in range(n_stages):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def rank_stages(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """Stages held by a pp rank: its own index, then every pp-th after it (the looped layout
    the interleaved schedule expects)."""
    return [pp_rank + k * pp for k in range(per_rank)]


def pipeline_microbatches(cfg: StrataConfig, dims: ParallelDims) -> int:
    """Micro-batches per step; checked against the rows a data-parallel rank reads and the schedule."""
    par = cfg.parallel
    rows = cfg.data.global_batch_size // dims.dp_size
    n = par.pp_microbatches or max(1, rows // cfg.data.micro_batch_size)
    if rows % n:
        raise ConfigError(
            f"parallel.pp_microbatches: {n} micro-batches do not split the {rows} rows each data-parallel rank "
            f"reads per step (data.global_batch_size {cfg.data.global_batch_size} / {dims.dp_size})"
        )
    what = "parallel.pp_microbatches" if par.pp_microbatches else "data.micro_batch_size"
    if par.pp_schedule == "1f1b" and n < dims.pp:
        raise ConfigError(f"{what}: the 1f1b schedule needs at least parallel.pp ({dims.pp}) micro-batches "
                          f"per step, got {n}; lower data.micro_batch_size or set parallel.pp_microbatches")  # fmt: skip
    if par.pp_schedule == "interleaved_1f1b" and n % dims.pp:
        raise ConfigError(f"{what}: the interleaved_1f1b schedule needs a multiple of parallel.pp ({dims.pp}) "
                          f"micro-batches per step, got {n}")  # fmt: skip
    return n


def check_pipeline(cfg: StrataConfig, dims: ParallelDims) -> str:
    """Raises ConfigError naming the fields when this config cannot run pipelined; else a
    one-line description of the split (strata doctor prints it)."""
    model, par = cfg.model, cfg.parallel
    if cfg.data.decomposition is not None:
        raise ConfigError("parallel.pp: data.decomposition changes the row length every step; the pipeline "
                          "schedule's shapes are fixed")  # fmt: skip
    n_stages = dims.pp * stages_per_rank(cfg)
    if model.n_layers < n_stages:
        raise ConfigError(f"model.n_layers ({model.n_layers}) is less than the pipeline stages "
                          f"(parallel.pp {dims.pp} x {stages_per_rank(cfg)} per rank = {n_stages})")  # fmt: skip
    n = pipeline_microbatches(cfg, dims)
    sizes = [len(layers) for layers in stage_layers(model.n_layers, n_stages)]
    rows = cfg.data.global_batch_size // dims.dp_size // n
    return f"{n_stages} stages of {sizes} layers, {par.pp_schedule}, {n} micro-batch(es) of {rows} rows per step"


# -- the modules --------------------------------------------------------------------------
class PipelineParts(nn.Module):
    """This rank's share of the model under the original names (`tok_embeddings` on the first
    stage's rank, `layers.{i}` of its stages, `norm`/`output` on the last stage's rank): what the
    optimizer, checkpoints and grad norm see. With tied embeddings the last stage's output
    projection is `output_embeddings`, a copy of `tok_embeddings` (no weight decay either: its
    name says embeddings). Calling it runs the whole pipeline forward-only (eval): logits on the
    ranks of the last stage, None on the others."""

    def __init__(self, pipeline: Pipeline, stages: dict[int, nn.Module]):
        super().__init__()
        self.cfg = pipeline.cfg.model
        self.tok_embeddings = stages[0].tok_embeddings if 0 in stages else None
        self.layers = nn.ModuleDict({k: v for s in sorted(stages) for k, v in stages[s].layers.items()})
        last = stages.get(pipeline.n_stages - 1)
        self.norm = last.norm if last is not None else None
        head = last.output if last is not None else None
        tied = self.cfg.tie_embeddings
        self.output, self.output_embeddings = (None, head) if tied else (head, None)
        self._pipeline = pipeline  # a plain attribute: not a submodule, so the names stay as they are

    def tied_copy_names(self) -> dict[str, str]:
        """Name of each copy of a tied weight on this rank -> the name checkpoints keep it under
        (its optimizer state too): the last stage's output projection reads `tok_embeddings.weight`."""
        return {"output_embeddings.weight": "tok_embeddings.weight"} if self.output_embeddings is not None else {}

    def whole_model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> global shape of every tensor of the whole (unsplit) model's state dict: what
        a checkpoint or HF directory must hold when this rank loads its share of it."""
        from models.spec import get_spec

        with torch.device("meta"):
            whole = get_spec(self.cfg.family).build(self.cfg)
        return {name: tuple(t.shape) for name, t in whole.state_dict().items()}

    def train(self, mode: bool = True) -> PipelineParts:
        super().train(mode)
        for stage in self._pipeline.modules.values():
            stage.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                shard: SequenceShard | None = None) -> torch.Tensor | None:  # fmt: skip
        return self._pipeline.forward(input_ids, position_ids, shard)


class Pipeline:
    """The stages this rank runs and the schedule over them."""

    def __init__(self, cfg: StrataConfig, ctx: DistContext, dims: ParallelDims, mesh, loss_fn: LossFn,
                 spec=None, shard_for: ShardFor | None = None) -> None:  # fmt: skip
        """`shard_for`: the context-parallel plan (engine.parallel.context_parallel_plan), None without CP."""
        from torch.distributed.pipelining import PipelineStage

        from models.spec import get_spec

        check_pipeline(cfg, dims)
        spec = spec or get_spec(cfg.model.family)
        self.cfg, self.ctx, self.loss_fn = cfg, ctx, loss_fn
        self.pp, self.pp_rank = dims.pp, dims.pp_rank(ctx.rank)
        # sequence parallelism: hidden states travel between stages sharded along the sequence
        self.sequence_shards = dims.tp if cfg.parallel.sequence_parallel else 1
        self.shard_for, self.cp, self._row_len, self._in_schedule = shard_for, dims.cp, 0, False
        self.group = mesh["pp"].get_group()
        per_rank = stages_per_rank(cfg)
        self.n_stages = dims.pp * per_rank
        self.n_microbatches = pipeline_microbatches(cfg, dims)
        self.modules = self._build_stages(spec, rank_stages(self.pp_rank, dims.pp, per_rank))
        for module in self.modules.values():
            parallelize_model(module, cfg.parallel, ctx, spec, mesh)  # TP, AC, compile, FSDP2 over this stage's dp ranks
            if shard_for is not None:
                module.register_forward_pre_hook(self._sequence_shard, with_kwargs=True)
        self.parts = PipelineParts(self, self.modules)
        # tied embeddings: this rank's copy (first or last stage; None in between) and its 2-rank group
        holder = self.parts.tok_embeddings if self.has_first else self.parts.output_embeddings
        self.tied_weight = holder.weight if holder is not None and cfg.model.tie_embeddings else None
        self.tie_group = self._tie_group(mesh) if cfg.model.tie_embeddings else None
        self.stages = [PipelineStage(module, s, self.n_stages, ctx.device, group=self.group)
                       for s, module in self.modules.items()]  # fmt: skip
        self.schedule = self._build_schedule()
        self._scale, self._z_coef, self._nll = 1.0, 0.0, []

    def _build_stages(self, spec, mine: list[int]) -> dict[int, nn.Module]:
        """Stage modules of this rank: the whole model is materialized and initialized exactly as
        at pp = 1 (same seed, same order: the same weights), then each stage takes its modules."""
        cfg, device = self.cfg, self.ctx.device
        with torch.device("meta"):
            whole = spec.build(cfg.model)
        whole.to_empty(device=device)
        torch.manual_seed(cfg.train.seed)
        whole.init_weights()
        split = stage_layers(cfg.model.n_layers, self.n_stages)
        stages = {}
        for s in mine:
            with torch.device("meta"):
                stage = spec.build(cfg.model)  # the family's forward; its modules are replaced
            stage.tok_embeddings = whole.tok_embeddings if s == 0 else None
            stage.layers = nn.ModuleDict({str(i): whole.layers[str(i)] for i in split[s]})
            last = s == self.n_stages - 1
            stage.norm = whole.norm if last else None
            stage.output = whole.output if last else None
            if last and cfg.model.tie_embeddings:  # the output projection: a copy of the embedding
                with torch.device("meta"):
                    stage.output = nn.Linear(cfg.model.dim, cfg.model.vocab_size, bias=False)
                stage.output.weight = nn.Parameter(whole.tok_embeddings.weight.detach().clone())
            for name in list(stage._buffers):  # e.g. Llama's RoPE tables
                stage._buffers[name] = whole._buffers[name]
            left = [name for name, t in (*stage.named_parameters(), *stage.named_buffers()) if t.is_meta]
            if left:
                raise RuntimeError(f"pipeline stage {s} kept meta tensors {left[:3]}: the family's modules changed")
            stages[s] = stage
        return stages

    def _build_schedule(self):
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        name = self.cfg.parallel.pp_schedule
        # scale_grads=False: the loss is already the summed NLL times the global scale
        if name == "interleaved_1f1b":
            return ScheduleInterleaved1F1B(self.stages, self.n_microbatches, loss_fn=self._loss, scale_grads=False)
        cls = Schedule1F1B if name == "1f1b" else ScheduleGPipe
        return cls(self.stages[0], self.n_microbatches, loss_fn=self._loss, scale_grads=False)

    def _tie_group(self, mesh) -> dist.ProcessGroup | None:
        """Every rank creates the 2-rank groups of pp rank 0 and pp rank pp - 1 at each dp/cp/tp
        coordinate (mesh columns); returns this rank's, None on the ranks in between."""
        ranks = mesh.mesh.reshape(self.pp, -1)
        pairs = torch.stack([ranks[0], ranks[-1]], dim=1).tolist()
        group, _ = dist.new_subgroups_by_enumeration(pairs)
        return group if self.tied_weight is not None else None

    def _sum_tied_grads(self) -> None:
        """Both copies of the tied embedding get the sum of their gradients (the input side's
        and the output projection's), as one weight used twice gets at pp = 1. FSDP2/TP shard
        both alike: summing the local shards sums the whole."""
        if self.tied_weight is None:
            return
        weight = self.tied_weight
        if weight.grad is None:  # no tokens reached it: it still takes part in the sum
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
        dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=self.tie_group)

    @property
    def counted_elsewhere(self) -> list[nn.Parameter]:
        """Parameters the grad norm leaves out: the last stage's copy of a tied embedding (the
        first stage counts it)."""
        return [self.parts.output_embeddings.weight] if self.parts.output_embeddings is not None else []

    @property
    def has_first(self) -> bool:
        return 0 in self.modules

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.modules

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, nll = self.loss_fn(logits, labels, self._z_coef)
        self._nll.append(nll.detach())
        return loss * self._scale

    def _sequence_shard(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of each stage under context parallelism: the SequenceShard of the
        micro-batch the schedule hands it, built from that micro-batch's full-row position_ids
        (`row_position_ids`, split into micro-batches with the rows), so shards always match
        micro-batches whatever parallel.pp_microbatches. Outside the schedule (eval) the caller's
        `shard=` is used as given (none: every CP rank runs whole rows, as downstream scoring does)."""
        rows = kwargs.pop("row_position_ids", None)
        if self._in_schedule and kwargs.get("shard") is None:
            full = rows if rows is not None else torch.empty((0, self._row_len), device="meta")
            kwargs["shard"] = self.shard_for({"input_ids": full, "position_ids": rows}, self.ctx.device)
        return args, kwargs

    def step(self, micro_batches: list[dict], scale: float, z_coef: float, documents: bool,
             autocast: torch.dtype | None, row_position_ids: list[torch.Tensor] | None = None) -> float:  # fmt: skip
        """Forward and backward of this rank's micro-batches through the schedule (gradients
        accumulate in the stages' parameters); returns this rank's summed NLL (0 before the last
        stage). The loss differentiated is `scale` x the summed NLL (+ z-loss), as without PP.
        Under context parallelism `micro_batches` hold this rank's slices of the rows and
        `row_position_ids` the full rows' position_ids (None: one document per row)."""
        device = self.ctx.device
        input_ids, labels = (torch.cat([mb[k] for mb in micro_batches]).to(device) for k in ("input_ids", "labels"))
        kwargs = {}
        if documents and micro_batches[0].get("position_ids") is not None:
            kwargs["position_ids"] = torch.cat([mb["position_ids"] for mb in micro_batches]).to(device)
        if self.shard_for is not None:
            self._row_len = input_ids.shape[1] * self.cp
            if documents and row_position_ids is not None and row_position_ids[0] is not None:
                kwargs["row_position_ids"] = torch.cat(row_position_ids).to(device)
        self._scale, self._z_coef, self._nll = scale, z_coef, []
        args = (input_ids,) if self.has_first else ()
        self._in_schedule = True
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None), self._loss_context():
            try:
                self.schedule.step(*args, target=labels if self.has_last else None, **kwargs)
            finally:
                self._in_schedule = False
        self._sum_tied_grads()
        # the schedule calls the loss once per micro-batch; at the first step torch may call it
        # before them on placeholder outputs (shape inference): those come first and are dropped
        real = self._nll[len(self._nll) - self.n_microbatches :] if self.has_last else []
        self._nll = []
        return sum(float(x.full_tensor() if hasattr(x, "full_tensor") else x) for x in real)

    def _loss_context(self):
        """loss_parallel() around the whole schedule (the loss and its backward run inside it)
        when the last stage's logits stay vocab-sharded; a no-op otherwise."""
        if not (self.has_last and self.cfg.parallel.loss_parallel):
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    # -- forward only (eval) --------------------------------------------------------------
    def _peer(self, stage: int) -> int:
        """Global rank of the pp peer holding `stage` (same dp/cp/tp coordinates as this rank)."""
        return dist.get_global_rank(self.group, stage % self.pp)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                shard: SequenceShard | None = None) -> torch.Tensor | None:  # fmt: skip
        """Logits on the last stage's ranks, None elsewhere; hidden states go stage to stage in
        float32 (exact for bf16 activations; FSDP2 casts them back to its compute dtype).
        `shard`: context parallel (input_ids/position_ids are this rank's slices of the rows)."""
        hidden = None
        b, t = input_ids.shape
        shape = (b, t // self.sequence_shards, self.cfg.model.dim)  # sequence parallel: this rank's part
        extra = {"shard": shard} if shard is not None else {}
        for s in sorted(self.modules):
            if s == 0:
                x = input_ids
            elif s - 1 in self.modules:
                x = hidden
            else:
                x = torch.empty(shape, dtype=torch.float32, device=input_ids.device)
                dist.recv(x, src=self._peer(s - 1), group=self.group)
            hidden = self.modules[s](x, position_ids, **extra)
            if s + 1 < self.n_stages and s + 1 not in self.modules:
                dist.send(hidden.float().contiguous(), dst=self._peer(s + 1), group=self.group)
        return hidden if self.has_last else None
