"""Dataset decomposition (METHODS.md §3): cut every document into power-of-two chunks.

Owns the binary-expansion split of document lengths into chunks, and the decomposition
directory: an index over the parent ShardSet (`decomposition.npz`: per chunk doc_id, begin,
log2_len) plus `manifest.json` with provenance and per-bucket counts, written atomically. It does
not read token data and does not decide training order (data_pipeline/curriculum.py does).

Convention: a chunk of bucket i is 2^i consecutive tokens of one document and is fed whole as
input_ids (a row of length 2^i). Its labels are the next tokens of the same document; the label
of the chunk's last position is the document token just after the chunk (the first token of the
document's next chunk or of its dropped remainder), or -100 when the chunk ends the document.
So the METHODS.md test vectors hold as written (1001 tokens, buckets 2^8.. -> 512 + 256, 233
dropped) and every row has a power-of-two length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.manifest import (
    MANIFEST_NAME,
    ParentLookup,
    building_dir,
    check_output_dir,
    json_bytes,
    locate_parent,
    parent_record,
    read_manifest,
    recorded_parent,
    require_parent,
)

INDEX_NAME = "decomposition.npz"
KIND = "dataset-decomposition"
VERSION = 1
DEFAULT_MIN_LOG2 = 8
DEFAULT_MAX_LOG2 = 13
CONVENTION = (
    "chunk of bucket i = 2^i consecutive tokens of one document = one row of input_ids; labels "
    "are the document's next tokens (last label: the token after the chunk, -100 at document end)"
)


@dataclass(frozen=True)
class Decomposition:
    """Chunks in document order (per document: largest first). Chunk k is tokens
    [begin[k], begin[k] + 2^log2_len[k]) of document doc_id[k]."""

    doc_id: np.ndarray  # int64
    begin: np.ndarray  # int64
    log2_len: np.ndarray  # int8
    min_log2: int
    max_log2: int
    dropped_tokens: int
    dropped_documents: int  # documents shorter than the smallest bucket (no chunk at all)

    def __len__(self) -> int:
        return len(self.doc_id)

    @property
    def buckets(self) -> range:
        return range(self.min_log2, self.max_log2 + 1)

    def bucket_counts(self) -> dict[int, int]:
        """Chunks per bucket (log2 length -> count), every bucket of the range listed."""
        counts = np.bincount(self.log2_len.astype(np.int64), minlength=self.max_log2 + 1)
        return {i: int(counts[i]) for i in self.buckets}


def check_bucket_range(min_log2: int, max_log2: int) -> None:
    if not 0 <= min_log2 <= max_log2 <= 40:
        raise ValueError(
            f"bucket range: need 0 <= min_log2 <= max_log2 <= 40, got min_log2={min_log2} "
            f"max_log2={max_log2}"
        )


def decompose_lengths(
    lengths: np.ndarray, min_log2: int = DEFAULT_MIN_LOG2, max_log2: int = DEFAULT_MAX_LOG2
) -> Decomposition:
    """Binary expansion of each document length, largest chunk first, capped at 2^max_log2.

    A document of L tokens gives floor(L / 2^max) chunks of 2^max, then one chunk of 2^j for
    every bit j (max > j >= min) set in L mod 2^max; the last L mod 2^min tokens are dropped.
    """
    check_bucket_range(min_log2, max_log2)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or (lengths < 0).any():
        raise ValueError("lengths: want a 1-d array of non-negative token counts")
    remainder = lengths & ((1 << max_log2) - 1)
    # counts[d, k]: chunks of bucket (max_log2 - k) in document d; columns run largest first
    columns = np.arange(max_log2, min_log2 - 1, -1)
    counts = (remainder[:, None] >> columns[None, :]) & 1
    counts[:, 0] = lengths >> max_log2
    log2_len = np.repeat(np.tile(columns, len(lengths)), counts.ravel()).astype(np.int8)
    per_doc = counts.sum(axis=1)
    doc_id = np.repeat(np.arange(len(lengths), dtype=np.int64), per_doc)
    sizes = np.left_shift(1, log2_len.astype(np.int64))
    ends = np.cumsum(sizes)
    doc_first_chunk = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
    begin = ends - sizes
    if len(begin):
        begin -= np.repeat((ends - sizes)[np.minimum(doc_first_chunk, len(begin) - 1)], per_doc)
    kept = int(sizes.sum())
    return Decomposition(
        doc_id=doc_id,
        begin=begin.astype(np.int64),
        log2_len=log2_len,
        min_log2=min_log2,
        max_log2=max_log2,
        dropped_tokens=int(lengths.sum()) - kept,
        dropped_documents=int((per_doc == 0).sum()),
    )


def summary(decomposition: Decomposition) -> list[dict[str, int]]:
    """One row per bucket: log2_len, length, chunks, tokens."""
    return [
        {"log2_len": i, "length": 1 << i, "chunks": n, "tokens": n << i}
        for i, n in decomposition.bucket_counts().items()
    ]


def build_manifest(
    decomposition: Decomposition, parent: Path, parent_manifest: dict[str, Any], out: Path
) -> dict[str, Any]:
    """The index's manifest; `parent` is recorded by absolute path and by its path relative to
    `out`, so the parent and the index can move together."""
    total = int(np.sum(np.left_shift(1, decomposition.log2_len.astype(np.int64))))
    return {
        "kind": KIND,
        "version": VERSION,
        "method": "dataset decomposition (Pouransari et al. 2024): binary expansion, largest first",
        "convention": CONVENTION,
        "parameters": {"min_log2": decomposition.min_log2, "max_log2": decomposition.max_log2},
        "parent": parent_record(parent, out),
        "tokenizer": parent_manifest.get("tokenizer"),
        "eos_id": parent_manifest.get("eos_id"),
        "documents": int(len(np.unique(decomposition.doc_id))) + decomposition.dropped_documents,
        "chunks": len(decomposition),
        "tokens": total,
        "dropped": {
            "tokens": decomposition.dropped_tokens,
            "documents_without_chunk": decomposition.dropped_documents,
        },
        "buckets": summary(decomposition),
    }


def write_decomposition(
    shardset_dir: str | Path,
    out: str | Path,
    min_log2: int = DEFAULT_MIN_LOG2,
    max_log2: int = DEFAULT_MAX_LOG2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Decompose the ShardSet at `shardset_dir` and write the index directory `out` atomically
    (built in a temp sibling, then moved into place). Returns the written manifest."""
    from data_pipeline.formats import open_shardset

    parent = Path(shardset_dir).resolve()
    out = Path(out).resolve()
    check_bucket_range(min_log2, max_log2)
    check_output_dir(out, parent, overwrite)
    shardset = open_shardset(parent)
    parent_manifest = read_manifest(parent)
    decomposition = decompose_lengths(np.asarray(shardset.lengths), min_log2, max_log2)
    manifest = build_manifest(decomposition, parent, parent_manifest, out)
    with building_dir(out) as tmp:
        with open(tmp / INDEX_NAME, "wb") as fh:
            np.savez(
                fh,
                doc_id=decomposition.doc_id,
                begin=decomposition.begin,
                log2_len=decomposition.log2_len,
            )
            fh.flush()
            os.fsync(fh.fileno())
        (tmp / MANIFEST_NAME).write_bytes(json_bytes(manifest))
    return manifest


