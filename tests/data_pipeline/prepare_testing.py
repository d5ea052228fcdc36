"""Shared helpers for the prepare/formats/convert tests: a tiny tokenizer, inputs, file snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.formats.writer import STATE_DIR
from data_pipeline.tokenizer import train_byte_level_bpe

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "def add(a, b):\n    return a + b\n",
    "Grüße aus Köln — naïve café, 東京, Привет мир 👋🏽\n",
    "# Title\n\nSome *markdown* with `code` and a [link](http://example.com).\n",
    "tabs\tand  spaces   and\r\nwindows newlines\n",
]


def make_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE trained on a few lines (trains in milliseconds)."""
    tokenizer = train_byte_level_bpe(SAMPLE_TEXTS * 20, vocab_size)
    tokenizer.save(str(path))
    return path


def load(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def decode(tokenizer: Tokenizer, tokens: np.ndarray) -> str:
    """Text of a document without its trailing EOS."""
    return tokenizer.decode(tokens[:-1].tolist(), skip_special_tokens=False)


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    """`n` varied documents (different lengths, scripts, code)."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        parts = rng.choice(len(SAMPLE_TEXTS), size=int(rng.integers(1, 6)))
        texts.append(f"doc {i}: " + "".join(SAMPLE_TEXTS[p] for p in parts))
    return texts


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({field: text}) + "\n")
    return path


def output_files(out_dir: Path) -> dict[str, bytes]:
    """Every file of a ShardSet except the resume state: name -> bytes."""
    return {
        p.relative_to(out_dir).as_posix(): p.read_bytes()
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and STATE_DIR not in p.relative_to(out_dir).parts
    }


def all_documents(shardset) -> list[np.ndarray]:
    return [shardset.get(i) for i in range(len(shardset))]
