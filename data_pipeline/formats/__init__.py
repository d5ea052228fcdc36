"""On-disk ShardSet formats (mds, wds, megatron): one reader interface, one writer protocol.

`open_shardset(path_or_remote)` returns the right reader from the manifest's `format`;
`get_format(name)` returns the shard writer. Resumable writing is in formats/writer.py.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from data_pipeline.formats.base import ShardFormat, ShardSet
from data_pipeline.manifest import read_manifest

FORMAT_NAMES = ("mds", "wds", "megatron")


def get_format(name: str) -> ShardFormat:
    if name == "mds":
        from data_pipeline.formats.mds import MDSFormat

        return MDSFormat()
    if name == "wds":
        from data_pipeline.formats.wds import WDSFormat

        return WDSFormat()
    if name == "megatron":
        from data_pipeline.formats.megatron import MegatronFormat

        return MegatronFormat()
    raise ValueError(f"unknown shard format {name!r}; expected one of {', '.join(FORMAT_NAMES)}")


def _remote_location(path_or_remote: str) -> str | None:
    """The remote location for URL-like inputs (s3://, gs://, file://...), else None."""
    scheme = urlparse(path_or_remote).scheme
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter
        return None
    if scheme == "file":
        return urlparse(path_or_remote).path
    return path_or_remote


def open_shardset(path_or_remote: str | Path, cache_dir: str | Path | None = None) -> ShardSet:
    """Open a ShardSet directory, or a remote MDS location (URL; `file://DIR` for a local one).

    Remote MDS sets are fetched lazily shard by shard into `cache_dir` (default
    ~/.cache/strata/mds/<hash>) through mosaicml-streaming's downloaders.
    """
    location = str(path_or_remote)
    remote = _remote_location(location)
    if remote is not None:
        from data_pipeline.formats.mds import MDSShardSet

        return MDSShardSet.open_remote(remote, Path(cache_dir) if cache_dir else None)
    root = Path(location)
    manifest = read_manifest(root)
    fmt = manifest.get("format")
    cache = Path(cache_dir) if cache_dir else None
    if fmt == "mds":
        from data_pipeline.formats.mds import MDSShardSet

        return MDSShardSet(root, manifest, cache_dir=cache)
    if fmt == "wds":
        from data_pipeline.formats.wds import WDSShardSet

        return WDSShardSet(root, manifest)
    if fmt == "megatron":
        from data_pipeline.formats.megatron import MegatronShardSet

        return MegatronShardSet(root, manifest)
    raise ValueError(f"{root}/manifest.json: unknown format {fmt!r}")


__all__ = ["FORMAT_NAMES", "ShardFormat", "ShardSet", "get_format", "open_shardset"]
