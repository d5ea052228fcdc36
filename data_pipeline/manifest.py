"""The ShardSet `manifest.json`: counts, tokenizer fingerprint, dtype, histogram, provenance.

Owns the manifest's shape, the document-length histogram and atomic JSON/npy/directory writes
(temp + os.replace). It does not decide what the counts are; prepare/convert pass them in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
LENGTHS_NAME = "lengths.npy"
TOKENIZER_NAME = "tokenizer.json"
MANIFEST_VERSION = 1


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def check_output_dir(out_dir: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output directory that is, contains or lies inside `source`, or that exists
    already unless `overwrite`; the input of a derived artifact is never touched."""
    source, target = Path(source).resolve(), Path(out_dir).resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ValueError(f"--out {out_dir}: must not be, contain or lie inside the input {source}")
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"--out {out_dir}: already exists (pass --overwrite to replace it)")


@contextmanager
def building_dir(target: Path) -> Iterator[Path]:
    """A temp sibling of `target` to build a directory in: moved onto `target` (replace_dir) when
    the block ends, removed when it raises, so readers see the old directory or the new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Moves the finished directory `new` to `target`; an old `target` is removed only after the
    new one is in place, so a crash leaves the old directory or the new one."""
    new.chmod(0o755)
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def length_histogram(lengths: np.ndarray) -> dict[str, list[int]]:
    """Counts of documents per power-of-two length bin: bin i holds lengths in [2^i, 2^(i+1))."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return {"bin_lower_edges": [], "counts": []}
    bins = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(bins)
    return {
        "bin_lower_edges": [int(2**i) for i in range(len(counts))],
        "counts": [int(c) for c in counts],
    }


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"not a ShardSet (no {MANIFEST_NAME}): {root}")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def manifest_sha256(root: Path) -> str:
    """Identity of a ShardSet, recorded as `parent` by anything derived from it."""
    return hashlib.sha256((Path(root) / MANIFEST_NAME).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- finding a parent


def parent_record(parent: Path, child: Path) -> dict[str, str]:
    """What a derived artifact at `child` records to find `parent` again: the absolute path,
    the path relative to `child` (so the two can move together), and the manifest's sha256."""
    parent, child = Path(parent).resolve(), Path(child).resolve()
    return {
        "path": str(parent),
        "relative_path": os.path.relpath(parent, child),
        "manifest_sha256": manifest_sha256(parent),
    }


def provenance_parent_paths(source: str | Path, child: Path) -> dict[str, str]:
    """A ShardSet provenance's `parent_path` / `parent_relative_path` for a local parent, so the
    chain can be followed after both move together (`locate_parent`); nothing for a remote one."""
    if not Path(source).is_dir():
        return {}
    record = parent_record(Path(source), child)
    return {"parent_path": record["path"], "parent_relative_path": record["relative_path"]}


def recorded_parent(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The parent a manifest names, as {"path", "relative_path", "manifest_sha256"} (missing
    entries None), or None for a root. Reads both shapes: a decomposition's top-level `parent`
    record and a ShardSet's `provenance` (parent sha256, parent_path or parent_location)."""
    parent = manifest.get("parent")
    if isinstance(parent, dict):
        return {
            "path": parent.get("path"),
            "relative_path": parent.get("relative_path"),
            "manifest_sha256": parent.get("manifest_sha256"),
        }
    provenance = manifest.get("provenance") or {}
    if not provenance.get("parent"):
        return None
    return {
        "path": provenance.get("parent_path") or provenance.get("parent_location"),
        "relative_path": provenance.get("parent_relative_path"),
        "manifest_sha256": provenance["parent"],
    }


@dataclass(frozen=True)
class ParentLookup:
    """Where a recorded parent was looked for and what was found.

    status: "ok" (a candidate's manifest has the recorded sha256; `path` is it), "changed"
    (a candidate exists with another sha256; `path` is the first such, `found_sha256` its
    hash) or "missing" (no candidate holds a manifest; `path` is None).
    """

    status: str
    path: Path | None
    tried: tuple[Path, ...]
    recorded_sha256: str
    found_sha256: str | None = None


def locate_parent(child_root: Path | None, record: dict[str, Any]) -> ParentLookup:
    """Find the parent `record` (from `parent_record`/`recorded_parent`) names: the recorded
    absolute path if its manifest hash matches, else the path relative to `child_root` if its
    hash matches (the two directories moved together). Manifests without a relative path (older
    ones) are looked for at the absolute path only; `child_root` None skips the relative one."""
    candidates: list[Path] = []
    if record.get("path"):
        candidates.append(Path(record["path"]))
    if record.get("relative_path") and child_root is not None:
        candidates.append(Path(os.path.normpath(Path(child_root).resolve() / record["relative_path"])))
    tried = tuple(dict.fromkeys(candidates))
    recorded = str(record.get("manifest_sha256") or "")
    changed: tuple[Path, str] | None = None
    for candidate in tried:
        if not (candidate / MANIFEST_NAME).is_file():
            continue
        found = manifest_sha256(candidate)
        if found == recorded:
            return ParentLookup("ok", candidate, tried, recorded)
        changed = changed or (candidate, found)
    if changed is not None:
        return ParentLookup("changed", changed[0], tried, recorded, changed[1])
    return ParentLookup("missing", None, tried, recorded)


def require_parent(lookup: ParentLookup, where: str, since: str, remedy: str = "") -> Path:
    """The verified parent directory of a `locate_parent` result, or a clear error naming every
    path tried: FileNotFoundError when none holds a manifest, ValueError when the parent changed
    since the child was derived (`since`, e.g. "decomposition"); `remedy` ends the message."""
    tried = " and ".join(str(path) for path in lookup.tried) or "no recorded path"
    if lookup.status == "missing":
        raise FileNotFoundError(f"{where}: its parent ShardSet is gone (tried {tried})")
    if lookup.status == "changed":
        raise ValueError(
            f"{where}: the parent ShardSet {lookup.path} changed since {since} (manifest sha256 "
            f"{str(lookup.found_sha256)[:16]}, recorded {lookup.recorded_sha256[:16]}; tried "
            f"{tried})" + (f"; {remedy}" if remedy else "")
        )
    assert lookup.path is not None
    return lookup.path


def summarize_rejections(manifest: dict[str, Any]) -> str:
    """One human line per rejection reason, for the end-of-run summary."""
    rejected = manifest.get("rejected", {})
    if not rejected:
        return "no records rejected"
    total = sum(rejected.values())
    parts = ", ".join(f"{reason}={count}" for reason, count in sorted(rejected.items()))
    return f"{total} records rejected: {parts}"
