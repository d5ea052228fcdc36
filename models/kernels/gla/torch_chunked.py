"""Chunkwise GLA in plain PyTorch: the reference for the fused kernels and the CPU path.

Chunks of 64 tokens (METHODS.md §9). Across chunks a state recurrence; inside a chunk, secondary
chunking into 16-token sub-blocks: off-diagonal sub-blocks as plain matmuls against a reference
point between the two blocks (every exponent <= 0), diagonal sub-blocks in log space. Sequences
of a packed batch (cu_seqlens) are laid out chunk by chunk, each padded to whole chunks, so the
state restarts at every document. Autograd runs through it; no custom backward.
"""

from __future__ import annotations

import torch

from models.kernels.gla._common import (
    CHUNK,
    SUB_CHUNK,
    check_inputs,
    compute_dtype,
    default_scale,
    seq_bounds,
)


class _ChunkLayout:
    """Where every chunk slot comes from: flat token index (or the zero pad row) and its sequence."""

    def __init__(self, bounds: list[tuple[int, int]], n_tokens: int, device: torch.device):
        slots, chunk_seq, chunk_pos = [], [], []
        for n, (start, end) in enumerate(bounds):
            n_chunks = -(-(end - start) // CHUNK)
            token = torch.arange(start, start + n_chunks * CHUNK)
            slots.append(torch.where(token < end, token, n_tokens))  # n_tokens = the zero row
            chunk_seq += [n] * n_chunks
            chunk_pos += list(range(n_chunks))
        self.slot_token = (
            torch.cat(slots).to(device)
            if slots
            else torch.zeros(0, dtype=torch.long, device=device)
        )
        self.valid = self.slot_token < n_tokens
        self.chunk_seq = torch.tensor(chunk_seq, dtype=torch.long, device=device)
        self.chunk_pos = torch.tensor(chunk_pos, dtype=torch.long, device=device)
        self.n_chunks = len(chunk_seq)
        max_chunks = max(chunk_pos, default=-1) + 1
        # table[n, j] = id of the j-th chunk of sequence n, -1 past its end
        table = torch.full((len(bounds), max_chunks), -1, dtype=torch.long)
        table[
            torch.tensor(chunk_seq, dtype=torch.long), torch.tensor(chunk_pos, dtype=torch.long)
        ] = torch.arange(self.n_chunks)
        self.table = table.to(device)

    def gather(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, T, H, D] -> [n_chunks, H, CHUNK, D] in `dtype`, pad slots zero."""
        flat = x.reshape(-1, *x.shape[2:]).to(dtype)
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        chunks = flat[self.slot_token].view(self.n_chunks, CHUNK, *flat.shape[1:])
        return chunks.transpose(1, 2)

    def scatter(self, chunks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[n_chunks, H, CHUNK, D] -> [B, T, H, D] shaped like `like` (pad slots dropped)."""
        flat = chunks.transpose(1, 2).reshape(-1, chunks.shape[1], chunks.shape[-1])
        # Sequences tile the tokens in order, so the real slots are already in token order.
        return flat[self.valid].reshape(*like.shape[:2], chunks.shape[1], chunks.shape[-1])


class _DiagonalBlocks(torch.autograd.Function):
    """A[i, j] = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i inside each 16-token sub-block.

    Log space, element-wise: never a lone exp(+G). The [.., 16, 16, K] factor is recomputed in
    backward instead of saved (the largest tensor of the torch path)."""

    @staticmethod
    def _decay(G):
        tril = torch.ones(G.shape[-2], G.shape[-2], dtype=torch.bool, device=G.device).tril()
        return torch.exp(
            torch.where(tril[:, :, None], G[..., :, None, :] - G[..., None, :, :], float("-inf"))
        )

    @staticmethod
    def forward(ctx, q, k, G):
        ctx.save_for_backward(q, k, G)
        return (q[..., :, None, :] * _DiagonalBlocks._decay(G) * k[..., None, :, :]).sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, G = ctx.saved_tensors
        weighted = grad[..., None] * _DiagonalBlocks._decay(G)  # [.., i, j, K]
        with_k = weighted * k[..., None, :, :]
        dq = with_k.sum(-2)
        with_q = weighted * q[..., :, None, :]
        dk = with_q.sum(-3)
        both = with_k * q[..., :, None, :]
        dG = both.sum(-2) - both.sum(-3)
        return dq, dk, dG


def _intra_chunk(q, k, v, G, scale):
    """Within-chunk output [n, H, C, V] from q, k, G [n, H, C, K] (G = within-chunk cumsum)."""
    n, h, c, dk = q.shape
    s = c // SUB_CHUNK
    qs = q.view(n, h, s, SUB_CHUNK, dk)
    ks = k.view(n, h, s, SUB_CHUNK, dk)
    vs = v.view(n, h, s, SUB_CHUNK, v.shape[-1])
    Gs = G.view(n, h, s, SUB_CHUNK, dk)
    # Reference point of row block i: the last token before it (G = 0 at the chunk start).
    G_ref = torch.cat([torch.zeros_like(Gs[:, :, :1, 0]), Gs[:, :, :-1, -1]], dim=2)  # [n,h,s,K]
    q_ref = qs * torch.exp(Gs - G_ref[:, :, :, None])
    col = torch.arange(c, device=q.device)
    before_block = col[None, :] < (torch.arange(s, device=q.device) * SUB_CHUNK)[:, None]  # [s, C]
    k_exp = torch.where(
        before_block[None, None, :, :, None], G_ref[:, :, :, None] - G[:, :, None], float("-inf")
    )
    k_ref = k[:, :, None] * torch.exp(k_exp)  # [n,h,s,C,K]
    a_off = q_ref @ k_ref.transpose(-1, -2)  # [n,h,s,16,C]
    a_diag = _DiagonalBlocks.apply(qs, ks, Gs)  # [n,h,s,16,16]
    o = a_off @ v[:, :, None] + a_diag @ vs
    return scale * o.reshape(n, h, c, -1)


def gla_torch_chunked(
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
    scale = default_scale(q, scale)
    batch, seq_len, heads, key_dim = q.shape
    acc = compute_dtype(q.dtype)
    bounds = seq_bounds(cu_seqlens, batch, seq_len)
    layout = _ChunkLayout(bounds, batch * seq_len, q.device)
    qc, kc, vc, gc = (layout.gather(x, acc) for x in (q, k, v, log_g))
    G = gc.cumsum(dim=2)
    G_last = G[:, :, -1]  # pad slots have log_g = 0, so this is the last real token's value
    k_decay = kc * torch.exp(G_last[:, :, None] - G)
    chunk_update = k_decay.transpose(-1, -2) @ vc  # [n_chunks, H, K, V]
    chunk_decay = torch.exp(G_last)[..., None]

    state = q.new_zeros(n_seqs, heads, key_dim, v.shape[-1], dtype=acc)
    if initial_state is not None:
        state = state + initial_state.to(acc)
    starts = []
    for j in range(layout.table.shape[1]):
        ids = layout.table[:, j]
        starts.append(state)
        take = ids.clamp(min=0)
        advanced = chunk_decay[take] * state + chunk_update[take]
        state = torch.where((ids >= 0)[:, None, None, None], advanced, state)
    if layout.n_chunks:
        chunk_start_state = torch.stack(starts)[layout.chunk_pos, layout.chunk_seq]
        o = scale * (qc * torch.exp(G)) @ chunk_start_state + _intra_chunk(qc, kc, vc, G, scale)
        o = layout.scatter(o, v)
    else:
        o = v.new_zeros(v.shape, dtype=acc)
    return o.to(v.dtype), (state if output_final_state else None)