@dataclass(frozen=True)
class DecompositionIndex:
    """A decomposition directory, opened: its manifest, chunks and where its parent was found."""

    root: Path
    manifest: dict[str, Any]
    decomposition: Decomposition
    parent_lookup: ParentLookup

    @property
    def parent(self) -> Path:
        """The parent ShardSet directory: the one whose manifest hash matches (recorded absolute
        path first, then the path relative to this index), else the recorded absolute path."""
        return self.parent_lookup.path or Path(self.manifest["parent"]["path"])


def open_decomposition(
    path: str | Path, check_parent: bool = True, where: str | None = None
) -> DecompositionIndex:
    """Read a decomposition directory; with `check_parent`, refuse it when no parent ShardSet
    with the recorded manifest hash is found, at the recorded absolute path or relative to the
    index (the chunks would point at other documents). `where` starts error messages (default
    `data.decomposition.path ROOT`)."""
    root = Path(path)
    where = where or f"data.decomposition.path {root}"
    if not (root / MANIFEST_NAME).is_file() or not (root / INDEX_NAME).is_file():
        raise FileNotFoundError(
            f"{where}: not a decomposition (want {MANIFEST_NAME} and {INDEX_NAME}; "
            "write one with `strata decompose SHARDSET --out DIR`)"
        )
    manifest = read_manifest(root)
    if manifest.get("kind") != KIND or manifest.get("version") != VERSION:
        raise ValueError(
            f"{where}: manifest kind/version {manifest.get('kind')!r}/{manifest.get('version')!r}, "
            f"want {KIND!r}/{VERSION}"
        )
    with np.load(root / INDEX_NAME) as index:
        doc_id, begin, log2_len = index["doc_id"], index["begin"], index["log2_len"]
    parameters = manifest["parameters"]
    decomposition = Decomposition(
        doc_id=doc_id.astype(np.int64),
        begin=begin.astype(np.int64),
        log2_len=log2_len.astype(np.int8),
        min_log2=int(parameters["min_log2"]),
        max_log2=int(parameters["max_log2"]),
        dropped_tokens=int(manifest["dropped"]["tokens"]),
        dropped_documents=int(manifest["dropped"]["documents_without_chunk"]),
    )
    if len(decomposition) != int(manifest["chunks"]):
        raise ValueError(
            f"{where}: {INDEX_NAME} holds {len(decomposition)} chunks, the manifest says "
            f"{manifest['chunks']}"
        )
    lookup = locate_parent(root, recorded_parent(manifest) or {})
    if check_parent:
        require_parent(lookup, where, "decomposition", "decompose it again")
    return DecompositionIndex(root, manifest, decomposition, lookup)
