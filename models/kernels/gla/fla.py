"""Dispatch to flash-linear-attention's `chunk_gla` (the optional `gpu` extra).

Same layout and semantics as our backends; raises a clear error when fla is not installed.
Owns no arithmetic.
"""

from __future__ import annotations

import os

import torch


def fla_available() -> bool:
    try:
        from fla.ops.gla import chunk_gla  # noqa: F401
    except ImportError:
        return False
    return True


def gla_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        from fla.ops.gla import chunk_gla
    except ImportError as err:
        raise RuntimeError(
            "gla backend 'fla' needs flash-linear-attention (pip install 'strata[gpu]'); "
            "use backend 'triton' or 'torch' instead"
        ) from err
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "gla backend 'fla' runs on CUDA tensors (on CPU only under the Triton interpreter, "
            "TRITON_INTERPRET=1, for tests); use 'torch' on CPU"
        )
    return chunk_gla(
        q=q,
        k=k,
        v=v,
        g=log_g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )
