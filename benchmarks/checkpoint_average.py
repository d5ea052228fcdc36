"""Checkpoint averaging (LAWA) vs the last checkpoint, at the end of a constant-LR phase.

The demo model (configs/demo.yaml) trains on the built-in stdlib corpus with a constant LR after
warmup, checkpointing every `--every` steps; then the last checkpoint and the averages of the
last K checkpoints (`strata average`'s engine.average) are scored on the same val set
(engine.evaluate.evaluate_shardset). Prints a table and appends JSON to
benchmarks/results/checkpoint_average.json. One process, CPU; quality, not speed.

  .venv/bin/python benchmarks/checkpoint_average.py [--steps 300] [--every 25] [--k 4 8]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import append_json  # noqa: E402
from data_pipeline.builtin import build_stdlib_corpus  # noqa: E402
from data_pipeline.formats import open_shardset  # noqa: E402
from engine.average import average_checkpoints, checkpoints_to_average  # noqa: E402
from engine.checkpoint import list_checkpoints  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.entry import run_training  # noqa: E402
from engine.evaluate import evaluate_shardset, token_byte_lengths  # noqa: E402
from engine.export import build_model_from_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "checkpoint_average_bench")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "stdlib", help="built-in corpus (built if missing)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25, help="steps between checkpoints")
    parser.add_argument("--lr", type=float, default=3e-3, help="the constant LR after warmup")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8], help="average the last K checkpoints")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "checkpoint_average.json")
    args = parser.parse_args()

    build_stdlib_corpus(args.data)
    shutil.rmtree(args.work, ignore_errors=True)
    run_dir = args.work / "run"
    keep = max(args.k) + 1
    overrides = [
        f"data.sources=[{{path: {args.data / 'train'}, name: stdlib}}]",
        f"data.val_path={args.data / 'val'}",
        "parallel.dp_replicate=1",
        f"train.steps={args.steps}",
        "train.eval_every=0",
        f"train.run_dir={run_dir}",
        f"optim.lr={args.lr}",
        "schedule={name: constant, warmup_steps: 30}",
        f"checkpoint.every={args.every}",
        f"checkpoint.keep_last={keep}",
        "logging.progress=false",
    ]
    start = time.perf_counter()
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    assert run_training(cfg).exit_code == 0
    train_s = time.perf_counter() - start

    val = open_shardset(args.data / "val")
    token_bytes = token_byte_lengths(val.tokenizer_path)

    def score(checkpoint: Path) -> dict:
        model, _, _ = build_model_from_checkpoint(checkpoint)
        return evaluate_shardset(model, val, cfg.data.seq_len, 16, torch.device("cpu"), None, token_bytes)

    last = list_checkpoints(run_dir / "checkpoints")[0]
    rows = [{"model": f"last checkpoint ({last.name})", "k": 1, **score(last)}]
    for k in args.k:
        steps = checkpoints_to_average([run_dir], k)
        out = average_checkpoints(steps, args.work / f"avg{k}")
        rows.append({"model": f"average of the last {k} ({steps[0].name}..{steps[-1].name})", "k": k, **score(out)})

    print(f"\n{'model':<52} {'val loss':>9} {'bits/byte':>10}")
    for row in rows:
        print(f"{row['model']:<52} {row['val_loss']:>9.4f} {row.get('val_bpb', float('nan')):>10.4f}")
    append_json(args.json, {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "steps": args.steps, "every": args.every, "lr": args.lr, "train_s": train_s, "rows": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
