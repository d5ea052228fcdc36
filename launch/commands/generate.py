"""`strata generate CKPT --prompt TEXT`: continue a prompt with a trained model (any family).

Loads the newest intact checkpoint under CKPT (engine/export.py) and the run's tokenizer, or a
Hugging Face directory (config.json + safetensors, its tokenizer.json), and decodes with models/generate.py (Llama: KV cache; GLA: recurrent state). Prints the prompt and
its continuation; `--ids` works on token ids instead of text (no tokenizer needed).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from launch.arguments import non_negative_int, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt with a trained checkpoint",
        description="Greedy or sampled continuation of a prompt by a Strata checkpoint "
        "(run dir, its checkpoints/ dir or one step dir: the newest intact one is used) "
        "or a Hugging Face directory (`strata export` output, a Llama/Qwen3/GLA download).",
    )
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="run directory, checkpoints directory, step directory or Hugging Face directory"
    )
    parser.add_argument(
        "--prompt", required=True, help="prompt text (with --ids: comma-separated token ids)"
    )
    parser.add_argument(
        "--ids", action="store_true", help="prompt and output are token ids, not text"
    )
    parser.add_argument(
        "--max-new-tokens", type=non_negative_int, default=64, help="tokens to generate at most (default 64)"
    )
    parser.add_argument(
        "--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=None, help="sample from the k most likely tokens only"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's, or the HF directory's)")
    parser.add_argument(
        "--no-eos-stop", action="store_true", help="do not stop at the tokenizer's EOS"
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to run (auto: cuda if available)",
    )
    parser.set_defaults(func=run)


def _non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0 (a sampling temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"--prompt: {text!r} is not a comma-separated list of token ids") from None
    if not ids:
        raise ValueError("--prompt: no token ids given")
    return ids


def run(args: argparse.Namespace) -> int:
    import torch

    from engine.export import build_model_from_checkpoint, build_model_from_hf
    from models.generate import generate

    if args.device == "cuda" and not torch.cuda.is_available():
        print("generate error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    try:
        source = Path(args.checkpoint)
        if (source / "config.json").is_file() and not (source / "config.yaml").is_file():  # as `strata eval`
            model, model_cfg = build_model_from_hf(source, device)
            run_dir = source  # its tokenizer.json
        else:
            model, model_cfg, run_dir = build_model_from_checkpoint(source, device)
        tokenizer, eos_id = None, None
        if not args.ids or not args.no_eos_stop:
            tokenizer, eos_id = _tokenizer(args.tokenizer, run_dir, required=not args.ids)
        prompt = _parse_ids(args.prompt) if args.ids else tokenizer.encode(args.prompt).ids
        if not prompt:
            raise ValueError("--prompt: the text encodes to no tokens")
        if max(prompt) >= model_cfg.vocab_size:
            raise ValueError(
                f"--prompt: token id {max(prompt)} is outside the vocabulary ({model_cfg.vocab_size})"
            )
        generator = torch.Generator(device=device).manual_seed(args.seed)
        new = generate(
            model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            eos_id=None if args.no_eos_stop else eos_id,
            generator=generator,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"generate error: {err}", file=sys.stderr)
        return 2
    if args.ids:
        print(",".join(str(i) for i in prompt + new))
    else:
        print(tokenizer.decode(prompt + new))
    return 0


def _tokenizer(path: str | None, run_dir: Path, required: bool):
    """(tokenizer or None, eos id or None); a missing tokenizer is an error only for text prompts."""
    from data_pipeline.tokenizer import find_eos_id, load_tokenizer
    from engine.export import find_run_tokenizer

    found = Path(path) if path else find_run_tokenizer(run_dir)
    if found is None or not Path(found).is_file():
        if required:
            where = path or f"the run {run_dir} or next to its data"
            raise FileNotFoundError(
                f"--tokenizer: no tokenizer.json in {where} (pass --tokenizer or use --ids)"
            )
        return None, None
    tokenizer = load_tokenizer(found)
    try:
        _, eos_id = find_eos_id(tokenizer)
    except ValueError:
        eos_id = None
    return tokenizer, eos_id
