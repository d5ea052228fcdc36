"""`strata dedup`: drop exact and near-duplicate documents of a ShardSet, keeping the first in corpus order.

Owns the document fingerprints (blake2b-128 of a document's token bytes; MinHash signatures of
its token n-gram shingles through `datasketch`), computed in N worker processes over contiguous
document ranges, the keep/drop decision (one process, corpus order, hence the same result for
any number of workers), `duplicates.npz` (every dropped document and the kept one it
duplicates) and the provenance. Writing the kept documents is convert.write_documents, as for
`strata select`; reading is the format readers (`open_shardset`, `get`).

Design notes. It works on token ids, after `prepare` and before `select`/`decompose`: any format,
no tokenizer, and what it compares is exactly what training sees. Exact hashing is hashlib's
blake2b: on the stdlib corpus (9M tokens) hashing every document takes 0.03 s, reading them
0.13 s (benchmarks/dedup_throughput.py: ~200M tokens/s in all), so xxhash would buy nothing
measurable. For MinHash, each n-gram of token ids is folded
into one 32-bit value by a vectorized numpy hash (no Python loop per shingle, no sha1 over
bytes); datasketch's `update_batch` then applies its "affine32" scheme (MurmurHash3 pre-mix,
`a*h+b mod 2^32` permutations) to a document's distinct values in blocks. `update_batch` still
calls `hashfunc` (here the identity) once per value: ~40% of signature time, the price of using
the library's public path rather than re-implementing its permutations. MinHashLSH (bands and
rows chosen by datasketch for the threshold) proposes earlier kept documents; a document is
dropped only when one of them has an estimated Jaccard (signature agreement) >= threshold. The
minhash method first drops exact duplicates (cheaper, and labelled as such); documents shorter
than the n-gram are compared exactly only. --workers N counts this process: N - 1 helpers are
spawned (as in `prepare`), each ~1 s of start-up (interpreter, this module, datasketch's scipy
import), and this process fingerprints ranges itself meanwhile, between its decisions; exact
hashing starts no helper below 256M tokens. Memory in the deciding
process: one dict entry per distinct document digest and one signature (num_perm * 4 bytes)
per kept document.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.convert import derived_shardset
from data_pipeline.formats import ShardSet, open_shardset
from data_pipeline.formats.writer import parse_size
from data_pipeline.manifest import (
    check_output_dir,
    manifest_sha256,
)
from data_pipeline.prepare import ProgressLine, _exit_with_parent

METHODS = ("exact", "minhash")
DUPLICATES_NAME = "duplicates.npz"
DUPLICATES_VERSION = 1
EXACT, NEAR = "exact_duplicate", "near_duplicate"
DIGEST_BYTES = 16  # blake2b digest size: 128 bits
MINHASH_SCHEME = "affine32"  # datasketch's default permutation scheme (uint32 hash values)
DEFAULT_NGRAM, DEFAULT_NUM_PERM, DEFAULT_THRESHOLD, DEFAULT_SEED = 5, 128, 0.8, 1
SHINGLE_BLOCK = 8192  # shingles per update_batch call: bounds the [block, num_perm] temporaries
# tokens a worker task covers (min, max) per method: exact hashing runs at ~200M tokens/s in one
# process (page-cached shards), so it starts helpers (~0.3-1 s each to spawn and import) only
# above 256M tokens; minhash runs at ~4M tokens/s and starts them at once
TASK_TOKENS = {"exact": (1 << 28, 1 << 30), "minhash": (1 << 16, 1 << 22)}
TASK_DOCS = 20_000  # ... and at most this many documents

# 64-bit mixing constants (golden ratio; splitmix64's finalizer)
_STEP = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class DedupParams:
    """What decides the output (besides the input): method and, for minhash, its parameters."""

    method: str = "exact"
    ngram: int = DEFAULT_NGRAM
    num_perm: int = DEFAULT_NUM_PERM
    threshold: float = DEFAULT_THRESHOLD
    seed: int = DEFAULT_SEED

    def check(self) -> None:
        """ValueError naming the flag of the first bad value."""
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1:
            raise ValueError(f"--ngram must be >= 1, got {self.ngram}")
        if self.num_perm < 2:
            raise ValueError(f"--num-perm must be >= 2, got {self.num_perm}")

    def describe(self) -> dict[str, Any]:
        """The parameters the provenance records (minhash's only for minhash)."""
        if self.method == "exact":
            return {"method": "exact"}
        return {
            "method": "minhash",
            "ngram": self.ngram,
            "num_perm": self.num_perm,
            "threshold": self.threshold,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------- fingerprints


def document_digest(tokens: np.ndarray) -> bytes:
    """blake2b-128 of the document's token bytes (as stored: the ShardSet's dtype)."""
    return hashlib.blake2b(np.ascontiguousarray(tokens), digest_size=DIGEST_BYTES).digest()


def shingle_hashes(tokens: np.ndarray, ngram: int) -> np.ndarray:
    """Distinct 32-bit hashes of the document's token n-grams, sorted (empty if shorter than ngram).

    Each n-gram (t_i .. t_{i+n-1}) is folded as h = (h ^ t) * golden (mod 2^64) over its tokens,
    mixed by splitmix64's finalizer, and its top 32 bits kept; all n-grams at once in numpy.
    """
    ids = np.asarray(tokens).astype(np.uint64)
    count = len(ids) - ngram + 1
    if count <= 0:
        return np.zeros(0, np.uint32)
    h = np.zeros(count, np.uint64)
    for k in range(ngram):
        h = (h ^ ids[k : k + count]) * _STEP
    h ^= h >> np.uint64(30)
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


def _identity(value: int) -> int:
    return value


class SignatureMaker:
    """MinHash signatures (datasketch, scheme affine32) of documents' shingle sets."""

    def __init__(self, num_perm: int, seed: int) -> None:
        from datasketch import MinHash

        self.minhash = MinHash(
            num_perm=num_perm, seed=seed, hashfunc=_identity, scheme=MINHASH_SCHEME
        )

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """uint32 [num_perm]: the MinHash of the set `shingles` (all max values when empty)."""
        self.minhash.clear()
        for start in range(0, len(shingles), SHINGLE_BLOCK):
            self.minhash.update_batch(shingles[start : start + SHINGLE_BLOCK].tolist())
        return np.array(self.minhash.hashvalues, dtype=np.uint32)


@dataclass
class Fingerprints:
    """Fingerprints of documents [first, first + len(lengths)) of a ShardSet."""

    first: int
    lengths: np.ndarray  # int64 [n]: tokens per document
    digests: np.ndarray  # uint8 [n, DIGEST_BYTES]
    signatures: np.ndarray | None = None  # uint32 [n, num_perm] (minhash only)
    has_shingles: np.ndarray | None = None  # bool [n]: at least `ngram` tokens (minhash only)


def fingerprint_range(
    shardset: ShardSet, first: int, end: int, params: DedupParams
) -> Fingerprints:
    """Digests (and, for minhash, signatures) of documents [first, end)."""
    n = end - first
    digests = np.zeros((n, DIGEST_BYTES), np.uint8)
    lengths = np.zeros(n, np.int64)
    signatures = has_shingles = None
    maker = None
    if params.method == "minhash":
        maker = SignatureMaker(params.num_perm, params.seed)
        signatures = np.zeros((n, params.num_perm), np.uint32)
        has_shingles = np.zeros(n, bool)
    for i in range(n):
        tokens = np.asarray(shardset.get(first + i), dtype=shardset.dtype)
        lengths[i] = len(tokens)
        digests[i] = np.frombuffer(document_digest(tokens), np.uint8)
        if maker is not None:
            shingles = shingle_hashes(tokens, params.ngram)
            has_shingles[i] = len(shingles) > 0
            signatures[i] = maker.signature(shingles)
    return Fingerprints(first, lengths, digests, signatures, has_shingles)


# --------------------------------------------------------------------------- worker processes

_WORKER_SHARDSET: ShardSet | None = None


def _init_worker(shardset: ShardSet) -> None:
    global _WORKER_SHARDSET
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _WORKER_SHARDSET = shardset


def _fingerprint_in_worker(first: int, end: int, params: DedupParams) -> Fingerprints:
    assert _WORKER_SHARDSET is not None
    return fingerprint_range(_WORKER_SHARDSET, first, end, params)


def document_ranges(
    lengths: np.ndarray, workers: int, method: str = "minhash"
) -> list[tuple[int, int]]:
    """Contiguous [first, end) document ranges, each about total/(8*workers) tokens (clamped to
    the method's TASK_TOKENS) and at most TASK_DOCS documents. Which ranges does not change the
    result."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    low, high = TASK_TOKENS[method]
    target = min(max(total // (8 * max(workers, 1)), low), high)
    ends = np.cumsum(lengths)
    ranges, first = [], 0
    while first < len(lengths):
        before = int(ends[first - 1]) if first else 0
        end = int(np.searchsorted(ends, before + target, side="left")) + 1
        end = min(max(end, first + 1), first + TASK_DOCS, len(lengths))
        ranges.append((first, end))
        first = end
    return ranges


class WorkerDied(RuntimeError):
    """A fingerprinting worker process ended abruptly (nothing was written)."""


def iter_fingerprints(
    shardset: ShardSet, params: DedupParams, workers: int
) -> Iterator[Fingerprints]:
    """Fingerprints of every document, range by range in corpus order, computed by `workers`
    processes: this one and workers - 1 spawned helpers (none for a single range).

    Ranges go to the helpers in order, at most 2 per helper in flight; whenever the next range
    due is not ready, this process fingerprints the next unassigned range itself instead of
    waiting (so it works while the helpers start, ~1 s each). Results come out in corpus order
    whoever computed them, and a range's fingerprints depend only on its documents.
    """
    ranges = document_ranges(np.asarray(shardset.lengths), workers, params.method)
    helpers = min(workers, len(ranges)) - 1
    if helpers <= 0:
        for first, end in ranges:
            yield fingerprint_range(shardset, first, end, params)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        helpers, mp_context=context, initializer=_init_worker, initargs=(shardset,)
    ) as pool:
        pending: deque[Future | Fingerprints] = deque()  # ranges[done:assigned], in order
        assigned = 0
        try:
            while pending or assigned < len(ranges):
                in_flight = sum(isinstance(item, Future) for item in pending)
                while assigned < len(ranges) and in_flight < 2 * helpers:
                    pending.append(pool.submit(_fingerprint_in_worker, *ranges[assigned], params))
                    assigned, in_flight = assigned + 1, in_flight + 1
                head = pending[0]
                if isinstance(head, Future) and not head.done() and assigned < len(ranges):
                    if len(pending) < 4 * (helpers + 1):
                        pending.append(fingerprint_range(shardset, *ranges[assigned], params))
                        assigned += 1
                        continue
                pending.popleft()
                yield head.result() if isinstance(head, Future) else head
        except BrokenProcessPool as exc:
            raise WorkerDied(
                "a dedup worker process died (out of memory? try fewer --workers); nothing was "
                "written"
            ) from exc
        finally:
            for item in pending:
                if isinstance(item, Future):
                    item.cancel()


# --------------------------------------------------------------------------- the decision


@dataclass
class Decisions:
    """Per document of the parent: the kept document it duplicates (-1: kept), the reason, the
    estimated Jaccard with that document (1.0 for an exact duplicate)."""

    duplicate_of: list[int] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)
    jaccard: list[float] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    lsh_bands: int | None = None
    lsh_rows: int | None = None
    short_documents: int = 0  # minhash: documents shorter than the n-gram (compared exactly only)


class DuplicateFinder:
    """Keeps the first document of each duplicate group, deciding in corpus order.

    Exact: a document whose digest was seen is dropped as a duplicate of the kept document that
    digest resolved to. Minhash (after the exact check): LSH proposes earlier kept documents; the
    one with the highest estimated Jaccard (ties: smaller id) is its original if >= threshold.
    """

    def __init__(self, params: DedupParams) -> None:
        self.params = params
        self.seen: dict[bytes, tuple[int, str, float]] = {}  # digest -> (kept id, reason, jaccard)
        self.decisions = Decisions()
        self.next_doc = 0
        self.lsh: Any = None  # datasketch MinHashLSH, built at the first add (minhash only)
        self.kept_signatures: dict[int, np.ndarray] = {}

    def _build_index(self) -> None:
        """The LSH index; built late, so its setup (~0.5 s: datasketch's band optimisation)
        overlaps the workers' start."""
        from datasketch import MinHashLSH

        threshold, num_perm = self.params.threshold, self.params.num_perm
        try:
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError:
            # datasketch's optimum is a single band (thresholds >= ~0.99, or few permutations),
            # which it refuses; two bands of half the rows find every pair one band would
            self.lsh = MinHashLSH(threshold, num_perm, params=(2, num_perm // 2))
        self.decisions.lsh_bands, self.decisions.lsh_rows = self.lsh.b, self.lsh.r

    def add(self, prints: Fingerprints) -> None:
        if prints.first != self.next_doc:
            raise ValueError(f"fingerprints out of order: got {prints.first}, want {self.next_doc}")
        if self.lsh is None and self.params.method == "minhash":
            self._build_index()
        d = self.decisions
        d.lengths.append(prints.lengths)
        for i in range(len(prints.lengths)):
            doc = prints.first + i
            digest = prints.digests[i].tobytes()
            original = self.seen.get(digest)
            if original is None and self.lsh is not None:
                assert prints.signatures is not None and prints.has_shingles is not None
                if prints.has_shingles[i]:
                    original = self._near(doc, prints.signatures[i])
                else:
                    d.short_documents += 1
            if original is None:
                self.seen[digest] = (doc, EXACT, 1.0)
                d.duplicate_of.append(-1)
                d.reason.append("")
                d.jaccard.append(1.0)
            else:
                self.seen.setdefault(digest, original)
                kept, reason, jaccard = original
                d.duplicate_of.append(kept)
                d.reason.append(reason)
                d.jaccard.append(jaccard)
        self.next_doc += len(prints.lengths)

    def _near(self, doc: int, signature: np.ndarray) -> tuple[int, str, float] | None:
        """(kept id, NEAR, estimated Jaccard) of this document's original, or None (it is kept
        and indexed)."""
        from datasketch import LeanMinHash

        assert self.lsh is not None
        sketch = LeanMinHash(seed=self.params.seed, hashvalues=signature, scheme=MINHASH_SCHEME)
        best: tuple[float, int] | None = None
        for candidate in self.lsh.query(sketch):
            agree = float(np.count_nonzero(self.kept_signatures[candidate] == signature))
            jaccard = agree / len(signature)
            if jaccard >= self.params.threshold and (
                best is None or (jaccard, -candidate) > (best[0], -best[1])
            ):
                best = (jaccard, candidate)
        if best is not None:
            return best[1], NEAR, best[0]
        self.lsh.insert(doc, sketch, check_duplication=False)
        self.kept_signatures[doc] = signature
        return None


# --------------------------------------------------------------------------- the command


@dataclass
class DedupResult:
    """What the deciding pass found, in arrays over the parent's documents."""

    duplicate_of: np.ndarray  # int64 [N], -1 where kept
    reason: np.ndarray  # str [N], "" where kept
    jaccard: np.ndarray  # float32 [N]
    lengths: np.ndarray  # int64 [N]
    decisions: Decisions

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.duplicate_of < 0)

    @property
    def dropped(self) -> np.ndarray:
        return np.flatnonzero(self.duplicate_of >= 0)

    def counts(self) -> dict[str, Any]:
        kept, dropped = self.kept, self.dropped
        by_reason = {r: int(np.count_nonzero(self.reason == r)) for r in (EXACT, NEAR)}
        tokens_by_reason = {r: int(self.lengths[self.reason == r].sum()) for r in (EXACT, NEAR)}
        total = int(self.lengths.sum())
        return {
            "documents": len(self.lengths),
            "tokens": total,
            "kept": len(kept),
            "dropped": len(dropped),
            "tokens_kept": int(self.lengths[kept].sum()),
            "tokens_dropped": int(self.lengths[dropped].sum()),
            "dropped_by_reason": by_reason,
            "tokens_dropped_by_reason": tokens_by_reason,
            "tokens_removed_fraction": (int(self.lengths[dropped].sum()) / total) if total else 0.0,
        }


def find_duplicates(
    shardset: ShardSet, params: DedupParams, workers: int = 1, progress: bool = False
) -> DedupResult:
    """Fingerprint every document (in `workers` processes) and decide, in corpus order, which
    are duplicates of an earlier kept one. The result does not depend on `workers`."""
    params.check()
    finder = DuplicateFinder(params)
    line = ProgressLine(
        int(np.asarray(shardset.lengths).sum()), progress, label=f"dedup {params.method}"
    )
    docs = tokens = 0
    for prints in iter_fingerprints(shardset, params, workers):
        finder.add(prints)
        docs += len(prints.lengths)
        tokens += int(prints.lengths.sum())
        line.update(docs, tokens, tokens)
    line.update(docs, tokens, tokens, final=True)
    d = finder.decisions
    return DedupResult(
        duplicate_of=np.asarray(d.duplicate_of, dtype=np.int64),
        reason=np.asarray(d.reason, dtype=str) if d.reason else np.zeros(0, "<U1"),
        jaccard=np.asarray(d.jaccard, dtype=np.float32),
        lengths=np.concatenate(d.lengths) if d.lengths else np.zeros(0, np.int64),
        decisions=d,
    )


def save_duplicates(path: Path, result: DedupResult, meta: dict[str, Any]) -> None:
    """duplicates.npz: per dropped document its parent id, the kept parent id it duplicates, the
    reason and the estimated Jaccard; plus kept_doc_id (parent id of each output document)."""
    dropped = result.dropped
    with open(path, "wb") as fh:
        np.savez(
            fh,
            doc_id=dropped.astype(np.int64),
            duplicate_of=result.duplicate_of[dropped],
            reason=result.reason[dropped] if len(dropped) else np.zeros(0, "<U14"),
            jaccard=result.jaccard[dropped],
            kept_doc_id=result.kept.astype(np.int64),
            meta=np.array(json.dumps(meta, sort_keys=True)),
        )
        fh.flush()
        os.fsync(fh.fileno())


def load_duplicates(path: str | Path) -> dict[str, Any]:
    """duplicates.npz as a dict of arrays (`meta` parsed); ValueError naming the file otherwise."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            out: dict[str, Any] = {key: data[key] for key in data.files if key != "meta"}
            out["meta"] = json.loads(str(data["meta"]))
    except (KeyError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not a strata dedup duplicates file ({err})") from None
    return out


def dedup(
    source: str | Path,
    out_dir: str | Path,
    params: DedupParams | None = None,
    *,
    workers: int | None = None,
    format_name: str | None = None,
    shard_size: str | int = "64MB",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Drop duplicate documents of the ShardSet `source`; write the kept ones to `out_dir`.

    The output is a new ShardSet (the parent's format unless `format_name`) holding the kept
    documents in corpus order, its manifest naming the parent and recording the method, its
    parameters and the counts, plus duplicates.npz; it is built in a temporary directory and
    renamed into place. `workers` (default: all cores) only changes the speed. Returns the
    output manifest.
    """
    params = params or DedupParams()
    params.check()
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    shard_size_bytes = parse_size(shard_size)
    parent = open_shardset(source)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, parent.root, overwrite)
    parent_sha = manifest_sha256(parent.root)
    format_name = format_name or parent.manifest["format"]

    result = find_duplicates(parent, params, workers, progress)
    kept = result.kept
    counts = result.counts()
    record = {
        **params.describe(),
        "hash": f"blake2b-{8 * DIGEST_BYTES} of each document's token bytes",
        "rule": "first document of each duplicate group in corpus order is kept"
        + (
            "; exact duplicates first, then MinHash LSH over token n-gram shingles: dropped when "
            "an earlier kept document has estimated Jaccard >= threshold; documents shorter than "
            "ngram compared exactly only"
            if params.method == "minhash"
            else ""
        ),
        **counts,
        "duplicates_file": DUPLICATES_NAME,
    }
    if params.method == "minhash":
        d = result.decisions
        record.update(
            lsh_bands=d.lsh_bands,
            lsh_rows=d.lsh_rows,
            minhash_scheme=f"datasketch {MINHASH_SCHEME}",
            short_documents=d.short_documents,
        )
    rejected = {reason: n for reason, n in counts["dropped_by_reason"].items() if n}
    with derived_shardset(
        parent,
        source,
        kept,
        out_dir,
        format_name,
        shard_size_bytes=shard_size_bytes,
        tool=f"strata dedup {params.method}",
        record={"dedup": record},
        counts={
            "documents": len(kept),
            "tokens": counts["tokens_kept"],
            "input_records": len(parent),
            "rejected": rejected,
        },
        progress=progress,
        label=f"dedup {params.method} write",
    ) as (tmp, manifest):
        save_duplicates(
            tmp / DUPLICATES_NAME,
            result,
            {
                "version": DUPLICATES_VERSION,
                "parent_manifest_sha256": parent_sha,
                **params.describe(),
            },
        )
    if progress:
        print(summary_line(params.method, counts, out_dir), file=sys.stderr)
    return manifest


def summary_line(method: str, counts: dict[str, Any], out_dir: Path) -> str:
    """dedup METHOD: kept K of N documents; dropped E exact + M near duplicates (x% of tokens)."""
    by_reason = counts["dropped_by_reason"]
    near = f" + {by_reason[NEAR]:,} near" if method == "minhash" else ""
    return (
        f"dedup {method}: kept {counts['kept']:,} of {counts['documents']:,} documents; dropped "
        f"{by_reason[EXACT]:,} exact{near} duplicates, {counts['tokens_dropped']:,} tokens "
        f"({counts['tokens_removed_fraction']:.2%} of tokens removed) -> {out_dir}"
    )


__all__ = [
    "DUPLICATES_NAME",
    "DedupParams",
    "DedupResult",
    "DuplicateFinder",
    "METHODS",
    "WorkerDied",
    "dedup",
    "document_digest",
    "document_ranges",
    "find_duplicates",
    "fingerprint_range",
    "load_duplicates",
    "shingle_hashes",
]
