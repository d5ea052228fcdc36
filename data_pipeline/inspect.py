"""`strata inspect`: what a Strata data artifact holds, as a plain JSON-ready dict.

Owns the summary of a ShardSet (prepare / select / convert output) or a decomposition index:
counts, document-length statistics, tokenizer, rejections, sources, shards on disk, and the
provenance chain walked up to its root. It reads only through the readers (`open_shardset`),
the manifest helpers and `open_decomposition`; it prints nothing (launch/commands/inspect.py does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import decompose
from data_pipeline.formats import ShardSet, open_shardset
from data_pipeline.manifest import (
    MANIFEST_NAME,
    length_histogram,
    locate_parent,
    manifest_sha256,
    read_manifest,
    recorded_parent,
)

SHARDSET = "shardset"
DECOMPOSITION = "decomposition"
EXPECTED = (
    f"want a ShardSet ({MANIFEST_NAME} with a format, plus shards: `strata prepare`, `select`, "
    f"`convert`) or a decomposition ({MANIFEST_NAME} + {decompose.INDEX_NAME}: `strata decompose`)"
)
MAX_CHAIN = 64  # ancestors followed at most (a guard against a manifest cycle)
STATUS = {"ok": "ok", "changed": "changed since", "missing": "missing"}


class NotAnArtifact(ValueError):
    """The path is not a directory Strata's data pipeline wrote."""


# --------------------------------------------------------------------------- what is it


def artifact_kind(path: str | Path) -> tuple[str, Path, dict[str, Any]]:
    """(SHARDSET or DECOMPOSITION, directory, manifest) of `path` (a directory or its
    manifest.json); NotAnArtifact naming the path and what is expected otherwise."""
    root = Path(path)
    if root.is_file() and root.name == MANIFEST_NAME:
        root = root.parent
    if not root.is_dir():
        what = "a file, not a directory" if root.exists() else "no such directory"
        raise NotAnArtifact(f"{path}: {what}; {EXPECTED}")
    if not (root / MANIFEST_NAME).is_file():
        inside = sorted(c.name for c in root.iterdir() if (c / MANIFEST_NAME).is_file())
        hint = f" (it holds some: {', '.join(inside)})" if inside else ""
        raise NotAnArtifact(
            f"{root}: no {MANIFEST_NAME}, not a Strata data artifact{hint}; {EXPECTED}"
        )
    try:
        manifest = read_manifest(root)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NotAnArtifact(f"{root / MANIFEST_NAME}: not valid JSON ({err}); {EXPECTED}") from None
    if not isinstance(manifest, dict):
        raise NotAnArtifact(f"{root / MANIFEST_NAME}: not a JSON object; {EXPECTED}")
    if manifest.get("kind") == decompose.KIND or (root / decompose.INDEX_NAME).is_file():
        return DECOMPOSITION, root, manifest
    if "format" in manifest and "shards" in manifest:
        return SHARDSET, root, manifest
    raise NotAnArtifact(
        f"{root / MANIFEST_NAME}: neither a ShardSet's manifest (format, shards) nor a "
        f"decomposition's (kind {decompose.KIND!r}); {EXPECTED}"
    )


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """Everything `strata inspect` shows about the artifact at `path`, as a JSON-ready dict."""
    kind, root, manifest = artifact_kind(path)
    if kind == DECOMPOSITION:
        return inspect_decomposition(root)
    try:
        shardset = open_shardset(root)
    except KeyError as err:
        raise NotAnArtifact(f"{root / MANIFEST_NAME}: missing field {err}; {EXPECTED}") from None
    return inspect_shardset(shardset)


# --------------------------------------------------------------------------- ShardSet


def length_statistics(lengths: np.ndarray) -> dict[str, float | int] | None:
    """min / median / mean / p90 / p99 / max of document lengths (None when there are none)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return None
    median, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {
        "min": int(lengths.min()),
        "median": float(median),
        "mean": round(float(lengths.mean()), 3),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(lengths.max()),
    }


def histogram_rows(lengths: np.ndarray) -> list[dict[str, int]]:
    """Documents per power-of-two length bin [lower, upper] (manifest.length_histogram's bins;
    the first bin also holds empty documents), from the first non-empty bin to the last."""
    histogram = length_histogram(lengths)
    rows = [
        {"lower": 0 if lower == 1 else lower, "upper": 2 * lower - 1, "documents": count}
        for lower, count in zip(histogram["bin_lower_edges"], histogram["counts"], strict=True)
    ]
    first = next((i for i, row in enumerate(rows) if row["documents"]), len(rows))
    return rows[first:]


def tokenizer_info(recorded: dict[str, Any] | None, tokenizer_file: Path | None) -> dict[str, Any]:
    """The manifest's tokenizer record, plus what the tokenizer.json on disk says (vocab size,
    whether its fingerprint still matches) when the file is there."""
    from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint, vocab_size_of

    info: dict[str, Any] = dict(recorded or {})
    info["file_path"] = str(tokenizer_file) if tokenizer_file is not None else None
    if tokenizer_file is not None:
        try:
            tokenizer = load_tokenizer(tokenizer_file)
        except (FileNotFoundError, ValueError) as err:
            info["file_error"] = str(err)
        else:
            info["file_vocab_size"] = vocab_size_of(tokenizer)
            if info.get("fingerprint"):
                info["fingerprint_matches"] = (
                    tokenizer_fingerprint(tokenizer) == info["fingerprint"]
                )
    return info


def _directory_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def shard_files(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Shard count, files and bytes on disk of the manifest's shards; files it names that are
    not there are listed under `missing_files`."""
    files = [name for shard in manifest.get("shards", []) for name in shard.get("files", [])]
    present = [root / name for name in files if (root / name).is_file()]
    return {
        "count": len(manifest.get("shards", [])),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in present),
        "missing_files": [name for name in files if not (root / name).is_file()],
        "directory_bytes": _directory_bytes(root),
    }


