"""Context parallelism: the tokens of one long sequence spread over the ranks of a CP group.

Owns the layout (which global positions a rank holds), the differentiable all-gather along the
sequence, softmax attention of a rank's queries against the whole gathered sequence (Llama 3's
all-gather CP: K/V are small next to Q under GQA) and GLA's recurrent-state hand-over between
ranks. Not the mesh (engine.parallel) nor which ranks form a group.

Written here because PyTorch's `context_parallel` (experimental) patches SDPA's flash /
efficient kernels only (no CPU, no document masks) and knows nothing of linear attention.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from models.packing import document_ids

Layout = Literal["zigzag", "contiguous"]


def local_positions(seq_len: int, size: int, rank: int, layout: Layout) -> torch.Tensor:
    """Global positions held by `rank`, increasing. zigzag (load-balanced causal attention):
    chunks r and 2*size-1-r of 2*size; contiguous (recurrent models): chunk r of size."""
    parts = 2 * size if layout == "zigzag" else size
    if seq_len % parts:
        raise ValueError(
            f"data.seq_len: {seq_len} tokens do not split into {parts} equal parts "
            f"(parallel.cp = {size}, {layout} layout)"
        )
    chunk = seq_len // parts
    chunks = [rank, parts - 1 - rank] if layout == "zigzag" else [rank]
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunks])


# torch >= 2.14 renames the single-tensor collectives (the old names warn); 2.11 has the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 forward, reduce-scatter (sum) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((grad.shape[0] // ctx.size, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None, None


@torch.compiler.disable  # kept out of compiled graphs: torch 2.11's dynamo got its backward wrong
def _gather_rank_major(x: torch.Tensor, group, size: int) -> torch.Tensor:
    return _GatherSequence.apply(x, group, size)


class SequenceShard:
    """This rank's share of the sequence dimension of a step's rows, and the means to rebuild it.

    Built per micro-batch from the full rows' position_ids (None = one document per row); the
    model receives the local slices (`take`) and this object.
    """

    def __init__(self, group, rank: int, size: int, seq_len: int, layout: Layout,
                 position_ids: torch.Tensor | None, device: torch.device):
        self.group, self.rank, self.size, self.seq_len, self.layout = group, rank, size, seq_len, layout
        self.index = local_positions(seq_len, size, rank, layout).to(device)
        everyone = torch.cat([local_positions(seq_len, size, r, layout) for r in range(size)])
        self.order = torch.argsort(everyone).to(device)  # gathered (rank-major) -> global order
        self.doc_ids = None if position_ids is None else document_ids(position_ids.to(device))
        self.cache: dict = {}  # per-step objects the attention backends build once (masks)

    def take(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's tokens of a [B, T, ...] tensor."""
        return None if x is None else x[:, self.index.to(x.device)]

    def positions(self, batch: int) -> torch.Tensor:
        """Global positions of the local tokens, [batch, T_local] (RoPE without documents)."""
        return self.index[None].expand(batch, -1)

    def gather_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """[size, *x.shape]: every rank's x, by rank; gradients flow back to their rank."""
        return _gather_rank_major(x[None], self.group, self.size)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence from every rank's local part along `dim`, in global order;
        gradients flow back to the rank that holds each token."""
        full = _gather_rank_major(x.movedim(dim, 0), self.group, self.size)
        return full.index_select(0, self.order).movedim(0, dim)

    def attention_mask(self) -> torch.Tensor:
        """Bool [B|1, 1, T_local, T]: local query i may see global key j (causal, same document)."""
        if "bool_mask" not in self.cache:
            keys = torch.arange(self.seq_len, device=self.index.device)
            mask = (self.index[:, None] >= keys[None, :])[None]
            if self.doc_ids is not None:
                mask = mask & (self.doc_ids[:, self.index, None] == self.doc_ids[:, None, :])
            self.cache["bool_mask"] = mask[:, None]
        return self.cache["bool_mask"]

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as SDPA's additive float bias (0 / -inf), built once per step: a bool mask
        would be converted, and the copy saved for backward, in every layer."""
        key = ("bias", dtype)
        if key not in self.cache:
            bias = torch.zeros(self.attention_mask().shape, dtype=dtype, device=self.index.device)
            self.cache[key] = bias.masked_fill_(~self.attention_mask(), float("-inf"))
        return self.cache[key]


def gla_carry_in(
    q: torch.Tensor,
    log_g: torch.Tensor,
    last_state: torch.Tensor,
    position_ids: torch.Tensor | None,
    scale: float,
    shard: SequenceShard,
) -> torch.Tensor:
    """What the state carried in from earlier ranks adds to this rank's GLA outputs.

    A rank's kernel runs from a zero state; its rows' final states `last_state` [B, H, K, V] and
    their total decays are gathered, the state entering this rank is scanned from them, and the
    tokens before the row's first document start read it through their cumulative gate:
    `o_t += scale * (q_t * exp(sum_{s<=t} log_g_s)) S_in`. q, log_g: [B, T_local, H, K].
    """
    compute = last_state.dtype
    log_g = log_g.to(compute)
    if position_ids is None:
        first_doc = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    else:  # tokens before the first document start of this rank's row slice
        first_doc = torch.cumsum((position_ids == 0).long(), dim=1) == 0
    passes = first_doc.all(dim=1)  # no document starts here: the carried state goes through
    decay = torch.exp(log_g.sum(dim=1)) * passes[:, None, None]  # [B, H, K]
    # one gather of (state, decay) that every rank uses, so every rank runs its backward
    gathered = shard.gather_ranks(torch.cat([last_state, decay[..., None]], dim=-1))
    states, decays = gathered[..., :-1], gathered[..., -1]  # [size, B, H, K, V], [size, B, H, K]
    weights = []  # rank j's state reaches this rank decayed by the ranks between
    for j in range(shard.size):
        weight = torch.full_like(decay, 1.0 if j < shard.rank else 0.0)
        for i in range(j + 1, shard.rank):
            weight = weight * decays[i]
        weights.append(weight)
    carry = (torch.stack(weights)[..., None] * states).sum(dim=0)  # entering this rank [B, H, K, V]
    gated_q = q.to(compute) * torch.exp(torch.cumsum(log_g, dim=1)) * first_doc[:, :, None, None]
    return scale * torch.einsum("bthk,bhkv->bthv", gated_q, carry)
