"""GLA kernel benchmark: correctness against the torch path, then side-by-side timings.

CPU: chunked (torch) vs recurrent time at T = 1k, 4k (forward, and forward + backward).
GPU: forward + backward time of own Triton vs fla `chunk_gla` vs SDPA-flash causal attention
of the same width, bf16, T = 1k .. 16k, medians of CUDA-event timings; correctness of triton
and fla against the torch path (fp32 on upcast inputs) on the same device. Prints a table and
writes JSON (benchmarks/results/gla_kernels.json, or --out). Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.kernels.gla import gla  # noqa: E402
from models.kernels.gla.fla import fla_available  # noqa: E402

# (name, batch, heads, d_k, d_v, sdpa heads, sdpa head dim): "A" is the brief's shape; "paper"
# is the GLA-1.3B layer (d = 2048, 4 heads, d_k = d/2, d_v = d) against Llama attention of the
# same width (16 heads of 128).
GPU_SHAPES = [
    ("A", 8, 16, 64, 64, 16, 64),
    ("paper", 8, 4, 256, 512, 16, 128),
]


def make_inputs(batch, seq_len, heads, key_dim, val_dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, key_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(batch, seq_len, heads, key_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(batch, seq_len, heads, val_dim, generator=gen, device=device, dtype=dtype)
    # The GLA gate: logsigmoid(.) / tau with tau = 16 (METHODS.md §9).
    logits = torch.randn(
        batch, seq_len, heads, key_dim, generator=gen, device=device, dtype=torch.float32
    )
    log_g = (F.logsigmoid(logits) / 16).to(dtype)
    return q, k, v, log_g


def fwd_bwd(backend, q, k, v, log_g, d_o, cu_seqlens=None):
    o, _ = gla(q, k, v, log_g, cu_seqlens=cu_seqlens, backend=backend)
    o.backward(d_o)
    return o


def rel_l2(actual, expected):
    return (
        (actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)
    ).item()


def check_against_torch(
    backend, dims, seq_len, device, cu_seqlens=None, dtype=torch.bfloat16, seed=1
):
    """Relative L2 error of o, dq, dk, dv, dlog_g vs the torch path run in fp32 on the same inputs."""
    batch, heads, key_dim, val_dim = dims
    base = make_inputs(batch, seq_len, heads, key_dim, val_dim, dtype, device, seed=seed)
    d_o = torch.randn(batch, seq_len, heads, val_dim, device=device, dtype=dtype)
    results = {}
    for name, run_dtype in ((backend, dtype), ("torch", torch.float32)):
        inputs = [x.detach().to(run_dtype).requires_grad_() for x in base]
        o = fwd_bwd(name, *inputs, d_o.to(run_dtype), cu_seqlens)
        results[name] = [o.detach()] + [x.grad for x in inputs]
    errors = {
        key: rel_l2(a, b)
        for key, a, b in zip(
            ("o", "dq", "dk", "dv", "dlog_g"), results[backend], results["torch"], strict=True
        )
    }
    errors["finite"] = all(bool(torch.isfinite(t).all()) for t in results[backend])
    return errors


def cuda_median_ms(fn, warmup=3, reps=15):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_median_s(fn, reps=3, warmup=True):
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gla_timer(backend, batch, seq_len, heads, key_dim, val_dim, device, backward=True):
    q, k, v, log_g = (
        x.requires_grad_(backward)
        for x in make_inputs(batch, seq_len, heads, key_dim, val_dim, torch.bfloat16, device)
    )
    d_o = torch.randn(batch, seq_len, heads, val_dim, device=device, dtype=torch.bfloat16)

    def step():
        for x in (q, k, v, log_g):
            x.grad = None
        o, _ = gla(q, k, v, log_g, backend=backend)
        if backward:
            o.backward(d_o)

    return step


def sdpa_timer(batch, seq_len, heads, head_dim, device, backward=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (
        torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=backward)
        for _ in range(3)
    )
    d_o = torch.randn(shape, device=device, dtype=torch.bfloat16)

    def step():
        for x in (q, k, v):
            x.grad = None
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            o.backward(d_o)

    return step


def run_cpu(args, report):
    torch.manual_seed(0)
    batch, heads, key_dim, val_dim = 1, 4, 32, 32
    rows = []
    for seq_len in (1024, 4096):
        row = {"T": seq_len}
        for mode in ("fwd", "fwd+bwd"):
            backward = mode == "fwd+bwd"
            for backend in ("torch", "recurrent"):
                q, k, v, log_g = make_inputs(
                    batch, seq_len, heads, key_dim, val_dim, torch.float32, "cpu"
                )
                for x in (q, k, v, log_g):
                    x.requires_grad_(backward)
                d_o = torch.randn(batch, seq_len, heads, val_dim)

                def step(backend=backend, q=q, k=k, v=v, log_g=log_g, d_o=d_o, backward=backward):
                    o, _ = gla(q, k, v, log_g, backend=backend)
                    if backward:
                        o.backward(d_o)

                grad_ctx = torch.enable_grad() if backward else torch.no_grad()
                slow = backend == "recurrent" and backward  # minutes per run at 4k: time it once
                with grad_ctx:
                    row[f"{backend} {mode} s"] = cpu_median_s(
                        step, reps=1 if slow else args.cpu_reps, warmup=not slow
                    )
            row[f"ratio {mode}"] = row[f"torch {mode} s"] / row[f"recurrent {mode} s"]
        rows.append(row)
        print(
            f"CPU T={seq_len:5d}  fwd: chunked {row['torch fwd s']:.3f}s recurrent {row['recurrent fwd s']:.3f}s"
            f" ratio {row['ratio fwd']:.3f} | fwd+bwd: chunked {row['torch fwd+bwd s']:.3f}s"
            f" recurrent {row['recurrent fwd+bwd s']:.3f}s ratio {row['ratio fwd+bwd']:.3f}",
            flush=True,
        )
    report["cpu"] = {
        "shape": dict(B=batch, H=heads, K=key_dim, V=val_dim, dtype="fp32"),
        "rows": rows,
    }


def run_gpu(args, report, save):
    """Per shape: correctness on this device, then timings (fla autotunes on its first calls)."""
    device = torch.device("cuda")
    have_fla = fla_available()
    report["gpu"] = {
        "device": torch.cuda.get_device_name(0),
        "fla": have_fla,
        "checks": [],
        "timings": [],
    }
    started = time.time()

    def log(kind, row):
        shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}
        print(f"[{time.time() - started:6.1f}s] {kind}", shown, flush=True)

    def check(**row):
        report["gpu"]["checks"].append(row)
        log("check", row)
        save()

    err = check_against_torch("triton", (2, 4, 64, 48), 300, device, dtype=torch.float32)
    check(shape="fp32 small", backend="triton", T=300, varlen=False, **err)
    for name, batch, heads, key_dim, val_dim, sdpa_heads, sdpa_dim in GPU_SHAPES:
        if name not in args.shapes:
            continue
        dims = (min(batch, 2), heads, key_dim, val_dim)
        for backend in ["triton"] + (["fla"] if have_fla else []):
            check(
                shape=name,
                backend=backend,
                T=1000,
                varlen=False,
                **check_against_torch(backend, dims, 1000, device),
            )
        # packed batch of 4 documents (B = 1, cu_seqlens); fla's varlen kernels would autotune anew
        cu = torch.tensor([0, 100, 1100, 1164, 3000], device=device, dtype=torch.int32)
        err = check_against_torch("triton", (1, *dims[1:]), 3000, device, cu_seqlens=cu)
        check(shape=name, backend="triton", T=3000, varlen=True, **err)

        for seq_len in args.seq_lens if name == "A" else args.paper_seq_lens:
            if time.time() - started > args.time_budget:
                print(f"time budget reached, skipping {name} T={seq_len}", flush=True)
                continue
            row = {"shape": name, "B": batch, "H": heads, "K": key_dim, "V": val_dim, "T": seq_len}
            backends = ["triton"] + (["fla"] if have_fla else [])
            for backend in backends:
                step = gla_timer(backend, batch, seq_len, heads, key_dim, val_dim, device)
                row[f"{backend} ms"] = cuda_median_ms(step, reps=args.reps)
                del step
                step = gla_timer(
                    backend, batch, seq_len, heads, key_dim, val_dim, device, backward=False
                )
                with torch.no_grad():
                    row[f"{backend} fwd ms"] = cuda_median_ms(step, reps=args.reps)
                del step
            step = sdpa_timer(batch, seq_len, sdpa_heads, sdpa_dim, device)
            row["sdpa_flash ms"] = cuda_median_ms(step, reps=args.reps)
            del step
            if have_fla:
                row["triton/fla"] = row["triton ms"] / row["fla ms"]
            row["triton/sdpa"] = row["triton ms"] / row["sdpa_flash ms"]
            report["gpu"]["timings"].append(row)
            torch.cuda.empty_cache()
            log("time", row)
            save()
        if name == "A" and args.profile:
            profile_kernels(report, save)


def profile_kernels(report, save, seq_len=4096):
    """Per-kernel CUDA time of one fwd+bwd (shape A) for triton and fla, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    _, batch, heads, key_dim, val_dim, *_ = GPU_SHAPES[0]
    backends = ["triton"] + (["fla"] if fla_available() else [])
    result = {}
    for backend in backends:
        step = gla_timer(backend, batch, seq_len, heads, key_dim, val_dim, torch.device("cuda"))
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        kernels = {}
        for event in prof.key_averages():
            cuda_us = getattr(event, "device_time_total", None) or getattr(
                event, "cuda_time_total", 0
            )
            if cuda_us:
                kernels[event.key[:80]] = round(cuda_us / 5 / 1000, 4)  # ms per step
        result[backend] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:14])
        print(f"kernels {backend} T={seq_len}:", json.dumps(result[backend], indent=1), flush=True)
    report["gpu"]["kernels_T4096_A"] = result
    save()


