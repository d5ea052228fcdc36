"""`strata export CKPT --hf OUT`: writes a Hugging Face model directory from a Strata checkpoint.

Output: safetensors (sharded + model.safetensors.index.json above --max-shard-size),
config.json (LlamaForCausalLM, or Qwen3ForCausalLM for qk_norm models), generation_config.json
and the run's tokenizer. The conversion itself lives in engine/export.py.
"""

from __future__ import annotations

import argparse
import re
import sys

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # engine.export.DTYPES' keys, without importing torch

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"--max-shard-size: {text!r} is not a size (e.g. 5GB, 500MB, 123456)")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if value < 1:
        raise ValueError(f"--max-shard-size: {text!r} must be at least one byte")
    return int(value)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to a Hugging Face model directory",
        description="Export a Strata checkpoint (run dir, its checkpoints/ dir, or one step dir: the newest "
        "intact one is used) to a directory that transformers loads with AutoModelForCausalLM.",
    )
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="run directory, checkpoints directory or step directory"
    )
    parser.add_argument("--hf", required=True, metavar="OUT", help="output directory")
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=None, help="cast weights (default: as stored)"
    )
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help="largest safetensors file before sharding (e.g. 5GB, 500MB; default 5GiB)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json to include (default: the run's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.export import DEFAULT_MAX_SHARD_BYTES, export_hf

    try:
        max_shard = DEFAULT_MAX_SHARD_BYTES if args.max_shard_size is None else parse_size(args.max_shard_size)
        out = export_hf(
            args.checkpoint,
            args.hf,
            dtype=args.dtype,
            max_shard_bytes=max_shard,
            tokenizer_path=args.tokenizer,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return 0
