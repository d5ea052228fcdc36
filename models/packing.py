"""Document boundaries of packed batches, as the attention backends and GLA kernels need them.

A packed row holds several documents; a document (segment) starts wherever position_ids == 0,
and every row start is a segment start too. This module turns position_ids into cu_seqlens
(varlen kernels) or a block-causal boolean mask (SDPA on CPU). It does not build batches.
"""

from __future__ import annotations

import torch


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: True where a segment starts (position id 0, or the first token of a row)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T], got shape {tuple(position_ids.shape)}")
    starts = position_ids == 0
    starts[:, 0] = True
    return starts


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Int64 [B, T]: index of the segment each token belongs to, counted from 0 within each row."""
    return torch.cumsum(segment_starts(position_ids).long(), dim=1) - 1


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment lengths over the flattened B*T tokens: int32 [n_segments + 1].

    cu[0] = 0, cu[-1] = B*T, and segment j covers flat tokens cu[j]:cu[j+1]; a segment never
    spans two rows. Lives on position_ids' device (flash-attn varlen wants it on the GPU).
    """
    starts = segment_starts(position_ids).reshape(-1)
    start_index = torch.nonzero(starts, as_tuple=False).reshape(-1)
    total = torch.tensor([starts.numel()], device=position_ids.device, dtype=start_index.dtype)
    return torch.cat([start_index, total]).to(torch.int32)


def last_segment_of_rows(cu_seqlens: torch.Tensor, rows: int, row_len: int) -> torch.Tensor:
    """Index (into the segments of cu_seqlens) of the segment ending each of `rows` rows."""
    ends = torch.arange(1, rows + 1, device=cu_seqlens.device, dtype=cu_seqlens.dtype) * row_len
    return torch.searchsorted(cu_seqlens[1:].contiguous(), ends)


def max_seqlen_from_cu_seqlens(cu_seqlens: torch.Tensor) -> int:
    """Length of the longest segment (the `max_seqlen` argument of varlen kernels)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, T], True = query t may attend to key s: s <= t and both in one segment.

    Pass as `attn_mask` to `F.scaled_dot_product_attention`; every query sees at least itself,
    so no row of the mask is empty (no NaNs).
    """
    doc = document_ids(position_ids)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    same_doc = doc[:, :, None] == doc[:, None, :]
    return (same_doc & causal)[:, None, :, :]
