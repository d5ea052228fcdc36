"""Shared GLA test inputs and the comparison helper (imported by the GLA kernel tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.kernels.gla import gla


def make_inputs(
    batch, seq_len, heads, key_dim, val_dim, dtype, n_seqs=None, seed=0, gate_scale=0.5
):
    """q, k, v, log_g (requires grad) and an initial state for n_seqs (default batch) sequences."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, key_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seq_len, heads, key_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seq_len, heads, val_dim, generator=gen, dtype=dtype)
    log_g = (
        F.logsigmoid(torch.randn(batch, seq_len, heads, key_dim, generator=gen, dtype=dtype))
        * gate_scale
    )
    h0 = torch.randn(n_seqs or batch, heads, key_dim, val_dim, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, log_g)], h0.requires_grad_()


def run_with_grads(backend, inputs, h0, cu_seqlens=None, use_h0=True):
    """Output, final state and the gradients of a fixed random projection of both."""
    q, k, v, log_g = inputs
    o, state = gla(
        q, k, v, log_g,
        initial_state=h0 if use_h0 else None,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(123)
    d_o = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    d_state = torch.randn(state.shape, generator=gen, dtype=state.dtype)
    wrt = [q, k, v, log_g] + ([h0] if use_h0 else [])
    grads = torch.autograd.grad((o * d_o).sum() + (state * d_state).sum(), wrt)
    return [o.detach(), state.detach(), *grads]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.to(expected.dtype) - expected).abs().max() / scale).item()


NAMES = ["o", "final_state", "dq", "dk", "dv", "dlog_g", "dh0"]


def assert_close_to_oracle(results, oracle, dtype):
    value_tol = 1e-10 if dtype == torch.float64 else 1e-5
    grad_tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, got, want in zip(NAMES, results, oracle, strict=False):
        tol = value_tol if name in ("o", "final_state") else grad_tol
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.3g} > {tol:g}"
