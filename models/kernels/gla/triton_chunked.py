"""Own Triton kernels for chunkwise GLA, forward and backward, varlen through cu_seqlens.

Chunk 64, sub-chunk 16 (METHODS.md §9). Nine small kernels over (chunk, block, head) tiles,
the long axis first (CUDA caps grid dimensions 1 and 2 at 65535), so that every matmul is a
full 64-row tensor-core tile and the sub-chunk work runs once, not once per value block:
  forward : `_cumsum_fwd`  G, the within-chunk cumulative gate (fp32), once for every kernel
            `_state_fwd`   state at every chunk start (sequential over chunks), final state
            `_attn_fwd`    A, the intra-chunk attention [T, H, 64] (scaled, lower triangular)
            `_output_fwd`  o = scale (q e^G) S + A v
  backward: `_dstate_bwd`  gradient of the state at every chunk end (reverse scan), d initial
            `_dattn_bwd`   dA = scale tril(do v^T)
            `_dv_bwd`      dv = A^T do + (k e^{G_last - G}) dS
            `_dqk_intra_bwd` intra-chunk dq, dk from dA (fp32 scratch)
            `_dqkg_bwd`    inter-chunk dq, dk added; dlog_g as a reverse cumulative sum
Off-diagonal sub-blocks are tensor-core matmuls against a reference point between the two
blocks (all exponents <= 0); diagonal sub-blocks are computed in log space, element-wise, from a
cumulative sum of the raw gates inside the sub-block. Matmul inputs are bf16/fp16 for 16-bit
inputs, the state, G, A and all accumulators fp32 (fp64 for fp64 inputs). On CPU it runs under
the Triton interpreter (TRITON_INTERPRET=1 before import).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from models.kernels.gla._common import CHUNK, SUB_CHUNK, check_inputs, default_scale

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _chunk_of(cu_seqlens, chunk_info, i_c):
    """Sequence, chunk index within it, first token and length of global chunk i_c."""
    i_n = tl.load(chunk_info + i_c * 2)
    i_t = tl.load(chunk_info + i_c * 2 + 1)
    start = tl.load(cu_seqlens + i_n)
    seq_len = tl.load(cu_seqlens + i_n + 1) - start
    return i_n, i_t, start.to(tl.int64), seq_len


@triton.jit
def _cumsum_fwd(
    g,
    gc,
    cu_seqlens,
    chunk_info,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    # fmt: off
    i_c, i_k, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    row = i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    mask = (row < seq_len)[:, None] & (o_k < K)[None, :]
    p = (bos * H + i_h) * K + row[:, None] * (H * K) + o_k[None, :]
    b_g = tl.load(g + p, mask=mask, other=0).to(gc.dtype.element_ty)
    tl.store(gc + p, tl.cumsum(b_g, axis=0), mask=mask)
    # fmt: on


@triton.jit
def _state_fwd(
    k,
    v,
    gc,
    h,
    h0,
    ht,
    cu_seqlens,
    chunk_offsets,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # fmt: off
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    k += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    h += (c0 * H + i_h) * K * V
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + p_kv, mask=m_kv, other=0).to(ACC)
    for i_t in range(tl.cdiv(seq_len, BT)):
        tl.store(h + i_t * H * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        row = i_t * BT + o_t
        m_t = row < seq_len
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + row[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0)
        b_G = tl.load(gc + row[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0)
        b_G_last = tl.load(gc + (tl.minimum(seq_len, (i_t + 1) * BT) - 1) * (H * K) + o_k, mask=m_k, other=0)
        b_v = tl.load(v + row[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :], other=0)
        b_kd = (b_k.to(ACC) * tl.exp(b_G_last[None, :] - b_G)).to(b_v.dtype)
        b_h = b_h * tl.exp(b_G_last)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC, out_dtype=ACC)
    tl.store(ht + i_nh * K * V + p_kv, b_h.to(ht.dtype.element_ty), mask=m_kv)
    # fmt: on


@triton.jit
def _attn_fwd(
    q,
    k,
    g,
    gc,
    A,
    cu_seqlens,
    chunk_info,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Rows of one sub-block of A: earlier sub-blocks by matmul, its own block in log space."""
    # fmt: off
    i_c, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    first = i_t * BT + i_s * BC  # first row of the sub-block within the sequence
    if first < seq_len:
        q += (bos * H + i_h) * K
        k += (bos * H + i_h) * K
        g += (bos * H + i_h) * K
        gc += (bos * H + i_h) * K
        A += (bos * H + i_h) * BT
        o_t = tl.arange(0, BT)
        o_c = tl.arange(0, BC)
        row_f = i_t * BT + o_t
        m_f = row_f < seq_len
        row_s = first + o_c
        m_s = row_s < seq_len
        before = (o_t < i_s * BC)[:, None]
        b_a_off = tl.zeros([BC, BT], dtype=ACC)
        b_a_diag = tl.zeros([BC, BC], dtype=ACC)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            p_sk = row_s[:, None] * (H * K) + o_k[None, :]
            b_q = tl.load(q + p_sk, mask=m_s[:, None] & m_k[None, :], other=0)
            b_qa = b_q.to(ACC)
            b_Gl = tl.cumsum(tl.load(g + p_sk, mask=m_s[:, None] & m_k[None, :], other=0).to(ACC), axis=0)
            if i_s > 0:
                b_g_ref = tl.load(gc + (first - 1) * (H * K) + o_k, mask=m_k, other=0)  # G before the block
                p_fk = row_f[:, None] * (H * K) + o_k[None, :]
                b_kf = tl.load(k + p_fk, mask=m_f[:, None] & m_k[None, :], other=0)
                b_Gf = tl.load(gc + p_fk, mask=m_f[:, None] & m_k[None, :], other=0)
                b_k_ref = (b_kf.to(ACC) * tl.exp(tl.where(before, b_g_ref[None, :] - b_Gf, float("-inf")))).to(b_q.dtype)
                b_q_ref = (b_qa * tl.exp(b_Gl)).to(b_q.dtype)
                b_a_off += tl.dot(b_q_ref, tl.trans(b_k_ref), input_precision=PREC, out_dtype=ACC)
            b_Gj = tl.zeros([BK], dtype=ACC)
            for j in range(BC):
                p_j = (first + j) * (H * K) + o_k
                m_j = m_k & (first + j < seq_len)
                b_kj = tl.load(k + p_j, mask=m_j, other=0).to(ACC)
                b_Gj += tl.load(g + p_j, mask=m_j, other=0).to(ACC)
                b_e = tl.exp(tl.where((o_c >= j)[:, None], b_Gl - b_Gj[None, :], float("-inf")))
                b_col = tl.sum(b_qa * b_kj[None, :] * b_e, axis=1)
                b_a_diag += tl.where((o_c == j)[None, :], b_col[:, None], 0)
        p_a = A + row_s[:, None] * (H * BT)
        outside = (o_t < i_s * BC) | (o_t >= i_s * BC + BC)  # zero above the diagonal block
        tl.store(p_a + o_t[None, :], (b_a_off * scale).to(A.dtype.element_ty), mask=m_s[:, None] & outside[None, :])
        tl.store(p_a + (i_s * BC + o_c)[None, :], (b_a_diag * scale).to(A.dtype.element_ty), mask=m_s[:, None])
    # fmt: on