def sweep_launch(report, save, seq_lens=(4096, 16384)):
    """Own-kernel launch variants (warps, stages) on shape A: fwd+bwd ms per variant."""
    from models.kernels.gla import triton_chunked

    _, batch, heads, key_dim, val_dim, *_ = GPU_SHAPES[0]
    default = {kind: dict(opts) for kind, opts in triton_chunked.LAUNCH.items()}
    variants = [("default", {})]
    for kind, opts in default.items():
        other = 8 if opts["num_warps"] == 4 else 4
        variants.append((f"{kind} warps={other}", {kind: {**opts, "num_warps": other}}))
    variants += [("all stages=1", {k: {**o, "num_stages": 1} for k, o in default.items()})]
    variants += [("all stages=3", {k: {**o, "num_stages": 3} for k, o in default.items()})]
    rows = []
    for label, change in variants:
        triton_chunked.LAUNCH.update({k: dict(v) for k, v in default.items()})
        triton_chunked.LAUNCH.update(change)
        row = {"variant": label}
        for seq_len in seq_lens:
            step = gla_timer(
                "triton", batch, seq_len, heads, key_dim, val_dim, torch.device("cuda")
            )
            row[f"T={seq_len} ms"] = cuda_median_ms(step, reps=10)
        rows.append(row)
        print("sweep", row, flush=True)
    triton_chunked.LAUNCH.update(default)
    report["gpu"]["launch_sweep_A"] = rows
    save()


