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


def summarize_rejections(manifest: dict[str, Any]) -> str:
    """One human line per rejection reason, for the end-of-run summary."""
    rejected = manifest.get("rejected", {})
    if not rejected:
        return "no records rejected"
    total = sum(rejected.values())
    parts = ", ".join(f"{reason}={count}" for reason, count in sorted(rejected.items()))
    return f"{total} records rejected: {parts}"
