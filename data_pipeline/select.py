"""Data selection by model-likelihood difference: CoLoR-Filter and MiniPLM (METHODS.md §1, §2).

Owns scoring (mean token NLL of every document under one or more models, documents packed
several per row with restarting position_ids), the two score formulas, top-k choice, the scores
file, and writing the chosen documents as a new ShardSet whose manifest names its parent.
It does not load checkpoints: callers pass `ScoringModel`s (data_pipeline never imports engine).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.convert import write_documents
from data_pipeline.formats import ShardSet, open_shardset
from data_pipeline.formats.writer import STATE_DIR, parse_size
from data_pipeline.manifest import manifest_sha256, replace_dir
from data_pipeline.packing import IGNORE_INDEX
from data_pipeline.prepare import ProgressLine
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

SCORES_NAME = "scores.npz"
SCORES_VERSION = 1


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
    are checked against the ShardSet; `description` goes into the provenance.
    """

    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    max_seq_len: int
    vocab_size: int
    tokenizer_path: Path | None
    description: dict[str, Any] = field(default_factory=dict)


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


def score_documents(
    shardset: ShardSet,
    models: Sequence[ScoringModel],
    *,
    batch_tokens: int = 16384,
    device: torch.device | str = "cpu",
    progress: bool = True,
    label: str = "score",
) -> tuple[np.ndarray, int]:
    """Mean token NLL (nats) of every document under each model: ([len(models), N] float64, window).

    All models see the same packed batches; the window is the smallest `max_seq_len` among them
    (see `document_windows`). Cross-entropy is taken in float32 and summed in float64.
    """
    if not models:
        raise ValueError("score_documents: no models given")
    window = min(m.max_seq_len for m in models)
    rows = max(1, batch_tokens // window)
    device = torch.device(device)
    num_docs = len(shardset)
    nll_sum = np.zeros((len(models), num_docs), np.float64)
    count = np.zeros(num_docs, np.int64)
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
                labels = torch.from_numpy(batch.labels).to(device).reshape(-1)
                owner_t = torch.from_numpy(owner[valid]).to(device)
                valid_t = torch.from_numpy(valid).to(device)
                for m, model in enumerate(models):
                    logits = model.logits(input_ids, position_ids)
                    nll = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]).float(),
                        labels,
                        ignore_index=IGNORE_INDEX,
                        reduction="none",
                    )
                    sums = torch.bincount(
                        owner_t, weights=nll[valid_t].double(), minlength=len(docs)
                    )
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


@dataclass
class Scores:
    """What `--scores FILE` reloads: per-role NLLs, the score, and where they came from."""

    method: str
    nll: dict[str, np.ndarray]
    window: int
    parent_sha256: str
    models: dict[str, dict[str, Any]]

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
        return cls(method, nll, int(meta["window"]), meta["parent_manifest_sha256"], meta["models"])


# --------------------------------------------------------------------------- the command


def _check_output(parent: ShardSet, out_dir: Path, overwrite: bool) -> None:
    parent_root, target = parent.root.resolve(), out_dir.resolve()
    if target == parent_root or parent_root in target.parents or target in parent_root.parents:
        raise ValueError(f"--out {out_dir}: must not be, contain or lie inside the input {parent.root}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"--out {out_dir}: already exists (pass --overwrite to replace it)")


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
    format_name: str | None = None,
    shard_size: str | int = "64MB",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score (or reload scores for) every document of `source`, keep the top k, write `out_dir`.

    `value` is tau (color-filter) or alpha (miniplm). `models` maps the method's two roles to
    ScoringModels; with `scores_file` no model is needed. The output is a new ShardSet (the
    parent's format unless `format_name`) holding the kept documents in corpus order, plus
    `scores.npz`; it is written to a temporary directory and renamed into place. Returns the
    output manifest.
    """
    method = METHODS[method_name]
    parent = open_shardset(source)
    out_dir = Path(out_dir)
    _check_output(parent, out_dir, overwrite)
    parent_sha = manifest_sha256(parent.root)
    keep = method.keep_count(len(parent), value)
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
            progress=progress,
            label=f"select {method.name}",
        )
        scores = Scores(
            method.name,
            dict(zip(method.roles, nll, strict=True)),
            window,
            parent_sha,
            {role: models[role].description for role in method.roles},
        )
    kept = top_k_in_corpus_order(scores.score, keep)

    format_name = format_name or parent.manifest["format"]
    shard_size_bytes = parse_size(shard_size)
    finite = scores.score[np.isfinite(scores.score)]
    selection = {
        "method": method.name,
        method.parameter: value,
        "score": "NLL[{}] - NLL[{}], mean token NLL in nats; higher is kept".format(*method.roles),
        "rule": "global top k, ties by smaller doc id, NaN last; corpus order kept",
        "k": int(keep),
        "kept": int(len(kept)),
        "dropped": int(len(parent) - len(kept)),
        "unscored_documents": int(np.isnan(scores.score).sum()),
        "window": scores.window,
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest = write_documents(
            parent,
            kept,
            tmp,
            format_name,
            shard_size_bytes=shard_size_bytes,
            compression=None,
            fingerprint={"parent_manifest_sha256": parent_sha, "selection": selection},
            counts={
                "documents": len(kept),
                "tokens": int(np.asarray(parent.lengths)[kept].sum()),
            },
            options={"shard_size_bytes": shard_size_bytes, "compression": None},
            provenance={
                "tool": f"strata select {method.name}",
                "parent": parent_sha,
                "parent_location": str(source),
                "parent_provenance": parent.manifest.get("provenance"),
                "selection": selection,
            },
            progress=progress,
            label=f"select {method.name}",
        )
        shutil.rmtree(tmp / STATE_DIR)  # not resumable: the whole directory appears at once
        scores.save(tmp / SCORES_NAME)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    "check_tokenizer",
    "document_windows",
    "score_documents",
    "select",
    "top_k_in_corpus_order",
]