@triton.jit
def _output_fwd(
    q,
    v,
    gc,
    h,
    A,
    o,
    cu_seqlens,
    chunk_info,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # fmt: off
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    q += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    o += (bos * H + i_h) * V
    A += (bos * H + i_h) * BT
    p_hc = h + (i_c.to(tl.int64) * H + i_h) * K * V
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    row = i_t * BT + o_t
    m_t = row < seq_len
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = tl.load(v + row[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0)
    b_o = tl.zeros([BT, BV], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_tk = row[:, None] * (H * K) + o_k[None, :]
        b_q = tl.load(q + p_tk, mask=m_t[:, None] & m_k[None, :], other=0)
        b_G = tl.load(gc + p_tk, mask=m_t[:, None] & m_k[None, :], other=0)
        b_h = tl.load(p_hc + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
        b_qg = (b_q.to(ACC) * tl.exp(b_G)).to(b_v.dtype)
        b_o += tl.dot(b_qg, b_h.to(b_v.dtype), input_precision=PREC, out_dtype=ACC)
    b_a = tl.load(A + row[:, None] * (H * BT) + o_t[None, :], mask=m_t[:, None], other=0)
    b_o = b_o * scale + tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PREC, out_dtype=ACC)
    tl.store(o + row[:, None] * (H * V) + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)
    # fmt: on


@triton.jit
def _dstate_bwd(
    q,
    gc,
    do,
    dh,
    dht,
    dh0,
    cu_seqlens,
    chunk_offsets,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # fmt: off
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    q += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    do += (bos * H + i_h) * V
    dh += (c0 * H + i_h) * K * V
    n_chunks = tl.cdiv(seq_len, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh * K * V + p_kv, mask=m_kv, other=0).to(ACC)
    for i_r in range(n_chunks):
        i_t = n_chunks - 1 - i_r
        tl.store(dh + i_t * H * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        row = i_t * BT + o_t
        m_t = row < seq_len
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + row[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0)
        b_G = tl.load(gc + row[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0)
        b_G_last = tl.load(gc + (tl.minimum(seq_len, (i_t + 1) * BT) - 1) * (H * K) + o_k, mask=m_k, other=0)
        b_do = tl.load(do + row[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :], other=0)
        b_qg = (b_q.to(ACC) * tl.exp(b_G) * scale).to(b_do.dtype)
        b_dh = b_dh * tl.exp(b_G_last)[:, None] + tl.dot(tl.trans(b_qg), b_do, input_precision=PREC, out_dtype=ACC)
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + p_kv, b_dh.to(dh0.dtype.element_ty), mask=m_kv)
    # fmt: on


@triton.jit
def _dattn_bwd(
    v,
    do,
    dA,
    cu_seqlens,
    chunk_info,
    scale,
    H: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # fmt: off
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    v += (bos * H + i_h) * V
    do += (bos * H + i_h) * V
    dA += (bos * H + i_h) * BT
    o_t = tl.arange(0, BT)
    row = i_t * BT + o_t
    m_t = row < seq_len
    b_da = tl.zeros([BT, BT], dtype=ACC)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = row[:, None] * (H * V) + o_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0)
        b_da += tl.dot(b_do, tl.trans(b_v), input_precision=PREC, out_dtype=ACC)
    b_da = tl.where(o_t[:, None] >= o_t[None, :], b_da * scale, 0)
    tl.store(dA + row[:, None] * (H * BT) + o_t[None, :], b_da.to(dA.dtype.element_ty), mask=m_t[:, None])
    # fmt: on


@triton.jit
def _dv_bwd(
    k,
    gc,
    A,
    do,
    dh,
    dv,
    cu_seqlens,
    chunk_info,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # fmt: off
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    k += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    A += (bos * H + i_h) * BT
    do += (bos * H + i_h) * V
    dv += (bos * H + i_h) * V
    p_dhc = dh + (i_c.to(tl.int64) * H + i_h) * K * V
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    row = i_t * BT + o_t
    m_t = row < seq_len
    m_tv = m_t[:, None] & m_v[None, :]
    last = tl.minimum(seq_len, (i_t + 1) * BT) - 1
    b_do = tl.load(do + row[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0)
    b_dv = tl.zeros([BT, BV], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_tk = row[:, None] * (H * K) + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_t[:, None] & m_k[None, :], other=0)
        b_G = tl.load(gc + p_tk, mask=m_t[:, None] & m_k[None, :], other=0)
        b_G_last = tl.load(gc + last * (H * K) + o_k, mask=m_k, other=0)
        b_dh = tl.load(p_dhc + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
        b_kd = (b_k.to(ACC) * tl.exp(b_G_last[None, :] - b_G)).to(b_do.dtype)
        b_dv += tl.dot(b_kd, b_dh.to(b_do.dtype), input_precision=PREC, out_dtype=ACC)
    # A^T: tile element (c, r) = A[r, c]; rows past the sequence end are masked
    b_at = tl.load(A + row[None, :] * (H * BT) + o_t[:, None], mask=m_t[None, :], other=0)
    b_dv += tl.dot(b_at.to(b_do.dtype), b_do, input_precision=PREC, out_dtype=ACC)
    tl.store(dv + row[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
    # fmt: on


@triton.jit
def _dqk_intra_bwd(
    q,
    k,
    g,
    gc,
    dA,
    dq,
    dk,
    cu_seqlens,
    chunk_info,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """dq, dk of one sub-block's rows from dA: dq from earlier columns, dk from later rows."""
    # fmt: off
    i_cs, i_k, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_s = i_cs // (BT // BC), i_cs % (BT // BC)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    first = i_t * BT + i_s * BC
    if first < seq_len:
        for_k = (bos * H + i_h) * K
        q, k, g, gc, dq, dk = q + for_k, k + for_k, g + for_k, gc + for_k, dq + for_k, dk + for_k
        dA += (bos * H + i_h) * BT
        o_t = tl.arange(0, BT)
        o_c = tl.arange(0, BC)
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        row_f = i_t * BT + o_t
        m_fk = (row_f < seq_len)[:, None] & m_k[None, :]
        p_fk = row_f[:, None] * (H * K) + o_k[None, :]
        row_s = first + o_c
        m_s = row_s < seq_len
        m_sk = m_s[:, None] & m_k[None, :]
        p_sk = row_s[:, None] * (H * K) + o_k[None, :]
        b_q = tl.load(q + p_sk, mask=m_sk, other=0).to(ACC)
        b_gs = tl.load(g + p_sk, mask=m_sk, other=0).to(ACC)
        b_Gl = tl.cumsum(b_gs, axis=0)  # G within the sub-block
        b_dq = tl.zeros([BC, BK], dtype=ACC)
        b_dk = tl.zeros([BC, BK], dtype=ACC)
        if i_s > 0:  # columns of earlier sub-blocks, reference = G before this block
            b_g_ref = tl.load(gc + (first - 1) * (H * K) + o_k, mask=m_k, other=0)
            b_kf = tl.load(k + p_fk, mask=m_fk, other=0)
            b_Gf = tl.load(gc + p_fk, mask=m_fk, other=0)
            before = (o_t < i_s * BC)[:, None]
            b_k_ref = (b_kf.to(ACC) * tl.exp(tl.where(before, b_g_ref[None, :] - b_Gf, float("-inf")))).to(b_kf.dtype)
            b_da_row = tl.load(dA + row_s[:, None] * (H * BT) + o_t[None, :], mask=m_s[:, None], other=0)
            b_dq += tl.exp(b_Gl) * tl.dot(b_da_row.to(b_kf.dtype), b_k_ref, input_precision=PREC, out_dtype=ACC)
        if first + BC < seq_len:  # rows of later sub-blocks, reference = G at this block's end
            b_g_end = tl.load(gc + (first + BC - 1) * (H * K) + o_k, mask=m_k, other=0)
            b_qf = tl.load(q + p_fk, mask=m_fk, other=0)
            b_Gf = tl.load(gc + p_fk, mask=m_fk, other=0)
            after = (o_t >= i_s * BC + BC)[:, None]
            b_q_ref = (b_qf.to(ACC) * tl.exp(tl.where(after, b_Gf - b_g_end[None, :], float("-inf")))).to(b_qf.dtype)
            # dA[later rows, block cols]^T: tile element (c, r) = dA[r, first + c]
            b_da_col = tl.load(dA + row_f[None, :] * (H * BT) + (i_s * BC + o_c)[:, None], mask=(row_f < seq_len)[None, :], other=0)
            b_to_end = tl.sum(b_gs, axis=0)[None, :] - b_Gl  # G_end - G, within the block
            b_dk += tl.exp(b_to_end) * tl.dot(b_da_col.to(b_qf.dtype), b_q_ref, input_precision=PREC, out_dtype=ACC)
        # diagonal sub-block in log space, column j at a time
        b_Gj = tl.zeros([BK], dtype=ACC)
        for j in range(BC):
            m_j = m_k & (first + j < seq_len)
            p_j = (first + j) * (H * K) + o_k
            b_kj = tl.load(k + p_j, mask=m_j, other=0).to(ACC)
            b_Gj += tl.load(g + p_j, mask=m_j, other=0).to(ACC)
            b_da_j = tl.load(dA + row_s * (H * BT) + i_s * BC + j, mask=m_s & (o_c >= j), other=0).to(ACC)
            b_e = tl.exp(tl.where((o_c >= j)[:, None], b_Gl - b_Gj[None, :], float("-inf")))
            b_dq += b_da_j[:, None] * b_kj[None, :] * b_e
            b_dk_j = tl.sum(b_da_j[:, None] * b_q * b_e, axis=0)
            b_dk += tl.where((o_c == j)[:, None], b_dk_j[None, :], 0)
        tl.store(dq + p_sk, b_dq.to(dq.dtype.element_ty), mask=m_sk)
        tl.store(dk + p_sk, b_dk.to(dk.dtype.element_ty), mask=m_sk)
    # fmt: on


@triton.jit
def _dqkg_bwd(
    q,
    k,
    v,
    gc,
    h,
    ht,
    do,
    dh,
    dq_intra,
    dk_intra,
    dq,
    dk,
    dg,
    cu_seqlens,
    chunk_info,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Adds the inter-chunk dq, dk; dlog_g[t] = sum over s >= t in the chunk of (q dq - k dk)[s]
    plus the state's share, sum_v S_end dS_end (S_end: the state at the chunk end)."""
    # fmt: off
    i_c, i_k, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    i_c64 = i_c.to(tl.int64)
    for_k = (bos * H + i_h) * K
    q, k, gc, dq_intra, dk_intra = q + for_k, k + for_k, gc + for_k, dq_intra + for_k, dk_intra + for_k
    dq, dk, dg = dq + for_k, dk + for_k, dg + for_k
    v += (bos * H + i_h) * V
    do += (bos * H + i_h) * V
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    row = i_t * BT + o_t
    m_t = row < seq_len
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = row[:, None] * (H * K) + o_k[None, :]
    is_last = (i_t + 1) * BT >= seq_len
    p_h = h + (i_c64 * H + i_h) * K * V
    p_dh = dh + (i_c64 * H + i_h) * K * V
    b_dqh = tl.zeros([BT, BK], dtype=ACC)
    b_dkh = tl.zeros([BT, BK], dtype=ACC)
    b_suffix = tl.zeros([BK], dtype=ACC)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_kv = o_k[:, None] * V + o_v[None, :]
        p_tv = row[:, None] * (H * V) + o_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0)
        b_h = tl.load(p_h + p_kv, mask=m_kv, other=0)
        b_dh = tl.load(p_dh + p_kv, mask=m_kv, other=0)
        b_dqh += tl.dot(b_do, tl.trans(b_h.to(b_do.dtype)), input_precision=PREC, out_dtype=ACC)
        b_dkh += tl.dot(b_v, tl.trans(b_dh.to(b_do.dtype)), input_precision=PREC, out_dtype=ACC)
        if is_last:  # the state after the chunk: the final state, else the next chunk's start
            b_h_end = tl.load(ht + (i_n.to(tl.int64) * H + i_h) * K * V + p_kv, mask=m_kv, other=0).to(ACC)
        else:
            b_h_end = tl.load(p_h + H * K * V + p_kv, mask=m_kv, other=0).to(ACC)
        b_suffix += tl.sum(b_h_end * b_dh.to(ACC), axis=1)
    b_G = tl.load(gc + p_tk, mask=m_tk, other=0)
    b_G_last = tl.load(gc + (tl.minimum(seq_len, (i_t + 1) * BT) - 1) * (H * K) + o_k, mask=m_k, other=0)
    b_dq = tl.load(dq_intra + p_tk, mask=m_tk, other=0) + b_dqh * tl.exp(b_G) * scale
    b_dk = tl.load(dk_intra + p_tk, mask=m_tk, other=0) + b_dkh * tl.exp(b_G_last[None, :] - b_G)
    b_q = tl.load(q + p_tk, mask=m_tk, other=0).to(ACC)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0).to(ACC)
    b_dB = b_q * b_dq - b_k * b_dk
    b_dg = b_suffix[None, :] + tl.sum(b_dB, axis=0)[None, :] - tl.cumsum(b_dB, axis=0) + b_dB
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dg + p_tk, b_dg.to(dg.dtype.element_ty), mask=m_tk)
    # fmt: on


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _block(dim: int, cap: int = 64) -> int:
    return max(16, min(cap, triton.next_power_of_2(dim)))


@functools.lru_cache(maxsize=64)
def _dense_layout(batch: int, seq_len: int, device: torch.device):
    n_chunks = -(-seq_len // CHUNK)
    cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32)
    return _layout_tensors(cu, [n_chunks] * batch, device)


def _layout_tensors(cu: torch.Tensor, chunks_per_seq: list[int], device: torch.device):
    offsets = [0]
    info = []
    for n, count in enumerate(chunks_per_seq):
        offsets.append(offsets[-1] + count)
        info += [(n, t) for t in range(count)]
    chunk_offsets = torch.tensor(offsets, dtype=torch.int32)
    chunk_info = torch.tensor(info, dtype=torch.int32).reshape(-1, 2)
    return cu.to(device), chunk_offsets.to(device), chunk_info.to(device), offsets[-1]


def _layout(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device: torch.device):
    """(cu_seqlens int32, chunk_offsets [N+1], chunk_info [n_chunks, 2] = (seq, chunk), n_chunks)."""
    if cu_seqlens is None:
        return _dense_layout(batch, seq_len, device)
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    lengths = (cu[1:] - cu[:-1]).tolist()
    if int(cu[0]) != 0 or int(cu[-1]) != seq_len or min(lengths, default=0) < 0:
        raise ValueError(f"gla: cu_seqlens must rise from 0 to T={seq_len}, got {cu.tolist()}")
    return _layout_tensors(cu.to(torch.int32), [-(-n // CHUNK) for n in lengths], device)


def _kernel_args(dtype: torch.dtype):
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, "ieee"
    return tl.float32, "tf32"


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "gla backend 'triton' on CPU runs under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing models.kernels.gla.triton_chunked, or use backend 'torch'"
        )


LAUNCH = {
    "cumsum": {"num_warps": 4, "num_stages": 1},
    "state": {"num_warps": 8, "num_stages": 2},
    "attn": {"num_warps": 4, "num_stages": 2},
    "output": {"num_warps": 8, "num_stages": 2},
    "dstate": {"num_warps": 8, "num_stages": 2},
    "dattn": {"num_warps": 8, "num_stages": 2},
    "dv": {"num_warps": 8, "num_stages": 2},
    "dqk_intra": {"num_warps": 4, "num_stages": 2},
    "dqkg": {"num_warps": 8, "num_stages": 1},
}
"""Launch options per kernel (warps, pipeline stages); benchmarks may try others."""


def _dqkg_value_block(val_dim: int) -> int:
    """dq/dk/dg loop over V in tiles: 32 wide beyond V = 64 keeps the kernel under 255 registers
    (64-wide tiles spilled 128 B/thread at V = 512 with Triton 3.6, torch 2.11's; sm_90 AOT check)."""
    return _block(val_dim) if val_dim <= 64 else 32


def _state_value_block(val_dim: int, programs: int) -> int:
    """The state scans are sequential over chunks: split V finer when few programs would run."""
    block = _block(val_dim)
    if block > 32 and programs * triton.cdiv(val_dim, block) < 2 * _sm_count():
        block = 32
    return block


@functools.lru_cache(maxsize=1)
def _sm_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).multi_processor_count
    return 1


def _forward(q, k, v, g, scale, initial_state, layout, n_seqs):
    """o, and for the backward: states at chunk starts h, final states ht, G, A."""
    cu, chunk_offsets, chunk_info, n_chunks = layout
    _, _, heads, key_dim = q.shape
    val_dim = v.shape[-1]
    acc, prec = _kernel_args(q.dtype)
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    bk, bv = _block(key_dim), _block(val_dim)
    shared = dict(H=heads, K=key_dim, BT=CHUNK)
    gc = torch.empty(q.shape, dtype=state_dtype, device=q.device)
    _cumsum_fwd[(n_chunks, triton.cdiv(key_dim, bk), heads)](
        g, gc, cu, chunk_info, BK=bk, **shared, **LAUNCH["cumsum"]
    )
    h = q.new_empty(_chunk_capacity(q.shape[0], q.shape[1], n_seqs), heads, key_dim, val_dim)
    ht = q.new_empty(n_seqs, heads, key_dim, val_dim, dtype=state_dtype)
    h0 = initial_state.contiguous() if initial_state is not None else ht
    bvs = _state_value_block(val_dim, n_seqs * heads * triton.cdiv(key_dim, bk))
    _state_fwd[(n_seqs * heads, triton.cdiv(key_dim, bk), triton.cdiv(val_dim, bvs))](
        k, v, gc, h, h0, ht, cu, chunk_offsets, V=val_dim, BK=bk, BV=bvs,
        USE_H0=initial_state is not None, ACC=acc, PREC=prec, **shared, **LAUNCH["state"],
    )  # fmt: skip
    attn = torch.empty(*q.shape[:3], CHUNK, dtype=state_dtype, device=q.device)
    _attn_fwd[(n_chunks, CHUNK // SUB_CHUNK, heads)](
        q, k, g, gc, attn, cu, chunk_info, scale, BC=SUB_CHUNK, BK=bk,
        ACC=acc, PREC=prec, **shared, **LAUNCH["attn"],
    )  # fmt: skip
    o = torch.empty_like(v)
    _output_fwd[(n_chunks, triton.cdiv(val_dim, bv), heads)](
        q, v, gc, h, attn, o, cu, chunk_info, scale, V=val_dim, BK=bk, BV=bv,
        ACC=acc, PREC=prec, **shared, **LAUNCH["output"],
    )  # fmt: skip
    return o, h, ht, gc, attn


def _backward(q, k, v, g, h, ht, gc, attn, do, dht, scale, layout, n_seqs, want_dh0):
    cu, chunk_offsets, chunk_info, n_chunks = layout
    _, _, heads, key_dim = q.shape
    val_dim = v.shape[-1]
    acc, prec = _kernel_args(q.dtype)
    bk, bv = _block(key_dim), _block(val_dim)
    shared = dict(H=heads, K=key_dim, BT=CHUNK, ACC=acc, PREC=prec)
    dh = torch.empty_like(h)
    dh0 = torch.empty_like(ht) if want_dh0 else None
    bvs = _state_value_block(val_dim, n_seqs * heads * triton.cdiv(key_dim, bk))
    _dstate_bwd[(n_seqs * heads, triton.cdiv(key_dim, bk), triton.cdiv(val_dim, bvs))](
        q, gc, do, dh, dht if dht is not None else ht, dh0 if dh0 is not None else ht, cu,
        chunk_offsets, scale, V=val_dim, BK=bk, BV=bvs, USE_DHT=dht is not None,
        STORE_DH0=want_dh0, **shared, **LAUNCH["dstate"],
    )  # fmt: skip
    d_attn = torch.empty_like(attn)
    _dattn_bwd[(n_chunks, heads)](
        v, do, d_attn, cu, chunk_info, scale, H=heads, V=val_dim, BT=CHUNK, BV=bv,
        ACC=acc, PREC=prec, **LAUNCH["dattn"],
    )  # fmt: skip
    dv = torch.empty_like(v)
    _dv_bwd[(n_chunks, triton.cdiv(val_dim, bv), heads)](
        k, gc, attn, do, dh, dv, cu, chunk_info, V=val_dim, BK=bk, BV=bv,
        **shared, **LAUNCH["dv"],
    )  # fmt: skip
    dq_intra, dk_intra = torch.empty_like(gc), torch.empty_like(gc)
    n_kblocks = triton.cdiv(key_dim, bk)
    _dqk_intra_bwd[(n_chunks * (CHUNK // SUB_CHUNK), n_kblocks, heads)](
        q, k, g, gc, d_attn, dq_intra, dk_intra, cu, chunk_info, BC=SUB_CHUNK, BK=bk,
        **shared, **LAUNCH["dqk_intra"],
    )  # fmt: skip
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g)
    _dqkg_bwd[(n_chunks, n_kblocks, heads)](
        q, k, v, gc, h, ht, do, dh, dq_intra, dk_intra, dq, dk, dg, cu, chunk_info, scale,
        V=val_dim, BK=bk, BV=_dqkg_value_block(val_dim), **shared, **LAUNCH["dqkg"],
    )  # fmt: skip
    return dq, dk, dv, dg, dh0


def _chunk_capacity(batch: int, seq_len: int, n_seqs: int) -> int:
    """Rows of the per-chunk state buffer, known from shapes alone (so that torch.compile can
    trace the op): every sequence adds at most one partial chunk to B*T // 64 full ones."""
    return (batch * seq_len) // CHUNK + n_seqs


# The kernels are two opaque custom ops with shape functions and an autograd formula, so that
# torch.compile keeps a GLA layer in one graph (an autograd.Function around Triton launches and
# host-side layout code makes dynamo break the graph there).
@torch.library.custom_op(
    "strata::gla_chunk_fwd",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state, "
    "Tensor? cu_seqlens, int n_seqs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _gla_fwd_op(q, k, v, g, scale, initial_state, cu_seqlens, n_seqs):
    """(o, h: state at every chunk start, ht: final states, G, A)."""
    layout = _layout(cu_seqlens, q.shape[0], q.shape[1], q.device)
    return _forward(q, k, v, g, scale, initial_state, layout, n_seqs)


@_gla_fwd_op.register_fake
def _(q, k, v, g, scale, initial_state, cu_seqlens, n_seqs):
    batch, seq_len, heads, key_dim = q.shape
    val_dim = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (
        torch.empty_like(v),
        q.new_empty(_chunk_capacity(batch, seq_len, n_seqs), heads, key_dim, val_dim),
        q.new_empty(n_seqs, heads, key_dim, val_dim, dtype=acc),
        q.new_empty(q.shape, dtype=acc),
        q.new_empty(batch, seq_len, heads, CHUNK, dtype=acc),
    )


@torch.library.custom_op(
    "strata::gla_chunk_bwd",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor g, Tensor h, Tensor ht, Tensor gc, Tensor attn, "
    "Tensor do, Tensor? dht, float scale, Tensor? cu_seqlens, int n_seqs, bool want_dh0) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _gla_bwd_op(q, k, v, g, h, ht, gc, attn, do, dht, scale, cu_seqlens, n_seqs, want_dh0):
    """(dq, dk, dv, dlog_g, d initial_state; an empty tensor unless want_dh0)."""
    layout = _layout(cu_seqlens, q.shape[0], q.shape[1], q.device)
    dq, dk, dv, dg, dh0 = _backward(
        q, k, v, g, h, ht, gc, attn, do, dht, scale, layout, n_seqs, want_dh0
    )
    return dq, dk, dv, dg, (dh0 if dh0 is not None else ht.new_empty(0))


@_gla_bwd_op.register_fake
def _(q, k, v, g, h, ht, gc, attn, do, dht, scale, cu_seqlens, n_seqs, want_dh0):
    dh0 = torch.empty_like(ht) if want_dh0 else ht.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dh0


def _setup_backward(ctx, inputs, output):
    q, k, v, g, scale, initial_state, cu_seqlens, n_seqs = inputs
    _, h, ht, gc, attn = output
    ctx.save_for_backward(q, k, v, g, h, ht, gc, attn, cu_seqlens)
    ctx.scale, ctx.n_seqs = scale, n_seqs
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype


def _gla_backward(ctx, do, _dh, dht, _dgc, _dattn):
    q, k, v, g, h, ht, gc, attn, cu_seqlens = ctx.saved_tensors
    want_dh0 = ctx.h0_dtype is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dg, dh0 = _gla_bwd_op(
        q, k, v, g, h, ht, gc, attn,
        torch.zeros_like(v) if do is None else do.contiguous(),
        None if dht is None else dht.contiguous(),
        ctx.scale, cu_seqlens, ctx.n_seqs, want_dh0,
    )  # fmt: skip
    return dq, dk, dv, dg, None, (dh0.to(ctx.h0_dtype) if want_dh0 else None), None, None


_gla_fwd_op.register_autograd(_gla_backward, setup_context=_setup_backward)


def gla_triton_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_seqs = check_inputs(q, k, v, log_g, initial_state, cu_seqlens)
    _check_device(q)
    scale = default_scale(q, scale)
    q, k, v, log_g = (x.contiguous() for x in (q, k, v, log_g))
    o, _, ht, _, _ = _gla_fwd_op(q, k, v, log_g, scale, initial_state, cu_seqlens, n_seqs)
    return o, (ht if output_final_state else None)
