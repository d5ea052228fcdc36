"""Gated Linear Attention kernels behind one function, `gla(...)` (METHODS.md §9).

Backends: `torch` (chunkwise PyTorch, reference + CPU path), `triton` (own fused chunkwise
Triton kernels), `fla` (flash-linear-attention's chunk_gla), `recurrent` (step by step, the
oracle); `auto` = triton on CUDA, torch on CPU. Layout follows fla: q, k, log_g [B, T, H, K],
v [B, T, H, V], states [N, H, K, V] fp32; with cu_seqlens, B = 1 and N = number of sequences.
"""

from __future__ import annotations

import torch

from models.kernels.gla.recurrent import gla_recurrent, gla_step
from models.kernels.gla.torch_chunked import gla_torch_chunked

BACKENDS = ("auto", "torch", "triton", "fla", "recurrent")

__all__ = ["BACKENDS", "gla", "gla_step", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> `triton` on CUDA, `torch` elsewhere; other names pass through after a check."""
    if backend not in BACKENDS:
        raise ValueError(
            f"model.gla_backend: unknown GLA backend {backend!r} (choose from {BACKENDS})"
        )
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention over [B, T, H, *] inputs; returns (o [B, T, H, V], final_state | None).

    `S_t = Diag(exp(log_g_t)) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`; scale defaults to
    K^-0.5. `log_g` is the log forget gate (<= 0). The state restarts (at `initial_state[n]`, or
    zero) at every sequence of `cu_seqlens`. o has v's dtype; the final state is fp32 (fp64 for
    fp64 inputs).
    """
    name = resolve_backend(backend, q.device)
    if name == "torch":
        fn = gla_torch_chunked
    elif name == "recurrent":
        fn = gla_recurrent
    elif name == "triton":
        from models.kernels.gla.triton_chunked import gla_triton_chunked as fn
    else:
        from models.kernels.gla.fla import gla_fla as fn
    return fn(q, k, v, log_g, scale, initial_state, output_final_state, cu_seqlens)
