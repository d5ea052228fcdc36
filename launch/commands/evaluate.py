"""`strata eval CKPT... [--data NAME=DIR ...] [--task NAME=FILE.jsonl ... [--num-fewshot K]]`: validation
loss and bits per byte of checkpoints, and accuracy on multiple-choice tasks (0- or k-shot).

Scores Strata checkpoints (the newest intact one of a run, or with `--all-checkpoints` every
committed one: a forgetting / learning curve) or Hugging Face directories on ShardSets packed
in document order (engine.evaluate.evaluate_shardset) and on task files (engine.downstream),
one process. By default a run is scored on what its config evaluated (data.val_path,
data.val_sets, train.eval_tasks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from launch.arguments import non_negative_int, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="validation loss / bits per byte of checkpoints on ShardSets",
        description="Score checkpoints (run dir, checkpoints dir, step dir, or a Hugging Face directory) on "
        "ShardSets: mean loss in nats/token, bits per byte, tokens scored.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="run / checkpoints / step dir, or HF dir")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="ShardSet to score on (repeatable); default: the run config's data.val_path and data.val_sets",
    )
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="[NAME=]FILE.jsonl",
        help='multiple-choice task to score, acc / acc_norm (repeatable); lines {"context": str, "choices": [str, ...], '
        '"label": int}, each choice written with its leading space; default: the run config\'s train.eval_tasks',
    )
    parser.add_argument(
        "--num-fewshot",
        type=non_negative_int,
        default=None,
        metavar="K",
        help="solved examples before each item of every task scored, drawn as lm-evaluation-harness does from the "
        "task file (never the item itself) or --fewshot-from; default: 0 for --task, train.eval_tasks' own otherwise",
    )
    parser.add_argument("--fewshot-from", default=None, metavar="FILE.jsonl",
                        help="task file of the same format the examples are drawn from (one task scored)")
    parser.add_argument("--fewshot-seed", type=int, default=None, metavar="N",
                        help="few-shot sampling seed (default 1234, lm-evaluation-harness's; or train.eval_tasks' own)")
    parser.add_argument("--all-checkpoints", action="store_true", help="every committed checkpoint of each run, oldest first")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the run's data.seq_len)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward (default 16)")
    parser.add_argument("--max-batches", type=non_negative_int, default=0, help="batches per set at most; 0 = the whole set (default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _named_sets(specs: list[str], flag: str = "--data", what: str = "DIR") -> dict[str, str]:
    """NAME -> path of `[NAME=]PATH` arguments (NAME defaults to the file or directory name)."""
    sets: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (Path(spec).stem if flag == "--task" else Path(spec).name, spec)
        if not name or not path:
            raise ValueError(f"{flag} {spec!r}: expected [NAME=]{what}")
        if name in sets:
            raise ValueError(f"{flag}: the name {name!r} is given twice (use NAME={what})")
        sets[name] = path
    return sets


def _with_fewshot(tasks: dict, args: argparse.Namespace) -> dict:
    """NAME -> EvalTaskConfig of `tasks` (paths or mappings) with the --num-fewshot, --fewshot-from
    and --fewshot-seed given; ValueError for --fewshot-from with other than one task."""
    from engine.config import as_eval_task

    if args.fewshot_from is not None and len(tasks) != 1:
        names = f" ({', '.join(tasks)})" if tasks else ""
        raise ValueError(f"--fewshot-from: one file for {len(tasks)} tasks{names}; score one task (--task), "
                         "or set fewshot_from per task in train.eval_tasks")  # fmt: skip
    given = {"num_fewshot": args.num_fewshot, "fewshot_from": args.fewshot_from, "seed": args.fewshot_seed}
    update = {key: value for key, value in given.items() if value is not None}
    return {name: as_eval_task(value).model_copy(update=update) for name, value in tasks.items()}


def _run_sets(run_dir: Path) -> tuple[dict[str, str], int | None, dict]:
    """The sets a run's config evaluates (val_path as 'val'), its data.seq_len and train.eval_tasks."""
    from engine.config import load_config

    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}, None, {}
    cfg = load_config(config)
    sets = ({"val": cfg.data.val_path} if cfg.data.val_path else {}) | dict(cfg.data.val_sets)
    return sets, cfg.data.seq_len, dict(cfg.train.eval_tasks)


def _targets(source: str, all_checkpoints: bool) -> list[tuple[str, Path, bool]]:
    """(label, path, is_hf) for each model to score from one CKPT argument."""
    from engine.checkpoint import list_checkpoints, resolve_checkpoint, verify

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such checkpoint, run or Hugging Face directory")
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        return [(path.name, path, True)]
    if not all_checkpoints:
        step_dir = resolve_checkpoint(path)
        return [(str(step_dir), step_dir, False)]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = [p for p in reversed(list_checkpoints(root)) if verify(p) is None]
    if not steps:
        raise FileNotFoundError(f"{source}: no intact checkpoint under {root}")
    return [(str(p), p, False) for p in steps]


