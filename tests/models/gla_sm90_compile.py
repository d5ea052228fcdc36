"""Compiles the own GLA Triton kernels for Hopper (sm_90) without a GPU; prints JSON.

Run as a script (TRITON_INTERPRET must be unset): the host code of `triton_chunked` runs on
CPU tensors with kernel launches intercepted, and each launch is compiled ahead of time to a
cubin with the ptxas that ships in the Triton wheel; cuobjdump reports registers and spills.
Catches what the interpreter cannot: GPU-only type errors, register spills, shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def captured_launches(run_host) -> list[tuple[JITFunction, tuple, dict]]:
    """Every kernel launch `run_host()` makes, with its arguments, none executed."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    original, JITFunction.run = JITFunction.run, record
    try:
        run_host()
    finally:
        JITFunction.run = original
    return launches


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(fn.arg_names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    signature, constants = {}, {}
    for param, name in zip(fn.params, fn.arg_names, strict=True):
        value = bound[name]
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
        else:
            signature[name] = "i32" if isinstance(value, int) else "fp32"
    target = GPUTarget("cuda", 90, 32)
    kernel = triton.compile(ASTSource(fn, signature, constants), target=target, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        dump = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    usage = dict(
        item.split(":", 1) for line in dump.splitlines() if "REG:" in line for item in line.split()
    )
    return {
        "regs": int(usage["REG"]),
        "spill_bytes": int(usage["STACK"]),
        "shared": kernel.metadata.shared,
    }


def report(dtype: torch.dtype, heads: int, key_dim: int, val_dim: int, varlen: bool) -> dict:
    from models.kernels.gla import triton_chunked as tc

    seq_len = 300
    q, k, g = (torch.zeros(1, seq_len, heads, key_dim, dtype=dtype) for _ in range(3))
    v = torch.zeros(1, seq_len, heads, val_dim, dtype=dtype)
    cu = torch.tensor([0, 100, 130, seq_len], dtype=torch.int32) if varlen else None
    n_seqs = 3 if varlen else 1
    layout = tc._layout(cu, 1, seq_len, torch.device("cpu"))

    def run_host():
        o, h, ht, gc, attn = tc._forward(q, k, v, g, 0.1, None, layout, n_seqs)
        tc._backward(q, k, v, g, h, ht, gc, attn, v, ht, 0.1, layout, n_seqs, False)

    return {fn.__name__: compile_launch(fn, a, kw) for fn, a, kw in captured_launches(run_host)}


if __name__ == "__main__":
    cases = {
        "bf16 H=16 K=V=64": (torch.bfloat16, 16, 64, 64, False),
        "bf16 varlen H=4 K=256 V=512 (paper)": (torch.bfloat16, 4, 256, 512, True),
        "fp32 H=2 K=64 V=128": (torch.float32, 2, 64, 128, False),
    }
    print(json.dumps({name: report(*case) for name, case in cases.items()}, indent=1))
