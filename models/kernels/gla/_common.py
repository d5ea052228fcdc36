"""Argument checks and layout helpers shared by every GLA backend.

Owns the interface contract (fla layout): q, k, log_g [B, T, H, K], v [B, T, H, V], states
[N, H, K, V]; with `cu_seqlens` B must be 1 and N = number of sequences, else N = B.
Does no arithmetic of its own beyond reshaping and padding.
"""

from __future__ import annotations

import torch

CHUNK = 64
"""Chunk length of the chunkwise kernels (METHODS.md §9)."""
SUB_CHUNK = 16
"""Secondary chunk: diagonal sub-blocks are computed in log space."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for a given input dtype: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> int:
    """Validates shapes; returns N, the number of sequences (states)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or log_g.dim() != 4:
        raise ValueError("gla: q, k, v, log_g must be 4-D [B, T, H, D]")
    if k.shape != q.shape or log_g.shape != q.shape:
        raise ValueError(
            f"gla: q {tuple(q.shape)}, k {tuple(k.shape)}, log_g {tuple(log_g.shape)} must match"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gla: v {tuple(v.shape)} must share [B, T, H] with q {tuple(q.shape)}")
    batch, _, heads, key_dim = q.shape
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"gla: with cu_seqlens the batch size must be 1, got {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("gla: cu_seqlens must be 1-D [N + 1]")
        n_seqs = cu_seqlens.numel() - 1
    else:
        n_seqs = batch
    if initial_state is not None:
        expected = (n_seqs, heads, key_dim, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"gla: initial_state must be {expected}, got {tuple(initial_state.shape)}"
            )
    return n_seqs


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def seq_bounds(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, end) of every sequence over the flattened B*T tokens."""
    if cu_seqlens is None:
        return [(b * seq_len, (b + 1) * seq_len) for b in range(batch)]
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != seq_len or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"gla: cu_seqlens must rise from 0 to T={seq_len}, got {cu}")
    return list(zip(cu[:-1], cu[1:], strict=True))


def to_padded(x: torch.Tensor, bounds: list[tuple[int, int]], length: int) -> torch.Tensor:
    """Flattened tokens [1 or B, T, H, D] -> [N, length, H, D], sequence n zero-padded at its end."""
    flat = x.reshape(-1, *x.shape[2:])
    out = flat.new_zeros(len(bounds), length, *x.shape[2:])
    index, rows = _padded_index(bounds, length, x.device)
    return out.index_put((rows, index[1]), flat[index[0]])


def from_padded(x: torch.Tensor, bounds: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_padded`: [N, length, H, D] -> the flattened layout of `like` ([B, T, H, D])."""
    index, rows = _padded_index(bounds, x.shape[1], x.device)
    flat = x.new_zeros(like.shape[0] * like.shape[1], *x.shape[2:])
    flat = flat.index_put((index[0],), x[rows, index[1]])
    return flat.reshape(*like.shape[:2], *x.shape[2:])


def _padded_index(bounds: list[tuple[int, int]], length: int, device: torch.device):
    tokens, positions, rows = [], [], []
    for n, (start, end) in enumerate(bounds):
        tokens.append(torch.arange(start, end))
        positions.append(torch.arange(end - start))
        rows.append(torch.full((end - start,), n))
    token = torch.cat(tokens).to(device)
    position = torch.cat(positions).to(device)
    row = torch.cat(rows).to(device)
    return (token, position), row
