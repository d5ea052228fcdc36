"""Input readers for `prepare`: JSONL (plain/.gz/.zst), text-file trees (.txt/.py/.md), Parquet,
and directories holding any of them.

Owns turning input paths into one ordered stream of raw records and turning a raw record into
document text or a rejection reason. It does not tokenize and never raises on bad *data*:
truncated archives and malformed records become counted reasons; only a missing input path or an
unsupported file type is an error (raised before any work starts).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

# kinds of raw payloads a record can carry
KIND_JSON = "json"  # bytes: one JSONL line, parsed in a worker
KIND_TEXT = "text"  # bytes: the whole content of a text file
KIND_VALUE = "value"  # any Python object: a Parquet cell
KIND_ERROR = "error"  # str: a reason, the record is rejected as is


@dataclass(frozen=True)
class InputSpec:
    """One input: a JSONL/Parquet file, a single text file, or a list of text files (a tree)."""

    kind: str  # "jsonl" | "parquet" | "text_files"
    source: str  # label used in per-source counts
    paths: tuple[Path, ...]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def describe(self) -> list[dict[str, Any]]:
        """Identity of the input for the run fingerprint: path, size, mtime of every file."""
        out = []
        for p in self.paths:
            st = p.stat()
            out.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out


class InputError(ValueError):
    """An input path that cannot be used (missing, unsupported type)."""


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    for comp in ("", ".gz", ".zst", ".zstd"):
        if any(name.endswith(s + comp) for s in JSONL_SUFFIXES):
            return True
    return False


def _directory_specs(path: Path, source: str, raw: str) -> list[InputSpec]:
    """A directory: each JSONL/Parquet file under it (sorted) is one input, sourced as
    `source/relative path`; its text files (sorted) are one more, sourced as `source`."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    structured = [p for p in files if _is_jsonl(p) or p.suffix.lower() == ".parquet"]
    texts = tuple(p for p in files if p.suffix.lower() in TEXT_SUFFIXES)
    if not structured and not texts:
        raise InputError(
            f"input directory has no .jsonl[.gz|.zst], .parquet or {'/'.join(TEXT_SUFFIXES)} files: {raw}"
        )
    specs = [
        InputSpec("parquet" if p.suffix.lower() == ".parquet" else "jsonl",
                  f"{source.rstrip('/')}/{p.relative_to(path).as_posix()}", (p,))
        for p in structured
    ]
    return specs + ([InputSpec("text_files", source, texts)] if texts else [])


def resolve_inputs(paths: list[str], source_names: list[str] | None = None) -> list[InputSpec]:
    """Check every input exists and has a supported type; directories become sorted file lists."""
    if not paths:
        raise InputError("no inputs given")
    specs = []
    for i, raw in enumerate(paths):
        path = Path(raw)
        source = source_names[i] if source_names else str(raw)
        if not path.exists():
            raise InputError(f"input not found: {raw}")
        if path.is_dir():
            specs += _directory_specs(path, source, raw)
        elif path.suffix.lower() == ".parquet":
            specs.append(InputSpec("parquet", source, (path,)))
        elif _is_jsonl(path):
            specs.append(InputSpec("jsonl", source, (path,)))
        elif path.suffix.lower() in TEXT_SUFFIXES:
            specs.append(InputSpec("text_files", source, (path,)))
        else:
            raise InputError(
                f"unsupported input type: {raw} (expected .jsonl[.gz|.zst], .parquet, "
                f"{'/'.join(TEXT_SUFFIXES)} or a directory of them)"
            )
    return specs


@dataclass
class ReadProgress:
    """Bytes of input consumed so far (compressed bytes for compressed files), for the ETA."""

    done_bytes: int = 0
    _file_base: int = 0
    _current: Any = field(default=None, repr=False)

    def start_file(self, raw_handle: Any) -> None:
        self._current = raw_handle

    def end_file(self, size: int) -> None:
        self._file_base += size
        self._current = None
        self.done_bytes = self._file_base

    def update(self) -> int:
        if self._current is not None:
            try:
                self.done_bytes = self._file_base + self._current.tell()
            except (OSError, ValueError):
                pass
        return self.done_bytes


