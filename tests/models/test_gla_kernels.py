"""GLA kernels on CPU: the chunked PyTorch path against the recurrent oracle, gradcheck, varlen."""

from __future__ import annotations

import pytest
import torch
from gla_cases import assert_close_to_oracle, make_inputs, run_with_grads

from models.kernels.gla import gla, gla_step, resolve_backend
from models.kernels.gla.fla import fla_available
from models.kernels.gla.torch_chunked import gla_torch_chunked

SHAPES = [
    # batch, seq_len (not a multiple of 64), heads, d_k, d_v
    (2, 77, 1, 8, 12),
    (1, 150, 4, 16, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_h0", [False, True])
def test_torch_chunked_matches_recurrent(dtype, shape, use_h0):
    inputs, h0 = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    oracle = run_with_grads("recurrent", inputs, h0, use_h0=use_h0)
    got = run_with_grads("torch", inputs, h0, use_h0=use_h0)
    assert_close_to_oracle(got, oracle, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [1, 4])
def test_torch_chunked_varlen_matches_recurrent(dtype, heads):
    cu_seqlens = torch.tensor([0, 9, 100, 164, 200], dtype=torch.int32)  # 4 documents, one of 91
    inputs, h0 = make_inputs(1, 200, heads, 12, 20, dtype=dtype, n_seqs=4, seed=heads)
    oracle = run_with_grads("recurrent", inputs, h0, cu_seqlens)
    got = run_with_grads("torch", inputs, h0, cu_seqlens)
    assert_close_to_oracle(got, oracle, dtype)


def test_packed_batch_equals_documents_alone():
    lengths = [30, 70, 1, 64]
    cu_seqlens = torch.tensor([0, 30, 100, 101, 165])
    (q, k, v, log_g), h0 = make_inputs(1, 165, 2, 8, 6, dtype=torch.float64, n_seqs=4)
    with torch.no_grad():
        o, state = gla(
            q, k, v, log_g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens
        )
        start = 0
        for n, length in enumerate(lengths):
            piece = slice(start, start + length)
            o_doc, s_doc = gla(
                q[:, piece], k[:, piece], v[:, piece], log_g[:, piece],
                initial_state=h0[n : n + 1], output_final_state=True,
            )  # fmt: skip
            torch.testing.assert_close(o[:, piece], o_doc, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(state[n : n + 1], s_doc, rtol=1e-12, atol=1e-12)
            start += length


@pytest.mark.parametrize("seq_len, fast", [(12, False), (70, True)])
def test_gradcheck_torch_chunked_fp64(seq_len, fast):
    """Full gradcheck on two short documents; fast (projected) gradcheck across two chunks."""
    (q, k, v, log_g), h0 = make_inputs(1, seq_len, 1, 2, 2, dtype=torch.float64, n_seqs=2)
    cu_seqlens = torch.tensor([0, 5, seq_len])

    def fn(q, k, v, log_g, h0):
        o, state = gla_torch_chunked(
            q, k, v, log_g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens
        )
        return o, state

    assert torch.autograd.gradcheck(fn, (q, k, v, log_g, h0), eps=1e-6, atol=1e-7, fast_mode=fast)


def test_step_matches_parallel_form():
    (q, k, v, log_g), h0 = make_inputs(2, 40, 2, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        o, final = gla(q, k, v, log_g, initial_state=h0, output_final_state=True)
        state = h0.clone()
        for t in range(40):
            o_t, state = gla_step(q[:, t], k[:, t], v[:, t], log_g[:, t], state, scale=4**-0.5)
            torch.testing.assert_close(o_t, o[:, t])
    torch.testing.assert_close(state, final)


def test_strong_decay_stays_finite():
    """Gates near zero (log_g ~ -30 per step) must not overflow the chunked form."""
    (q, k, v, log_g), _ = make_inputs(1, 128, 1, 4, 4, dtype=torch.float32)
    with torch.no_grad():
        log_g = log_g * 0 - 30.0
        o_ref, _ = gla(q, k, v, log_g, backend="recurrent")
        o, _ = gla(q, k, v, log_g, backend="torch")
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)


def test_backend_resolution_and_errors():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="gla_backend"):
        resolve_backend("cuda-magic", torch.device("cpu"))
    (q, k, v, log_g), _ = make_inputs(2, 10, 1, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch size must be 1"):
        gla(q, k, v, log_g, cu_seqlens=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match="initial_state"):
        gla(q, k, v, log_g, initial_state=torch.zeros(3, 1, 4, 4))
    if not fla_available():
        with pytest.raises(RuntimeError, match="flash-linear-attention"):
            gla(q, k, v, log_g, backend="fla")
