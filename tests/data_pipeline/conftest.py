"""In-memory ShardSet fakes for sampler/loader tests (the readers' protocol, no files).

Tests get them through the fixtures; subprocess workers (run as scripts from this directory)
may `from conftest import FakeShardSet, make_shardset`.
"""

from __future__ import annotations

import numpy as np
import pytest

EOS_ID = 0


class FakeShardSet:
    """Documents whose tokens are unique across the set (and across sources via `token_base`):
    document d holds lengths[d] - 1 distinct ids then EOS, so any token names its document."""

    def __init__(self, lengths, token_base: int = 1, eos_id: int = EOS_ID) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.eos_id = eos_id
        self.manifest = {"format": "fake", "documents": len(self.lengths)}
        self._starts = token_base + np.concatenate([[0], np.cumsum(self.lengths - 1)])

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, doc_id: int) -> np.ndarray:
        length = int(self.lengths[doc_id])
        body = np.arange(self._starts[doc_id], self._starts[doc_id] + length - 1, dtype=np.uint32)
        return np.append(body, np.uint32(self.eos_id))

    def all_body_tokens(self) -> np.ndarray:
        """Every non-EOS token of the set once (what one epoch must show as labels)."""
        return np.arange(self._starts[0], self._starts[-1])


def make_shardset(n_docs: int, seed: int, token_base: int = 1, max_len: int = 40) -> FakeShardSet:
    rng = np.random.default_rng(seed)
    return FakeShardSet(rng.integers(1, max_len, size=n_docs), token_base=token_base)


@pytest.fixture
def fake_shardset():
    """Factory: fake_shardset(lengths, token_base=1) -> FakeShardSet."""
    return FakeShardSet


@pytest.fixture
def random_shardset():
    """Factory: random_shardset(n_docs, seed, token_base=1, max_len=40) -> FakeShardSet."""
    return make_shardset


@pytest.fixture
def two_sources() -> list[FakeShardSet]:
    return [
        make_shardset(60, seed=1, token_base=1),
        make_shardset(25, seed=2, token_base=1_000_000),
    ]
