"""`strata demo`: the main job end to end on the Python standard library's source.

Prepares the built-in corpus (resumable; reused when present), trains configs/demo.yaml,
evaluates, and prints a summary that compares the model's bits per byte with gzip -9. The demo
owns its run directory: a re-run moves the last one aside (<run_dir>.previous) and starts fresh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from launch.arguments import add_set_argument

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="prepare the built-in stdlib corpus, train a small Llama, report bits/byte vs gzip",
        description="Runs the whole Strata path on this machine: `prepare --builtin stdlib`, training of "
        "configs/demo.yaml, evaluation, and a summary (steps, tokens, train/val loss, bits per byte next to "
        "gzip -9 on the same val documents, tokens/s, output paths).",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: configs/demo.yaml)")
    p.add_argument("--data-dir", default="data/stdlib", help="where the built-in corpus is prepared")
    add_set_argument(p)
    p.add_argument("--launcher", choices=["inprocess", "ray"], default="inprocess",
                   help="run training in this process or through the embedded local Ray cluster")
    p.add_argument("--workers", type=int, default=2, help="Ray training workers (with --launcher ray)")
    p.set_defaults(func=run)


def prepare_corpus(data_dir: Path) -> None:
    from data_pipeline.builtin import build_stdlib_corpus

    build_stdlib_corpus(data_dir)


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Renames an existing `run_dir` to its sibling `<name>.previous` (replacing an older one)
    and returns that path; None when there is no previous run. The rename is atomic; a crash
    mid-way leaves `run_dir` as it was."""
    if not os.path.lexists(run_dir):
        return None
    previous = run_dir.with_name(f"{run_dir.name}.previous")
    trash = None
    if os.path.lexists(previous):  # a directory cannot be renamed over a non-empty one
        trash = previous.with_name(f"{previous.name}.deleting-{os.getpid()}")
        os.replace(previous, trash)
    os.replace(run_dir, previous)
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash)
        else:
            trash.unlink()
    return previous


def val_texts(val_path: Path) -> list[str]:
    from data_pipeline.formats import open_shardset
    from data_pipeline.tokenizer import load_tokenizer

    shardset = open_shardset(val_path)
    tokenizer = load_tokenizer(shardset.tokenizer_path or val_path.parent / "tokenizer.json")
    texts = []
    for doc_id in range(len(shardset)):
        ids = shardset.get(doc_id).tolist()
        if ids and ids[-1] == shardset.eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


def run(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.evaluate import gzip_bits_per_byte

    start = time.perf_counter()
    data_dir = Path(args.data_dir)
    prepare_corpus(data_dir)
    replicas = 1 if args.launcher == "inprocess" else args.workers  # the demo model is replicated, not sharded
    overrides = [
        f"data.sources=[{{path: {data_dir / 'train'}, name: stdlib}}]",
        f"data.val_path={data_dir / 'val'}",
        f"parallel.dp_replicate={replicas}",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    run_dir = Path(cfg.train.run_dir)
    previous = set_aside_previous_run(run_dir)
    if previous is not None:  # else it would train over the last demo, appending to its metrics.jsonl
        print(f"demo: moved the previous demo run {run_dir} to {previous}; training from scratch", flush=True)
    if args.launcher == "ray":
        from launch.ray_launcher import submit_ray

        code = submit_ray(cfg, num_workers=args.workers)
        if code != 0:
            return code
        import json

        summary = json.loads((Path(cfg.train.run_dir) / "summary.json").read_text())
    else:
        from engine.entry import run_training

        result = run_training(cfg)
        if result.exit_code != 0:
            return result.exit_code
        summary = result.__dict__
    gzip_bpb = gzip_bits_per_byte(val_texts(data_dir / "val"))
    print_summary(cfg, summary, gzip_bpb, time.perf_counter() - start)
    return 0


def print_summary(cfg, summary: dict, gzip_bpb: float, elapsed: float) -> None:
    val = summary.get("val") or {}
    run_dir = Path(cfg.train.run_dir)
    lines = [
        "",
        "== Strata demo summary ==",
        f"steps            {summary['step']}",
        f"tokens trained   {summary['tokens_seen']:,}",
        f"final train loss {summary['final_loss']:.4f} nats/token",
    ]
    if val:
        lines.append(f"val loss         {val['val_loss']:.4f} nats/token over {val['val_tokens']:,} tokens")
    if "val_bpb" in val:
        verdict = "beats" if val["val_bpb"] < gzip_bpb else "does NOT beat"
        lines.append(f"val bits/byte    {val['val_bpb']:.3f}  (gzip -9 per document: {gzip_bpb:.3f}; the model {verdict} gzip)")
    lines += [
        f"throughput       {summary['tokens_per_s']:,.0f} tokens/s",
        f"wall time        {elapsed / 60:.1f} min",
        f"outputs          {run_dir}/ (config.yaml, metrics.jsonl, tb/, report.png, checkpoints/)",
        f"look at it       strata report {run_dir}  (table + {run_dir}/report.png)",
    ]
    print("\n".join(lines), flush=True)
