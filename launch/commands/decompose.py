"""`strata decompose SHARDSET --out DIR`: index a ShardSet's documents as power-of-two chunks.

Argument parsing, the per-bucket table and exit codes only; the decomposition and its atomic
write are data_pipeline.decompose. Train on the result with `data.decomposition.path: DIR`.
"""

from __future__ import annotations

import sys

from data_pipeline.decompose import DEFAULT_MAX_LOG2, DEFAULT_MIN_LOG2


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "decompose",
        help="dataset decomposition: cut documents into power-of-two chunks (length curriculum)",
        description="Cut every document of SHARDSET into chunks of 2^i tokens (binary expansion of "
        "its length, largest first; pieces shorter than 2^min-log2 are dropped) and write an index "
        "over SHARDSET (decomposition.npz + manifest.json naming the parent and its manifest hash) "
        "to --out. Train on it with data.decomposition.path.",
    )
    parser.add_argument("shardset", metavar="SHARDSET", help="input ShardSet directory")
    parser.add_argument("--out", required=True, help="output directory (refused if it exists)")
    parser.add_argument(
        "--min-log2",
        type=int,
        default=DEFAULT_MIN_LOG2,
        help=f"smallest bucket is 2^N tokens (default {DEFAULT_MIN_LOG2})",
    )
    parser.add_argument(
        "--max-log2",
        type=int,
        default=DEFAULT_MAX_LOG2,
        help=f"largest bucket is 2^N tokens (default {DEFAULT_MAX_LOG2})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=run)


def run(args) -> int:
    from data_pipeline.decompose import write_decomposition

    try:
        manifest = write_decomposition(
            args.shardset, args.out, args.min_log2, args.max_log2, overwrite=args.overwrite
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"decompose: {error}", file=sys.stderr)
        return 2
    print(f"{'bucket':>8} {'length':>8} {'chunks':>10} {'tokens':>14}")
    for row in manifest["buckets"]:
        print(f"{row['log2_len']:>8} {row['length']:>8} {row['chunks']:>10,} {row['tokens']:>14,}")
    dropped = manifest["dropped"]
    kept = manifest["tokens"]
    share = dropped["tokens"] / max(kept + dropped["tokens"], 1)
    print(
        f"{manifest['chunks']:,} chunks, {kept:,} tokens kept; dropped {dropped['tokens']:,} tokens "
        f"({share:.1%}), {dropped['documents_without_chunk']:,} documents shorter than "
        f"2^{args.min_log2}; wrote {args.out}"
    )
    return 0
