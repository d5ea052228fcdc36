"""`strata hparams --params N --tokens D`: prints the Step-Law learning rate and batch size.

Formula and test vectors: METHODS.md §8 (engine/hparams.py). It does not edit configs; write
`optim.lr: auto` / `data.tokens_per_step: auto` in a config to use these values in a run.
"""

from __future__ import annotations

import argparse
import sys

from launch.arguments import positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "hparams",
        help="Step-Law learning rate and batch size for N params and D tokens",
        description="Step Law (Li et al. 2025): lr = 1.79 N^-0.713 D^0.307, batch = 0.58 D^0.571 tokens.",
    )
    parser.add_argument(
        "--params", required=True, help="non-embedding parameters N (e.g. 1e9, 400M, 1.5B)"
    )
    parser.add_argument("--tokens", required=True, help="training tokens D (e.g. 1e11, 40B, 2T)")
    parser.add_argument(
        "--seq-len", type=positive_int, default=None, help="also print the batch in sequences of this length"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.hparams import step_law

    try:
        n_params = _count("--params", args.params)
        n_tokens = _count("--tokens", args.tokens)
        lr, batch_tokens = step_law(n_params, n_tokens)
    except ValueError as err:
        print(f"hparams error: {err}", file=sys.stderr)
        return 2
    print(f"N (non-embedding params) = {n_params:.4g}")
    print(f"D (training tokens)      = {n_tokens:.4g}")
    print(f"learning rate            = {lr:.4g}")
    print(f"batch size (tokens)      = {batch_tokens:.4g}")
    if args.seq_len:
        sequences = max(1, round(batch_tokens / args.seq_len))
        print(f"batch size (sequences)   = {sequences} x {args.seq_len} tokens")
    print(f"optimizer steps          = {n_tokens / batch_tokens:.4g}")
    return 0


def _count(flag: str, text: str) -> float:
    from engine.hparams import parse_count

    try:
        return parse_count(text)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None
