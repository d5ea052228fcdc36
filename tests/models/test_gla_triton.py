"""Own Triton GLA kernels (forward + backward) against the recurrent oracle, on CPU.

Runs under the Triton interpreter (TRITON_INTERPRET=1, set here before the kernels are
imported); shapes are tiny because the interpreter is slow.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gla_cases import assert_close_to_oracle, make_inputs, rel_err, run_with_grads  # noqa: E402

from models.kernels.gla import gla  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    """(Re)import the kernels so that they are built for the interpreter."""
    name = "models.kernels.gla.triton_chunked"
    if name in sys.modules:
        importlib.reload(sys.modules[name])
    else:
        importlib.import_module(name)
    yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_dense_with_initial_state(dtype):
    # T = 80: one full chunk + a partial one; d_k != d_v
    inputs, h0 = make_inputs(2, 80, 1, 12, 20, dtype=dtype, seed=1)
    oracle = run_with_grads("recurrent", inputs, h0)
    got = run_with_grads("triton", inputs, h0)
    assert_close_to_oracle(got, oracle, dtype)


def test_triton_varlen_four_heads_no_initial_state():
    cu_seqlens = torch.tensor([0, 10, 90, 100], dtype=torch.int32)  # 3 documents
    inputs, h0 = make_inputs(1, 100, 4, 8, 16, dtype=torch.float32, n_seqs=3, seed=2)
    oracle = run_with_grads("recurrent", inputs, h0, cu_seqlens, use_h0=False)
    got = run_with_grads("triton", inputs, h0, cu_seqlens, use_h0=False)
    assert_close_to_oracle(got, oracle, torch.float32)


def test_triton_wide_keys_split_blocks_varlen():
    """d_k = 80 > one 64-wide key block: the separate dv kernel and the key-block loops."""
    cu_seqlens = torch.tensor([0, 70, 75, 90], dtype=torch.int32)
    inputs, h0 = make_inputs(1, 90, 1, 80, 8, dtype=torch.float64, n_seqs=3, seed=3)
    oracle = run_with_grads("recurrent", inputs, h0, cu_seqlens)
    got = run_with_grads("triton", inputs, h0, cu_seqlens)
    assert_close_to_oracle(got, oracle, torch.float64)


def test_triton_wide_values_loop_over_value_tiles():
    """d_v = 96 > 64: every kernel's value-block loop, dq/dk/dg over 32-wide value tiles."""
    cu_seqlens = torch.tensor([0, 40, 70], dtype=torch.int32)
    inputs, h0 = make_inputs(1, 70, 1, 16, 96, dtype=torch.float64, n_seqs=2, seed=5)
    oracle = run_with_grads("recurrent", inputs, h0, cu_seqlens)
    got = run_with_grads("triton", inputs, h0, cu_seqlens)
    assert_close_to_oracle(got, oracle, torch.float64)


def test_triton_output_only_loss_three_chunks():
    """No final-state gradient (dht is None); T = 150 spans three chunks and a partial sub-block."""
    (q, k, v, log_g), _ = make_inputs(2, 150, 2, 16, 24, dtype=torch.float64, seed=4)
    grads = {}
    for backend in ("recurrent", "triton"):
        o, state = gla(q, k, v, log_g, backend=backend)
        assert state is None
        weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=o.dtype)
        grads[backend] = [o.detach(), *torch.autograd.grad((o * weight).sum(), (q, k, v, log_g))]
    for name, got, want in zip(
        ["o", "dq", "dk", "dv", "dlog_g"], grads["triton"], grads["recurrent"], strict=True
    ):
        err = rel_err(got, want)
        assert err < 1e-10, f"{name}: relative error {err:.3g}"


def test_triton_backend_compiles_into_one_graph():
    """The kernels are opaque custom ops: torch.compile(fullgraph=True) traces a layer around
    them (varlen, initial state, both outputs used) and matches eager values and gradients."""
    cu_seqlens = torch.tensor([0, 30, 100], dtype=torch.int32)
    (q, k, v, log_g), h0 = make_inputs(1, 100, 2, 16, 8, dtype=torch.float32, n_seqs=2, seed=9)

    def layer(q, k, v, log_g, h0):
        o, state = gla(
            q.tanh(), k, v, log_g, initial_state=h0, output_final_state=True,
            cu_seqlens=cu_seqlens, backend="triton",
        )  # fmt: skip
        return (o * o).sum() + state.square().sum()

    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        loss = fn(q, k, v, log_g, h0)
        results.append([loss.detach(), *torch.autograd.grad(loss, (q, k, v, log_g, h0))])
    for got, want in zip(results[1], results[0], strict=True):
        assert rel_err(got, want) < 1e-5


def test_gla_blocks_compile_whole_with_the_triton_backend():
    """Per-block torch.compile (as engine.parallel applies it) with fullgraph=True on a packed
    batch: no graph break around the kernels, logits and gradients equal eager."""
    from models.config import ModelConfig
    from models.spec import get_spec

    cfg = ModelConfig(
        family="gla", vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=128,
        gla_backend="triton",
    )  # fmt: skip
    with torch.device("meta"):
        model = get_spec("gla").build(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    ids = torch.randint(0, 64, (1, 90), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(40), torch.arange(50)])[None]
    eager_logits = model(ids, position_ids)
    eager_grads = torch.autograd.grad(eager_logits.square().mean(), list(model.parameters()))
    for name, block in list(model.layers.named_children()):
        model.layers[name] = torch.compile(block, fullgraph=True)
    logits = model(ids, position_ids)
    grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
    assert rel_err(logits.detach(), eager_logits.detach()) < 1e-5
    for got, want in zip(grads, eager_grads, strict=True):
        assert rel_err(got, want) < 1e-4
