"""Training throughput: Strata's step vs a plain Hugging Face baseline of identical shape.

Baseline: `transformers` LlamaForCausalLM (SDPA attention) + torch AdamW, the same batch,
sequence, vocabulary and widths, plain loop (forward with labels, backward, step). Strata: the
engine's `Trainer.train_step` (fused AdamW, clipping, schedule). Both run in this process,
interleaved round by round, so machine noise hits both alike; the median step time counts.
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
from engine.dist import init_distributed  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def hf_baseline(cfg, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.hidden_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.optim.lr), betas=(0.9, 0.95), weight_decay=0.1)
    return model, optimizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=8, help="timed steps of each, interleaved")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--json", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*args.overrides, f"train.run_dir={tmp}", "data.cross_document_attention=true",
                                        "logging.tensorboard=false", "data.sources=[]", "data.val_path=null",
                                        "parallel.dp_replicate=1"])
        ctx = init_distributed(cfg.train.device)
        n_micro = cfg.data.global_batch_size // cfg.data.micro_batch_size
        loader = SyntheticLoader(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.micro_batch_size, n_micro, ctx.device)
        strata = Trainer(cfg, ctx, loader=loader)
        hf_model, hf_opt = hf_baseline(cfg, ctx.device)

        def strata_step():
            strata.train_step(loader.next_step())

        def hf_step():
            for mb in loader.next_step():
                out = hf_model(input_ids=mb["input_ids"], labels=mb["input_ids"])  # HF shifts internally
                (out.loss / n_micro).backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        times = {"strata": [], "hf": []}
        for i in range(args.rounds + 1):
            for name, fn in (("strata", strata_step), ("hf", hf_step)):
                t0 = time.perf_counter()
                fn()
                if i:  # round 0 is warm-up
                    times[name].append(time.perf_counter() - t0)
        tokens = cfg.data.global_batch_size * cfg.data.seq_len
        rate = {k: tokens / statistics.median(v) for k, v in times.items()}
        ratio = rate["strata"] / rate["hf"]
        n_params = sum(p.numel() for p in strata.model.parameters())
        print(f"{'impl':<10}{'tokens/s':>12}{'step s':>10}")
        for k in ("hf", "strata"):
            print(f"{k:<10}{rate[k]:>12,.0f}{statistics.median(times[k]):>10.3f}")
        print(f"ratio strata/hf: {ratio:.2f}x  ({n_params / 1e6:.1f}M params, batch {cfg.data.global_batch_size}x{cfg.data.seq_len}, "
              f"threads {torch.get_num_threads()})")
        append_json(args.json, {"config": args.config, "overrides": args.overrides, "threads": torch.get_num_threads(),
                                "tokens_per_s": rate, "ratio": ratio, "params": n_params, "rounds": args.rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
