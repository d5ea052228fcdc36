"""The ShardSet reader interface shared by every on-disk format, and the shard-writer protocol.

A ShardSet is a directory with `manifest.json`, `lengths.npy` (tokens per document) and the
shards. Readers give `len`, `lengths` (without touching token data) and `get(doc_id)`. Writing
order, resumability and shard cutting live in formats/writer.py, not here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_pipeline.manifest import LENGTHS_NAME, TOKENIZER_NAME


class ShardSet:
    """Random access to the token documents of one prepared dataset (any format)."""

    format: str = ""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.eos_id: int = int(manifest["eos_id"])
        self._reset_caches()
        counts = [int(s["num_docs"]) for s in manifest["shards"]]
        # doc id d lives in shard i where shard_starts[i] <= d < shard_starts[i+1]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._num_docs = int(self.shard_starts[-1])

    def _reset_caches(self) -> None:
        self._lengths: np.ndarray | None = None
        self._shards: dict[int, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickles (to loader worker processes) without memory maps; they reopen lazily."""
        state = self.__dict__.copy()
        for key in ("_lengths", "_shards", "_lock"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def __len__(self) -> int:
        return self._num_docs

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document (EOS included), memory-mapped from lengths.npy."""
        if self._lengths is None:
            self._lengths = np.load(self._local_file(LENGTHS_NAME), mmap_mode="r")
        return self._lengths

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["counts"]["tokens"])

    @property
    def tokenizer_path(self) -> Path | None:
        path = self._local_file(TOKENIZER_NAME)
        return path if path.is_file() else None

    def _local_file(self, name: str) -> Path:
        """Path of a top-level file of the ShardSet on local disk (remote readers download it)."""
        return self.root / name

    def locate(self, doc_id: int) -> tuple[int, int]:
        """(shard index, index within that shard) of a document."""
        if not 0 <= doc_id < self._num_docs:
            raise IndexError(f"document {doc_id} out of range [0, {self._num_docs})")
        shard = int(np.searchsorted(self.shard_starts, doc_id, side="right")) - 1
        return shard, int(doc_id - self.shard_starts[shard])

    def _shard(self, shard: int) -> Any:
        """The opened (memory-mapped) shard, opened once per process and shared by threads."""
        opened = self._shards.get(shard)
        if opened is None:
            with self._lock:
                opened = self._shards.get(shard)
                if opened is None:
                    opened = self._shards[shard] = self._open_shard(shard)
        return opened

    def _open_shard(self, shard: int) -> Any:
        raise NotImplementedError

    def get(self, doc_id: int) -> np.ndarray:
        """Tokens of one document, EOS included, as `self.dtype`."""
        raise NotImplementedError

    def iter_documents(self) -> Iterator[np.ndarray]:
        for doc_id in range(len(self)):
            yield self.get(doc_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, docs={len(self)}, dtype={self.dtype})"


class ShardFormat(Protocol):
    """Writes one shard's files and the set-level index for one on-disk format."""

    name: str
    per_doc_overhead: int  # approximate bytes a document adds besides its tokens
    supports_compression: bool

    def write_shard(
        self,
        directory: Path,
        shard_index: int,
        first_doc_id: int,
        docs: list[np.ndarray],
        dtype: np.dtype,
        compression: str | None,
    ) -> dict[str, Any]:
        """Write the shard's files into `directory`; return {"files": [...], ...format info}."""
        ...

    def finalize(self, out_dir: Path, shards: list[dict[str, Any]]) -> None:
        """Write set-level files (e.g. the MDS index.json) once every shard is in place."""
        ...
