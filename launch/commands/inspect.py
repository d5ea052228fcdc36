"""`strata inspect PATH [--json] [--docs N]`: look at a ShardSet or a decomposition index.

Argument parsing, rich tables and exit codes only; what is shown comes from
data_pipeline.inspect (one dict, printed as is with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

BAR_WIDTH = 40


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what a ShardSet or decomposition holds: counts, lengths, tokenizer, provenance",
        description="Summarize a data artifact Strata wrote: a ShardSet (strata prepare, select, "
        "convert; mds, wds or megatron) or a decomposition index (strata decompose). Shows "
        "documents, tokens, document-length statistics and histogram (from lengths.npy, no "
        "token data read), tokenizer, rejected records by reason, per-source counts, shards "
        "and bytes on disk, and the provenance chain up to the root with each ancestor marked "
        "ok, 'changed since' (its manifest hash differs from the recorded one) or missing.",
    )
    parser.add_argument("path", metavar="PATH", help="ShardSet or decomposition directory")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.add_argument(
        "--docs",
        type=int,
        default=0,
        metavar="N",
        help="also show the first N documents (chunks, for a decomposition) decoded with the "
        "ShardSet's tokenizer",
    )
    parser.add_argument(
        "--max-chars",
        type=int,
        default=400,
        metavar="C",
        help="cut each document shown by --docs after C characters (default 400)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.inspect import inspect_artifact, sample_documents

    if args.docs < 0 or args.max_chars < 1:
        print("inspect: error: --docs must be >= 0 and --max-chars >= 1", file=sys.stderr)
        return 2
    try:
        report = inspect_artifact(args.path)
        if args.docs:
            report["documents_shown"] = sample_documents(args.path, args.docs, args.max_chars)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"inspect: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return 0


# --------------------------------------------------------------------------- rendering


def _console():
    from rich.console import Console

    # a pipe or a test gets wide lines, so paths and hashes are never folded
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def _table(title: str, *columns: str, text_columns: int = 1, **kwargs: Any):
    """A table whose first `text_columns` columns are left-aligned and the rest (numbers) right."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", **kwargs)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < text_columns else "right")
    return table


def _cells(*values: Any):
    from rich.text import Text

    return [Text(_fmt(v)) for v in values]  # Text: document text and paths are never markup


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    return str(value)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def bar(count: int, largest: int, width: int = BAR_WIDTH) -> str:
    """A text bar of `count` against the largest count (at least one block when non-zero)."""
    if count <= 0 or largest <= 0:
        return ""
    return "█" * max(1, round(width * count / largest))


def _overview(report: dict[str, Any]) -> list[tuple[str, Any]]:
    tokenizer = report["tokenizer"]
    vocab = tokenizer.get("file_vocab_size", tokenizer.get("vocab_size"))
    fingerprint = str(tokenizer.get("fingerprint") or "-")[:16]
    if tokenizer.get("fingerprint_matches") is False:
        fingerprint += " (tokenizer.json differs!)"
    rows: list[tuple[str, Any]] = [
        ("kind", report["kind"]),
        (
            "format",
            report["format"] + (f" ({report['compression']})" if report.get("compression") else ""),
        ),
        ("documents", report["documents"]),
        ("tokens", report["tokens"]),
    ]
    if report["kind"] == "shardset":
        shards = report["shards"]
        rows += [
            ("dtype", report["dtype"]),
            ("eos", f"{report['eos']['token']} (id {report['eos']['id']})"),
            ("input records", report["input_records"]),
            ("rejected records", sum(report["rejected"].values())),
            (
                "shards",
                f"{shards['count']:,} ({shards['files']:,} files, {_bytes(shards['bytes'])})",
            ),
            ("on disk", _bytes(shards["directory_bytes"])),
        ]
    else:
        dropped = report["dropped"] or {}
        rows += [
            ("chunks", report["chunks"]),
            (
                "buckets",
                f"2^{report['parameters']['min_log2']} .. 2^{report['parameters']['max_log2']}",
            ),
            (
                "dropped",
                f"{_fmt(dropped.get('tokens'))} tokens, "
                f"{_fmt(dropped.get('documents_without_chunk'))} documents without a chunk",
            ),
            ("parent", f"{report['parent']['path'] or '-'} ({report['parent']['status']})"),
            ("on disk", _bytes(report["files"]["directory_bytes"])),
        ]
    rows += [
        ("tokenizer", tokenizer.get("file_path") or tokenizer.get("file") or "-"),
        ("fingerprint", fingerprint),
        ("vocab size", vocab),
        ("manifest sha256", report["manifest_sha256"][:16]),
    ]
    return rows


def render(report: dict[str, Any]) -> None:
    """The report as rich tables on stdout."""
    console = _console()
    title = f"{report['kind']} {report['path']}"
    overview = _table(title, "", "", text_columns=2, show_header=False)
    for key, value in _overview(report):
        overview.add_row(*_cells(key, value))
    console.print(overview)

    if report["kind"] == "shardset":
        stats = report["length_stats"]
        if stats:
            table = _table("document length (tokens)", *stats)
            table.add_row(*_cells(*stats.values()))
            console.print(table)
        rows = report["length_histogram"]
        if rows:
            largest = max(r["documents"] for r in rows)
            table = _table("length histogram", "tokens", "documents", "")
            for r in rows:
                table.add_row(
                    *_cells(f"{r['lower']}-{r['upper']}", r["documents"]),
                    bar(r["documents"], largest),
                )
            console.print(table)
        if report["rejected"]:
            table = _table("rejected records", "reason", "records")
            for reason, count in report["rejected"].items():
                table.add_row(*_cells(reason, count))
            console.print(table)
        if report["sources"]:
            table = _table("sources", "source", "input records", "documents", "tokens", "rejected")
            for name, s in report["sources"].items():
                table.add_row(
                    *_cells(
                        name,
                        s.get("input_records"),
                        s.get("documents"),
                        s.get("tokens"),
                        sum((s.get("rejected") or {}).values()),
                    )
                )
            console.print(table)
    else:
        largest = max((b["chunks"] for b in report["buckets"]), default=0)
        table = _table("buckets", "bucket", "length", "chunks", "tokens", "")
        for b in report["buckets"]:
            table.add_row(
                *_cells(f"2^{b['log2_len']}", b["length"], b["chunks"], b["tokens"]),
                bar(b["chunks"], largest),
            )
        console.print(table)

    table = _table(
        "provenance (this artifact first, up to the root)",
        "#",
        "status",
        "method",
        "parameters",
        "path",
        text_columns=5,
    )
    for step in report["provenance"]:
        table.add_row(
            *_cells(step["depth"], step["status"], step["method"], step["parameters"], step["path"])
        )
    console.print(table)
    for step in report["provenance"]:
        if step["status"] in ("changed since", "missing"):
            console.print(
                *_cells(
                    f"ancestor {step['depth']} {step['status']}: looked in "
                    f"{' and '.join(step['tried']) or 'no recorded path'}"
                )
            )
    for problem in report["problems"]:
        console.print(*_cells(f"problem: {problem}"))

    for doc in report.get("documents_shown", []):
        where = f"document {doc['doc_id']}"
        if "chunk" in doc:
            where = f"chunk {doc['chunk']} (document {doc['doc_id']}, from token {doc['begin']})"
        console.rule(*_cells(f"{where}: {doc['tokens']:,} tokens"), align="left")
        console.print(*_cells(doc["text"] + (" …" if doc["truncated"] else "")))
