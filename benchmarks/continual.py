"""Continual pretraining on the built-in corpus: forgetting vs adaptation under four LR policies.

Two domains of the Python standard library (A: top-level modules/packages a-m, B: n-z; leading
underscores ignored), one byte-level BPE for both. A small Llama is pretrained on A with the
infinite schedule (warmup, cooldown to lr_const = 0.25 x peak, then constant; never annealed),
then continued on B from that one checkpoint with `strata resume` (optimizer kept, fresh sampler):
  (a) no rewarm: constant LR 0.1 x peak, below where the base was;
  (b) rewarm + cosine: warmup from the base's LR to the peak, cosine to 0.1 x peak (METHODS §6);
  (c) infinite: B at the base's constant LR; an anneal branch (`strata resume CKPT --anneal K`)
      forks K steps before the end and anneals to lr_min = 0.01 x peak, ending with the others (§5);
  (d) as (b) with 25% replay of A, A's sampler position continued (§7 recipe 3).
Loss on A-val (forgetting) and B-val (adaptation) is measured from every checkpoint afterwards.
Prints a table and writes benchmarks/results/continual.json; an experiment, it asserts nothing.

    .venv/bin/python benchmarks/continual.py [--pretrain-steps 2000] [--continue-steps 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from data_pipeline.builtin import split_train_val, stdlib_files, stdlib_root  # noqa: E402
from data_pipeline.formats import open_shardset  # noqa: E402
from data_pipeline.prepare import PrepareOptions, prepare  # noqa: E402
from data_pipeline.sources import InputSpec  # noqa: E402
from data_pipeline.tokenizer import train_byte_level_bpe  # noqa: E402
from engine.checkpoint import list_checkpoints  # noqa: E402
from engine.evaluate import evaluate_shardset  # noqa: E402
from engine.export import load_checkpoint_weights  # noqa: E402
from launch.cli import main as strata  # noqa: E402
from models.spec import get_spec  # noqa: E402

LR = 3e-3
FIRST_HALF = "abcdefghijklm"


def domain_of(relative: Path) -> str:
    """'A' for top-level names starting a-m (leading underscores ignored), else 'B'."""
    return "A" if relative.parts[0].lstrip("_")[:1].lower() in FIRST_HALF else "B"


def _texts(files: list[Path], max_bytes: int):
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        yield text
        if total >= max_bytes:
            return


def build_domains(work: Path, vocab: int) -> dict[str, Any]:
    """work/{A,B}/{train,val} ShardSets with one tokenizer (reused when already there)."""
    root = stdlib_root()
    by_domain: dict[str, list[Path]] = {"A": [], "B": []}
    for path in stdlib_files(root):
        by_domain[domain_of(path.relative_to(root))].append(path)
    splits = {d: split_train_val(files, root, val_fraction=0.05) for d, files in by_domain.items()}
    tokenizer = work / "tokenizer.json"
    if not tokenizer.is_file():
        interleaved = [f for pair in zip(splits["A"][0], splits["B"][0], strict=False) for f in pair]
        work.mkdir(parents=True, exist_ok=True)
        train_byte_level_bpe(_texts(interleaved, 4_000_000), vocab).save(str(tokenizer))
    info: dict[str, Any] = {"tokenizer": str(tokenizer)}
    for domain, (train, val) in splits.items():
        for split, files in (("train", train), ("val", val)):
            out = work / domain / split
            options = PrepareOptions(tokenizer=str(tokenizer), workers=2, shard_size="16MB", progress=False)
            manifest = prepare([InputSpec("text_files", f"stdlib_{domain}/{split}", tuple(files))], out, options)
            info[f"{domain}/{split}"] = {"files": len(files), **manifest["counts"]}
    return info


def config_tree(args: argparse.Namespace, work: Path, run: str, sources: list[dict], schedule: dict,
                steps: int, lr: float = LR) -> dict:  # fmt: skip
    return {
        "model": {"vocab_size": args.vocab, "dim": args.dim, "n_layers": args.layers, "n_heads": 4,
                  "max_seq_len": args.seq_len},  # fmt: skip
        "data": {"sources": sources, "seq_len": args.seq_len, "global_batch_size": args.batch,
                 "micro_batch_size": args.batch, "prefetch": 2},  # fmt: skip
        "optim": {"lr": lr},
        "schedule": schedule,
        "train": {"steps": steps, "run_dir": str(work / "runs" / run), "num_threads": args.threads},
        "checkpoint": {"every": args.ckpt_every, "keep_last": 10_000},
        "logging": {"log_every": 10, "tensorboard": False, "progress": False},
    }


def source(work: Path, domain: str, weight: float = 1.0) -> dict:
    return {"path": str(work / domain / "train"), "name": domain, "weight": weight}


def strata_quiet(argv: list[str], log: Path) -> float:
    """Runs a `strata` command in this process, its output into `log`; returns the wall time."""
    start = time.perf_counter()
    with log.open("w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        code = strata(argv)
    if code != 0:
        raise SystemExit(f"strata {' '.join(argv)} exited {code}; see {log}")
    return time.perf_counter() - start


def run_all(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Trains the base and the continual variants; returns {run: {"wall_s": seconds}}."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    configs = work / "configs"
    configs.mkdir(exist_ok=True)
    runs: dict[str, dict] = {}

    def write(name: str, tree: dict) -> str:
        path = configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return str(path)

    infinite = {"name": "infinite", "warmup_steps": 0.05, "cooldown_end": 0.3, "anneal_start": 1.0,
                "const_ratio": 0.25, "min_ratio": 0.01}  # fmt: skip
    tree = config_tree(args, work, "base", [source(work, "A")], infinite, args.pretrain_steps)
    runs["base"] = {"wall_s": strata_quiet(["train", write("base", tree)], logs / "base.log")}

    only_b = [source(work, "B")]
    rewarm = {"name": "rewarm", "start_lr": "current", "warmup_steps": 0.05, "min_lr_ratio": 0.1}
    constant_phase = {"name": "infinite", "warmup_steps": 0, "cooldown_end": 0, "anneal_start": 1.0,
                      "const_ratio": 0.25, "min_ratio": 0.01}  # fmt: skip
    variants = {  # name: (sources, schedule, peak LR, data policy)
        "a_constant_low": (only_b, {"name": "constant"}, 0.1 * LR, "new"),
        "b_rewarm_cosine": (only_b, rewarm, LR, "new"),
        "c_infinite": (only_b, constant_phase, LR, "new"),
        "d_rewarm_replay": ([source(work, "B", 0.75), source(work, "A", 0.25)], rewarm, LR, "continue"),
    }
    for name, (sources, schedule, lr, data) in variants.items():
        tree = config_tree(args, work, name, sources, schedule, args.continue_steps, lr)
        tree["continual"] = {"optimizer": "keep", "schedule": "restart", "data": data, "step": "continue"}
        argv = ["resume", str(work / "runs" / "base"), "--config", write(name, tree)]
        runs[name] = {"wall_s": strata_quiet(argv, logs / f"{name}.log")}

    branch_step = args.pretrain_steps + args.continue_steps - args.anneal_steps
    checkpoint = work / "runs" / "c_infinite" / "checkpoints" / f"step_{branch_step:08d}"
    argv = ["resume", str(checkpoint), "--anneal", str(args.anneal_steps),
            "--run-dir", str(work / "runs" / "c_infinite_anneal")]  # fmt: skip
    runs["c_infinite_anneal"] = {"wall_s": strata_quiet(argv, logs / "c_infinite_anneal.log")}
    return runs


@torch.no_grad()
def evaluate_run(run_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, list]:
    """Loss (nats/token) on A-val and B-val at every checkpoint of a run, oldest first."""
    val = {d: open_shardset(work / d / "val") for d in ("A", "B")}
    curve: dict[str, list] = {"step": [], "loss_A": [], "loss_B": []}
    model = None
    for step_dir in reversed(list_checkpoints(run_dir / "checkpoints")):
        state, model_cfg, _ = load_checkpoint_weights(step_dir)
        if model is None:
            with torch.device("meta"):
                model = get_spec(model_cfg.family).build(model_cfg)
            model.to_empty(device="cpu")
            model.init_weights()  # RoPE tables; parameters are overwritten below
        model.load_state_dict(state, strict=True)
        curve["step"].append(int(step_dir.name[5:]))
        for domain, shardset in val.items():
            result = evaluate_shardset(
                model, shardset, args.seq_len, 32, torch.device("cpu"), max_batches=-(-args.eval_seqs // 32)
            )
            curve[f"loss_{domain}"].append(result["val_loss"])
    return curve


def at_step(curve: dict, step: int, key: str) -> float | None:
    return curve[key][curve["step"].index(step)] if step in curve["step"] else None


def a_loss_at_b_loss(curve: dict, target: float, after: int) -> float | None:
    """A-val loss where B-val loss first reaches `target`, linear between checkpoints at or after
    step `after`; None if it never does."""
    points = [(a, b) for s, a, b in zip(curve["step"], curve["loss_A"], curve["loss_B"], strict=True) if s >= after]
    for i, (a1, b1) in enumerate(points):
        if b1 <= target:
            if i == 0:
                return a1
            a0, b0 = points[i - 1]
            return a0 + (b0 - target) / (b0 - b1) * (a1 - a0)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "data" / "continual_bench")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--continue-steps", type=int, default=1000)
    parser.add_argument("--anneal-steps", type=int, default=200)
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--eval-seqs", type=int, default=256, help="val sequences per domain per checkpoint")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on busy cores)")
    args = parser.parse_args()
    if args.continue_steps % args.ckpt_every or args.anneal_steps % args.ckpt_every:
        parser.error("--continue-steps and --anneal-steps must be multiples of --ckpt-every")
    torch.set_num_threads(args.threads)
    work = args.work
    for stale in ("runs", "logs"):
        if (work / stale).exists():
            import shutil

            shutil.rmtree(work / stale)
    t0 = time.perf_counter()
    data = build_domains(work, args.vocab)
    prepare_s = time.perf_counter() - t0
    runs = run_all(args, work)
    t1 = time.perf_counter()
    curves = {name: evaluate_run(work / "runs" / name, work, args) for name in runs}
    eval_s = time.perf_counter() - t1

    p0, end, every = args.pretrain_steps, args.pretrain_steps + args.continue_steps, args.ckpt_every
    base_a, base_b = at_step(curves["base"], p0, "loss_A"), at_step(curves["base"], p0, "loss_B")
    main_run, branch = curves["c_infinite"], curves["c_infinite_anneal"]
    shared = [i for i, s in enumerate(main_run["step"]) if s < branch["step"][0]]
    curves["c_infinite_anneal"] = {k: [main_run[k][i] for i in shared] + branch[k] for k in branch}
    variants = ["a_constant_low", "b_rewarm_cosine", "c_infinite", "c_infinite_anneal", "d_rewarm_replay"]
    target = max(at_step(curves[v], end, "loss_B") for v in variants)  # the worst final B: all reach it
    quarter = max(every, (args.continue_steps // 4) // every * every)
    marks = sorted({p0 + every, p0 + quarter, p0 + 2 * quarter, end} & set(range(p0 + every, end + 1, every)))
    rows = []
    for v in variants:
        curve = curves[v]
        rows.append({
            "variant": v,
            "loss_B": {s: at_step(curve, s, "loss_B") for s in marks},
            "loss_A_end": at_step(curve, end, "loss_A"),
            "forgetting_A": at_step(curve, end, "loss_A") - base_a,
            "peak_forgetting_A": max(a for s, a in zip(curve["step"], curve["loss_A"], strict=True) if s > p0) - base_a,
            "loss_A_at_equal_B": a_loss_at_b_loss(curve, target, p0),
        })  # fmt: skip

    print(f"\nbase after {p0} steps on A (infinite schedule, constant phase): A-val {base_a:.3f}, B-val {base_b:.3f}")
    head = " | ".join(f"B @+{s - p0}" for s in marks)
    print(f"\n| variant | {head} | A end | A end - A base | max A - A base | A when B first = {target:.3f} |")
    print("|---|" + "---:|" * (len(marks) + 4))
    for r in rows:
        bs = " | ".join(f"{r['loss_B'][s]:.3f}" for s in marks)
        at = f"{r['loss_A_at_equal_B']:.3f}" if r["loss_A_at_equal_B"] is not None else "-"
        print(f"| {r['variant']} | {bs} | {r['loss_A_end']:.3f} | {r['forgetting_A']:+.3f} | "
              f"{r['peak_forgetting_A']:+.3f} | {at} |")  # fmt: skip
    total = time.perf_counter() - t0
    print(f"\nwall: prepare {prepare_s:.0f} s, training {sum(r['wall_s'] for r in runs.values()):.0f} s, "
          f"eval {eval_s:.0f} s, total {total:.0f} s")  # fmt: skip

    out = REPO_ROOT / "benchmarks" / "results" / "continual.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()} torch {torch.__version__}",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": data,
        "runs": runs,
        "curves": curves,
        "base_loss": {"A": base_a, "B": base_b},
        "equal_B_target": target,
        "rows": [{**r, "loss_B": {str(k): v for k, v in r["loss_B"].items()}} for r in rows],
        "wall_s": {"prepare": prepare_s, "eval": eval_s, "total": total},
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
