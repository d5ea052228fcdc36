"""Tokenizers for `prepare`: load a HF `tokenizer.json`, train a byte-level BPE, fingerprint it.

Owns the choice of EOS token, the token dtype (uint16 below 65536 ids) and the settings that
make decode(encode(text)) exact. It does not read inputs or write shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
DEFAULT_EOS = "<|endoftext|>"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a HF `tokenizer.json`, or the one in a directory (a Hugging Face model directory);
    a missing or malformed file is a clear error."""
    given = path
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{given}: a directory without tokenizer.json (a sentencepiece tokenizer.model "
                                    "alone is not read: convert it with transformers' AutoTokenizer.save_pretrained)")  # fmt: skip
    if not path.is_file():
        hub = len(Path(given).parts) == 2 and not str(given).startswith((".", "/"))  # e.g. meta-llama/Llama-3.2-1B
        hint = f"; for a Hub model, download it first (`huggingface-cli download {given}`) and give its directory" if hub else ""
        raise FileNotFoundError(f"tokenizer file not found: {path}{hint}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"cannot load tokenizer {path}: {exc}") from exc


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style, no normalizer) whose decode(encode(t)) == t for any t.

    All 256 byte symbols are in the initial alphabet, so no text is ever out of vocabulary.
    `<|endoftext|>` is the only special token (id 0).
    """
    if vocab_size < 256 + 1:
        raise ValueError(f"vocab size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[DEFAULT_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the canonical JSON of the tokenizer (vocab, merges, pipeline)."""
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def find_eos_id(tokenizer: Tokenizer, eos_token: str | None = None) -> tuple[str, int]:
    """The EOS token and id: `eos_token` if given, else the first known EOS name in the vocab."""
    names = (eos_token,) if eos_token else EOS_CANDIDATES
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return name, int(token_id)
    if eos_token:
        raise ValueError(f"EOS token {eos_token!r} is not in the tokenizer's vocabulary")
    raise ValueError(
        f"tokenizer has none of the usual EOS tokens {list(EOS_CANDIDATES)}; pass --eos-token"
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (including added/special tokens)."""
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def configure_for_documents(tokenizer: Tokenizer) -> Tokenizer:
    """Special-token strings inside a document are encoded as plain text, never as control ids.

    Without this a literal "<|endoftext|>" in a web page would become an EOS inside a document.
    Padding and truncation are turned off so every token of a document is kept.
    """
    tokenizer.encode_special_tokens = True
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
