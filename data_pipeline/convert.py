"""`convert`: rewrite a ShardSet in another format (mds <-> wds <-> megatron), document for document.

Same documents, same order, same counts; new shards, a new manifest whose provenance names the
parent manifest's sha256. Resumable like `prepare` (it uses the same ShardSetWriter).
`write_documents` (a chosen list of a parent's documents -> a ShardSet) is also the writing path
of `select` and `dedup`, through `derived_shardset` (a subset, built whole in a temp sibling).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data_pipeline.formats import ShardSet, open_shardset
from data_pipeline.formats.writer import STATE_DIR, ShardSetWriter, check_writable, parse_size
from data_pipeline.manifest import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    building_dir,
    manifest_sha256,
    provenance_parent_paths,
    read_manifest,
    write_json_atomic,
)
from data_pipeline.prepare import ProgressLine, build_manifest, clear_output_dir


@contextmanager
def derived_shardset(
    parent: ShardSet,
    source: str | Path,
    doc_ids: Sequence[int],
    out_dir: Path,
    format_name: str,
    *,
    shard_size_bytes: int,
    tool: str,
    record: dict[str, Any],
    counts: dict[str, Any],
    progress: bool,
    label: str,
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Writes `doc_ids` of `parent` (read from `source`) as a new ShardSet that appears at
    `out_dir` all at once when the block ends: yields (the temp directory, the manifest) so the
    caller can add its side files (scores, duplicate lists). `record` (e.g. {"selection": ...})
    goes into the provenance and the writer's fingerprint."""
    parent_sha = manifest_sha256(parent.root)
    with building_dir(out_dir) as tmp:
        manifest = write_documents(
            parent,
            doc_ids,
            tmp,
            format_name,
            shard_size_bytes=shard_size_bytes,
            compression=None,
            fingerprint={"parent_manifest_sha256": parent_sha, **record},
            counts=counts,
            options={"shard_size_bytes": shard_size_bytes, "compression": None},
            provenance={
                "tool": tool,
                "parent": parent_sha,
                "parent_location": str(source),
                **provenance_parent_paths(source, out_dir),
                "parent_provenance": parent.manifest.get("provenance"),
                **record,
            },
            progress=progress,
            label=label,
        )
        shutil.rmtree(tmp / STATE_DIR)  # not resumable: the whole directory appears at once
        yield tmp, manifest


def write_documents(
    parent: ShardSet,
    doc_ids: Sequence[int] | None,
    out_dir: Path,
    format_name: str,
    *,
    shard_size_bytes: int,
    compression: str | None,
    fingerprint: dict[str, Any],
    counts: dict[str, Any],
    options: dict[str, Any],
    provenance: dict[str, Any],
    progress: bool,
    label: str,
) -> dict[str, Any]:
    """Write `parent`'s documents `doc_ids` (None: all), in that order, as a ShardSet in `out_dir`.

    Resumable through ShardSetWriter (the resume cursor is an index into `doc_ids`); copies the
    parent's tokenizer.json and writes manifest.json last. Returns the manifest.
    """
    ids = range(len(parent)) if doc_ids is None else doc_ids
    position = [0]

    def snapshot() -> dict[str, Any]:
        return {"cursor": list(position)}

    writer = ShardSetWriter(
        out_dir, format_name, parent.dtype, shard_size_bytes, compression, fingerprint, snapshot
    )
    if writer.finished:
        return read_manifest(out_dir)
    start = writer.resume_point["cursor"][0] if writer.resume_point else 0
    line = ProgressLine(len(ids), progress, label=label)
    tokens_done = 0
    for index in range(start, len(ids)):
        position[0] = index
        tokens = parent.get(int(ids[index]))
        writer.add(tokens)
        tokens_done += len(tokens)
        line.update(index + 1, tokens_done, index + 1)
    position[0] = len(ids)
    lengths = writer.finish()
    line.update(len(ids), tokens_done, len(ids), final=True)

    if parent.tokenizer_path is not None:
        shutil.copyfile(parent.tokenizer_path, out_dir / TOKENIZER_NAME)
    pm = parent.manifest
    manifest = build_manifest(
        format_name=format_name,
        dtype=parent.dtype,
        eos_token=pm.get("eos_token"),
        eos_id=parent.eos_id,
        tokenizer_info=pm["tokenizer"],
        counts=counts,
        lengths=lengths,
        shards=writer.shards,
        options=options,
        provenance=provenance,
    )
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    writer.mark_complete()
    return manifest


def convert(
    source: str | Path,
    out_dir: str | Path,
    format_name: str,
    *,
    shard_size: str | int = "64MB",
    compression: str | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every document of `source` (a ShardSet path or remote MDS URL) to `out_dir`."""
    parent = open_shardset(source, cache_dir)
    out_dir = Path(out_dir)
    if parent.root.resolve() == out_dir.resolve():
        raise ValueError("the output directory must differ from the input")
    check_writable(out_dir)
    if overwrite:
        clear_output_dir(out_dir)
    parent_sha = manifest_sha256(parent.root)
    shard_size_bytes = parse_size(shard_size)
    pm = parent.manifest
    counts = dict(pm["counts"])
    counts.update(rejected=pm.get("rejected", {}), sources=pm.get("sources", {}))
    manifest = write_documents(
        parent,
        None,
        out_dir,
        format_name,
        shard_size_bytes=shard_size_bytes,
        compression=compression,
        fingerprint={
            "parent_manifest_sha256": parent_sha,
            "format": format_name,
            "shard_size_bytes": shard_size_bytes,
            "compression": compression,
        },
        counts=counts,
        options={**pm.get("options", {}), "shard_size_bytes": shard_size_bytes,
                 "compression": compression},
        provenance={
            "tool": "strata convert",
            "parent": parent_sha,
            "parent_location": str(source),
            **provenance_parent_paths(source, out_dir),
            "parent_provenance": pm.get("provenance"),
        },
        progress=progress,
        label="convert",
    )
    if progress:
        print(
            f"convert: wrote {len(parent):,} documents as {len(manifest['shards'])} {format_name} "
            f"shards to {out_dir}",
            file=sys.stderr,
        )
    return manifest