def _check_shardset(what: str, path: str) -> None:
    """A local ShardSet path holds a manifest (remote scheme:// paths are left to the reader)."""
    from data_pipeline.manifest import MANIFEST_NAME

    if "://" not in path and not (Path(path) / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{what}: not a ShardSet (no {MANIFEST_NAME})")


def run(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline.formats import open_shardset
    from engine.config import ConfigError
    from engine.downstream import prepare_tasks, score_task
    from engine.evaluate import evaluate_shardset, token_byte_lengths
    from engine.export import build_model_from_checkpoint, build_model_from_hf, find_run_tokenizer
    from engine.metrics import format_duration

    if args.device == "cuda" and not torch.cuda.is_available():
        print("eval error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    autocast = torch.bfloat16 if device.type == "cuda" else None
    try:
        given = _named_sets(args.data)
        for name, data in given.items():  # a wrong path fails now, not after loading a model
            _check_shardset(f"--data {name}={data}", data)
        given_tasks = _named_sets(args.task, "--task", "FILE.jsonl")
        if given_tasks:
            given_tasks = _with_fewshot(given_tasks, args)
        targets = [t for source in args.checkpoints for t in _targets(source, args.all_checkpoints)]
    except (ValueError, FileNotFoundError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    rows, token_bytes, encoded_tasks, start = [], {}, {}, time.perf_counter()
    for label, path, is_hf in targets:
        if is_hf:
            model, model_cfg = build_model_from_hf(path, device)
            sets, seq_len, step, tasks = given, None, None, given_tasks
        else:
            model, model_cfg, run_dir = build_model_from_checkpoint(path, device)
            run_sets, seq_len, run_tasks = _run_sets(run_dir)
            sets, step = given or run_sets, int(path.name[5:])
            tasks = given_tasks
            if not tasks:
                try:
                    tasks = _with_fewshot(run_tasks, args)
                except ValueError as err:
                    print(f"eval error: {label}: {err}", file=sys.stderr)
                    return 2
        if not sets and not tasks:
            print(f"eval error: {label}: nothing to score: pass --data DIR or --task NAME=FILE.jsonl", file=sys.stderr)
            return 2
        specs = tuple((name, tuple(spec.model_dump().items())) for name, spec in tasks.items())
        key = (specs, str(path if is_hf else run_dir), model_cfg.max_seq_len)
        if tasks and key not in encoded_tasks:  # tokenized once per run (tokenizer) and context window
            try:
                task_tokenizer = (path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None) if is_hf \
                    else find_run_tokenizer(run_dir)  # fmt: skip
                field = "--task" if given_tasks else "train.eval_tasks"
                encoded_tasks[key] = prepare_tasks(tasks, task_tokenizer, model_cfg.max_seq_len, field)
            except ConfigError as err:
                print(f"eval error: {label}: {err}", file=sys.stderr)
                return 2
        seq_len = args.seq_len or seq_len or model_cfg.max_seq_len
        if seq_len > model_cfg.max_seq_len:
            print(f"eval error: --seq-len {seq_len} exceeds the model's max_seq_len ({model_cfg.max_seq_len})", file=sys.stderr)
            return 2
        results = {}
        for name, data in sets.items():
            try:
                _check_shardset(f"{label}: the run's val set {name!r}", data)
            except FileNotFoundError as err:
                print(f"eval error: {err}; pass --data DIR", file=sys.stderr)
                return 2
            shardset = open_shardset(data)
            tokenizer = shardset.tokenizer_path
            if tokenizer not in token_bytes:
                token_bytes[tokenizer] = token_byte_lengths(tokenizer) if tokenizer else None
            results[name] = evaluate_shardset(
                model, shardset, seq_len, args.batch_size, device, autocast, token_bytes[tokenizer],
                max_batches=args.max_batches,
            )  # fmt: skip
        task_results = {
            name: score_task(model, task, device, autocast, args.batch_size * seq_len) | {"num_fewshot": task.num_fewshot}
            for name, task in encoded_tasks.get(key, {}).items()
        }
        rows.append({"checkpoint": label, "step": step, "seq_len": seq_len, "results": results, "tasks": task_results})
        del model
        if len(targets) > 1:  # progress of a curve, on stderr so --json stays clean
            losses = ", ".join([f"{name} {r['val_loss']:.4f}" for name, r in results.items()]
                               + [f"{name} acc {r['acc']:.4f}" for name, r in task_results.items()])
            elapsed = time.perf_counter() - start
            eta = elapsed / len(rows) * (len(targets) - len(rows))
            print(f"[{len(rows)}/{len(targets)}] {label}: {losses} (ETA {format_duration(eta)})", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows)
    return 0


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(name for row in rows for name in row["results"]))
    task_names = list(dict.fromkeys(name for row in rows for name in row["tasks"]))
    titles = (["validation loss (nats/token) / bits per byte"] if names else []) + (["task acc / acc_norm"] if task_names else [])
    table = Table(title="; ".join(titles))
    table.add_column("checkpoint", overflow="fold")
    table.add_column("step", justify="right")
    shots = {name: r["num_fewshot"] for row in rows for name, r in row["tasks"].items() if r.get("num_fewshot")}
    for name in names + task_names:
        table.add_column(f"{name} ({shots[name]}-shot)" if name in shots else name, justify="right")
    for row in rows:
        cells = []
        for name in names:
            r = row["results"].get(name)
            bpb = f" / {r['val_bpb']:.4f}" if r and "val_bpb" in r else ""
            cells.append(f"{r['val_loss']:.4f}{bpb}" if r else "")
        for name in task_names:
            r = row["tasks"].get(name)
            cells.append(f"{r['acc']:.4f} / {r['acc_norm']:.4f}" if r else "")
        table.add_row(row["checkpoint"], "" if row["step"] is None else f"{row['step']:,}", *cells)
    Console().print(table)
    for name in task_names:  # the bad lines a task file had, as the trainer's eval says them
        r = next(row["tasks"][name] for row in rows if name in row["tasks"])
        if r.get("skipped"):
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(r["skipped"].items()))
            print(f"note: task {name}: {r['items']} items scored, {sum(r['skipped'].values())} skipped ({reasons})")
