"""`strata import-hf HF_DIR [CONFIG]`: starts a Strata run whose initial weights come from a local HF model.

The architecture (`model.*`, the family picked by `model_type`: llama/qwen3 or fla's gla) is
taken from HF_DIR/config.json; the rest (data, optim, schedule, train...) from CONFIG and --set. The run directory gets config.yaml, a step-0 checkpoint holding
the imported weights (so a requeued run never restarts from random weights), the HF tokenizer
when there is one, and imported_from.json; then it trains unless --no-train. Continue it later
with `strata train --resume RUN_DIR`. The conversion lives in engine/export.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError
from launch.arguments import add_set_argument

if TYPE_CHECKING:
    from engine.config import StrataConfig

# ModelConfig fields fixed by the HF checkpoint (the rest, e.g. attn_backend, z_loss, max_seq_len, stay the config's).
ARCHITECTURE_FIELDS = (
    "family", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
    "norm_eps", "rope_theta", "rope_scaling", "qk_norm", "tie_embeddings", "gla_gate_rank", "gla_gate_tau",
)  # fmt: skip


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-hf",
        help="start a run from a local Hugging Face checkpoint (Llama, Qwen3, fla GLA)",
        description="Start a Strata run from a local HF Llama (or Qwen3-style qk-norm, or fla GLA) directory: model "
        "architecture from its config.json, everything else from CONFIG / --set, weights from its "
        "safetensors. Writes a step-0 checkpoint, then trains (unless --no-train).",
    )
    parser.add_argument(
        "hf_dir", metavar="HF_DIR", help="directory with config.json + *.safetensors"
    )
    parser.add_argument(
        "config", nargs="?", help="run config YAML (its model section may be omitted)"
    )
    add_set_argument(parser)
    parser.add_argument("--run-dir", default=None, help="run directory (default: train.run_dir)")
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="only create the run directory and its step-0 checkpoint",
    )
    parser.add_argument("--nproc", type=int, default=1, help="spawn this many local processes")
    parser.set_defaults(func=run)


def merge_hf_architecture(tree: dict[str, Any], hf_dir: str | Path) -> dict[str, Any]:
    """The config tree with `model` architecture fields from HF_DIR; a conflicting value is an error."""
    from engine.export import read_hf_model_config

    try:
        hf_model = read_hf_model_config(hf_dir)
    except (FileNotFoundError, ValueError) as err:  # the message already names HF_DIR or its config.json
        raise ConfigError(str(err)) from None
    user_model = dict(tree.get("model") or {})
    architecture = hf_model.model_dump(include=set(ARCHITECTURE_FIELDS))  # plain values, as YAML holds them
    for field in ARCHITECTURE_FIELDS:
        if field not in user_model:
            continue
        ours, theirs = user_model[field], architecture[field]
        if field == "n_kv_heads" and ours is None:
            ours = user_model.get("n_heads", hf_model.n_heads)
        if field == "rope_scaling" and ours is not None:  # compared with its defaults filled in
            ours = type(hf_model).model_validate({"rope_scaling": ours}).model_dump()["rope_scaling"]
        if ours != theirs:
            raise ConfigError(
                f"model.{field}: {ours!r} differs from the HF checkpoint's {theirs!r} "
                "(omit it: import-hf takes the architecture from config.json)"
            )
    user_model.update(architecture)
    user_model.setdefault("max_seq_len", hf_model.max_seq_len)
    return {**tree, "model": user_model}


def import_config(
    hf_dir: str, config: str | None, overrides: list[str], run_dir: str | None
) -> StrataConfig:
    from engine.config import apply_overrides, load_config, read_yaml

    tree = apply_overrides(read_yaml(config) if config else {}, overrides)
    if run_dir is not None:
        tree = apply_overrides(tree, [f"train.run_dir={run_dir}"])
    return load_config(merge_hf_architecture(tree, hf_dir))


def _provenance(hf_dir: Path) -> dict[str, Any]:
    files = sorted(p for p in hf_dir.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
    digest.update((hf_dir / "config.json").read_bytes())
    return {
        "hf_dir": str(hf_dir.resolve()),
        "files": [p.name for p in files],
        "fingerprint": digest.hexdigest(),
    }


def run(args: argparse.Namespace) -> int:
    if args.nproc > 1:
        from launch.local import launch_local

        forwarded = ["import-hf", args.hf_dir] + ([args.config] if args.config else [])
        forwarded += [x for o in args.overrides for x in ("--set", o)]
        forwarded += (["--run-dir", args.run_dir] if args.run_dir else []) + (
            ["--no-train"] if args.no_train else []
        )
        return launch_local(forwarded, nproc=args.nproc)

    from engine.checkpoint import latest_checkpoint
    from engine.dist import init_distributed, shutdown
    from engine.export import load_hf_into_model
    from engine.trainer import Trainer

    hf_dir = Path(args.hf_dir)
    cfg = import_config(args.hf_dir, args.config, args.overrides, args.run_dir)
    run_dir = Path(cfg.train.run_dir)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        print(
            f"import-hf error: {run_dir} already has checkpoints; continue it with `strata train --resume {run_dir}`",
            file=sys.stderr,
        )
        return 2
    ctx = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, ctx, resume=False)
        load_hf_into_model(trainer.model, hf_dir)
        if ctx.is_main:
            (run_dir / "imported_from.json").write_text(json.dumps(_provenance(hf_dir), indent=1))
            if (hf_dir / "tokenizer.json").is_file():
                shutil.copyfile(hf_dir / "tokenizer.json", run_dir / "tokenizer.json")
        path = trainer.save()  # step 0: a requeue before the first checkpoint resumes these weights
        if ctx.is_main:
            print(f"imported {hf_dir} into {run_dir} (step-0 checkpoint {path.name})", flush=True)
        if args.no_train:
            trainer.loader.close()
            return 0
        return trainer.fit().exit_code
    finally:
        shutdown()
