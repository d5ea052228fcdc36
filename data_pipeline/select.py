"""Data selection by model-likelihood difference: CoLoR-Filter and MiniPLM (METHODS.md §1, §2).

Owns scoring (mean token NLL of every document under one or more models, documents packed
several per row with restarting position_ids; fp32 or bf16 autocast, fp32 cross-entropy over
token chunks), the two score formulas, top-k choice (global, or the streaming CoLoR-Filter
variant), the scores file, and writing the chosen documents as a new ShardSet naming its parent.
It does not load checkpoints: callers pass `ScoringModel`s (data_pipeline never imports engine).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.convert import derived_shardset
from data_pipeline.formats import ShardSet, open_shardset
from data_pipeline.formats.writer import parse_size
from data_pipeline.manifest import (
    check_output_dir,
    manifest_sha256,
)
from data_pipeline.packing import IGNORE_INDEX
from data_pipeline.prepare import ProgressLine
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

SCORES_NAME = "scores.npz"
SCORES_VERSION = 1
SCORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# fp32 logits held at once by the cross-entropy (per chunk of scored tokens): 1 GiB
LOGITS_CHUNK_BYTES = 1 << 30
SELECTIONS = ("global", "streaming")


@dataclass(frozen=True)
class Method:
    """A selection method: score = NLL[roles[0]] - NLL[roles[1]]; keep the top `keep_count`."""

    name: str
    roles: tuple[str, str]  # (minuend, subtrahend) of the NLL difference
    parameter: str  # "tau" or "alpha"

    def keep_count(self, num_docs: int, value: float) -> int:
        if self.parameter == "tau":  # CoLoR-Filter: k = floor(N / tau)
            if not value >= 1:
                raise ValueError(f"--tau must be >= 1, got {value}")
            return math.floor(num_docs / value)
        if not 0 < value <= 1:  # MiniPLM: k = floor(alpha * N)
            raise ValueError(f"--alpha must be in (0, 1], got {value}")
        return math.floor(value * num_docs)


METHODS = {
    "color-filter": Method("color-filter", ("prior", "conditional"), "tau"),
    "miniplm": Method("miniplm", ("reference", "teacher"), "alpha"),
}


@dataclass
class ScoringModel:
    """A causal LM as selection needs it: `logits(input_ids [B,T], position_ids [B,T]) -> [B,T,V]`.

    `max_seq_len` bounds the scoring window; `tokenizer_path` (None: unknown) and `vocab_size`
    are checked against the ShardSet; `description` goes into the provenance. A model that also
    gives `hidden_states(input_ids, position_ids) -> [B,T,D]` and `project(h [n,D]) -> [n,V]`
    (Strata's Llama and GLA do) is projected only at scored tokens, a chunk at a time, so the
    full [B,T,V] logits never exist; otherwise `logits` is called and its output chunked.
    """

    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    max_seq_len: int
    vocab_size: int
    tokenizer_path: Path | None
    description: dict[str, Any] = field(default_factory=dict)
    hidden_states: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None


class TokenizerMismatch(ValueError):
    """A scoring model was trained with another tokenizer than the ShardSet's."""


# --------------------------------------------------------------------------- tokenizer check


def _shardset_fingerprint(shardset: ShardSet) -> str:
    if shardset.tokenizer_path is not None:
        return tokenizer_fingerprint(load_tokenizer(shardset.tokenizer_path))
    return str(shardset.manifest["tokenizer"]["fingerprint"])


def check_tokenizer(shardset: ShardSet, role: str, model: ScoringModel) -> None:
    """Refuse a model whose tokenizer (or, when it has none on disk, vocabulary) differs.

    Fingerprints are sha256 of the canonical tokenizer JSON (data_pipeline.tokenizer); both are
    computed the same way so a copied tokenizer.json matches its original.
    """
    data_fp = _shardset_fingerprint(shardset)
    data_vocab = int(shardset.manifest["tokenizer"].get("vocab_size", 0))
    where = model.description.get("path", role)
    if model.tokenizer_path is not None:
        model_fp = tokenizer_fingerprint(load_tokenizer(model.tokenizer_path))
        if model_fp != data_fp:
            raise TokenizerMismatch(
                f"--{role} {where}: its tokenizer {model.tokenizer_path} (fingerprint "
                f"{model_fp[:16]}) differs from the ShardSet's {shardset.root / 'tokenizer.json'} "
                f"(fingerprint {data_fp[:16]}); the models must share the data's tokenizer"
            )
    else:
        print(
            f"select: warning: --{role} {where}: no tokenizer.json found; only the vocabulary "
            "size is checked",
            file=sys.stderr,
        )
    if model.vocab_size < data_vocab:
        raise TokenizerMismatch(
            f"--{role} {where}: model vocab_size {model.vocab_size} is smaller than the "
            f"ShardSet's tokenizer vocab_size {data_vocab} ({shardset.root})"
        )


# --------------------------------------------------------------------------- scoring


def document_windows(length: int, window: int) -> Iterator[tuple[int, int]]:
    """(start, n_inputs) of the scoring windows of a document of `length` tokens.

    A document's targets are its tokens 1..L-1 (token 0 has no context, as in training: the
    loader masks the label of every document start). A document with L - 1 <= window targets is
    one window. A longer one is cut into consecutive non-overlapping windows: window j feeds
    tokens [j*W, j*W + n) and predicts tokens [j*W + 1, j*W + n + 1), with the context
    restarting at each window (as training restarts it at each row). Every target is scored
    exactly once, so the document's NLL is the mean over all its L - 1 targets. Documents of
    one token (EOS only) have no targets and score NaN.
    """
    targets = length - 1
    for start in range(0, max(targets, 0), window):
        yield start, min(window, targets - start)


@dataclass
class _Batch:
    input_ids: np.ndarray  # [rows, window] int64
    labels: np.ndarray  # [rows, window] int64, IGNORE_INDEX outside documents
    position_ids: np.ndarray  # [rows, window] int64
    owner: np.ndarray  # [rows, window] int64: index into `docs`, -1 on padding
    docs: list[int]  # doc ids with a window in this batch (each once)
    finished: int  # documents whose last window is in this batch
    tokens: int  # document tokens covered by this batch's windows (for the progress line)


def _packed_batches(shardset: ShardSet, window: int, rows: int) -> Iterator[_Batch]:
    """Windows of all documents, in corpus order, packed first-fit into a batch of `rows` rows.

    Each window goes to the first row of the current batch with room for it; a window that fits
    in no row closes the batch. Row tails are padding (a position-0 segment of its own, labels
    ignored). Position ids restart at 0 at every window, so no token attends to another
    document (or another window of the same document).
    """

    def empty() -> _Batch:
        return _Batch(
            input_ids=np.zeros((rows, window), np.int64),
            labels=np.full((rows, window), IGNORE_INDEX, np.int64),
            position_ids=np.zeros((rows, window), np.int64),
            owner=np.full((rows, window), -1, np.int64),
            docs=[],
            finished=0,
            tokens=0,
        )

    def closed(batch: _Batch, fill: np.ndarray) -> _Batch:
        used = int(np.count_nonzero(fill))  # rows fill in order: row r+1 is used only if r is
        for row in range(used):
            batch.position_ids[row, fill[row] :] = np.arange(window - fill[row])
        for name in ("input_ids", "labels", "position_ids", "owner"):
            setattr(batch, name, getattr(batch, name)[:used])
        return batch

    batch, fill = empty(), np.zeros(rows, np.int64)  # fill[r]: tokens placed in row r
    lengths = np.asarray(shardset.lengths)
    for doc_id in range(len(shardset)):
        windows = list(document_windows(int(lengths[doc_id]), window))
        if not windows:
            batch.finished += 1
            batch.tokens += int(lengths[doc_id])
            continue
        tokens = np.asarray(shardset.get(doc_id), dtype=np.int64)
        for index, (start, n) in enumerate(windows):
            fits = fill + n <= window
            if not fits.any():
                yield closed(batch, fill)
                batch, fill = empty(), np.zeros(rows, np.int64)
                fits = fill + n <= window
            row = int(np.argmax(fits))
            if not batch.docs or batch.docs[-1] != doc_id:
                batch.docs.append(doc_id)
            span = slice(int(fill[row]), int(fill[row]) + n)
            batch.input_ids[row, span] = tokens[start : start + n]
            batch.labels[row, span] = tokens[start + 1 : start + n + 1]
            batch.position_ids[row, span] = np.arange(n)
            batch.owner[row, span] = len(batch.docs) - 1
            batch.tokens += n + (1 if index == 0 else 0)
            fill[row] += n
        batch.finished += 1
    if batch.docs or batch.finished:
        yield closed(batch, fill)


def resolve_score_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`--dtype` to the autocast dtype: auto is bf16 on CUDA and fp32 elsewhere."""
    device = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in SCORE_DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(SCORE_DTYPES)}; got {name!r}")
    return SCORE_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bf16" (the name the provenance and scores file record)."""
    return {v: k for k, v in SCORE_DTYPES.items()}[dtype]


def _token_nll(
    model: ScoringModel,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    targets: torch.Tensor,
    scored: torch.Tensor,
    chunk_tokens: int,
) -> torch.Tensor:
    """NLL (float32) of `targets` at the flat positions `scored` of the batch, chunk by chunk.

    Only `chunk_tokens` rows of logits are upcast to float32 (and, for a model with
    hidden_states/project, projected) at a time; logsumexp and the target logit are float32
    whatever dtype the forward ran in.
    """
    if model.hidden_states is not None and model.project is not None:
        hidden = model.hidden_states(input_ids, position_ids)
        flat, project = hidden.reshape(-1, hidden.shape[-1]), model.project
    else:
        logits = model.logits(input_ids, position_ids)
        flat, project = logits.reshape(-1, logits.shape[-1]), None
    pieces = []
    for start in range(0, scored.shape[0], chunk_tokens):
        rows = flat[scored[start : start + chunk_tokens]]
        logits = (rows if project is None else project(rows)).float()
        pieces.append(
            F.cross_entropy(logits, targets[start : start + chunk_tokens], reduction="none")
        )
    return torch.cat(pieces) if pieces else targets.new_zeros(0, dtype=torch.float32)


def score_documents(
    shardset: ShardSet,
    models: Sequence[ScoringModel],
    *,
    batch_tokens: int = 16384,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES,
    progress: bool = True,
    label: str = "score",
) -> tuple[np.ndarray, int]:
    """Mean token NLL (nats) of every document under each model: ([len(models), N] float64, window).

    All models see the same packed batches; the window is the smallest `max_seq_len` among them
    (see `document_windows`). The forward runs under autocast to `dtype` when that is not
    float32 (bf16 on CUDA); cross-entropy is taken in float32 over chunks of at most
    `logits_chunk_bytes` of float32 logits, and summed per document in float64.
    """
    if not models:
        raise ValueError("score_documents: no models given")
    if dtype not in SCORE_DTYPES.values():
        raise ValueError(f"score_documents: dtype must be float32 or bfloat16, got {dtype}")
    window = min(m.max_seq_len for m in models)
    rows = max(1, batch_tokens // window)
    device = torch.device(device)
    num_docs = len(shardset)
    nll_sum = np.zeros((len(models), num_docs), np.float64)
    count = np.zeros(num_docs, np.int64)
    chunks = [max(1, logits_chunk_bytes // (4 * m.vocab_size)) for m in models]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    line = ProgressLine(int(np.asarray(shardset.lengths).sum()), progress, label=label)
    docs_done = tokens_done = 0
    with torch.inference_mode():
        for batch in _packed_batches(shardset, window, rows):
            docs_done += batch.finished
            tokens_done += batch.tokens
            if batch.docs:
                docs = np.asarray(batch.docs)
                owner = batch.owner.reshape(-1)
                valid = owner >= 0
                count[docs] += np.bincount(owner[valid], minlength=len(docs))
                input_ids = torch.from_numpy(batch.input_ids).to(device)
                position_ids = torch.from_numpy(batch.position_ids).to(device)
                scored = torch.from_numpy(np.flatnonzero(valid)).to(device)
                targets = torch.from_numpy(batch.labels.reshape(-1)[valid]).to(device)
                owner_t = torch.from_numpy(owner[valid]).to(device)
                for m, model in enumerate(models):
                    with autocast:
                        nll = _token_nll(model, input_ids, position_ids, targets, scored, chunks[m])
                    sums = torch.bincount(owner_t, weights=nll.double(), minlength=len(docs))
                    nll_sum[m, docs] += sums.cpu().numpy()
            line.update(docs_done, tokens_done, tokens_done)
    line.update(docs_done, tokens_done, tokens_done, final=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return nll_sum / np.where(count > 0, count, np.nan), window


# --------------------------------------------------------------------------- selection


def top_k_in_corpus_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Doc ids of the k highest scores, returned sorted by doc id (corpus order).

    Ties are broken by the smaller doc id; NaN scores (documents with no targets) rank last.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 <= k <= len(scores):
        raise ValueError(f"cannot keep {k} of {len(scores)} documents")
    doc_ids = np.arange(len(scores))
    # np.lexsort sorts by its last key first: NaN-ness, then descending score, then doc id
    ranked = np.lexsort((doc_ids, -np.nan_to_num(scores, nan=0.0), np.isnan(scores)))
    return np.sort(ranked[:k])


def streaming_top_k(scores: np.ndarray, chunk_docs: int, tau: float) -> np.ndarray:
    """The streaming CoLoR-Filter variant (ours, not the paper's): doc ids, in corpus order.

    The corpus is cut into consecutive chunks of `chunk_docs` documents; each keeps its best
    floor(len(chunk) / tau) by `top_k_in_corpus_order` (ties by smaller doc id, NaN last), so
    a decision needs only its chunk's scores. A full chunk keeps floor(chunk_docs / tau), the
    last (shorter) one floor(its length / tau); the total can be below the global floor(N / tau)
    when chunk_docs is not a multiple of tau.
    """
    scores = np.asarray(scores, dtype=np.float64)
    check_streaming(chunk_docs, tau)
    kept = [
        start + top_k_in_corpus_order(chunk, math.floor(len(chunk) / tau))
        for start in range(0, len(scores), chunk_docs)
        for chunk in (scores[start : start + chunk_docs],)
    ]
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def check_streaming(chunk_docs: int | None, tau: float) -> None:
    """A chunk must be able to keep a document: chunk_docs >= tau."""
    if chunk_docs is None or chunk_docs < 1:
        raise ValueError(f"--chunk-docs must be a positive integer for --selection streaming, got {chunk_docs}")
    if math.floor(chunk_docs / tau) < 1:
        raise ValueError(
            f"--chunk-docs {chunk_docs}: a chunk keeps floor({chunk_docs} / tau {tau}) = 0 "
            "documents; use --chunk-docs >= tau"
        )


@dataclass
class Scores:
    """What `--scores FILE` reloads: per-role NLLs, the score, and where they came from."""

    method: str
    nll: dict[str, np.ndarray]
    window: int
    parent_sha256: str
    models: dict[str, dict[str, Any]]
    dtype: str = "fp32"  # the forward's precision ("fp32" or "bf16"); cross-entropy is fp32

    @property
    def score(self) -> np.ndarray:
        first, second = METHODS[self.method].roles
        return self.nll[first] - self.nll[second]

    def save(self, path: Path) -> None:
        meta = {
            "version": SCORES_VERSION,
            "method": self.method,
            "window": self.window,
            "parent_manifest_sha256": self.parent_sha256,
            "models": self.models,
            "dtype": self.dtype,
            "formula": "score = NLL[{}] - NLL[{}] (mean token NLL, nats)".format(
                *METHODS[self.method].roles
            ),
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(
            tmp,
            doc_id=np.arange(len(self.score), dtype=np.int64),
            score=self.score,
            meta=np.array(json.dumps(meta, sort_keys=True)),
            **{f"nll_{role}": values for role, values in self.nll.items()},
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--scores: no such file {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                method = meta["method"]
                nll = {role: np.asarray(data[f"nll_{role}"]) for role in METHODS[method].roles}
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(f"--scores {path}: not a strata select scores file ({err})") from None
        return cls(
            method,
            nll,
            int(meta["window"]),
            meta["parent_manifest_sha256"],
            meta["models"],
            meta.get("dtype", "fp32"),
        )


# --------------------------------------------------------------------------- the command


def select(
    method_name: str,
    source: str | Path,
    out_dir: str | Path,
    value: float,
    *,
    models: dict[str, ScoringModel] | None = None,
    scores_file: str | Path | None = None,
    batch_tokens: int = 16384,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
    selection: str = "global",
    chunk_docs: int | None = None,
    format_name: str | None = None,
    shard_size: str | int = "64MB",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score (or reload scores for) every document of `source`, keep the top k, write `out_dir`.

    `value` is tau (color-filter) or alpha (miniplm). `models` maps the method's two roles to
    ScoringModels; with `scores_file` no model is needed. `dtype` (auto, fp32, bf16) is the
    forward's precision (`resolve_score_dtype`). `selection` is "global" (the paper's top k) or,
    for color-filter only, "streaming" (`streaming_top_k` over chunks of `chunk_docs`). The
    output is a new ShardSet (the parent's format unless `format_name`) holding the kept
    documents in corpus order, plus `scores.npz`; it is written to a temporary directory and
    renamed into place. Returns the output manifest.
    """
    method = METHODS[method_name]
    score_dtype = resolve_score_dtype(dtype, device)
    if selection not in SELECTIONS:
        raise ValueError(f"--selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if selection == "streaming" and method.parameter != "tau":
        raise ValueError(f"--selection streaming is a CoLoR-Filter variant; {method.name} has none")
    if selection == "global" and chunk_docs is not None:
        raise ValueError("--chunk-docs applies only to --selection streaming")
    parent = open_shardset(source)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, parent.root, overwrite)
    parent_sha = manifest_sha256(parent.root)
    keep = method.keep_count(len(parent), value)
    if selection == "streaming":
        check_streaming(chunk_docs, value)
        full_chunks, rest = divmod(len(parent), chunk_docs)
        keep = full_chunks * math.floor(chunk_docs / value) + math.floor(rest / value)
    if keep == 0:
        raise ValueError(
            f"--{method.parameter} {value}: keeps no document of {len(parent)} ({method.name})"
        )

    if scores_file is not None:
        scores = Scores.load(scores_file)
        if scores.method != method.name:
            raise ValueError(f"--scores {scores_file}: holds {scores.method} scores, not {method.name}")
        if scores.parent_sha256 != parent_sha:
            raise ValueError(
                f"--scores {scores_file}: scored ShardSet {scores.parent_sha256[:16]}, not "
                f"{parent.root} ({parent_sha[:16]})"
            )
        if len(scores.score) != len(parent):
            raise ValueError(f"--scores {scores_file}: {len(scores.score)} scores for {len(parent)} documents")
    else:
        missing = [role for role in method.roles if not models or role not in models]
        if missing:
            raise ValueError(f"{method.name}: --{' and --'.join(missing)} (or --scores FILE) required")
        for role in method.roles:
            check_tokenizer(parent, role, models[role])
        nll, window = score_documents(
            parent,
            [models[role] for role in method.roles],
            batch_tokens=batch_tokens,
            device=device,
            dtype=score_dtype,
            progress=progress,
            label=f"select {method.name}",
        )
        scores = Scores(
            method.name,
            dict(zip(method.roles, nll, strict=True)),
            window,
            parent_sha,
            {role: models[role].description for role in method.roles},
            dtype_name(score_dtype),
        )
    if selection == "streaming":
        kept = streaming_top_k(scores.score, chunk_docs, value)
        rule = (
            f"streaming variant (ours, not the paper's): best floor({chunk_docs} / tau) of each "
            f"consecutive chunk of {chunk_docs} documents, ties by smaller doc id, NaN last; "
            "corpus order kept"
        )
    else:
        kept = top_k_in_corpus_order(scores.score, keep)
        rule = "global top k, ties by smaller doc id, NaN last; corpus order kept"

    format_name = format_name or parent.manifest["format"]
    shard_size_bytes = parse_size(shard_size)
    finite = scores.score[np.isfinite(scores.score)]
    selection = {
        "method": method.name,
        method.parameter: value,
        "score": "NLL[{}] - NLL[{}], mean token NLL in nats; higher is kept".format(*method.roles),
        "selection": selection,
        "rule": rule,
        "chunk_docs": chunk_docs,
        "k": int(keep),
        "kept": int(len(kept)),
        "dropped": int(len(parent) - len(kept)),
        "unscored_documents": int(np.isnan(scores.score).sum()),
        "window": scores.window,
        "dtype": scores.dtype,
        "models": scores.models,
        "scores_file": SCORES_NAME,
        "scores_from": str(scores_file) if scores_file is not None else None,
        "score_stats": {
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "mean": float(finite.mean()) if finite.size else None,
            "threshold": float(scores.score[kept].min()) if len(kept) else None,
        },
    }
    with derived_shardset(
        parent,
        source,
        kept,
        out_dir,
        format_name,
        shard_size_bytes=shard_size_bytes,
        tool=f"strata select {method.name}",
        record={"selection": selection},
        counts={"documents": len(kept), "tokens": int(np.asarray(parent.lengths)[kept].sum())},
        progress=progress,
        label=f"select {method.name} write",
    ) as (tmp, manifest):
        scores.save(tmp / SCORES_NAME)
    if progress:
        print(
            f"select {method.name}: kept {len(kept):,} of {len(parent):,} documents "
            f"({manifest['counts']['tokens']:,} tokens) -> {out_dir}",
            file=sys.stderr,
        )
    return manifest


__all__ = [
    "METHODS",
    "SCORES_NAME",
    "Scores",
    "ScoringModel",
    "TokenizerMismatch",
    "check_streaming",
    "check_tokenizer",
    "document_windows",
    "dtype_name",
    "resolve_score_dtype",
    "score_documents",
    "select",
    "streaming_top_k",
    "top_k_in_corpus_order",
]
