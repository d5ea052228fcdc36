"""`convert`: rewrite a ShardSet in another format (mds <-> wds <-> megatron), document for document.

Same documents, same order, same counts; new shards, a new manifest whose provenance names the
parent manifest's sha256. Resumable like `prepare` (it uses the same ShardSetWriter).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from data_pipeline.formats import open_shardset
from data_pipeline.formats.writer import ShardSetWriter, check_writable, parse_size
from data_pipeline.manifest import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    manifest_sha256,
    read_manifest,
    write_json_atomic,
)
from data_pipeline.prepare import ProgressLine, build_manifest, clear_output_dir


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
        raise ValueError("convert: the output directory must differ from the input")
    check_writable(out_dir)
    if overwrite:
        clear_output_dir(out_dir)
    parent_sha = manifest_sha256(parent.root)
    shard_size_bytes = parse_size(shard_size)
    fingerprint = {
        "parent_manifest_sha256": parent_sha,
        "format": format_name,
        "shard_size_bytes": shard_size_bytes,
        "compression": compression,
    }
    position = [0]

    def snapshot() -> dict[str, Any]:
        return {"cursor": list(position)}

    writer = ShardSetWriter(
        out_dir, format_name, parent.dtype, shard_size_bytes, compression, fingerprint, snapshot
    )
    if writer.finished:
        return read_manifest(out_dir)
    start = writer.resume_point["cursor"][0] if writer.resume_point else 0
    line = ProgressLine(len(parent), progress, label="convert")
    tokens_done = 0
    for doc_id in range(start, len(parent)):
        position[0] = doc_id
        tokens = parent.get(doc_id)
        writer.add(tokens)
        tokens_done += len(tokens)
        line.update(doc_id + 1, tokens_done, doc_id + 1)
    position[0] = len(parent)
    lengths = writer.finish()
    line.update(len(parent), tokens_done, len(parent), final=True)

    if parent.tokenizer_path is not None:
        shutil.copyfile(parent.tokenizer_path, out_dir / TOKENIZER_NAME)
    pm = parent.manifest
    counts = dict(pm["counts"])
    counts.update(rejected=pm.get("rejected", {}), sources=pm.get("sources", {}))
    manifest = build_manifest(
        format_name=format_name,
        dtype=parent.dtype,
        eos_token=pm.get("eos_token"),
        eos_id=parent.eos_id,
        tokenizer_info=pm["tokenizer"],
        counts=counts,
        lengths=lengths,
        shards=writer.shards,
        options={**pm.get("options", {}), "shard_size_bytes": shard_size_bytes,
                 "compression": compression},
        provenance={
            "tool": "strata convert",
            "parent": parent_sha,
            "parent_location": str(source),
            "parent_provenance": pm.get("provenance"),
        },
    )
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    writer.mark_complete()
    if progress:
        print(
            f"convert: wrote {len(parent):,} documents as {len(writer.shards)} {format_name} "
            f"shards to {out_dir}",
            file=sys.stderr,
        )
    return manifest
