"""Own Triton kernels for chunkwise GLA, forward and backward, varlen through cu_seqlens.

Chunk 64, sub-chunk 16 (METHODS.md §9). Four kernels, each over (block, chunk, head) tiles;
the within-chunk cumulative gate is recomputed in every kernel from log_g (no cumsum pass):
  forward : `_state_fwd`  state at every chunk start (sequential over chunks), final state
            `_output_fwd` o = (q e^G) S + intra-chunk attention, sub-block by sub-block
  backward: `_dstate_bwd` gradient of the state at every chunk end (reverse scan), d initial
            `_grads_bwd`  dq, dk, dlog_g (and dv when K fits one block), `_dv_bwd` otherwise.
Off-diagonal sub-blocks are tensor-core matmuls against a reference point between the two
blocks (all exponents <= 0); diagonal sub-blocks are computed in log space, element-wise.
Matmul inputs are bf16/fp16 for 16-bit inputs, the state and all accumulators fp32 (fp64 for
fp64 inputs). On CPU it runs under the Triton interpreter (TRITON_INTERPRET=1 before import).
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
def _state_fwd(
    k,
    v,
    g,
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
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    k += (bos * H + i_h) * K
    g += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    h += (c0 * H + i_h) * K * V
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + p_kv, mask=m_kv, other=0).to(ACC)
    for i_t in range(tl.cdiv(seq_len, BT)):
        tl.store(h + i_t * H * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        row = i_t * BT + o_t
        m_t = row < seq_len
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + row[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0)
        b_g = tl.load(g + row[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0).to(ACC)
        b_v = tl.load(v + row[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :], other=0)
        b_G = tl.cumsum(b_g, axis=0)
        b_G_last = tl.sum(b_g, axis=0)  # padded rows carry log_g = 0
        b_kd = (b_k.to(ACC) * tl.exp(b_G_last[None, :] - b_G)).to(b_v.dtype)
        b_h = b_h * tl.exp(b_G_last)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC, out_dtype=ACC)
    tl.store(ht + i_nh * K * V + p_kv, b_h.to(ht.dtype.element_ty), mask=m_kv)
    # fmt: on


@triton.jit
def _output_fwd(
    q,
    k,
    v,
    g,
    h,
    o,
    cu_seqlens,
    chunk_info,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # fmt: off
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    g += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    o += (bos * H + i_h) * V
    p_hc = h + (i_c.to(tl.int64) * H + i_h) * K * V
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    row_f = i_t * BT + o_t  # rows of the chunk within the sequence
    m_f = row_f < seq_len
    b_vf = tl.load(v + row_f[:, None] * (H * V) + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0)
    for i_s in tl.static_range(BT // BC):
        row_s = i_t * BT + i_s * BC + o_c
        m_s = row_s < seq_len
        if i_t * BT + i_s * BC < seq_len:
            b_o = tl.zeros([BC, BV], dtype=ACC)
            b_a_off = tl.zeros([BC, BT], dtype=ACC)
            b_a_diag = tl.zeros([BC, BC], dtype=ACC)
            for i_k in range(tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_k = o_k < K
                b_gf = tl.load(g + row_f[:, None] * (H * K) + o_k[None, :], mask=m_f[:, None] & m_k[None, :], other=0).to(ACC)
                b_q = tl.load(q + row_s[:, None] * (H * K) + o_k[None, :], mask=m_s[:, None] & m_k[None, :], other=0)
                b_gs = tl.load(g + row_s[:, None] * (H * K) + o_k[None, :], mask=m_s[:, None] & m_k[None, :], other=0).to(ACC)
                # G at the last token before this sub-block (0 at the chunk start)
                b_g_ref = tl.sum(tl.where((o_t < i_s * BC)[:, None], b_gf, 0), axis=0)
                b_Gl = tl.cumsum(b_gs, axis=0)  # G within the sub-block
                b_Gs = b_g_ref[None, :] + b_Gl
                b_qf32 = b_q.to(ACC)
                b_h = tl.load(p_hc + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
                b_o += tl.dot((b_qf32 * tl.exp(b_Gs)).to(b_q.dtype), b_h.to(b_q.dtype), input_precision=PREC, out_dtype=ACC)
                if i_s > 0:
                    b_Gf = tl.cumsum(b_gf, axis=0)
                    b_kf = tl.load(k + row_f[:, None] * (H * K) + o_k[None, :], mask=m_f[:, None] & m_k[None, :], other=0)
                    b_q_ref = (b_qf32 * tl.exp(b_Gs - b_g_ref[None, :])).to(b_q.dtype)
                    before = (o_t < i_s * BC)[:, None]
                    b_k_ref = (b_kf.to(ACC) * tl.exp(tl.where(before, b_g_ref[None, :] - b_Gf, float("-inf")))).to(b_q.dtype)
                    b_a_off += tl.dot(b_q_ref, tl.trans(b_k_ref), input_precision=PREC, out_dtype=ACC)
                b_Gj = tl.zeros([BK], dtype=ACC)
                for j in range(BC):
                    p_j = (i_t * BT + i_s * BC + j) * (H * K) + o_k
                    m_j = m_k & (i_t * BT + i_s * BC + j < seq_len)
                    b_kj = tl.load(k + p_j, mask=m_j, other=0).to(ACC)
                    b_Gj += tl.load(g + p_j, mask=m_j, other=0).to(ACC)
                    b_e = tl.exp(tl.where((o_c >= j)[:, None], b_Gl - b_Gj[None, :], float("-inf")))
                    b_col = tl.sum(b_qf32 * b_kj[None, :] * b_e, axis=1)
                    b_a_diag += tl.where((o_c == j)[None, :], b_col[:, None], 0)
            b_vs = tl.load(v + row_s[:, None] * (H * V) + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0)
            b_o += tl.dot(b_a_diag.to(b_vs.dtype), b_vs, input_precision=PREC, out_dtype=ACC)
            if i_s > 0:
                b_o += tl.dot(b_a_off.to(b_vs.dtype), b_vf, input_precision=PREC, out_dtype=ACC)
            tl.store(o + row_s[:, None] * (H * V) + o_v[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m_s[:, None] & m_v[None, :])
    # fmt: on


@triton.jit
def _dstate_bwd(
    q,
    g,
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
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    q += (bos * H + i_h) * K
    g += (bos * H + i_h) * K
    do += (bos * H + i_h) * V
    dh += (c0 * H + i_h) * K * V
    n_chunks = tl.cdiv(seq_len, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh * K * V + p_kv, mask=m_kv, other=0).to(ACC)
    for i_r in range(n_chunks):
        i_t = n_chunks - 1 - i_r
        tl.store(dh + i_t * H * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        row = i_t * BT + o_t
        m_t = row < seq_len
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + row[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0)
        b_g = tl.load(g + row[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0).to(ACC)
        b_do = tl.load(do + row[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :], other=0)
        b_qg = (b_q.to(ACC) * tl.exp(tl.cumsum(b_g, axis=0)) * scale).to(b_do.dtype)
        b_dh = b_dh * tl.exp(tl.sum(b_g, axis=0))[:, None] + tl.dot(tl.trans(b_qg), b_do, input_precision=PREC, out_dtype=ACC)
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + p_kv, b_dh.to(dh0.dtype.element_ty), mask=m_kv)
    # fmt: on


@triton.jit
def _grads_bwd(
    q,
    k,
    v,
    g,
    h,
    ht,
    do,
    dh,
    dq,
    dk,
    dv,
    dg,
    cu_seqlens,
    chunk_info,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    FUSE_DV: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # fmt: off
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    i_c64 = i_c.to(tl.int64)
    for_k = (bos * H + i_h) * K
    for_v = (bos * H + i_h) * V
    q, k, g, dq, dk, dg = q + for_k, k + for_k, g + for_k, dq + for_k, dk + for_k, dg + for_k
    v, do, dv = v + for_v, do + for_v, dv + for_v
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    row_f = i_t * BT + o_t
    m_f = row_f < seq_len
    m_fk = m_f[:, None] & m_k[None, :]
    p_fk = row_f[:, None] * (H * K) + o_k[None, :]
    b_qf = tl.load(q + p_fk, mask=m_fk, other=0)
    b_kf = tl.load(k + p_fk, mask=m_fk, other=0)
    b_gf = tl.load(g + p_fk, mask=m_fk, other=0).to(ACC)
    b_Gf = tl.cumsum(b_gf, axis=0)
    b_G_last = tl.sum(b_gf, axis=0)
    is_last = (i_t + 1) * BT >= seq_len
    # Suffix of d(cumulative gate) beyond this chunk = sum_v S_end * dS_end (S_end: state at
    # the chunk end = next chunk's start state, or the sequence's final state).
    b_suffix = tl.zeros([BK], dtype=ACC)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        p_kv = o_k[:, None] * V + o_v[None, :]
        b_dh = tl.load(dh + (i_c64 * H + i_h) * K * V + p_kv, mask=m_kv, other=0).to(ACC)
        if is_last:
            b_h_end = tl.load(ht + (i_n.to(tl.int64) * H + i_h) * K * V + p_kv, mask=m_kv, other=0).to(ACC)
        else:
            b_h_end = tl.load(h + ((i_c64 + 1) * H + i_h) * K * V + p_kv, mask=m_kv, other=0).to(ACC)
        b_suffix += tl.sum(b_h_end * b_dh, axis=1)
    carry = b_suffix
    for i_r in tl.static_range(BT // BC):
        i_s = BT // BC - 1 - i_r
        row_s = i_t * BT + i_s * BC + o_c
        m_s = row_s < seq_len
        if i_t * BT + i_s * BC < seq_len:
            m_sk = m_s[:, None] & m_k[None, :]
            p_sk = row_s[:, None] * (H * K) + o_k[None, :]
            b_q = tl.load(q + p_sk, mask=m_sk, other=0).to(ACC)
            b_k = tl.load(k + p_sk, mask=m_sk, other=0).to(ACC)
            b_gs = tl.load(g + p_sk, mask=m_sk, other=0).to(ACC)
            b_g_ref = tl.sum(tl.where((o_t < i_s * BC)[:, None], b_gf, 0), axis=0)  # G before the block
            b_Gl = tl.cumsum(b_gs, axis=0)  # G within the sub-block
            b_Gs = b_g_ref[None, :] + b_Gl
            b_g_end = b_g_ref + tl.sum(b_gs, axis=0)  # G at the block's last token
            b_dqh = tl.zeros([BC, BK], dtype=ACC)
            b_dkh = tl.zeros([BC, BK], dtype=ACC)
            b_da_row = tl.zeros([BC, BT], dtype=ACC)  # dA[block rows, all cols]
            b_da_col = tl.zeros([BC, BT], dtype=ACC)  # dA[all rows, block cols]^T
            b_da_diag = tl.zeros([BC, BC], dtype=ACC)
            for i_v in range(tl.cdiv(V, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < V
                p_kv = o_k[:, None] * V + o_v[None, :]
                m_kv = m_k[:, None] & m_v[None, :]
                p_sv = row_s[:, None] * (H * V) + o_v[None, :]
                p_fv = row_f[:, None] * (H * V) + o_v[None, :]
                b_do_s = tl.load(do + p_sv, mask=m_s[:, None] & m_v[None, :], other=0)
                b_v_s = tl.load(v + p_sv, mask=m_s[:, None] & m_v[None, :], other=0)
                b_h = tl.load(h + (i_c64 * H + i_h) * K * V + p_kv, mask=m_kv, other=0).to(b_do_s.dtype)
                b_dh = tl.load(dh + (i_c64 * H + i_h) * K * V + p_kv, mask=m_kv, other=0).to(b_do_s.dtype)
                b_dqh += tl.dot(b_do_s, tl.trans(b_h), input_precision=PREC, out_dtype=ACC)
                b_dkh += tl.dot(b_v_s, tl.trans(b_dh), input_precision=PREC, out_dtype=ACC)
                b_da_diag += tl.dot(b_do_s, tl.trans(b_v_s), input_precision=PREC, out_dtype=ACC)
                if i_s > 0:
                    b_vf = tl.load(v + p_fv, mask=m_f[:, None] & m_v[None, :], other=0)
                    b_da_row += tl.dot(b_do_s, tl.trans(b_vf), input_precision=PREC, out_dtype=ACC)
                if i_s < BT // BC - 1:
                    b_dof = tl.load(do + p_fv, mask=m_f[:, None] & m_v[None, :], other=0)
                    b_da_col += tl.dot(b_v_s, tl.trans(b_dof), input_precision=PREC, out_dtype=ACC)
            b_dq = b_dqh * tl.exp(b_Gs) * scale
            b_k_last = b_k * tl.exp(b_G_last[None, :] - b_Gs)  # k e^{G_last - G}
            b_dk = b_dkh * tl.exp(b_G_last[None, :] - b_Gs)
            if i_s > 0:
                before = (o_t < i_s * BC)[:, None]
                b_k_ref = (b_kf.to(ACC) * tl.exp(tl.where(before, b_g_ref[None, :] - b_Gf, float("-inf")))).to(b_qf.dtype)
                b_dq += tl.exp(b_Gs - b_g_ref[None, :]) * tl.dot((b_da_row * scale).to(b_qf.dtype), b_k_ref, input_precision=PREC, out_dtype=ACC)
            b_at_off = tl.zeros([BC, BT], dtype=ACC)  # A[rows after the block, block cols]^T (for dv)
            if i_s < BT // BC - 1:
                after = (o_t >= (i_s + 1) * BC)[:, None]
                b_q_ref = (b_qf.to(ACC) * tl.exp(tl.where(after, b_Gf - b_g_end[None, :], float("-inf")))).to(b_qf.dtype)
                b_dk += tl.exp(b_g_end[None, :] - b_Gs) * tl.dot((b_da_col * scale).to(b_qf.dtype), b_q_ref, input_precision=PREC, out_dtype=ACC)
                if FUSE_DV:
                    b_k_end = (b_k * tl.exp(b_g_end[None, :] - b_Gs)).to(b_qf.dtype)
                    b_at_off = tl.dot(b_k_end, tl.trans(b_q_ref), input_precision=PREC, out_dtype=ACC) * scale
            # diagonal sub-block in log space: column j of dA (and of A for dv)
            b_da_diag = tl.where(o_c[:, None] >= o_c[None, :], b_da_diag * scale, 0)
            b_a_diag = tl.zeros([BC, BC], dtype=ACC)
            b_Gj = tl.zeros([BK], dtype=ACC)
            for j in range(BC):
                m_j = m_k & (i_t * BT + i_s * BC + j < seq_len)
                p_j = (i_t * BT + i_s * BC + j) * (H * K) + o_k
                b_kj = tl.load(k + p_j, mask=m_j, other=0).to(ACC)
                b_Gj += tl.load(g + p_j, mask=m_j, other=0).to(ACC)
                b_e = tl.exp(tl.where((o_c >= j)[:, None], b_Gl - b_Gj[None, :], float("-inf")))
                b_da_j = tl.sum(tl.where((o_c == j)[None, :], b_da_diag, 0), axis=1)
                b_dq += b_da_j[:, None] * b_kj[None, :] * b_e
                b_dk_j = tl.sum(b_da_j[:, None] * b_q * b_e, axis=0)
                b_dk += tl.where((o_c == j)[:, None], b_dk_j[None, :], 0)
                if FUSE_DV:
                    b_a_j = tl.sum(b_q * b_kj[None, :] * b_e, axis=1)
                    b_a_diag += tl.where((o_c == j)[None, :], b_a_j[:, None], 0)
            b_dB = b_q * b_dq - b_k * b_dk
            b_dg = carry[None, :] + tl.sum(b_dB, axis=0)[None, :] - tl.cumsum(b_dB, axis=0) + b_dB
            carry += tl.sum(b_dB, axis=0)
            tl.store(dq + p_sk, b_dq.to(dq.dtype.element_ty), mask=m_sk)
            tl.store(dk + p_sk, b_dk.to(dk.dtype.element_ty), mask=m_sk)
            tl.store(dg + p_sk, b_dg.to(dg.dtype.element_ty), mask=m_sk)
            if FUSE_DV:
                b_at_diag = tl.trans(b_a_diag * scale)
                for i_v in range(tl.cdiv(V, BV)):
                    o_v = i_v * BV + tl.arange(0, BV)
                    m_v = o_v < V
                    p_sv = row_s[:, None] * (H * V) + o_v[None, :]
                    b_do_s = tl.load(do + p_sv, mask=m_s[:, None] & m_v[None, :], other=0)
                    b_dh = tl.load(dh + (i_c64 * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
                    b_dv = tl.dot(b_k_last.to(b_do_s.dtype), b_dh.to(b_do_s.dtype), input_precision=PREC, out_dtype=ACC)
                    b_dv += tl.dot(b_at_diag.to(b_do_s.dtype), b_do_s, input_precision=PREC, out_dtype=ACC)
                    if i_s < BT // BC - 1:
                        b_dof = tl.load(do + row_f[:, None] * (H * V) + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0)
                        b_dv += tl.dot(b_at_off.to(b_do_s.dtype), b_dof, input_precision=PREC, out_dtype=ACC)
                    tl.store(dv + p_sv, b_dv.to(dv.dtype.element_ty), mask=m_s[:, None] & m_v[None, :])
    # fmt: on


@triton.jit
def _dv_bwd(
    q,
    k,
    g,
    do,
    dh,
    dv,
    cu_seqlens,
    chunk_info,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    # fmt: off
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, seq_len = _chunk_of(cu_seqlens, chunk_info, i_c)
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    g += (bos * H + i_h) * K
    do += (bos * H + i_h) * V
    dv += (bos * H + i_h) * V
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    row_f = i_t * BT + o_t
    m_f = row_f < seq_len
    p_dhc = dh + (i_c.to(tl.int64) * H + i_h) * K * V
    b_dof = tl.load(do + row_f[:, None] * (H * V) + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0)
    for i_s in tl.static_range(BT // BC):
        row_s = i_t * BT + i_s * BC + o_c
        m_s = row_s < seq_len
        if i_t * BT + i_s * BC < seq_len:
            b_dv = tl.zeros([BC, BV], dtype=ACC)
            b_at_off = tl.zeros([BC, BT], dtype=ACC)
            b_a_diag = tl.zeros([BC, BC], dtype=ACC)
            for i_k in range(tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_k = o_k < K
                p_sk = row_s[:, None] * (H * K) + o_k[None, :]
                p_fk = row_f[:, None] * (H * K) + o_k[None, :]
                b_k = tl.load(k + p_sk, mask=m_s[:, None] & m_k[None, :], other=0)
                b_q = tl.load(q + p_sk, mask=m_s[:, None] & m_k[None, :], other=0).to(ACC)
                b_gs = tl.load(g + p_sk, mask=m_s[:, None] & m_k[None, :], other=0).to(ACC)
                b_gf = tl.load(g + p_fk, mask=m_f[:, None] & m_k[None, :], other=0).to(ACC)
                b_Gf = tl.cumsum(b_gf, axis=0)
                b_G_last = tl.sum(b_gf, axis=0)
                b_g_ref = tl.sum(tl.where((o_t < i_s * BC)[:, None], b_gf, 0), axis=0)
                b_Gl = tl.cumsum(b_gs, axis=0)  # G within the sub-block
                b_Gs = b_g_ref[None, :] + b_Gl
                b_g_end = b_g_ref + tl.sum(b_gs, axis=0)
                b_dh = tl.load(p_dhc + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
                b_k_last = (b_k.to(ACC) * tl.exp(b_G_last[None, :] - b_Gs)).to(b_k.dtype)
                b_dv += tl.dot(b_k_last, b_dh.to(b_k.dtype), input_precision=PREC, out_dtype=ACC)
                if i_s < BT // BC - 1:
                    b_qf = tl.load(q + p_fk, mask=m_f[:, None] & m_k[None, :], other=0)
                    after = (o_t >= (i_s + 1) * BC)[:, None]
                    b_q_ref = (b_qf.to(ACC) * tl.exp(tl.where(after, b_Gf - b_g_end[None, :], float("-inf")))).to(b_k.dtype)
                    b_k_end = (b_k.to(ACC) * tl.exp(b_g_end[None, :] - b_Gs)).to(b_k.dtype)
                    b_at_off += tl.dot(b_k_end, tl.trans(b_q_ref), input_precision=PREC, out_dtype=ACC)
                b_Gj = tl.zeros([BK], dtype=ACC)
                for j in range(BC):
                    p_j = (i_t * BT + i_s * BC + j) * (H * K) + o_k
                    m_j = m_k & (i_t * BT + i_s * BC + j < seq_len)
                    b_kj = tl.load(k + p_j, mask=m_j, other=0).to(ACC)
                    b_Gj += tl.load(g + p_j, mask=m_j, other=0).to(ACC)
                    b_e = tl.exp(tl.where((o_c >= j)[:, None], b_Gl - b_Gj[None, :], float("-inf")))
                    b_a_j = tl.sum(b_q * b_kj[None, :] * b_e, axis=1)
                    b_a_diag += tl.where((o_c == j)[None, :], b_a_j[:, None], 0)
            b_do_s = tl.load(do + row_s[:, None] * (H * V) + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0)
            b_dv += tl.dot(tl.trans(b_a_diag * scale).to(b_do_s.dtype), b_do_s, input_precision=PREC, out_dtype=ACC)
            if i_s < BT // BC - 1:
                b_dv += tl.dot((b_at_off * scale).to(b_do_s.dtype), b_dof, input_precision=PREC, out_dtype=ACC)
            tl.store(dv + row_s[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_s[:, None] & m_v[None, :])
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
    "state": {"num_warps": 4, "num_stages": 2},
    "output": {"num_warps": 4, "num_stages": 2},
    "dstate": {"num_warps": 4, "num_stages": 2},
    "grads": {"num_warps": 4, "num_stages": 2},  # H100 sweep 2026-11-22: 7% faster than 8 warps
    "dv": {"num_warps": 4, "num_stages": 2},
}
"""Launch options per kernel (warps, pipeline stages); benchmarks may try others."""


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
    cu, chunk_offsets, chunk_info, n_chunks = layout
    _, _, heads, key_dim = q.shape
    val_dim = v.shape[-1]
    acc, prec = _kernel_args(q.dtype)
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    bk, bv = _block(key_dim), _block(val_dim)
    h = q.new_empty(n_chunks, heads, key_dim, val_dim)
    ht = q.new_empty(n_seqs, heads, key_dim, val_dim, dtype=state_dtype)
    h0 = initial_state.contiguous() if initial_state is not None else ht
    bvs = _state_value_block(val_dim, n_seqs * heads * triton.cdiv(key_dim, bk))
    grid = (triton.cdiv(val_dim, bvs), triton.cdiv(key_dim, bk), n_seqs * heads)
    _state_fwd[grid](
        k, v, g, h, h0, ht, cu, chunk_offsets,
        H=heads, K=key_dim, V=val_dim, BT=CHUNK, BK=bk, BV=bvs,
        USE_H0=initial_state is not None, ACC=acc, PREC=prec, **LAUNCH["state"],
    )  # fmt: skip
    o = torch.empty_like(v)
    grid = (triton.cdiv(val_dim, bv), n_chunks, heads)
    _output_fwd[grid](
        q, k, v, g, h, o, cu, chunk_info, scale,
        H=heads, K=key_dim, V=val_dim, BT=CHUNK, BC=SUB_CHUNK, BK=bk, BV=bv,
        ACC=acc, PREC=prec, **LAUNCH["output"],
    )  # fmt: skip
    return o, h, ht


def _backward(q, k, v, g, h, ht, do, dht, scale, layout, n_seqs, want_dh0):
    cu, chunk_offsets, chunk_info, n_chunks = layout
    _, _, heads, key_dim = q.shape
    val_dim = v.shape[-1]
    acc, prec = _kernel_args(q.dtype)
    bk, bv = _block(key_dim), _block(val_dim)
    dh = torch.empty_like(h)
    dh0 = torch.empty_like(ht) if want_dh0 else None
    bvs = _state_value_block(val_dim, n_seqs * heads * triton.cdiv(key_dim, bk))
    grid = (triton.cdiv(val_dim, bvs), triton.cdiv(key_dim, bk), n_seqs * heads)
    _dstate_bwd[grid](
        q, g, do, dh, dht if dht is not None else ht, dh0 if dh0 is not None else ht, cu, chunk_offsets, scale,
        H=heads, K=key_dim, V=val_dim, BT=CHUNK, BK=bk, BV=bvs,
        USE_DHT=dht is not None, STORE_DH0=want_dh0, ACC=acc, PREC=prec, **LAUNCH["dstate"],
    )  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = torch.empty_like(g)
    n_kblocks = triton.cdiv(key_dim, bk)
    fuse_dv = n_kblocks == 1
    _grads_bwd[(n_kblocks, n_chunks, heads)](
        q, k, v, g, h, ht, do, dh, dq, dk, dv, dg, cu, chunk_info, scale,
        H=heads, K=key_dim, V=val_dim, BT=CHUNK, BC=SUB_CHUNK, BK=bk, BV=bv,
        FUSE_DV=fuse_dv, ACC=acc, PREC=prec, **LAUNCH["grads"],
    )  # fmt: skip
    if not fuse_dv:
        _dv_bwd[(triton.cdiv(val_dim, bv), n_chunks, heads)](
            q, k, g, do, dh, dv, cu, chunk_info, scale,
            H=heads, K=key_dim, V=val_dim, BT=CHUNK, BC=SUB_CHUNK, BK=bk, BV=bv,
            ACC=acc, PREC=prec, **LAUNCH["dv"],
        )  # fmt: skip
    return dq, dk, dv, dg, dh0


class _ChunkGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, cu_seqlens, n_seqs):
        batch, seq_len = q.shape[:2]
        layout = _layout(cu_seqlens, batch, seq_len, q.device)
        o, h, ht = _forward(q, k, v, g, scale, initial_state, layout, n_seqs)
        ctx.save_for_backward(q, k, v, g, h, ht)
        ctx.layout, ctx.scale, ctx.n_seqs = layout, scale, n_seqs
        ctx.has_h0 = initial_state is not None
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)  # an unused final state gives dht = None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h, ht = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        want_dh0 = ctx.has_h0 and ctx.needs_input_grad[5]
        dq, dk, dv, dg, dh0 = _backward(
            q, k, v, g, h, ht, do.contiguous(), None if dht is None else dht.contiguous(),
            ctx.scale, ctx.layout, ctx.n_seqs, want_dh0,
        )  # fmt: skip
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dg, None, dh0, None, None


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
    o, ht = _ChunkGLA.apply(q, k, v, log_g, scale, initial_state, cu_seqlens, n_seqs)
    return o, (ht if output_final_state else None)
