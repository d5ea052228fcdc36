"""`prepare`: raw text -> tokenized, EOS-terminated documents -> a resumable ShardSet.

Owns the pipeline: read records in a fixed order (sources.py), validate and tokenize them in
batches in N worker processes (HF `encode_batch_fast`), count rejections by reason, hand the
documents in input order to the resumable ShardSetWriter, and write manifest.json/lengths.npy.
It does not define the on-disk formats (formats/) nor the tokenizer recipe (tokenizer.py).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from data_pipeline import sources as src
from data_pipeline.formats.writer import STATE_DIR, ShardSetWriter, check_writable, parse_size
from data_pipeline.manifest import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    length_histogram,
    read_manifest,
    summarize_rejections,
    write_bytes_atomic,
    write_json_atomic,
)
from data_pipeline.tokenizer import (
    configure_for_documents,
    find_eos_id,
    load_tokenizer,
    token_dtype,
    tokenizer_fingerprint,
    train_byte_level_bpe,
    vocab_size_of,
)

PIPELINE_VERSION = 1  # bump when the bytes written for the same inputs change
ENCODE_GROUP_CHARS = 4_000_000


@dataclass
class PrepareOptions:
    """Everything that decides the output (except `workers`, `batch_bytes`, `progress`)."""

    format: str = "mds"
    text_field: str = "text"
    tokenizer: str | None = None  # path to a HF tokenizer.json
    train_tokenizer: int | None = None  # vocab size of a byte-level BPE trained on the input
    eos_token: str | None = None
    shard_size: str | int = "64MB"
    compression: str | None = None  # mds only: zstd, zstd:7, gz, br, bz2, snappy
    max_doc_chars: int = 1_000_000  # longer documents are split into pieces; 0 keeps them whole
    workers: int | None = None  # default: os.cpu_count()
    # Encoder fan-out: (batches, encoder_args, workers) -> (batch, EncodedBatch) pairs in input
    # order. None = local worker processes; `strata prepare --ray` passes Ray tasks. Not part of
    # the output's identity (the shards are the same either way).
    encode_map: Callable[..., Iterator[tuple[list, EncodedBatch]]] | None = None
    batch_bytes: int = 1 << 20  # raw input bytes per worker task
    progress: bool = True
    overwrite: bool = False


# ---------------------------------------------------------------------------------------------
# worker side: extract text, split, tokenize a batch, append EOS
# ---------------------------------------------------------------------------------------------
@dataclass
class EncodedBatch:
    outcomes: list[str | int]  # per record: rejection reason, or number of documents it became
    tokens: np.ndarray  # all documents of the batch back to back, EOS included
    doc_lengths: np.ndarray  # tokens per document


class DocumentEncoder:
    """Turns raw records into token documents; one per worker process."""

    def __init__(
        self, tokenizer_json: str, eos_id: int, dtype: str, text_field: str, max_doc_chars: int
    ) -> None:
        self.tokenizer = configure_for_documents(Tokenizer.from_str(tokenizer_json))
        self.eos_id = eos_id
        self.dtype = np.dtype(dtype)
        self.text_field = text_field
        self.max_doc_chars = max_doc_chars

    def _ids(self, texts: list[str]) -> list[list[int] | None]:
        """Token ids per text; None where the tokenizer itself fails on a text.

        Texts go to the tokenizer in groups of at most ENCODE_GROUP_CHARS characters: HF
        Encodings cost ~100 bytes per token, so a 100 MB document must not be encoded at once.
        """
        out: list[list[int] | None] = []
        start = 0
        while start < len(texts):
            end, chars = start, 0
            while end < len(texts) and (end == start or chars + len(texts[end]) <= ENCODE_GROUP_CHARS):
                chars += len(texts[end])
                end += 1
            out.extend(self._ids_of_group(texts[start:end]))
            start = end
        return out

    def _ids_of_group(self, texts: list[str]) -> list[list[int] | None]:
        try:
            return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        except Exception:  # one bad text fails the whole batch: retry one by one
            out: list[list[int] | None] = []
            for text in texts:
                try:
                    out.append(self.tokenizer.encode(text, add_special_tokens=False).ids)
                except Exception:
                    out.append(None)
            return out

    def encode(self, records: list[tuple[str, Any]]) -> EncodedBatch:
        outcomes: list[str | int] = []
        texts: list[str] = []
        for kind, payload in records:
            text, reason = src.extract_text(kind, payload, self.text_field)
            if reason is not None:
                outcomes.append(reason)
                continue
            pieces = src.split_long_text(text, self.max_doc_chars)
            outcomes.append(len(pieces))
            texts.extend(pieces)
        ids_per_text = self._ids(texts) if texts else []
        # drop records the tokenizer failed on or that produced no tokens at all
        kept: list[list[int]] = []
        cursor = 0
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, str):
                continue
            ids = ids_per_text[cursor : cursor + outcome]
            cursor += outcome
            if any(x is None for x in ids):
                outcomes[i] = "tokenizer_error"
            elif not any(ids):
                outcomes[i] = "no_tokens"
            else:
                kept.extend(ids)  # type: ignore[arg-type]
        lengths = np.fromiter((len(ids) + 1 for ids in kept), dtype=np.int64, count=len(kept))
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for ids in kept:
            n = len(ids)
            tokens[pos : pos + n] = ids
            tokens[pos + n] = self.eos_id
            pos += n + 1
        return EncodedBatch(outcomes, tokens, lengths)


_WORKER_ENCODER: DocumentEncoder | None = None  # one per worker process, set by the initializer


def _exit_with_parent(parent_pid: int) -> None:
    """A SIGKILLed parent cannot stop its pool; workers notice being orphaned and leave."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _init_worker(*encoder_args: Any) -> None:
    global _WORKER_ENCODER
    # each worker is one core; rayon threads inside every worker would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C is the parent's to handle (it stops the pool); a worker would only print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _WORKER_ENCODER = DocumentEncoder(*encoder_args)


