"""`strata prepare INPUT... --out DIR`: tokenize raw text into a resumable ShardSet.

Also `strata prepare --builtin stdlib --out DIR` (train/val ShardSets + tokenizer from the
Python standard library). Argument parsing and exit codes only; the work is data_pipeline.prepare.
"""

from __future__ import annotations

import argparse
import sys

from launch.arguments import byte_size, non_negative_int, positive_int

BUILTIN_ONLY = ("val_fraction", "max_files")  # flags that mean something only with --builtin


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize raw text (jsonl[.gz|.zst], text dirs, parquet) into token shards",
        description="Tokenize inputs into a ShardSet (shards + manifest.json + lengths.npy). "
        "Every document gets an EOS. A killed run started again with the same arguments resumes "
        "after its last committed shard and ends with byte-identical shards. Bad records are "
        "counted by reason in the manifest, never fatal.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="JSONL (.jsonl/.jsonl.gz/.jsonl.zst), Parquet, .txt/.py/.md files or directories of them")
    p.add_argument("--out", required=True, help="output ShardSet directory (created if missing)")
    p.add_argument("--builtin", choices=["stdlib"],
                   help="build the built-in corpus instead of reading INPUTs: OUT/train, OUT/val, OUT/tokenizer.json")
    p.add_argument("--format", default="mds", choices=["mds", "wds", "megatron"],
                   help="shard format (default mds: mosaicml-streaming)")
    p.add_argument("--tokenizer", metavar="PATH", help="HF tokenizers tokenizer.json to encode with, or a Hugging Face model directory holding one")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                   help="train a byte-level BPE with this vocab size on the inputs (builtin default 8192)")
    p.add_argument("--eos-token", help="EOS token string (default: the first of <|endoftext|>, </s>, <eos>, ... in the vocab)")
    p.add_argument("--text-field", default="text", help="JSON/Parquet field holding the document text (default text)")
    p.add_argument("--workers", type=positive_int, default=None, help="tokenizer worker processes (default: number of cores)")
    p.add_argument("--ray", action="store_true",
                   help="encode on Ray tasks (a private local Ray instance unless --ray-address is given); same shards, same resumability")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray: join this cluster (auto, HOST:PORT or ray://...) instead of starting a local one")
    p.add_argument("--shard-size", type=byte_size, default="64MB", help="approximate bytes per shard, e.g. 64MB, 512kb (default 64MB)")
    p.add_argument("--compression", default=None,
                   help="MDS shard compression: zstd, zstd:LEVEL, gz, br, bz2, snappy (default none)")
    p.add_argument("--max-doc-chars", type=non_negative_int, default=1_000_000,
                   help="split longer documents into pieces of at most this many characters (0 = keep whole; default 1000000)")
    p.add_argument("--val-fraction", type=float, default=None, help="--builtin: share of files held out for val (default 0.02)")
    p.add_argument("--max-files", type=positive_int, default=None, help="--builtin: keep only the first N files (small demos/tests)")
    p.add_argument("--overwrite", action="store_true", help="delete what OUT holds instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.formats.writer import ResumeMismatch
    from data_pipeline.prepare import PrepareOptions, WorkerDied, prepare
    from data_pipeline.sources import InputError

    try:
        if args.builtin:
            return _run_builtin(args)
        if not args.inputs:
            raise InputError("no inputs given (or use --builtin stdlib)")
        for name in BUILTIN_ONLY:
            if getattr(args, name) is not None:
                raise InputError(f"--{name.replace('_', '-')} applies only to --builtin")

        options = PrepareOptions(
            format=args.format,
            text_field=args.text_field,
            tokenizer=args.tokenizer,
            train_tokenizer=args.train_tokenizer,
            eos_token=args.eos_token,
            shard_size=args.shard_size,
            compression=args.compression,
            max_doc_chars=args.max_doc_chars,
            workers=args.workers,
            progress=not args.quiet,
            overwrite=args.overwrite,
            encode_map=_ray_encode_map(args.ray_address) if args.ray else None,
        )
        manifest = prepare(args.inputs, args.out, options)
        if manifest["counts"]["documents"] == 0:  # a wrong --text-field, most likely: say so, even with --quiet
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(manifest["rejected"].items()))
            records = manifest["counts"]["input_records"]
            why = f"all {records:,} input records were rejected ({reasons})" if records else "the inputs hold no records"
            raise InputError(f"no documents written to {args.out}: {why}; check the inputs and --text-field "
                             f"(now {args.text_field!r})")
    except (InputError, ResumeMismatch, PermissionError, FileNotFoundError, ValueError) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    except WorkerDied as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nprepare: interrupted; the shards committed to {args.out} are kept: "
              "run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _ray_encode_map(address: str | None):
    from functools import partial

    from launch.ray_launcher import ray_encoded_batches

    return partial(ray_encoded_batches, address=address)


def _run_builtin(args: argparse.Namespace) -> int:
    from data_pipeline.builtin import build_stdlib_corpus

    if args.inputs:
        raise ValueError("--builtin takes no INPUT arguments")
    if args.tokenizer:
        raise ValueError("--builtin trains its own tokenizer; use --train-tokenizer VOCAB to size it")
    result = build_stdlib_corpus(
        args.out,
        vocab_size=args.train_tokenizer or 8192,
        val_fraction=0.02 if args.val_fraction is None else args.val_fraction,
        format=args.format,
        workers=args.workers,
        shard_size=args.shard_size,
        max_files=args.max_files,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(f"builtin stdlib: train={result['train']} val={result['val']} tokenizer={result['tokenizer']}")
    return 0