def inspect_shardset(shardset: ShardSet) -> dict[str, Any]:
    """Counts, lengths (from the lengths array, no token data), tokenizer, rejections, sources,
    shards on disk, provenance chain, and `problems` (disagreements between those)."""
    manifest, root = shardset.manifest, shardset.root
    lengths = np.asarray(shardset.lengths, dtype=np.int64)
    counts = manifest.get("counts", {})
    shards = shard_files(root, manifest)
    tokenizer = tokenizer_info(manifest.get("tokenizer"), shardset.tokenizer_path)
    problems = []
    if len(lengths) != len(shardset):
        problems.append(f"lengths.npy holds {len(lengths)} documents, the shards {len(shardset)}")
    if int(lengths.sum()) != int(counts.get("tokens", lengths.sum())):
        problems.append(
            f"lengths.npy sums to {int(lengths.sum())} tokens, the manifest says {counts['tokens']}"
        )
    if shards["missing_files"]:
        problems.append(f"{len(shards['missing_files'])} shard files missing")
    if tokenizer.get("fingerprint_matches") is False:
        problems.append("tokenizer.json no longer matches the recorded fingerprint")
    return {
        "path": str(root.resolve()),
        "kind": SHARDSET,
        "format": manifest["format"],
        "compression": (manifest.get("options") or {}).get("compression"),
        "dtype": manifest.get("dtype"),
        "eos": {"token": manifest.get("eos_token"), "id": manifest.get("eos_id")},
        "documents": len(shardset),
        "tokens": int(counts.get("tokens", lengths.sum())),
        "input_records": counts.get("input_records"),
        "split_records": counts.get("split_records", 0),
        "length_stats": length_statistics(lengths),
        "length_histogram": histogram_rows(lengths),
        "tokenizer": tokenizer,
        "rejected": dict(sorted((manifest.get("rejected") or {}).items())),
        "sources": manifest.get("sources") or {},
        "shards": shards,
        "manifest_sha256": manifest_sha256(root),
        "provenance": provenance_chain(root, manifest),
        "problems": problems,
    }


# --------------------------------------------------------------------------- decomposition


def inspect_decomposition(root: Path) -> dict[str, Any]:
    """Buckets (2^i: chunks, tokens) from the index itself, drops, the parent and its chain."""
    index = decompose.open_decomposition(root, check_parent=False, where=str(root))
    manifest, lookup = index.manifest, index.parent_lookup
    buckets = decompose.summary(index.decomposition)
    problems = []
    if buckets != manifest.get("buckets"):
        problems.append(f"{decompose.INDEX_NAME} and {MANIFEST_NAME} disagree on the bucket counts")
    if lookup.status != "ok":
        problems.append(f"parent ShardSet {STATUS[lookup.status]}: training on it is refused")
    tokenizer_file = None
    if lookup.path is not None:
        candidate = lookup.path / "tokenizer.json"
        tokenizer_file = candidate if candidate.is_file() else None
    return {
        "path": str(root.resolve()),
        "kind": DECOMPOSITION,
        "format": f"{decompose.KIND} v{manifest.get('version')}",
        "documents": manifest.get("documents"),
        "tokens": manifest.get("tokens"),
        "chunks": len(index.decomposition),
        "parameters": manifest.get("parameters"),
        "dropped": manifest.get("dropped"),
        "buckets": buckets,
        "tokenizer": tokenizer_info(manifest.get("tokenizer"), tokenizer_file),
        "parent": {
            "status": STATUS[lookup.status],
            "path": str(lookup.path) if lookup.path is not None else None,
            "tried": [str(p) for p in lookup.tried],
        },
        "files": {"directory_bytes": _directory_bytes(root)},
        "manifest_sha256": manifest_sha256(root),
        "provenance": provenance_chain(root, manifest),
        "problems": problems,
    }


# --------------------------------------------------------------------------- provenance