def _encode_in_worker(records: list[tuple[str, Any]]) -> EncodedBatch:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode(records)


# ---------------------------------------------------------------------------------------------
# main side
# ---------------------------------------------------------------------------------------------
class Counters:
    """Counts of a run; JSON-serializable so they can be stored with each committed shard."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = data or {
            "input_records": 0,
            "documents": 0,
            "tokens": 0,
            "split_records": 0,
            "rejected": {},
            "sources": {},
        }

    def _source(self, name: str) -> dict[str, Any]:
        return self.data["sources"].setdefault(
            name, {"input_records": 0, "documents": 0, "tokens": 0, "rejected": {}}
        )

    def reject(self, source: str, reason: str) -> None:
        self.data["input_records"] += 1
        self.data["rejected"][reason] = self.data["rejected"].get(reason, 0) + 1
        per_source = self._source(source)
        per_source["input_records"] += 1
        per_source["rejected"][reason] = per_source["rejected"].get(reason, 0) + 1

    def document(self, source: str, num_tokens: int) -> None:
        self.data["documents"] += 1
        self.data["tokens"] += num_tokens
        per_source = self._source(source)
        per_source["documents"] += 1
        per_source["tokens"] += num_tokens

    def record_done(self, source: str) -> None:
        self.data["input_records"] += 1
        self._source(source)["input_records"] += 1

    def copy(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.data))


class ProgressLine:
    """A one-line progress bar on stderr: docs/s, tokens/s, ETA from input bytes read."""

    def __init__(self, total_bytes: int, enabled: bool, label: str = "prepare") -> None:
        self.total_bytes = max(total_bytes, 1)
        self.enabled = enabled
        self.label = label
        self.is_tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, docs: int, tokens: int, done_bytes: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.is_tty else 10.0):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        fraction = min(done_bytes / self.total_bytes, 1.0)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        bar = "#" * int(fraction * 24)
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
        line = (
            f"{self.label} [{bar:<24}] {fraction:4.0%} {docs:,} docs {docs / elapsed:,.0f} docs/s "
            f"{tokens / elapsed:,.0f} tok/s ETA {eta_text}"
        )
        end = "\n" if final or not self.is_tty else ""
        print(("\r" if self.is_tty else "") + line, end=end, file=sys.stderr, flush=True)


def _batches(
    records: Iterator[tuple[int, str, str, Any]], batch_bytes: int
) -> Iterator[list[tuple[int, str, str, Any]]]:
    batch: list[tuple[int, str, str, Any]] = []
    size = 0
    for record in records:
        payload = record[3]
        size += len(payload) if isinstance(payload, (bytes, str)) else 16
        batch.append(record)
        if size >= batch_bytes or len(batch) >= 4096:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded_batches(
    batches: Iterator[list[tuple[int, str, str, Any]]], encoder_args: tuple, workers: int
) -> Iterator[tuple[list[tuple[int, str, str, Any]], EncodedBatch]]:
    """Encode batches in `workers` processes, yielding results in input order (bounded queue)."""
    if workers <= 1:
        encoder = DocumentEncoder(*encoder_args)
        for batch in batches:
            yield batch, encoder.encode([(r[2], r[3]) for r in batch])
        return
    ctx = multiprocessing.get_context("spawn")
    # ProcessPoolExecutor, not Pool: a worker that dies (e.g. killed for memory) raises
    # BrokenProcessPool here instead of leaving its task pending forever
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=encoder_args) as pool:
        pending: deque = deque()
        try:
            for batch in batches:
                payloads = [(r[2], r[3]) for r in batch]
                pending.append((batch, pool.submit(_encode_in_worker, payloads)))
                if len(pending) >= 2 * workers:
                    done_batch, future = pending.popleft()
                    yield done_batch, future.result()
            while pending:
                done_batch, future = pending.popleft()
                yield done_batch, future.result()
        except BrokenProcessPool as exc:
            raise WorkerDied(
                "a tokenizer worker process died (out of memory?); committed shards are kept, "
                "run the same command again to resume"
            ) from exc
        finally:
            for _, future in pending:
                future.cancel()


class WorkerDied(RuntimeError):
    """A worker process ended abruptly; the run can be resumed."""


def _train_tokenizer(
    specs: list[src.InputSpec], opts: PrepareOptions, state_dir: Path
) -> Tokenizer:
    """Train (or reuse, on resume) a byte-level BPE on the accepted text of the inputs."""
    spec = {
        "vocab_size": opts.train_tokenizer,
        "inputs": [s.describe() for s in specs],
        "text_field": opts.text_field,
        "max_doc_chars": opts.max_doc_chars,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    saved = state_dir / f"trained-tokenizer-{key}.json"
    if saved.is_file():
        return load_tokenizer(saved)

    def texts() -> Iterator[str]:
        for _, kind, payload in src.iter_raw_records(specs, opts.text_field):
            text, reason = src.extract_text(kind, payload, opts.text_field)
            if reason is None:
                yield from src.split_long_text(text, opts.max_doc_chars)

    assert opts.train_tokenizer is not None
    tokenizer = train_byte_level_bpe(texts(), opts.train_tokenizer)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(saved, tokenizer.to_str().encode("utf-8"))
    return tokenizer


def clear_output_dir(out_dir: Path) -> None:
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def prepare(
    inputs: list[str] | list[src.InputSpec],
    out_dir: str | Path,
    options: PrepareOptions | None = None,
    source_names: list[str] | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into a ShardSet at `out_dir`; resume a killed run; return the manifest.

    Raises InputError (missing/unsupported input), PermissionError (unwritable output),
    ResumeMismatch (output holds a different run) before any work is done.
    """
    opts = options or PrepareOptions()
    out_dir = Path(out_dir)
    specs = (
        list(inputs)
        if inputs and isinstance(inputs[0], src.InputSpec)
        else src.resolve_inputs([str(p) for p in inputs], source_names)
    )
    if opts.tokenizer and opts.train_tokenizer:
        raise ValueError("give either a tokenizer file or --train-tokenizer, not both")
    if not opts.tokenizer and not opts.train_tokenizer:
        raise ValueError("a tokenizer is required: --tokenizer PATH or --train-tokenizer VOCAB")
    shard_size_bytes = parse_size(opts.shard_size)
    tokenizer = load_tokenizer(opts.tokenizer) if opts.tokenizer else None  # a bad path: no empty OUT left behind
    check_writable(out_dir)
    if opts.overwrite:
        clear_output_dir(out_dir)

    if tokenizer is None:
        tokenizer = _train_tokenizer(specs, opts, out_dir / STATE_DIR)
    eos_token, eos_id = find_eos_id(tokenizer, opts.eos_token)
    vocab_size = vocab_size_of(tokenizer)
    dtype = token_dtype(vocab_size)
    fingerprint = tokenizer_fingerprint(tokenizer)

    run_fingerprint = {
        "pipeline_version": PIPELINE_VERSION,
        "inputs": [{"source": s.source, "kind": s.kind, "files": s.describe()} for s in specs],
        "format": opts.format,
        "text_field": opts.text_field,
        "tokenizer": fingerprint,
        "eos_id": eos_id,
        "shard_size_bytes": shard_size_bytes,
        "compression": opts.compression,
        "max_doc_chars": opts.max_doc_chars,
    }
    counters = Counters()
    position = [0, 0]  # (record index, piece index) of the next document to write

    def snapshot() -> dict[str, Any]:
        return {"cursor": list(position), "counters": counters.copy()}

    writer = ShardSetWriter(
        out_dir, opts.format, dtype, shard_size_bytes, opts.compression, run_fingerprint, snapshot
    )
    if writer.finished:
        manifest = read_manifest(out_dir)
        if opts.progress:
            print(f"prepare: {out_dir} is already complete", file=sys.stderr)
        return manifest
    if writer.resume_point is not None:
        counters = Counters(writer.resume_point["counters"])
        position[:] = writer.resume_point["cursor"]
        if opts.progress:
            print(
                f"prepare: resuming {out_dir} after {len(writer.shards)} committed shards "
                f"({counters.data['documents']:,} documents)",
                file=sys.stderr,
            )
    resume_record, resume_piece = position

    read_progress = src.ReadProgress()
    total_bytes = sum(s.total_bytes() for s in specs)
    progress = ProgressLine(total_bytes, opts.progress)
    records = (
        (index, source, kind, payload)
        for index, (source, kind, payload) in enumerate(
            src.iter_raw_records(specs, opts.text_field, read_progress)
        )
        if index >= resume_record
    )
    encoder_args = (tokenizer.to_str(), eos_id, dtype.name, opts.text_field, opts.max_doc_chars)
    workers = opts.workers or os.cpu_count() or 1
    last_index = resume_record - 1
    encode_map = opts.encode_map or _encoded_batches
    for batch, encoded in encode_map(_batches(records, opts.batch_bytes), encoder_args, workers):
        doc_cursor = 0
        token_cursor = 0
        for (index, source, _, _), outcome in zip(batch, encoded.outcomes, strict=True):
            last_index = index
            if isinstance(outcome, str):
                counters.reject(source, outcome)
                continue
            for piece in range(outcome):
                length = int(encoded.doc_lengths[doc_cursor])
                tokens = encoded.tokens[token_cursor : token_cursor + length]
                doc_cursor += 1
                token_cursor += length
                if index == resume_record and piece < resume_piece:
                    continue  # written before the interruption
                position[:] = [index, piece]
                writer.add(tokens)
                counters.document(source, length)
                if piece == 0 and outcome > 1:
                    counters.data["split_records"] += 1
            counters.record_done(source)
        progress.update(
            counters.data["documents"], counters.data["tokens"], read_progress.update()
        )
    position[:] = [last_index + 1, 0]
    lengths = writer.finish()
    progress.update(counters.data["documents"], counters.data["tokens"], total_bytes, final=True)

    write_bytes_atomic(out_dir / TOKENIZER_NAME, tokenizer.to_str().encode("utf-8"))
    manifest = build_manifest(
        format_name=opts.format,
        dtype=dtype,
        eos_token=eos_token,
        eos_id=eos_id,
        tokenizer_info={
            "file": TOKENIZER_NAME,
            "fingerprint": fingerprint,
            "vocab_size": vocab_size,
            "trained_on_input": bool(opts.train_tokenizer),
        },
        counts=counters.data,
        lengths=lengths,
        shards=writer.shards,
        options={
            "text_field": opts.text_field,
            "max_doc_chars": opts.max_doc_chars,
            "shard_size_bytes": shard_size_bytes,
            "compression": opts.compression,
        },
        provenance={
            "tool": "strata prepare",
            "pipeline_version": PIPELINE_VERSION,
            "inputs": [s.source for s in specs],
            "parent": None,
        },
    )
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    writer.mark_complete()
    if opts.progress:
        print(
            f"prepare: wrote {manifest['counts']['documents']:,} documents, "
            f"{manifest['counts']['tokens']:,} tokens in {len(writer.shards)} {opts.format} shards "
            f"to {out_dir}; {summarize_rejections(manifest)}",
            file=sys.stderr,
        )
    return manifest