def print_gpu_table(report):
    gpu = report.get("gpu")
    if not gpu:
        return
    print(f"\nGPU: {gpu['device']} (fwd+bwd ms, median; bf16)")
    print(
        "| shape | T | triton | fla | sdpa-flash | triton/fla | triton/sdpa | triton fwd | fla fwd |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in gpu["timings"]:
        print(
            f"| {r['shape']} | {r['T']} | {r['triton ms']:.3f} | {r.get('fla ms', float('nan')):.3f} |"
            f" {r['sdpa_flash ms']:.3f} | {r.get('triton/fla', float('nan')):.2f} | {r['triton/sdpa']:.2f} |"
            f" {r['triton fwd ms']:.3f} | {r.get('fla fwd ms', float('nan')):.3f} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default="benchmarks/results/gla_kernels.json")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--paper-seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in GPU_SHAPES])
    parser.add_argument(
        "--reps", type=int, default=15, help="timed repetitions per GPU measurement"
    )
    parser.add_argument("--cpu-reps", type=int, default=3)
    parser.add_argument(
        "--time-budget", type=float, default=420.0, help="seconds for the GPU timings"
    )
    parser.add_argument("--profile", action="store_true", help="GPU: per-kernel times at T=4096")
    parser.add_argument("--sweep", action="store_true", help="GPU: own-kernel launch variants")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():  # one file holds both sections: keep the other device's results
        previous = json.loads(out.read_text())
        report = {**{k: v for k, v in previous.items() if k in ("cpu", "gpu")}, **report}
    section = "gpu" if device == "cuda" else "cpu"
    report[f"{section}_run"] = {
        k: report.pop(k) for k in ("date", "python", "torch", "command", "triton") if k in report
    }

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)

    if device == "cuda":
        run_gpu(args, report, save)
        if args.sweep:
            sweep_launch(report, save)
        print_gpu_table(report)
    else:
        run_cpu(args, report)
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