def _summarize_inputs(inputs: list[Any]) -> str:
    names = [str(i) for i in inputs]
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def describe_step(
    manifest: dict[str, Any] | None, provenance: dict[str, Any] | None
) -> dict[str, Any]:
    """Kind, method and key parameters of one artifact of a chain, from its manifest or, when
    the artifact is gone, the provenance its child embedded."""
    if manifest is not None and manifest.get("kind") == decompose.KIND:
        return {
            "kind": DECOMPOSITION,
            "method": "strata decompose",
            "parameters": manifest.get("parameters", {}),
        }
    provenance = provenance if provenance is not None else (manifest or {}).get("provenance") or {}
    method = provenance.get("tool") or provenance.get("method") or "unknown"
    parameters: dict[str, Any] = {}
    if manifest is not None:
        parameters["format"] = manifest.get("format")
    if provenance.get("inputs"):
        parameters["inputs"] = _summarize_inputs(provenance["inputs"])
    curation = provenance.get("selection") or provenance.get("dedup") or {}  # select / dedup
    for key in ("tau", "alpha", "selection", "chunk_docs", "ngram", "threshold", "kept", "dropped"):
        if curation.get(key) is not None:
            parameters[key] = curation[key]
    return {"kind": SHARDSET, "method": method, "parameters": parameters}


def provenance_chain(root: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The artifact and its ancestors up to the root, child first. Each ancestor is looked for
    with manifest.locate_parent (recorded absolute path, then the path relative to its child)
    and marked ok, "changed since" (a manifest is there with another hash) or missing; past a
    missing one the chain goes on from the provenance its child embedded, when it has one."""
    chain = [
        {
            "depth": 0,
            "path": str(Path(root).resolve()),
            "status": "this",
            **describe_step(manifest, None),
        }
    ]
    child_root: Path | None = Path(root)
    provenance = manifest.get("provenance") if manifest.get("kind") != decompose.KIND else None
    record = recorded_parent(manifest)
    while record is not None and len(chain) <= MAX_CHAIN:
        lookup = locate_parent(child_root, record)
        entry: dict[str, Any] = {
            "depth": len(chain),
            "path": str(lookup.path) if lookup.path is not None else record.get("path"),
            "status": STATUS[lookup.status],
            "recorded_sha256": lookup.recorded_sha256,
        }
        if lookup.status != "ok":
            entry["tried"] = [str(p) for p in lookup.tried]
        if lookup.path is not None:
            parent_manifest = read_manifest(lookup.path)
            entry.update(describe_step(parent_manifest, None))
            child_root, provenance = lookup.path, parent_manifest.get("provenance")
            record = recorded_parent(parent_manifest)
        else:
            embedded = (provenance or {}).get("parent_provenance")
            entry.update(
                describe_step(None, embedded)
                if embedded
                else {"kind": None, "method": "unknown", "parameters": {}}
            )
            child_root, provenance = None, embedded
            record = recorded_parent({"provenance": embedded}) if embedded else None
        chain.append(entry)
    return chain


# --------------------------------------------------------------------------- documents


def _decoder(tokenizer_file: Path | None):
    if tokenizer_file is None:
        return None
    from data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_file)


def _sample(
    doc_id: int, tokens: np.ndarray, tokenizer, max_chars: int, **extra: Any
) -> dict[str, Any]:
    """One document for the eye: decoded (ids when there is no tokenizer), cut at `max_chars`."""
    head = tokens[: max_chars + 1].tolist()  # a token is at least one character (or byte)
    if tokenizer is not None:
        text = tokenizer.decode(head, skip_special_tokens=False)
    else:
        text = " ".join(str(t) for t in head)
    truncated = len(tokens) > len(head) or len(text) > max_chars
    return {
        "doc_id": doc_id,
        **extra,
        "tokens": int(len(tokens)),
        "text": text[:max_chars],
        "truncated": truncated,
    }


def sample_documents(path: str | Path, count: int, max_chars: int = 400) -> list[dict[str, Any]]:
    """The first `count` documents of a ShardSet (or chunks of a decomposition, read from its
    verified parent), decoded with the ShardSet's tokenizer.json and cut at `max_chars`."""
    kind, root, _ = artifact_kind(path)
    if count <= 0:
        return []
    if kind == SHARDSET:
        shardset = open_shardset(root)
        tokenizer = _decoder(shardset.tokenizer_path)
        return [
            _sample(d, shardset.get(d), tokenizer, max_chars)
            for d in range(min(count, len(shardset)))
        ]
    index = decompose.open_decomposition(root, check_parent=True, where=str(root))
    shardset = open_shardset(index.parent)
    tokenizer = _decoder(shardset.tokenizer_path)
    d = index.decomposition
    samples = []
    for k in range(min(count, len(d))):
        begin, size = int(d.begin[k]), 1 << int(d.log2_len[k])
        tokens = shardset.get(int(d.doc_id[k]))[begin : begin + size]
        samples.append(
            _sample(int(d.doc_id[k]), tokens, tokenizer, max_chars, chunk=k, begin=begin)
        )
    return samples