def _zstd_lines(raw: Any) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd stream; EOFError if the last frame is cut short.

    zstandard's stream_reader ends quietly on a truncated frame, so frames are tracked here.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame = dctx.decompressobj()
    frame_has_data = False
    pending = b""
    while chunk := raw.read(1 << 20):
        while chunk:
            frame_has_data = True
            pending += frame.decompress(chunk)
            if frame.eof:
                chunk = frame.unused_data
                frame = dctx.decompressobj()
                frame_has_data = False
            else:
                chunk = b""
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if frame_has_data:
        raise EOFError("zstd stream ended inside a frame")
    if pending:
        yield pending


def _open_binary_lines(path: Path, raw: Any) -> Any:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith((".zst", ".zstd")):
        return _zstd_lines(raw)
    return raw


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, OSError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return tuple(errors)


def _iter_jsonl(path: Path, progress: ReadProgress) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as raw:
        progress.start_file(raw)
        try:
            stream = _open_binary_lines(path, raw)
            for line in stream:
                if line.strip():
                    yield KIND_JSON, line
                else:
                    yield KIND_ERROR, "blank_line"
        except _corrupt_errors():
            yield KIND_ERROR, "truncated_or_corrupt_file"


def _iter_parquet(path: Path, text_field: str, progress: ReadProgress) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception:  # pyarrow raises ArrowInvalid/OSError on a broken footer
        yield KIND_ERROR, "truncated_or_corrupt_file"
        return
    if text_field not in parquet.schema_arrow.names:
        for _ in range(parquet.metadata.num_rows):
            yield KIND_ERROR, "missing_text_field"
        return
    try:
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield KIND_VALUE, value
    except Exception:
        yield KIND_ERROR, "truncated_or_corrupt_file"


def _iter_text_files(paths: tuple[Path, ...], progress: ReadProgress) -> Iterator[tuple[str, Any]]:
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            yield KIND_ERROR, "unreadable_file"
        else:
            yield KIND_TEXT, data
        progress.end_file(path.stat().st_size if path.exists() else 0)


def iter_raw_records(
    specs: list[InputSpec], text_field: str, progress: ReadProgress | None = None
) -> Iterator[tuple[str, str, Any]]:
    """All records of all inputs in a fixed order: (source, kind, payload)."""
    progress = progress or ReadProgress()
    for spec in specs:
        if spec.kind == "text_files":
            for kind, payload in _iter_text_files(spec.paths, progress):
                yield spec.source, kind, payload
            continue
        path = spec.paths[0]
        records = _iter_jsonl(path, progress) if spec.kind == "jsonl" else _iter_parquet(
            path, text_field, progress
        )
        for kind, payload in records:
            yield spec.source, kind, payload
        progress.end_file(os.path.getsize(path))


def extract_text(kind: str, payload: Any, text_field: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable document, (None, reason) for a rejected record."""
    if kind == KIND_ERROR:
        return None, str(payload)
    if kind == KIND_JSON:
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            return None, "invalid_json"
        if not isinstance(obj, dict):
            return None, "not_a_json_object"
        if text_field not in obj:
            return None, "missing_text_field"
        value = obj[text_field]
    elif kind == KIND_TEXT:
        value = payload
    else:
        value = payload
    if value is None:
        return None, "missing_text_field"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(value, str):
        return None, "non_string_text"
    try:
        value.encode("utf-8")  # lone surrogates from JSON escapes like "\ud800"
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    if not value.strip():
        return None, "empty_document"
    return value, None


def split_long_text(text: str, max_chars: int) -> list[str]:
    """Cut a document into pieces of at most `max_chars` characters (0 = keep whole).

    A cut is placed after the last newline in the second half of the window when there is one,
    else exactly at the limit. "".join(pieces) == text always.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        newline = text.rfind("\n", start + max_chars // 2, end)
        if newline != -1:
            end = newline + 1
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces
