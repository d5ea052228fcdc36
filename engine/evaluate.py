"""Validation: mean loss in nats/token and bits per byte of the text the scored tokens spell.

Bits per byte counts, for each scored target token, the bytes it decodes to (byte-level BPE:
one vocab character = one byte; special tokens such as EOS count 0 bytes while their loss
still counts, which can only make our number look worse).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def token_byte_lengths(tokenizer_path: str | Path) -> np.ndarray:
    """Bytes each token id decodes to, for a byte-level BPE `tokenizer.json`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    specials = {tok.content for tok in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for piece, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        lengths[idx] = 0 if piece in specials else len(piece)
    return lengths


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    token_bytes: np.ndarray | None = None,
    reduce=None,
    document_masking: bool = True,
    shard_for=None,
) -> dict:
    """{'val_loss', 'val_tokens'[, 'val_bpb']} over the batches (`reduce` sums across ranks).
    `shard_for(batch, device)` (context parallel): this rank scores its part of every row."""
    was_training = model.training
    model.eval()
    nll, tokens, nbytes = 0.0, 0, 0
    byte_table = torch.as_tensor(token_bytes) if token_bytes is not None else None
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        position_ids = batch.get("position_ids") if document_masking else None
        position_ids = position_ids.to(device) if position_ids is not None else None
        shard = shard_for(batch, device) if shard_for is not None else None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if shard is not None:
                input_ids, labels, position_ids = (shard.take(x) for x in (input_ids, labels, position_ids))
                logits = model(input_ids, position_ids, shard=shard)
            else:
                logits = model(input_ids, position_ids)
        if logits is None:  # a pipeline stage before the last (engine.pipeline): the last one scores
            continue
        nll += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        scored = labels[labels != -100].cpu()
        tokens += scored.numel()
        if byte_table is not None:
            nbytes += int(byte_table[scored].sum())
    if reduce is not None:
        nll, tokens, nbytes = reduce(nll), int(reduce(tokens)), int(reduce(nbytes))
    model.train(was_training)
    result = {"val_loss": nll / max(tokens, 1), "val_tokens": tokens}
    if byte_table is not None and nbytes:
        result["val_bpb"] = nll / math.log(2) / nbytes
    return result


def evaluate_shardset(
    model: torch.nn.Module,
    shardset,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    token_bytes: np.ndarray | None = None,
    max_batches: int = 0,
    cross_document_attention: bool = False,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
    shard_for=None,
) -> dict:
    """`evaluate` over a ShardSet packed in document order (data_pipeline.loader.eval_batches);
    `max_batches` 0 = all of it. Every rank of `world_size` scores its share; `reduce` sums."""
    from data_pipeline.loader import eval_batches

    batches = eval_batches(
        shardset, seq_len, batch_size, max_batches or 10**12, cross_document_attention, rank, world_size
    )
    return evaluate(
        model, batches, device, autocast_dtype, token_bytes, reduce, document_masking=not cross_document_attention,
        shard_for=shard_for,
    )  # fmt: skip


def gzip_bits_per_byte(texts: Iterable[str]) -> float:
    """Reference compressor: `gzip -9` on each document separately, bits per byte of UTF-8 text."""
    import gzip

    bits, nbytes = 0, 0
    for text in texts:
        raw = text.encode("utf-8")
        bits += 8 * len(gzip.compress(raw, compresslevel=9, mtime=0))
        nbytes += len(raw)
    return bits / max(nbytes, 1)
