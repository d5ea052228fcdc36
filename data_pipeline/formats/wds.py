"""webdataset shards: tar files of `{key}.tokens.npy` samples, written with `webdataset.TarWriter`.

Tars are written reproducibly (fixed mtime/user) so resumed runs are byte-identical. Next to each
tar, `shard-NNNNN.offsets.npy` holds the byte offset of every document's token data inside the
tar, so `get(doc_id)` is one slice of a memory map, never a tar scan.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.formats.base import ShardSet

SAMPLE_FIELD = "tokens.npy"


def shard_names(shard_index: int) -> tuple[str, str]:
    return f"shard-{shard_index:05}.tar", f"shard-{shard_index:05}.offsets.npy"


def _token_data_offsets(tar_path: Path) -> np.ndarray:
    """Offset of the array data (past the .npy header) of every member, in tar order."""
    offsets = []
    with tarfile.open(tar_path, "r") as tar, open(tar_path, "rb") as raw:
        for member in tar:
            if not member.name.endswith("." + SAMPLE_FIELD):
                continue
            raw.seek(member.offset_data)
            version = np.lib.format.read_magic(raw)
            np.lib.format._check_version(version)
            if version == (1, 0):
                np.lib.format.read_array_header_1_0(raw)
            else:
                np.lib.format.read_array_header_2_0(raw)
            offsets.append(raw.tell())
    return np.array(offsets, dtype=np.int64)


class WDSFormat:
    name = "wds"
    per_doc_overhead = 512 + 128 + 256  # tar header, npy header, average tar padding
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
        import webdataset

        tar_name, offsets_name = shard_names(shard_index)
        tar_path = directory / tar_name
        with webdataset.TarWriter(str(tar_path), mtime=0.0, user="strata", group="strata") as sink:
            for i, doc in enumerate(docs):
                sink.write({"__key__": f"{first_doc_id + i:010d}", SAMPLE_FIELD: doc})
        offsets = _token_data_offsets(tar_path)
        if len(offsets) != len(docs):
            raise RuntimeError(f"{tar_name}: wrote {len(docs)} documents, found {len(offsets)}")
        np.save(directory / offsets_name, offsets)
        return {"files": [tar_name, offsets_name]}

    def finalize(self, out_dir: Path, shards: list[dict[str, Any]]) -> None:
        return None


class WDSShardSet(ShardSet):
    format = "wds"

    def tar_paths(self) -> list[str]:
        return [str(self.root / shard_names(i)[0]) for i in range(len(self.shard_starts) - 1)]

    def _open_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        tar_name, offsets_name = shard_names(shard)
        buffer = np.memmap(self.root / tar_name, dtype=np.uint8, mode="r")
        return buffer, np.load(self.root / offsets_name)

    def get(self, doc_id: int) -> np.ndarray:
        shard, index = self.locate(doc_id)
        buffer, offsets = self._shard(shard)
        count = int(self.lengths[doc_id])
        return np.frombuffer(buffer, self.dtype, count=count, offset=int(offsets[index])).copy()
