"""Resumable ShardSet writing: cut documents into shards by size and commit them one by one.

A shard's files are written to a staging directory and moved into place with os.replace; only
then is `.strata_state/state.json` (atomically) updated with the shard and the caller's resume
point. A run killed anywhere resumes from the last committed shard and, because shard cuts
depend only on the document stream, ends with byte-identical shards. Format details live in the
format modules; what a "resume point" means is the caller's business (prepare, convert).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.formats import get_format
from data_pipeline.manifest import LENGTHS_NAME, MANIFEST_NAME, write_json_atomic, write_npy_atomic

STATE_DIR = ".strata_state"
STATE_FILE = "state.json"


class ResumeMismatch(RuntimeError):
    """The output directory holds a run with different inputs or options."""


def parse_size(text: str | int) -> int:
    """'64MB', '512kb', '1gib', 1048576 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20,
             "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
    value = text.strip().lower()
    number = value.rstrip("abgikm ")
    unit = value[len(number):].strip()
    try:
        if unit not in units:
            raise ValueError(unit)
        size = int(float(number) * units[unit])
    except (ValueError, OverflowError):  # "12XB", "MB", "abc", "inf"
        raise ValueError(f"cannot parse size {text!r} (examples: 64MB, 512kb, 1048576)") from None
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def check_writable(out_dir: Path) -> None:
    """Fail at once (before any work) if `out_dir` cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{id(out_dir)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory is not writable: {out_dir} ({exc.strerror})") from exc


class ShardSetWriter:
    """Accepts documents in order; writes shards of about `shard_size_bytes`; resumes.

    `snapshot()` is called right before a shard is committed and must describe the caller's
    position *before* the document that did not fit (it is stored as the resume point).
    """

    def __init__(
        self,
        out_dir: Path,
        format_name: str,
        dtype: np.dtype,
        shard_size_bytes: int,
        compression: str | None,
        fingerprint: dict[str, Any],
        snapshot: Callable[[], dict[str, Any]],
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.format = get_format(format_name)
        if compression and not self.format.supports_compression:
            raise ValueError(f"--compression is not supported by the {format_name} format (mds only)")
        if compression:
            from streaming.base.compression import get_compressions, is_compression

            if not is_compression(compression):
                known = ", ".join(sorted({name.split(":")[0] for name in get_compressions()}))
                raise ValueError(f"unknown compression {compression!r}; use {known} (optionally :LEVEL)")
        self.dtype = np.dtype(dtype)
        self.shard_size_bytes = shard_size_bytes
        self.compression = compression
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.snapshot = snapshot
        self.state_dir = self.out_dir / STATE_DIR
        check_writable(self.out_dir)
        if overwrite:
            self._clear_output()
        self.shards: list[dict[str, Any]] = []
        self.resume_point: dict[str, Any] | None = None
        self.finished = False
        self._load_state()
        shutil.rmtree(self.state_dir / "staging", ignore_errors=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._buffer: list[np.ndarray] = []
        self._buffer_bytes = 0

    # ---- state -------------------------------------------------------------------------
    def _clear_output(self) -> None:
        for child in self.out_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _load_state(self) -> None:
        state_path = self.state_dir / STATE_FILE
        if not state_path.is_file():
            leftovers = [p.name for p in self.out_dir.iterdir() if p.name != STATE_DIR]
            if leftovers:
                raise ResumeMismatch(
                    f"output directory {self.out_dir} is not empty and holds no resumable run "
                    f"(found {', '.join(sorted(leftovers)[:3])}); use a new directory or --overwrite"
                )
            return
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
        if state.get("fingerprint") != self.fingerprint:
            raise ResumeMismatch(
                f"output directory {self.out_dir} holds a run with different inputs or options; "
                "use a new directory or --overwrite"
            )
        self.shards = state["shards"]
        self.resume_point = state.get("resume")
        self.finished = bool(state.get("finished")) and (self.out_dir / MANIFEST_NAME).is_file()

    def _save_state(self) -> None:
        write_json_atomic(
            self.state_dir / STATE_FILE,
            {
                "fingerprint": self.fingerprint,
                "shards": self.shards,
                "resume": self.resume_point,
                "finished": self.finished,
            },
        )

    @property
    def num_docs_committed(self) -> int:
        return sum(int(s["num_docs"]) for s in self.shards)

    # ---- writing -----------------------------------------------------------------------
    def add(self, tokens: np.ndarray) -> None:
        size = tokens.nbytes + self.format.per_doc_overhead
        if self._buffer and self._buffer_bytes + size > self.shard_size_bytes:
            self._commit_shard(self.snapshot())
        self._buffer.append(tokens)
        self._buffer_bytes += size

    def _commit_shard(self, resume_point: dict[str, Any]) -> None:
        shard_index = len(self.shards)
        staging = self.state_dir / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        lengths = np.array([len(d) for d in self._buffer], dtype=np.int64)
        try:
            entry = self.format.write_shard(
                staging, shard_index, self.num_docs_committed, self._buffer, self.dtype, self.compression
            )
        except OSError:  # a full disk, say: give the half-written shard's space back
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for name in entry["files"]:
            (staging / name).replace(self.out_dir / name)
        write_npy_atomic(self.state_dir / f"lengths-{shard_index:05}.npy", lengths)
        shutil.rmtree(staging)
        entry.update({"num_docs": len(self._buffer), "num_tokens": int(lengths.sum())})
        self.shards.append(entry)
        self.resume_point = resume_point
        self._save_state()
        self._buffer = []
        self._buffer_bytes = 0

    def finish(self) -> np.ndarray:
        """Commit the last shard, write the format index and lengths.npy; return the lengths."""
        if self._buffer:
            self._commit_shard(self.snapshot())
        self.format.finalize(self.out_dir, self.shards)
        parts = [
            np.load(self.state_dir / f"lengths-{i:05}.npy") for i in range(len(self.shards))
        ]
        lengths = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        write_npy_atomic(self.out_dir / LENGTHS_NAME, lengths)
        return lengths

    def mark_complete(self) -> None:
        """Called after manifest.json is written: a rerun with the same arguments is a no-op."""
        self.finished = True
        self.resume_point = self.snapshot()
        self._save_state()
