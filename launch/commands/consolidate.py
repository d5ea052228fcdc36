"""`strata consolidate CKPT OUT.safetensors`: the full weights of a sharded checkpoint in one file.

Reads a DCP checkpoint saved at any mesh (FSDP / TP / HSDP shards) in this one process and
writes every model tensor, unsharded, under Strata's own parameter names (for HF names use
`strata export`). Reading is engine/export.py's; the output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def consolidate(checkpoint: str | Path, out_path: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Writes the checkpoint's model weights to one safetensors file; returns its path."""
    from safetensors.torch import save_file

    from engine.checkpoint import resolve_checkpoint
    from engine.export import DTYPES, load_checkpoint_weights

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"OUT: {out_path} must end in .safetensors")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"OUT: {out_path} exists (pass --overwrite)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    step_dir = resolve_checkpoint(checkpoint)
    state_dict, model_cfg, _ = load_checkpoint_weights(step_dir)
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(DTYPES[dtype])
        tensors[name] = tensor.contiguous().clone()  # safetensors refuses shared storage
    metadata = {
        "format": "pt",
        "strata_checkpoint": step_dir.name,
        "model_config": json.dumps(model_cfg.model_dump(mode="json")),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "consolidate",
        help="write a checkpoint's full (unsharded) weights to one safetensors file",
        description="Gather the model weights of a Strata checkpoint, saved at any FSDP/TP/HSDP layout, into "
        "a single safetensors file with Strata parameter names and the model config in its metadata. "
        "CKPT may be a run directory, its checkpoints/ directory or one step directory (the newest intact "
        "checkpoint is used).",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="run directory, checkpoints directory or step directory")
    parser.add_argument("out", metavar="OUT.safetensors", help="output file")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast floating tensors (default: as stored)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        path = consolidate(args.checkpoint, args.out, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"consolidate: error: {err}", file=sys.stderr)
        return 2  # bad input, like every other command
    print(f"wrote {path}")
    return 0
