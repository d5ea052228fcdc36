"""Built-in corpus `stdlib`: the running Python's standard-library .py files as train/val ShardSets.

Every machine has it, so demos and tests need no download. Files are found via `sysconfig`,
split into train/val by a hash of their path relative to the stdlib root (stable across
machines), a byte-level BPE is trained on the train split, and both splits go through `prepare`.
Excluded (documented choice): test suites (test/, tests/, idle_test/), site-packages, the
generated pydoc topics and codec tables (pydoc_data/, encodings/), and files over 300 KB.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipeline.formats.writer import check_writable
from data_pipeline.manifest import TOKENIZER_NAME, write_bytes_atomic, write_json_atomic
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sources import InputSpec
from data_pipeline.tokenizer import load_tokenizer, train_byte_level_bpe

BUILTIN_NAMES = ("stdlib",)
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data",
     "encodings"}
)
MAX_FILE_BYTES = 300_000
SPEC_NAME = "builtin.json"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib .py files kept for the corpus, sorted by relative path."""
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
                continue
        except OSError:
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")


def split_train_val(
    files: list[Path], root: Path, val_fraction: float = 0.02
) -> tuple[list[Path], list[Path]]:
    """Deterministic split by sha256 of the relative path; val always gets at least one file."""
    threshold = int(val_fraction * 2**64)
    keyed = [(_path_hash(f.relative_to(root).as_posix()), f) for f in files]
    val = [f for h, f in keyed if h < threshold]
    if not val and len(files) > 1:
        val = [min(keyed, key=lambda item: item[0])[1]]
    val_set = set(val)
    train = [f for f in files if f not in val_set]
    return train, val


def _read_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            yield text


def build_stdlib_corpus(
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    val_fraction: float = 0.02,
    format: str = "mds",
    workers: int | None = None,
    shard_size: str | int = "64MB",
    max_files: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write OUT/tokenizer.json, OUT/train and OUT/val; return their paths and manifests.

    `max_files` keeps the first N files (by relative path) for small test corpora. A rerun with
    the same arguments reuses the tokenizer and resumes/skips the ShardSets.
    """
    out_dir = Path(out_dir)
    check_writable(out_dir)
    root = stdlib_root()
    files = stdlib_files(root)
    if max_files is not None:
        files = files[:max_files]
    train, val = split_train_val(files, root, val_fraction)
    spec = {
        "builtin": "stdlib",
        "python": sysconfig.get_python_version(),
        "root": str(root),
        "files": [f.relative_to(root).as_posix() for f in files],
        "sizes": [f.stat().st_size for f in files],
        "val_fraction": val_fraction,
        "vocab_size": vocab_size,
    }
    tokenizer_path = out_dir / TOKENIZER_NAME
    spec_path = out_dir / SPEC_NAME
    reuse = tokenizer_path.is_file() and spec_path.is_file()
    if reuse:
        with open(spec_path, encoding="utf-8") as fh:
            reuse = json.load(fh) == json.loads(json.dumps(spec))
    if not reuse:
        if progress:
            print(
                f"builtin stdlib: training a {vocab_size}-token byte-level BPE on "
                f"{len(train)} files ({len(val)} held out for val)",
                flush=True,
            )
        tokenizer = train_byte_level_bpe(_read_texts(train), vocab_size)
        write_bytes_atomic(tokenizer_path, tokenizer.to_str().encode("utf-8"))
        write_json_atomic(spec_path, spec)
    load_tokenizer(tokenizer_path)  # fail early on a damaged file

    result: dict[str, Any] = {"tokenizer": tokenizer_path}
    for split, split_files in (("train", train), ("val", val)):
        options = PrepareOptions(
            format=format,
            tokenizer=str(tokenizer_path),
            workers=workers,
            shard_size=shard_size,
            progress=progress,
        )
        split_spec = InputSpec("text_files", f"stdlib/{split}", tuple(split_files))
        manifest = prepare([split_spec], out_dir / split, options)
        result[split] = out_dir / split
        result[f"{split}_manifest"] = manifest
    return result
