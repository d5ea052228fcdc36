"""Packing windows into input_ids / labels / position_ids with document boundaries."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.packing import IGNORE_INDEX, pack_windows, read_window
from data_pipeline.sampler import DocumentSpan

EOS_ID = 0  # the fakes' EOS


def _window(shardset, spans: list[DocumentSpan]) -> tuple[np.ndarray, np.ndarray]:
    n = sum(s.end - s.begin for s in spans)
    tokens, starts = np.empty((1, n), dtype=np.int64), np.empty((1, n), dtype=bool)
    read_window(shardset, spans, tokens[0], starts[0])
    return tokens, starts


def test_positions_restart_per_document_and_eos_to_next_document_target_is_masked(fake_shardset):
    shardset = fake_shardset([3, 4, 5])  # docs: [1 2 E] [3 4 5 E] [6 7 8 9 E]
    # window of T+1 = 8 tokens starting inside doc 0: [2 E | 3 4 5 E | 6 7]
    tokens, starts = _window(
        shardset, [DocumentSpan(0, 1, 3), DocumentSpan(1, 0, 4), DocumentSpan(2, 0, 2)]
    )
    batch = pack_windows(tokens, starts)
    assert batch["input_ids"].tolist() == [[2, EOS_ID, 3, 4, 5, EOS_ID, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 0]]  # row start counts as a start
    assert batch["labels"].tolist() == [[EOS_ID, IGNORE_INDEX, 4, 5, EOS_ID, IGNORE_INDEX, 7]]
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (1, 7)


def test_last_label_of_a_row_is_kept_inside_a_document_and_masked_at_a_boundary(fake_shardset):
    shardset = fake_shardset([4, 3])  # [1 2 3 E] [4 5 E]
    inside = pack_windows(*_window(shardset, [DocumentSpan(0, 0, 3)]))
    assert inside["labels"].tolist() == [[2, 3]]
    at_boundary = pack_windows(*_window(shardset, [DocumentSpan(0, 2, 4), DocumentSpan(1, 0, 1)]))
    assert at_boundary["input_ids"].tolist() == [[3, EOS_ID]]
    assert at_boundary["labels"].tolist() == [[EOS_ID, IGNORE_INDEX]]


def test_cross_document_attention_counts_positions_per_row_and_masks_nothing(fake_shardset):
    shardset = fake_shardset([3, 4])
    tokens, starts = _window(shardset, [DocumentSpan(0, 0, 3), DocumentSpan(1, 0, 4)])
    batch = pack_windows(tokens, starts, cross_document_attention=True)
    assert batch["position_ids"].tolist() == [list(range(6))]
    assert batch["labels"].tolist() == [[2, EOS_ID, 3, 4, 5, EOS_ID]]


def test_read_window_rejects_lengths_that_disagree_with_the_data(fake_shardset):
    class Short(fake_shardset):
        def get(self, doc_id):
            return super().get(doc_id)[:-1]

    shardset = Short([5])
    tokens, starts = np.empty(5, dtype=np.int64), np.empty(5, dtype=bool)
    try:
        read_window(shardset, [DocumentSpan(0, 0, 5)], tokens, starts)
    except ValueError as error:
        assert "document 0" in str(error)
    else:
        raise AssertionError("expected a ValueError")
