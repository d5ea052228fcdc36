"""Dataset decomposition (METHODS.md §3) vs concat-and-chunk at equal tokens, side by side on CPU.

Arms (same model, optimizer, cosine schedule, seed, tokens per step and total tokens):
  baseline_masked  packed loader at data.seq_len, attention restarts at each document (default);
  baseline_concat  packed loader at data.seq_len, plain concat-and-chunk (the paper's baseline);
  dd_grow_p2       `strata decompose` buckets 2^min..2^max, Grow-P2 curriculum, `--cycles` cycles;
  dd_uniform       the same decomposition, Uniform odds.
Each arm is one `engine.entry.run_training` in this process. Train time is the trainer's own
step time (data wait included; model build, final eval and checkpoint excluded). Val loss and
bits per byte are measured afterwards from every arm's final checkpoint on the same packed val
sequences (data.seq_len, document-masked for all arms), next to the trainer's own end-of-run
eval. Prints a table and writes benchmarks/results/decomposition.json; asserts nothing.

    .venv/bin/python benchmarks/decomposition.py [--steps 64] [--arms baseline_masked,baseline_concat,dd_grow_p2,dd_uniform]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from data_pipeline.curriculum import CurriculumSampler  # noqa: E402
from data_pipeline.decompose import open_decomposition  # noqa: E402
from data_pipeline.formats import open_shardset  # noqa: E402
from data_pipeline.loader import eval_batches  # noqa: E402
from engine.entry import run_training  # noqa: E402
from engine.evaluate import evaluate, token_byte_lengths  # noqa: E402
from engine.export import build_model_from_checkpoint  # noqa: E402
from launch.cli import main as strata  # noqa: E402

ARMS = ("baseline_masked", "baseline_concat", "dd_grow_p2", "dd_uniform")
DEFAULT_ARMS = "baseline_masked,baseline_concat,dd_grow_p2"


def strata_quiet(argv: list[str], log: Path) -> None:
    """Runs a `strata` command in this process, its output into `log`."""
    with log.open("w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        code = strata(argv)
    if code != 0:
        raise SystemExit(f"strata {' '.join(argv)} exited {code}; see {log}")


def ensure_data(args: argparse.Namespace) -> Path:
    """The built-in corpus (reused when present) and its decomposition; returns the index dir."""
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.data / "train" / "manifest.json").is_file():
        strata_quiet(["prepare", "--builtin", "stdlib", "--out", str(args.data)], args.work / "prepare.log")
    index = args.work / f"decomp_{args.min_log2}_{args.max_log2}"
    if not (index / "manifest.json").is_file():
        argv = ["decompose", str(args.data / "train"), "--out", str(index), "--min-log2", str(args.min_log2),
                "--max-log2", str(args.max_log2), "--overwrite"]  # fmt: skip
        strata_quiet(argv, args.work / "decompose.log")
    return index


def config_tree(args: argparse.Namespace, arm: str, index: Path) -> dict:
    rows = args.tokens_per_step // args.seq_len
    data: dict = {"val_path": str(args.data / "val"), "seq_len": args.seq_len, "global_batch_size": rows,
                  "micro_batch_size": rows, "seed": args.seed, "prefetch": 2,
                  "cross_document_attention": arm == "baseline_concat"}  # fmt: skip
    if arm.startswith("dd_"):
        data["decomposition"] = {"path": str(index), "curriculum": arm[3:], "cycles": args.cycles,
                                 "tokens_per_step": args.tokens_per_step,
                                 "micro_batch_tokens": args.tokens_per_step}  # fmt: skip
    else:
        data["sources"] = [{"path": str(args.data / "train"), "name": "stdlib"}]
    return {
        "model": {"family": "llama", "vocab_size": 8192, "dim": args.dim, "n_layers": args.layers, "n_heads": 4,
                  "max_seq_len": args.seq_len, "qk_norm": True, "tie_embeddings": True},  # fmt: skip
        "data": data,
        "optim": {"lr": args.lr, "weight_decay": 0.1, "beta2": 0.95, "grad_clip": 1.0},
        "schedule": {"name": "cosine", "warmup_steps": args.warmup, "min_lr_ratio": 0.02},
        "train": {"steps": args.steps, "eval_every": 0, "run_dir": str(args.work / "runs" / arm),
                  "num_threads": args.threads, "seed": args.seed},  # fmt: skip
        "checkpoint": {"every": 0, "save_final": True},
        "logging": {"log_every": args.log_every, "tensorboard": False, "progress": False},
    }


def step_lengths(args: argparse.Namespace, arm: str, index: Path) -> list[int]:
    """The row length of every step of an arm (the curriculum's plan; data.seq_len for the baselines)."""
    if not arm.startswith("dd_"):
        return [args.seq_len] * args.steps
    sampler = CurriculumSampler(open_decomposition(index).decomposition, args.seed, args.tokens_per_step, args.cycles, arm[3:])
    return [1 << sampler.plan(step).log2_len for step in range(args.steps)]


def read_metrics(run_dir: Path, log_every: int) -> dict:
    """Summed step time and the per-record sequence lengths / losses from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "step_time_s" in r]
    return {
        "train_s": sum(r["step_time_s"] for r in steps) * log_every,  # step_time_s = window time / log_every
        "data_wait_s": sum(r["step_time_s"] * r["data_wait_frac"] for r in steps) * log_every,
        "curve": [{"step": r["step"], "loss": r["loss"], "seq_len": r.get("seq_len")} for r in steps],
    }


@torch.no_grad()
def uniform_eval(run_dir: Path, args: argparse.Namespace) -> dict:
    """Final-checkpoint val loss / bpb on the packed val set, document-masked, for every arm alike."""
    model, _, _ = build_model_from_checkpoint(run_dir)
    shardset = open_shardset(args.data / "val")
    token_bytes = token_byte_lengths(shardset.tokenizer_path or args.data / "tokenizer.json")
    batches = eval_batches(shardset, args.seq_len, args.tokens_per_step // args.seq_len, 10**12)
    return evaluate(model, batches, torch.device("cpu"), None, token_bytes, document_masking=True)


def run_arm(args: argparse.Namespace, arm: str, index: Path) -> dict:
    run_dir = args.work / "runs" / arm
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log = args.work / "logs" / f"{arm}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        result = run_training(config_tree(args, arm, index))
    wall = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"{arm}: training exited {result.exit_code}; see {log}")
    metrics = read_metrics(run_dir, args.log_every)
    lengths = step_lengths(args, arm, index)
    return {
        "wall_s": wall,
        "train_s": metrics["train_s"],
        "data_wait_s": metrics["data_wait_s"],
        "tokens": result.tokens_seen,
        "tokens_per_s": result.tokens_seen / metrics["train_s"],
        "final_train_loss": result.final_loss,
        "trainer_eval": result.val,
        "eval": uniform_eval(run_dir, args),
        "mean_seq_len": sum(lengths) / len(lengths),
        "steps_per_seq_len": {str(n): lengths.count(n) for n in sorted(set(lengths))},
        "curve": metrics["curve"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024, help="baseline sequence length = largest bucket")
    parser.add_argument("--tokens-per-step", type=int, default=4 * 1024)
    parser.add_argument("--min-log2", type=int, default=6)
    parser.add_argument("--max-log2", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--log-every", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription)")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "stdlib")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "data" / "decomposition_bench")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "decomposition.json")
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - set(ARMS)):
        parser.error(f"--arms: unknown {unknown}; choose from {ARMS}")
    if 1 << args.max_log2 != args.seq_len:
        parser.error("--seq-len must equal 2^--max-log2 (the baseline trains at the longest bucket)")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    index = ensure_data(args)
    decomposition = json.loads((index / "manifest.json").read_text())
    results = {}
    for arm in arms:
        results[arm] = run_arm(args, arm, index)
        r = results[arm]
        print(f"{arm}: train {r['train_s']:.1f} s, val loss {r['eval']['val_loss']:.4f}", flush=True)

    base = next((a for a in ("baseline_masked", "baseline_concat") if a in results), arms[0])
    print(f"\n{args.steps} steps x {args.tokens_per_step} tokens, dim {args.dim} x {args.layers} layers, "
          f"{args.threads} thread(s); ratios vs {base}")  # fmt: skip
    print("\n| arm | mean seq len | train s | tokens | tokens/s | time vs base | val loss | val bpb | trainer eval loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm, r in results.items():
        r["time_ratio"] = r["train_s"] / results[base]["train_s"]
        trainer_loss = (r["trainer_eval"] or {}).get("val_loss")
        print(f"| {arm} | {r['mean_seq_len']:.0f} | {r['train_s']:.1f} | {r['tokens']:,} | "
              f"{r['tokens_per_s']:,.0f} | {r['time_ratio']:.3f}x | {r['eval']['val_loss']:.4f} | "
              f"{r['eval'].get('val_bpb', float('nan')):.4f} | "
              f"{trainer_loss if trainer_loss is None else f'{trainer_loss:.4f}'} |")  # fmt: skip
    total = time.perf_counter() - t0
    print(f"\ntotal wall {total:.0f} s")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()} "
        f"torch {torch.__version__}",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "decomposition": {"buckets": decomposition["buckets"], "dropped": decomposition["dropped"]},
        "baseline": base,
        "arms": results,
        "total_wall_s": total,
    }
    args.json.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
