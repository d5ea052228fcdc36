"""MDS (mosaicml-streaming) shards: written with `streaming.MDSWriter`, read by memory map.

Each shard is written by its own MDSWriter (one column `tokens`, `ndarray:<dtype>`) so shards
can be committed one by one for resumability; `index.json` is assembled at the end in the layout
`streaming.StreamingDataset` reads. The reader parses the shard layout directly (no per-call
file opening); remote locations are fetched into a local cache with streaming's downloaders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.formats.base import ShardSet
from data_pipeline.manifest import write_bytes_atomic

INDEX_NAME = "index.json"
TOKENS_COLUMN = "tokens"


def _shard_basename(shard_index: int) -> str:
    return f"shard.{shard_index:05}.mds"


class MDSFormat:
    name = "mds"
    per_doc_overhead = 4 + 4 + 1 + 4  # offset, column size, shape byte, shape
    supports_compression = True

    def write_shard(
        self,
        directory: Path,
        shard_index: int,
        first_doc_id: int,
        docs: list[np.ndarray],
        dtype: np.dtype,
        compression: str | None,
    ) -> dict[str, Any]:
        from streaming import MDSWriter

        staging = directory / "mdswriter"
        shutil.rmtree(staging, ignore_errors=True)
        with MDSWriter(
            columns={TOKENS_COLUMN: f"ndarray:{np.dtype(dtype).name}"},
            out=str(staging),
            compression=compression,
            size_limit=None,  # one writer per shard: strata cuts shards itself
        ) as writer:
            for doc in docs:
                writer.write({TOKENS_COLUMN: doc})
        with open(staging / INDEX_NAME, encoding="utf-8") as fh:
            (info,) = json.load(fh)["shards"]
        raw_name = _shard_basename(shard_index)
        info["raw_data"]["basename"] = raw_name
        produced = staging / "shard.00000.mds"
        files = [raw_name]
        if info.get("zip_data"):
            zip_name = info["zip_data"]["basename"].replace("shard.00000.mds", raw_name)
            produced = staging / info["zip_data"]["basename"]
            info["zip_data"]["basename"] = zip_name
            files = [zip_name]
        os.replace(produced, directory / files[0])
        shutil.rmtree(staging)
        return {"files": files, "mds": info}

    def finalize(self, out_dir: Path, shards: list[dict[str, Any]]) -> None:
        index = {"version": 2, "shards": [s["mds"] for s in shards]}
        write_bytes_atomic(out_dir / INDEX_NAME, json.dumps(index, sort_keys=True).encode())


def _download(remote: str, local: Path) -> None:
    """Fetch one file through mosaicml-streaming's downloaders (s3://, gs://, local dirs, ...)."""
    from streaming.base.storage import CloudDownloader

    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.dl-{os.getpid()}-{threading.get_ident()}")
    if tmp.exists():
        tmp.unlink()
    CloudDownloader.direct_download(remote, str(tmp))
    os.replace(tmp, local)


def _join_remote(remote: str, name: str) -> str:
    return remote.rstrip("/") + "/" + name


def default_cache_dir(location: str) -> Path:
    base = Path(os.environ.get("STRATA_CACHE", Path.home() / ".cache" / "strata"))
    return base / "mds" / hashlib.sha1(location.encode()).hexdigest()[:16]


class MDSShardSet(ShardSet):
    """MDS ShardSet on local disk, or remote (any streaming-supported URL) with a local cache."""

    format = "mds"

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        remote: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__(root, manifest)
        self.remote = remote
        self.cache_dir = Path(cache_dir) if cache_dir else None
        with open(self._local_file(INDEX_NAME), encoding="utf-8") as fh:
            self._shard_infos = json.load(fh)["shards"]
        if len(self._shard_infos) != len(self.shard_starts) - 1:
            raise ValueError(f"{root}: index.json and manifest.json disagree on the shard count")

    @classmethod
    def open_remote(cls, remote: str, cache_dir: Path | None = None) -> MDSShardSet:
        from data_pipeline.manifest import MANIFEST_NAME, read_manifest

        cache = Path(cache_dir) if cache_dir else default_cache_dir(remote)
        manifest_path = cache / MANIFEST_NAME
        cached = manifest_path.read_bytes() if manifest_path.is_file() else None
        # the manifest decides everything else: always fetch a fresh copy, and drop the cached
        # files of an older version of the remote set
        fresh = cache / f".{MANIFEST_NAME}.fresh"
        fresh.unlink(missing_ok=True)
        try:
            _download(_join_remote(remote, MANIFEST_NAME), fresh)
        except Exception as err:  # botocore / gcs / azure / missing file: one message naming the place
            detail = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
            raise FileNotFoundError(
                f"{remote}: cannot fetch its {MANIFEST_NAME} ({type(err).__name__}: {detail}); check the "
                "location and the credentials of its store"
            ) from None
        if cached is not None and fresh.read_bytes() != cached:
            for child in cache.iterdir():
                if child.is_file() and child != fresh:
                    child.unlink()
        os.replace(fresh, manifest_path)
        manifest = read_manifest(cache)
        if manifest.get("format") != "mds":
            raise ValueError(f"remote ShardSets must be MDS; {remote} is {manifest.get('format')!r}")
        return cls(cache, manifest, remote=remote, cache_dir=cache)

    def _local_file(self, name: str) -> Path:
        path = self.root / name
        if self.remote is not None and not path.exists():
            try:
                _download(_join_remote(self.remote, name), path)
            except FileNotFoundError:
                pass  # optional files (tokenizer.json) may be absent
        return path

    def _open_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        buffer = np.memmap(self._raw_shard_path(shard), dtype=np.uint8, mode="r")
        count = int(np.frombuffer(buffer, np.uint32, count=1, offset=0)[0])
        offsets = np.frombuffer(buffer, np.uint32, count=count + 1, offset=4).astype(np.int64)
        return buffer, offsets

    def _raw_shard_path(self, shard: int) -> Path:
        info = self._shard_infos[shard]
        raw_name = info["raw_data"]["basename"]
        zip_info = info.get("zip_data")
        if not zip_info:
            return self._local_file(raw_name)
        cache = self.cache_dir or default_cache_dir(str(self.root.resolve()))
        raw_path = cache / raw_name
        if not raw_path.exists():
            from streaming.base.compression import decompress

            zipped = self._local_file(zip_info["basename"])
            cache.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(raw_path, decompress(info["compression"], zipped.read_bytes()))
        return raw_path

    def get(self, doc_id: int) -> np.ndarray:
        shard, index = self.locate(doc_id)
        buffer, offsets = self._shard(shard)
        begin, end = int(offsets[index]), int(offsets[index + 1])
        # sample = [u32 column size][shape byte: ndim<<2 | shape dtype code][shape][values]
        shape_byte = int(buffer[begin + 4])
        ndim, shape_code = shape_byte >> 2, shape_byte & 3
        start = begin + 4 + 1 + ndim * (1 << shape_code)
        count = (end - start) // self.dtype.itemsize
        return np.frombuffer(buffer, self.dtype, count=count, offset=start).copy()
