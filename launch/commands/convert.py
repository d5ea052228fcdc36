"""`strata convert SRC DST --format mds|wds|megatron` (or `--out DST`): rewrite a ShardSet in another format.

Argument parsing and exit codes only; the work is data_pipeline.convert.
"""

from __future__ import annotations

import argparse
import sys

from launch.arguments import byte_size


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a ShardSet between formats (mds, wds, megatron)",
        description="Rewrite every document of a ShardSet in another format; same documents, same "
        "order, new manifest naming the parent. SRC may be a remote MDS location (s3://..., file://DIR).",
    )
    p.add_argument("source", metavar="SRC", help="ShardSet directory or remote MDS URL")
    p.add_argument("destination", nargs="?", metavar="DST", help="output ShardSet directory (or --out DST)")
    p.add_argument("--out", help="output ShardSet directory (same as DST)")
    p.add_argument("--format", required=True, choices=["mds", "wds", "megatron"], help="output format")
    p.add_argument("--shard-size", type=byte_size, default="64MB", help="approximate bytes per shard (default 64MB)")
    p.add_argument("--compression", default=None, help="MDS shard compression (zstd, gz, ...; default none)")
    p.add_argument("--cache-dir", default=None, help="local cache for a remote SRC")
    p.add_argument("--overwrite", action="store_true", help="delete what OUT holds instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.convert import convert
    from data_pipeline.formats.writer import ResumeMismatch

    if (args.destination is None) == (args.out is None):
        print("convert: error: give the output directory once: DST or --out DST", file=sys.stderr)
        return 2
    try:
        convert(
            args.source,
            args.out or args.destination,
            args.format,
            shard_size=args.shard_size,
            compression=args.compression,
            cache_dir=args.cache_dir,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ResumeMismatch, PermissionError, FileNotFoundError, ValueError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    return 0
