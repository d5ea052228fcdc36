"""The `fla` backend (flash-linear-attention's chunk_gla) against the recurrent oracle, on CPU.

fla's Triton kernels run under the interpreter (TRITON_INTERPRET=1, set by conftest before
anything imports triton). Its autotuner cannot time candidates without a GPU, so timing is
replaced by zeros and the first candidate runs. Skipped where fla is not installed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from gla_cases import assert_close_to_oracle, make_inputs, run_with_grads

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="fla not installed"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
        reason="needs a GPU or the Triton interpreter",
    ),
]


@pytest.fixture(autouse=True)
def untimed_autotuning(monkeypatch):
    import triton.runtime.autotuner as autotuner

    monkeypatch.setattr(
        autotuner.Autotuner,
        "do_bench",
        property(lambda self: lambda fn, quantiles: [0.0] * len(quantiles)),
    )


def test_fla_dense_with_initial_state():
    inputs, h0 = make_inputs(2, 80, 2, 16, 32, dtype=torch.float32, seed=7)
    oracle = run_with_grads("recurrent", inputs, h0)
    got = run_with_grads("fla", inputs, h0)
    assert_close_to_oracle(got, oracle, torch.float32)


def test_fla_varlen_three_documents():
    cu_seqlens = torch.tensor([0, 10, 90, 100], dtype=torch.int32)
    inputs, h0 = make_inputs(1, 100, 2, 16, 16, dtype=torch.float32, n_seqs=3, seed=8)
    oracle = run_with_grads("recurrent", inputs, h0, cu_seqlens)
    got = run_with_grads("fla", inputs, h0, cu_seqlens)
    assert_close_to_oracle(got, oracle, torch.float32)
