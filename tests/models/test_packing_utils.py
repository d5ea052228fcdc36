"""Document boundaries from position_ids: cu_seqlens and the block-causal SDPA mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.packing import (
    block_causal_mask,
    cu_seqlens_from_position_ids,
    document_ids,
    max_seqlen_from_cu_seqlens,
)


def test_cu_seqlens_marks_every_document_and_row_start():
    position_ids = torch.tensor(
        [
            [0, 1, 2, 0, 1, 0],  # three documents
            [5, 6, 0, 1, 2, 3],  # row starts mid-document: still a boundary
        ]
    )
    cu = cu_seqlens_from_position_ids(position_ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 8, 12]
    assert max_seqlen_from_cu_seqlens(cu) == 4


def test_cu_seqlens_of_plain_rows_is_one_segment_per_row():
    position_ids = torch.arange(4).repeat(3, 1)
    assert cu_seqlens_from_position_ids(position_ids).tolist() == [0, 4, 8, 12]


def test_document_ids_count_segments_within_each_row():
    position_ids = torch.tensor([[0, 1, 0, 0, 1], [3, 0, 1, 2, 0]])
    assert document_ids(position_ids).tolist() == [[0, 0, 1, 2, 2], [0, 1, 1, 1, 2]]


def test_block_causal_mask_shape_and_pattern():
    mask = block_causal_mask(torch.tensor([[0, 1, 0, 1]]))
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    expected = torch.tensor(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)


def test_sdpa_with_block_causal_mask_equals_attention_per_document():
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 10, 8
    position_ids = torch.tensor(
        [
            [0, 1, 2, 3, 0, 1, 2, 0, 1, 2],
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        ]
    )
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(position_ids))

    cu = cu_seqlens_from_position_ids(position_ids).tolist()
    flat = lambda x: x.transpose(1, 2).reshape(b * t, h, d)  # [B*T, H, D]
    qf, kf, vf = flat(q), flat(k), flat(v)
    pieces = []
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (qf, kf, vf))  # [1, H, L, D]
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        pieces.append(out[0].transpose(0, 1))
    reference = torch.cat(pieces).reshape(b, t, h, d).transpose(1, 2)
    torch.testing.assert_close(packed, reference)

    grads = torch.autograd.grad(packed.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)
