"""Megatron `.bin/.idx` shards written with megatron-core's `IndexedDatasetBuilder`.

One `shard-NNNNN.bin/.idx` pair per shard (each a complete IndexedDataset, one sequence per
document). Megatron has no uint32 dtype, so vocabularies >= 65536 are stored as int32. The
reader memory-maps the documented .idx layout itself: importing megatron-core costs seconds
and torch, which loader workers should not pay; tests check it against `IndexedDataset`.
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.formats.base import ShardSet

IDX_MAGIC = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}


def shard_prefix(shard_index: int) -> str:
    return f"shard-{shard_index:05}"


def storage_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.uint16) if np.dtype(dtype) == np.uint16 else np.dtype(np.int32)


class MegatronFormat:
    name = "megatron"
    per_doc_overhead = 4 + 8 + 8  # sequence length, pointer, document index
    supports_compression = False

    def write_shard(
        self,
        directory: Path,
        shard_index: int,
        first_doc_id: int,
        docs: list[np.ndarray],
        dtype: np.dtype,
        compression: str | None,
    ) -> dict[str, Any]:
        builder_class = _indexed_dataset_builder()
        prefix = shard_prefix(shard_index)
        stored = storage_dtype(dtype)
        builder = builder_class(str(directory / f"{prefix}.bin"), dtype=stored.type)
        for doc in docs:
            builder.add_document(doc.astype(stored, copy=False), [len(doc)])
        builder.finalize(str(directory / f"{prefix}.idx"))
        return {"files": [f"{prefix}.bin", f"{prefix}.idx"]}

    def finalize(self, out_dir: Path, shards: list[dict[str, Any]]) -> None:
        return None


def read_idx(idx_path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, sequence byte pointers) of a Megatron .idx file."""
    buffer = np.memmap(idx_path, dtype=np.uint8, mode="r")
    header = bytes(buffer[:34])
    if header[:9] != IDX_MAGIC:
        raise ValueError(f"not a Megatron index file: {idx_path}")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != 1:
        raise ValueError(f"{idx_path}: unsupported Megatron index version {version}")
    dtype = np.dtype(DTYPE_CODES[header[17]])
    sequence_count, _document_count = struct.unpack("<QQ", header[18:34])
    lengths = np.frombuffer(buffer, np.int32, count=sequence_count, offset=34)
    pointers = np.frombuffer(buffer, np.int64, count=sequence_count, offset=34 + lengths.nbytes)
    return dtype, lengths, pointers


class MegatronShardSet(ShardSet):
    format = "megatron"

    def path_prefixes(self) -> list[str]:
        return [str(self.root / shard_prefix(i)) for i in range(len(self.shard_starts) - 1)]

    def _open_shard(self, shard: int) -> tuple[np.ndarray, np.dtype, np.ndarray]:
        prefix = self.root / shard_prefix(shard)
        dtype, _lengths, pointers = read_idx(prefix.with_suffix(".idx"))
        data = np.memmap(prefix.with_suffix(".bin"), dtype=np.uint8, mode="r")
        return data, dtype, pointers

    def get(self, doc_id: int) -> np.ndarray:
        shard, index = self.locate(doc_id)
        data, stored, pointers = self._shard(shard)
        count = int(self.lengths[doc_id])
        tokens = np.frombuffer(data, stored, count=count, offset=int(pointers[index]))
        return tokens.astype(self.dtype, copy=True)


def _indexed_dataset_builder() -> type:
    """megatron-core's builder class, imported without the noise it makes on a CPU machine: its
    "Transformer Engine and Apex are not installed" UserWarnings, and the "No CUDA runtime is
    found" line torch.utils.cpp_extension logs when megatron-core imports it."""
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    finally:
        cpp_extension_log.setLevel(level)
    return IndexedDatasetBuilder
