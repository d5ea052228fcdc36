"""Step-by-step GLA: the test oracle and the decoding step (O(1) state per token).

`S_t = Diag(exp(log_g_t)) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t` (METHODS.md §9), one
token at a time in fp32 (fp64 for fp64 inputs). Autograd runs through it. Not fast: the
chunked backends are for training.
"""

from __future__ import annotations

import torch

from models.kernels.gla._common import (
    check_inputs,
    compute_dtype,
    default_scale,
    from_padded,
    seq_bounds,
    to_padded,
)


def gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k, log_g [N, H, K], v [N, H, V], state [N, H, K, V] -> (o [N, H, V], state)."""
    acc = state.dtype
    state = state * log_g.to(acc).exp()[..., None] + k.to(acc)[..., None] * v.to(acc)[..., None, :]
    out = scale * torch.einsum("nhk,nhkv->nhv", q.to(acc), state)
    return out, state


def gla_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_seqs = check_inputs(q, k, v, log_g, initial_state, cu_seqlens)
    scale = default_scale(q, scale)
    batch, seq_len, heads, key_dim = q.shape
    acc = compute_dtype(q.dtype)
    if cu_seqlens is not None:
        # Pad each sequence at its end: zero keys/values and log-gate 0 leave the state as is.
        bounds = seq_bounds(cu_seqlens, batch, seq_len)
        length = max((end - start for start, end in bounds), default=0)
        qs, ks, vs, gs = (to_padded(x, bounds, length) for x in (q, k, v, log_g))
    else:
        qs, ks, vs, gs = q, k, v, log_g
    state = q.new_zeros(n_seqs, heads, key_dim, v.shape[-1], dtype=acc)
    if initial_state is not None:
        state = state + initial_state.to(acc)
    outs = []
    for t in range(qs.shape[1]):
        out, state = gla_step(qs[:, t], ks[:, t], vs[:, t], gs[:, t], state, scale)
        outs.append(out)
    o = torch.stack(outs, dim=1) if outs else vs.new_zeros(vs.shape, dtype=acc)
    if cu_seqlens is not None:
        o = from_padded(o, bounds, v)
    return o.to(v.dtype), (state if output_final_state else None)
