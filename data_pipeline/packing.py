"""Packing: token windows cut from a document stream -> the trainer's batch tensors.

A window holds seq_len + 1 tokens and a flag per token saying whether it starts a document.
input_ids = tokens[:T], labels = tokens[1:T+1], position_ids restart at 0 at every document
start and at every row start. The label whose target starts a new document (the EOS -> next
document's first token) is -100: nothing in the row's visible context predicts it. With
cross-document attention (classic concat-and-chunk) positions run 0..T-1 and no label is masked.
Which windows to read is the sampler's job; this module only reads and packs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from data_pipeline.sampler import DocumentSpan

IGNORE_INDEX = -100


class ShardSetReader(Protocol):
    """What the loader needs of a ShardSet reader (data_pipeline/formats)."""

    lengths: np.ndarray
    eos_id: int

    def __len__(self) -> int: ...

    def get(self, doc_id: int) -> np.ndarray: ...


def read_window(
    shardset: ShardSetReader,
    spans: Sequence[DocumentSpan],
    tokens_out: np.ndarray,
    starts_out: np.ndarray,
) -> None:
    """Fill `tokens_out` with the spans' tokens and `starts_out` with document-start flags."""
    filled = 0
    for span in spans:
        doc = shardset.get(span.doc_id)
        if span.end > len(doc):
            raise ValueError(
                f"document {span.doc_id} has {len(doc)} tokens but lengths says >= {span.end}; "
                "the ShardSet's lengths do not match its data"
            )
        n = span.end - span.begin
        tokens_out[filled : filled + n] = doc[span.begin : span.end]
        starts_out[filled] = span.begin == 0
        starts_out[filled + 1 : filled + n] = False
        filled += n
    if filled != len(tokens_out):
        raise ValueError(f"spans cover {filled} tokens, the window has {len(tokens_out)}")


def pack_windows(
    tokens: np.ndarray, doc_starts: np.ndarray, cross_document_attention: bool = False
) -> dict[str, torch.Tensor]:
    """[b, T+1] tokens and document-start flags -> input_ids, labels, position_ids (int64 [b, T])."""
    if tokens.ndim != 2 or tokens.shape != doc_starts.shape or tokens.shape[1] < 2:
        raise ValueError(
            f"want [b, T+1] tokens and flags, got {tokens.shape} and {doc_starts.shape}"
        )
    seq_len = tokens.shape[1] - 1
    input_ids = np.ascontiguousarray(tokens[:, :seq_len], dtype=np.int64)
    labels = np.array(tokens[:, 1:], dtype=np.int64)
    columns = np.arange(seq_len, dtype=np.int64)
    if cross_document_attention:
        position_ids = np.broadcast_to(columns, input_ids.shape).copy()
    else:
        labels[doc_starts[:, 1:]] = IGNORE_INDEX
        segment_starts = doc_starts[:, :seq_len].copy()
        segment_starts[:, 0] = True
        last_start = np.maximum.accumulate(np.where(segment_starts, columns, 0), axis=1)
        position_ids = columns - last_start
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
    }
