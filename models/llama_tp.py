"""Tensor-parallel plan of the Llama family (DTensor styles over a 1-D TP mesh).

Column-wise wq/wk/wv/w1/w3, row-wise wo/w2, vocab-sharded embedding and output projection;
optional sequence parallelism (norms and the residual stream sharded along the sequence) and
loss parallelism (logits stay vocab-sharded into the loss). Only the plan lives here: the mesh
and the order TP -> AC -> compile -> FSDP belong to engine/parallel.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def check_tp_shapes(cfg, tp: int) -> None:
    """Raises ValueError naming the field when the model cannot be split `tp` ways."""
    for field, value in (
        ("model.n_heads", cfg.n_heads),
        ("model.n_kv_heads", cfg.kv_heads),
        ("model.ffn_hidden", cfg.hidden_dim),
        ("model.vocab_size", cfg.vocab_size),
    ):
        if value % tp:
            raise ValueError(f"{field} ({value}) must be divisible by parallel.tp ({tp})")


def block_plan(sequence_parallel: bool, qk_norm: bool = False) -> dict:
    """Per-block styles. With sequence parallelism the block's input and output are the local
    sequence shard [b, t/tp, d]; attention and MLP all-gather it and reduce-scatter back.
    qk-norm weights act on head-sharded q/k [b, t, heads/tp, head_dim] (dim 2 sharded)."""
    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=residual),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=residual),
    }
    if qk_norm:  # per-head norms see only this rank's heads: their weight grads must be summed
        plan |= {
            "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        }
    if sequence_parallel:
        plan |= {
            "attention_norm": SequenceParallel(),
            "ffn_norm": SequenceParallel(),
            # attention(x, cos, sin, position_ids, shard): gather x's sequence, leave the rest alone
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None),
                use_local_output=True,
            ),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
        }
    return plan


def apply_llama_tp(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False, loss_parallel: bool = False
) -> None:
    """Shards `model` (a materialized models.llama.Llama) over `tp_mesh` in place.

    The output projection (`Llama.project`, tied or untied) multiplies the gathered final hidden
    state by a vocab-sharded weight, so logits come out vocab-sharded; the model's forward then
    returns plain full logits, except in training mode with `loss_parallel`, where it returns
    the vocab-sharded DTensor for `torch.distributed.tensor.parallel.loss_parallel()`.
    """
    check_tp_shapes(model.cfg, tp_mesh.size())
    if loss_parallel and model.cfg.z_loss:
        raise ValueError("parallel.loss_parallel: not supported with model.z_loss > 0 (z-loss needs full logits)")
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel, model.cfg.qk_norm))
    # a pipeline stage (engine.pipeline) lacks tok_embeddings before the first stage and
    # norm/output before the last: their parts of the plan are skipped
    first, last = model.tok_embeddings is not None, model.norm is not None
    top = {}
    if first:
        top["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1) if sequence_parallel else Replicate()
        )
    if last and sequence_parallel:
        top["norm"] = SequenceParallel()
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.output is not None:  # untied: Llama.project reads output.weight directly
        model.output.weight = nn.Parameter(distribute_tensor(model.output.weight, tp_mesh, [Shard(0)]))

    def gather_final_hidden(module, args, output: torch.Tensor) -> DTensor:
        if isinstance(output, DTensor):  # sequence parallel: all-gather the sequence
            return output.redistribute(tp_mesh, [Replicate()])
        return DTensor.from_local(output, tp_mesh, [Replicate()], run_check=False)

    def plain_logits(module, args, output):
        if isinstance(output, DTensor) and not (loss_parallel and module.training):
            return output.full_tensor()
        return output

    def fresh_embedding(module, args, output: torch.Tensor) -> torch.Tensor:
        # RowwiseParallel hands out `to_local()`, a view of the DTensor's local tensor; a
        # compiled block (AOTAutograd) given such a view as input sends its gradient past the
        # DTensor's backward (wrong grads / a crash). A fresh [b, t, d] tensor avoids that.
        return output.clone()

    if first:
        model.tok_embeddings.register_forward_hook(fresh_embedding)
    if last:  # a stage before the last returns its hidden states as they are (sequence-sharded under SP)
        model.norm.register_forward_hook(gather_final_hidden)
        model.register_forward_hook(plain_logits)
