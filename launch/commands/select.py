"""`strata select color-filter|miniplm SHARDSET ... --out DIR`: keep documents by likelihood difference.

Argument parsing, model loading (the checkpoint loader `strata generate` uses, or
engine.export.build_model_from_hf for a Hugging Face directory) and exit codes only; scoring,
choice and writing are data_pipeline.select.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROLE_HELP = {
    "prior": "model trained on the pool (pretraining data)",
    "conditional": "the prior fine-tuned on target-domain data",
    "teacher": "large teacher model",
    "reference": "small reference model",
}
CKPT_HELP = " (Strata run dir, checkpoints dir or step dir, or a Hugging Face model directory)"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shardset", metavar="SHARDSET", help="input ShardSet directory")
    parser.add_argument("--out", required=True, help="output ShardSet directory (must not exist)")
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=16384,
        help="tokens per scoring batch (rows of the models' max_seq_len; default 16384)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the models run (auto: cuda if available)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="forward precision: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on CPU); "
        "log-softmax and NLL sums stay fp32",
    )
    parser.add_argument(
        "--scores",
        default=None,
        metavar="FILE",
        help="reuse a scores.npz written by an earlier select on the same ShardSet (no models needed)",
    )
    parser.add_argument(
        "--format",
        choices=["mds", "wds", "megatron"],
        default=None,
        help="output format (default: the input's)",
    )
    parser.add_argument("--shard-size", default="64MB", help="approximate bytes per shard (default 64MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "select",
        help="curate a ShardSet by model-likelihood difference (CoLoR-Filter, MiniPLM)",
        description="Score every document by the difference of its mean token NLL under two "
        "models and write the top documents, in corpus order, as a new ShardSet whose manifest "
        "names its parent. Scores are saved as OUT/scores.npz for re-selection (--scores).",
    )
    methods = parser.add_subparsers(dest="method", metavar="METHOD", title="methods", required=True)
    color = methods.add_parser(
        "color-filter",
        help="CoLoR-Filter: keep the top N/tau by L_prior - L_conditional",
        description="CoLoR-Filter (Brandfonbrener et al. 2024): score s(x) = L_prior(x) - "
        "L_cond(x) (mean token NLL); keep the global top k = floor(N / tau), in corpus order.",
    )
    _common(color)
    for role in ("prior", "conditional"):
        color.add_argument(f"--{role}", metavar="CKPT", help=ROLE_HELP[role] + CKPT_HELP)
    color.add_argument("--tau", type=float, default=16.0, help="keep 1/tau of the documents (default 16)")
    color.add_argument(
        "--selection",
        choices=["global", "streaming"],
        default="global",
        help="global: the paper's top floor(N/tau) over the whole pool (default); streaming: a "
        "variant (ours, not the paper's) keeping the best floor(M/tau) of each consecutive "
        "chunk of --chunk-docs M documents",
    )
    color.add_argument(
        "--chunk-docs",
        type=int,
        default=None,
        metavar="M",
        help="documents per chunk for --selection streaming (>= tau; best a multiple of tau)",
    )
    color.set_defaults(func=run, roles=("prior", "conditional"), parameter="tau")

    mini = methods.add_parser(
        "miniplm",
        help="MiniPLM difference sampling: keep the top alpha*N by NLL_ref - NLL_teacher",
        description="MiniPLM (Gu et al. 2024): score r(x) = NLL_ref(x) - NLL_teacher(x) (mean "
        "token NLL); keep the top floor(alpha * N), in corpus order.",
    )
    _common(mini)
    for role in ("teacher", "reference"):
        mini.add_argument(f"--{role}", metavar="CKPT", help=ROLE_HELP[role] + CKPT_HELP)
    mini.add_argument("--alpha", type=float, default=0.5, help="fraction of documents kept (default 0.5)")
    mini.set_defaults(
        func=run, roles=("reference", "teacher"), parameter="alpha", selection="global", chunk_docs=None
    )


def load_scoring_model(checkpoint: str, device: torch.device):
    """A ScoringModel from a Strata checkpoint (as `strata generate` loads it) or an HF directory."""
    from data_pipeline.select import ScoringModel

    path = Path(checkpoint)
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        from engine.export import build_model_from_hf

        model, model_cfg = build_model_from_hf(path, device)
        tokenizer = path / "tokenizer.json"
        description = {"path": str(path), "kind": "hf", "family": model_cfg.family}
    else:
        from engine.checkpoint import resolve_checkpoint
        from engine.export import build_model_from_checkpoint, find_run_tokenizer

        model, model_cfg, run_dir = build_model_from_checkpoint(checkpoint, device)
        tokenizer = find_run_tokenizer(run_dir)
        description = {
            "path": str(path),
            "kind": "strata",
            "checkpoint": str(resolve_checkpoint(checkpoint)),
            "family": model_cfg.family,
        }
    description["params"] = sum(p.numel() for p in model.parameters())

    def logits(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids, position_ids=position_ids)

    return ScoringModel(
        logits=logits,
        hidden_states=getattr(model, "hidden_states", None),
        project=getattr(model, "project", None),
        max_seq_len=model_cfg.max_seq_len,
        vocab_size=model_cfg.vocab_size,
        tokenizer_path=tokenizer if tokenizer is not None and Path(tokenizer).is_file() else None,
        description=description,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline.formats.writer import ResumeMismatch
    from data_pipeline.select import select

    label = f"select {args.method}"
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{label}: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if args.batch_tokens < 1:
        print(f"{label}: error: --batch-tokens must be positive", file=sys.stderr)
        return 2
    try:
        models = None
        if args.scores is None:
            missing = [f"--{role}" for role in args.roles if getattr(args, role) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required (or --scores FILE)")
            models = {role: load_scoring_model(getattr(args, role), device) for role in args.roles}
        select(
            args.method,
            args.shardset,
            args.out,
            getattr(args, args.parameter),
            models=models,
            scores_file=args.scores,
            batch_tokens=args.batch_tokens,
            device=device,
            dtype=args.dtype,
            selection=args.selection,
            chunk_docs=args.chunk_docs,
            format_name=args.format,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (FileExistsError, FileNotFoundError, PermissionError, ResumeMismatch, ValueError) as err:
        print(f"{label}: error: {err}", file=sys.stderr)
        return 2
    return 0
