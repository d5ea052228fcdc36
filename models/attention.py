"""Causal attention with optional document masking, one function over several backends.

Backends: flash-attn varlen (GPU, when installed), FlexAttention (GPU), and SDPA (anywhere;
a block-diagonal causal mask on CPU since FlexAttention has no CPU backward). Inputs are
[B, H, T, D] with K/V possibly holding fewer (grouped) heads. Under context parallelism a
rank's queries meet the whole gathered sequence (`sharded_causal_attention`).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from models.packing import block_causal_mask

if TYPE_CHECKING:
    from models.context_parallel import SequenceShard

log = logging.getLogger(__name__)


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except Exception:  # not installed or no CUDA build: fall back to SDPA/Flex
        return None


@functools.cache
def _flex_attention(cuda: bool):
    """FlexAttention, compiled on CUDA (eager FlexAttention is an unfused reference path there:
    slow and O(T^2) memory); eager elsewhere (the CPU forward used by tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if cuda else flex_attention


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal [+ same-document]) v, returned as [B, H, T, D].

    `position_ids` [B, T] marks document starts where it is 0; None means one causal sequence
    per row (the fastest path: SDPA picks flash/cuDNN kernels on GPU).
    """
    gqa = q.shape[1] != k.shape[1]
    if position_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if backend in ("auto", "flash") and q.is_cuda and _flash_attn_varlen() is not None:
        return _flash_varlen(q, k, v, position_ids)
    if backend == "flash":
        _warn_once("attn_backend=flash: flash-attn is not available here; using SDPA with a mask")
    if backend in ("auto", "flex") and q.is_cuda:
        return _flex(q, k, v, position_ids)
    if backend == "flex" and not q.is_cuda:
        _warn_once("attn_backend=flex has no CPU backward; using SDPA with a block-causal mask")
    mask = block_causal_mask(position_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _flash_varlen(q, k, v, position_ids):
    from models.packing import cu_seqlens_from_position_ids

    b, h, t, d = q.shape
    cu = cu_seqlens_from_position_ids(position_ids)
    max_len = int((cu[1:] - cu[:-1]).max())
    flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # [B*T, H, D]
    out = _flash_attn_varlen()(flat(q), flat(k), flat(v), cu, cu, max_len, max_len, causal=True)
    return out.reshape(b, t, h, d).transpose(1, 2)


def _flex(q, k, v, position_ids):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.cumsum((position_ids == 0).int(), dim=1)  # [B, T] document index per token

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    mask = create_block_mask(same_doc_causal, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    return _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sharded_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: SequenceShard, backend: str = "auto"
) -> torch.Tensor:
    """Context parallel: this rank's queries [B, H, T_local, D] against the whole sequence's
    keys/values [B, H_kv, T, D] (gathered), causal and per document by global position."""
    gqa = q.shape[1] != k.shape[1]
    if backend == "flash":
        _warn_once("attn_backend=flash: context parallelism uses FlexAttention/SDPA (flash-attn varlen cannot take the rank's zigzag queries)")
    if backend in ("auto", "flash", "flex") and q.is_cuda:
        return _flex_sharded(q, k, v, shard)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=shard.attention_bias(q.dtype), enable_gqa=gqa)


def _flex_sharded(q, k, v, shard):
    from torch.nn.attention.flex_attention import create_block_mask

    index, doc = shard.index, shard.doc_ids

    def visible(b, h, q_idx, kv_idx):
        position = index[q_idx]
        allowed = position >= kv_idx
        return allowed if doc is None else allowed & (doc[b, position] == doc[b, kv_idx])

    mask = shard.cache.get("flex_block_mask")
    if mask is None:  # once per micro-batch, not per layer
        batch = None if doc is None else q.shape[0]
        mask = create_block_mask(visible, batch, None, q.shape[2], k.shape[2], device=q.device)
        shard.cache["flex_block_mask"] = mask
    return _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
