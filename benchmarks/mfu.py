"""MFU benchmark: tokens/s and model FLOPs utilization of Strata's training step on a preset.

Runs the engine's own `Trainer.train_step` (FSDP2 + compile + bf16 when on GPU, as configured)
on synthetic tokens so that data loading is out of the measurement. Launch under torchrun for
FSDP, e.g. on one GPU:
  torchrun --nproc_per_node 1 benchmarks/mfu.py --config configs/llama_1b.yaml
On CPU it runs a small model (`--set` to shrink) and reports tokens/s (no MFU without a peak).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SyntheticLoader, append_json  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.dist import init_distributed, shutdown  # noqa: E402
from engine.metrics import device_peak_flops  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/llama_1b.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compile, allocator)")
    parser.add_argument("--json", default="benchmarks/results/mfu.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            args.config,
            [*args.overrides, f"train.run_dir={tmp}", "data.cross_document_attention=true", "logging.tensorboard=false"],
        )
        ctx = init_distributed(cfg.train.device)
        n_micro = cfg.data.global_batch_size // ctx.world_size // cfg.data.micro_batch_size
        loader = SyntheticLoader(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.micro_batch_size, n_micro, ctx.device)
        trainer = Trainer(cfg, ctx, loader=loader)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        times = []
        for i in range(args.warmup + args.steps):
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.train_step(loader.next_step())
            trainer.step += 1
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_time = statistics.median(times)
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        tps_device = tokens_per_step / step_time / ctx.world_size
        peak = device_peak_flops(ctx.device, cfg.logging.peak_flops)
        flops_per_token = trainer.flops_per_token_at(cfg.data.seq_len)
        mfu = flops_per_token * tps_device / peak if peak else None
        result = {
            "config": args.config,
            "overrides": args.overrides,
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "world_size": ctx.world_size,
            "params": n_params,
            "seq_len": cfg.data.seq_len,
            "micro_batch": cfg.data.micro_batch_size,
            "global_batch": cfg.data.global_batch_size,
            "compile": cfg.parallel.compile,
            "activation_checkpointing": cfg.parallel.activation_checkpointing,
            "step_time_s": step_time,
            "tokens_per_s_per_device": tps_device,
            "flops_per_token": flops_per_token,
            "mfu": mfu,
            "peak_mem_gb": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None,
        }
        if ctx.is_main:
            print(f"{'config':<28}{'params':>10}{'seq':>6}{'mb':>4}{'tok/s/dev':>12}{'MFU':>8}{'mem GB':>8}")
            mfu_text = f"{100 * mfu:.1f}%" if mfu else "-"
            mem = f"{result['peak_mem_gb']:.1f}" if result["peak_mem_gb"] else "-"
            print(f"{Path(args.config).name:<28}{n_params / 1e6:>9.0f}M{cfg.data.seq_len:>6}{cfg.data.micro_batch_size:>4}"
                  f"{tps_device:>12,.0f}{mfu_text:>8}{mem:>8}")
            append_json(args.json, result)
        trainer.loader.close()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