def build_manifest(
    *,
    format_name: str,
    dtype: np.dtype,
    eos_token: str | None,
    eos_id: int,
    tokenizer_info: dict[str, Any],
    counts: dict[str, Any],
    lengths: np.ndarray,
    shards: list[dict[str, Any]],
    options: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The manifest.json of a ShardSet (shared by prepare and convert)."""
    rejected = counts.get("rejected", {})
    return {
        "manifest_version": 1,
        "format": format_name,
        "dtype": np.dtype(dtype).name,
        "eos_token": eos_token,
        "eos_id": eos_id,
        "tokenizer": tokenizer_info,
        "counts": {
            "documents": int(counts["documents"]),
            "tokens": int(counts["tokens"]),
            "input_records": int(counts.get("input_records", counts["documents"])),
            "rejected_records": int(sum(rejected.values())),
            "split_records": int(counts.get("split_records", 0)),
        },
        "rejected": dict(sorted(rejected.items())),
        "sources": counts.get("sources", {}),
        "length_histogram": length_histogram(lengths),
        "length_stats": {
            "min": int(lengths.min()) if len(lengths) else 0,
            "max": int(lengths.max()) if len(lengths) else 0,
            "mean": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
        },
        "shards": [
            {"files": s["files"], "num_docs": int(s["num_docs"]), "num_tokens": int(s["num_tokens"])}
            for s in shards
        ],
        "options": options,
        "provenance": provenance,
    }
