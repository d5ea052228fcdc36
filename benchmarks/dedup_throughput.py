"""Documents/s and tokens/s of `strata dedup` (exact, minhash) with --workers 1 and 2, side by side.

Corpus (built here, as benchmarks/prepare_throughput.py does): the Python standard library's .py
files, tests included, one document per file, up to --mb of text; a byte-level BPE trained on the
first 400 files; tokenized by `prepare` (MDS). Timed: `data_pipeline.dedup.find_duplicates`, the
pass that --workers changes (read every document, fingerprint it, decide in corpus order;
--workers 2 = this process + 1 spawned helper, its start-up included), best of --repeats, all
configurations interleaved. Writing the kept documents (the same for any --workers) is timed
once per method. Also counted: the duplicates of the demo's built-in corpus
(`build_stdlib_corpus` train split).

Exact hashing starts no helper below TASK_TOKENS["exact"][0] tokens (256M); the row "exact, 2
workers, forced processes" shrinks the tasks so a helper starts, to show what that path costs.
The headline is the ratio of --workers 2 to --workers 1 tokens/s; other jobs share the 2 cores,
so the load average and CPU seconds (this process and its helpers) are printed with it, and in
every round the machine's parallel capacity is measured too: 2 * t(one busy Python process) /
t(two at once), i.e. how many cores two processes got at that moment (2.0 on an idle 2-core box).

    .venv/bin/python benchmarks/dedup_throughput.py [--mb 32] [--repeats 3] [--copies 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data_pipeline.dedup as dedup_module  # noqa: E402
from benchmarks.prepare_throughput import build_input, cpu_seconds  # noqa: E402
from data_pipeline.builtin import build_stdlib_corpus  # noqa: E402
from data_pipeline.dedup import EXACT, NEAR, DedupParams, dedup, find_duplicates  # noqa: E402
from data_pipeline.formats import open_shardset  # noqa: E402
from data_pipeline.prepare import PrepareOptions, prepare  # noqa: E402
from data_pipeline.tokenizer import train_byte_level_bpe  # noqa: E402

CONFIGS = {  # name -> (method, workers, force worker processes for exact)
    "exact, 1 worker": ("exact", 1, False),
    "exact, 2 workers": ("exact", 2, False),
    "exact, 2 workers, forced processes": ("exact", 2, True),
    "minhash, 1 worker": ("minhash", 1, False),
    "minhash, 2 workers": ("minhash", 2, False),
}


def build_pool(work: Path, megabytes: float, vocab: int, copies: int) -> tuple[Path, int, int]:
    """work/pool: stdlib files as documents (prepare_throughput's input), the whole list `copies`
    times over (copies 2.. are exact duplicates of the first). (path, files, bytes of one copy)."""
    text_bytes = build_input(work / "input.jsonl", megabytes)
    with open(work / "input.jsonl", encoding="utf-8") as fh:
        lines = fh.readlines()
    texts = [json.loads(line)["text"] for line in lines]
    if copies > 1:
        (work / "input.jsonl").write_text("".join(lines * copies), encoding="utf-8")
    train_byte_level_bpe(texts[:400], vocab).save(str(work / "tokenizer.json"))
    options = PrepareOptions(tokenizer=str(work / "tokenizer.json"), workers=2, progress=False)
    prepare([work / "input.jsonl"], work / "pool", options)
    return work / "pool", len(texts), text_bytes


def timed_find(shardset, method: str, workers: int, force: bool):
    """(result, wall seconds, CPU seconds) of one find_duplicates pass."""
    saved = dict(dedup_module.TASK_TOKENS)
    if force:
        dedup_module.TASK_TOKENS["exact"] = saved["minhash"]
    try:
        cpu, start = cpu_seconds(), time.perf_counter()
        result = find_duplicates(shardset, DedupParams(method=method), workers)
        return result, time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        dedup_module.TASK_TOKENS.update(saved)


def _spin(iterations: int) -> float:
    start, total = time.perf_counter(), 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - start


def parallel_capacity(pool: ProcessPoolExecutor, iterations: int = 5_000_000) -> float:
    """Cores two busy processes get right now: 2 * t(one alone) / t(two at once)."""
    alone = pool.submit(_spin, iterations).result()
    pair = max(pool.map(_spin, [iterations, iterations]))
    return 2 * alone / pair


def duplicate_counts(result) -> dict[str, int]:
    counts = result.counts()
    return {
        "exact_duplicate": counts["dropped_by_reason"][EXACT],
        "near_duplicate": counts["dropped_by_reason"][NEAR],
        "tokens_dropped": counts["tokens_dropped"],
        "tokens_removed_fraction": counts["tokens_removed_fraction"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=32.0, help="MB of stdlib text (32: all of it)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--copies", type=int, default=1, help="corpus repeated K times (a bigger job, same work per token)"
    )
    parser.add_argument("--out", default="benchmarks/results/dedup_throughput.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="strata-dedup-bench-"))
    try:
        pool, files, text_bytes = build_pool(work, args.mb, args.vocab, args.copies)
        shardset = open_shardset(pool)
        lengths = np.asarray(shardset.lengths)
        documents, tokens = len(lengths), int(lengths.sum())

        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        cpu: dict[str, float] = {}
        results = {}
        capacity: list[float] = []
        spinners = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        list(spinners.map(_spin, [1, 1]))  # both started before anything is timed
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            capacity.append(parallel_capacity(spinners))
            for name, (method, workers, force) in CONFIGS.items():
                result, seconds, cpu_used = timed_find(shardset, method, workers, force)
                if not times[name] or seconds < min(times[name]):
                    cpu[name] = cpu_used
                times[name].append(seconds)
                results[name] = result
        load_after = os.getloadavg()[0]
        spinners.shutdown()

        same = {
            method: all(
                np.array_equal(results[a].duplicate_of, results[b].duplicate_of)
                for a in CONFIGS
                for b in CONFIGS
                if CONFIGS[a][0] == CONFIGS[b][0] == method
            )
            for method in ("exact", "minhash")
        }
        write_seconds = {}
        for method in ("exact", "minhash"):
            start = time.perf_counter()
            dedup(pool, work / f"out-{method}", DedupParams(method=method), workers=2,
                  progress=False)  # fmt: skip
            write_seconds[method] = time.perf_counter() - start
        found = {m: duplicate_counts(results[f"{m}, 1 worker"]) for m in ("exact", "minhash")}

        builtin = build_stdlib_corpus(work / "builtin", workers=2, progress=False)
        builtin_set = open_shardset(builtin["train"])
        builtin_found = {
            m: duplicate_counts(find_duplicates(builtin_set, DedupParams(method=m), 2))
            for m in ("exact", "minhash")
        }
        builtin_docs = len(builtin_set)

        best = {name: min(values) for name, values in times.items()}
        print(
            f"corpus: {files:,} stdlib files (tests included) x {args.copies}, "
            f"{args.copies * text_bytes / 1e6:.1f} MB, "
            f"{documents:,} documents, {tokens:,} tokens (vocab {args.vocab}); "
            f"{os.cpu_count()} cores, load average {load_before:.1f} -> {load_after:.1f}; "
            f"best of {args.repeats}; same result for every --workers: {same}"
        )
        print(
            "parallel capacity (cores two busy processes got) per round: "
            + ", ".join(f"{c:.2f}" for c in capacity)
        )
        print(
            f"| configuration | seconds, best of {args.repeats} (all runs) | documents/s | "
            "tokens/s | CPU s | vs 1 worker |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        rows = []
        for name, (method, workers, force) in CONFIGS.items():
            base = best[f"{method}, 1 worker"]
            all_runs = ", ".join(f"{t:.2f}" for t in times[name])
            print(
                f"| {name} | {best[name]:.2f} ({all_runs}) | {documents / best[name]:,.0f} | "
                f"{tokens / best[name]:,.0f} | {cpu[name]:.2f} | {base / best[name]:.2f}x |"
            )
            rows.append({
                "configuration": name, "method": method, "workers": workers,
                "forced_processes": force, "seconds": best[name], "seconds_all_runs": times[name],
                "documents_per_s": documents / best[name], "tokens_per_s": tokens / best[name],
                "cpu_seconds": cpu[name], "ratio_vs_1_worker": base / best[name],
            })  # fmt: skip
        for method in ("exact", "minhash"):
            f = found[method]
            print(
                f"{method}: {f['exact_duplicate']} exact + {f['near_duplicate']} near duplicates "
                f"dropped ({f['tokens_removed_fraction']:.2%} of tokens); `dedup` end to end with "
                f"writing the kept documents: {write_seconds[method]:.2f} s"
            )
        for method, f in builtin_found.items():
            print(
                f"built-in stdlib train split ({builtin_docs} documents), {method}: "
                f"{f['exact_duplicate']} exact + {f['near_duplicate']} near duplicates"
            )

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "benchmark": "dedup_throughput",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": platform.platform(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            "command": " ".join([".venv/bin/python", "benchmarks/dedup_throughput.py", *sys.argv[1:]]),
            "corpus": {"files": files, "copies": args.copies,
                       "text_mb": args.copies * text_bytes / 1e6, "documents": documents,
                       "tokens": tokens, "vocab": args.vocab},
            "parameters": {"ngram": 5, "num_perm": 128, "threshold": 0.8},
            "repeats": args.repeats, "load_average": [load_before, load_after],
            "parallel_capacity_per_round": capacity,
            "same_result_for_any_workers": same, "results": rows,
            "dedup_end_to_end_seconds": write_seconds,
            "duplicates": found,
            "builtin_stdlib_train": {"documents": builtin_docs, "duplicates": builtin_found},
        }, indent=1) + "\n")  # fmt: skip
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
