"""`strata dedup SHARDSET --out DIR [--method exact|minhash]`: drop duplicate documents.

Argument parsing, the one-line error messages and exit codes only; fingerprints, the keep/drop
decision and writing the new ShardSet are data_pipeline.dedup.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.dedup import (
    DEFAULT_NGRAM,
    DEFAULT_NUM_PERM,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    DUPLICATES_NAME,
    METHODS,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "dedup",
        help="remove exact / near-duplicate documents from a ShardSet",
        description="Drop duplicate documents of SHARDSET (token ids; any format, no tokenizer "
        "needed) and write the kept ones, in corpus order, as a new ShardSet whose manifest names "
        "its parent and counts what was dropped by reason. The first document of each duplicate "
        "group is kept. exact: identical token sequences (blake2b-128). minhash: exact "
        "duplicates, then near duplicates by MinHash LSH over token n-grams (datasketch). "
        f"OUT/{DUPLICATES_NAME} lists every dropped document and the kept one it duplicates.",
    )
    parser.add_argument("shardset", metavar="SHARDSET", help="input ShardSet directory")
    parser.add_argument("--out", required=True, help="output ShardSet directory (must not exist)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="exact",
        help="exact (default) or minhash (exact + near)",
    )
    parser.add_argument(
        "--ngram",
        type=int,
        default=DEFAULT_NGRAM,
        help=f"minhash: tokens per shingle (default {DEFAULT_NGRAM}); shorter documents are "
        "compared exactly only",
    )
    parser.add_argument(
        "--num-perm",
        type=int,
        default=DEFAULT_NUM_PERM,
        help=f"minhash: permutations per signature (default {DEFAULT_NUM_PERM})",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="minhash: drop a document whose estimated Jaccard with an earlier kept one is >= "
        f"this, in (0, 1] (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"minhash: permutation seed (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes computing fingerprints, this one included (default: all cores); the "
        "result does not depend on it",
    )
    parser.add_argument(
        "--format",
        choices=["mds", "wds", "megatron"],
        default=None,
        help="output format (default: the input's)",
    )
    parser.add_argument(
        "--shard-size", default="64MB", help="approximate bytes per shard (default 64MB)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.dedup import DedupParams, WorkerDied, dedup

    params = DedupParams(
        method=args.method,
        ngram=args.ngram,
        num_perm=args.num_perm,
        threshold=args.threshold,
        seed=args.seed,
    )
    try:
        dedup(
            args.shardset,
            args.out,
            params,
            workers=args.workers,
            format_name=args.format,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (FileExistsError, FileNotFoundError, PermissionError, ValueError) as err:
        print(f"dedup: error: {err}", file=sys.stderr)
        return 2
    except WorkerDied as err:
        print(f"dedup: error: {err}", file=sys.stderr)
        return 1
    return 0
