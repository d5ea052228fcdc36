"""Tokens/s of `strata prepare` vs a plain single-process loop on the same JSONL input.

Baseline (what one writes first): read the JSONL line by line, `json.loads`, `tokenizer.encode`
per document, append EOS, write all tokens to one .npy file (uint16). `prepare` rows run the real
pipeline (validation, batched `encode_batch_fast` in worker processes, MDS shards, manifest,
lengths.npy). Both produce the same token stream (checked). Runs are interleaved, best of N;
the module import of mosaicml-streaming is done once before timing (a per-process constant).

    .venv/bin/python benchmarks/prepare_throughput.py [--mb 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.builtin import stdlib_root  # noqa: E402
from data_pipeline.formats import open_shardset  # noqa: E402
from data_pipeline.prepare import PrepareOptions, prepare  # noqa: E402
from data_pipeline.tokenizer import train_byte_level_bpe  # noqa: E402


def build_input(path: Path, megabytes: float) -> int:
    """JSONL of stdlib source files (tests included), up to `megabytes` of text."""
    limit = int(megabytes * 1e6)
    written = 0
    root = stdlib_root()
    with open(path, "w", encoding="utf-8") as fh:
        for file in sorted(root.rglob("*.py")):
            if "site-packages" in file.parts:
                continue
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip():
                continue
            fh.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode("utf-8"))
            if written >= limit:
                break
    return written


def cpu_seconds() -> float:
    """User+system CPU time of this process and its finished children (the worker pool)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def plain_loop(input_path: Path, tokenizer_path: Path, out_path: Path) -> tuple[int, float]:
    from tokenizers import Tokenizer

    start = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos = tokenizer.token_to_id("<|endoftext|>")
    tokens: list[int] = []
    with open(input_path, encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            tokens.extend(tokenizer.encode(text, add_special_tokens=False).ids)
            tokens.append(eos)
    np.save(out_path, np.array(tokens, dtype=np.uint16))
    return len(tokens), time.perf_counter() - start


def run_prepare(input_path: Path, tokenizer_path: Path, out_dir: Path, workers: int) -> tuple[int, float]:
    start = time.perf_counter()
    manifest = prepare([input_path], out_dir, PrepareOptions(
        tokenizer=str(tokenizer_path), workers=workers, progress=False, overwrite=True))
    return manifest["counts"]["tokens"], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=24.0, help="MB of input text")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--out", default="benchmarks/results/prepare_throughput.json")
    args = parser.parse_args()

    import streaming  # noqa: F401  (one-off import cost, kept out of the timings)

    work = Path(tempfile.mkdtemp(prefix="strata-prepare-bench-"))
    try:
        input_path = work / "input.jsonl"
        text_bytes = build_input(input_path, args.mb)
        tokenizer_path = work / "tokenizer.json"
        sample = [json.loads(line)["text"] for line in open(input_path, encoding="utf-8")][:400]
        train_byte_level_bpe(sample, args.vocab).save(str(tokenizer_path))

        cores = os.cpu_count() or 1
        rows = {"plain loop (1 process, encode per doc)": None,
                "strata prepare --workers 1": 1,
                f"strata prepare --workers {cores} (default)": cores}
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}
        tokens: dict[str, int] = {}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, workers in rows.items():
                cpu_start = cpu_seconds()
                if workers is None:
                    n, seconds = plain_loop(input_path, tokenizer_path, work / "plain.npy")
                else:
                    n, seconds = run_prepare(input_path, tokenizer_path, work / "out", workers)
                cpu_used = cpu_seconds() - cpu_start
                tokens[name] = n
                if seconds < best.get(name, float("inf")):
                    best[name], cpu[name] = seconds, cpu_used
        load_after = os.getloadavg()[0]

        plain = np.load(work / "plain.npy")
        shardset = open_shardset(work / "out")
        stream = np.concatenate([shardset.get(i) for i in range(len(shardset))])
        same = bool(np.array_equal(plain, stream))

        baseline = "plain loop (1 process, encode per doc)"
        base_rate = tokens[baseline] / best[baseline]
        print(f"input: {text_bytes / 1e6:.1f} MB text, {tokens[baseline]:,} tokens, vocab {args.vocab}, "
              f"{cores} cores, best of {args.repeats}; same token stream: {same}; "
              f"load average {load_before:.1f} -> {load_after:.1f}")
        print("| method | seconds | tokens/s | vs plain loop | CPU s | tokens per CPU s |")
        print("|---|---:|---:|---:|---:|---:|")
        results = []
        for name in rows:
            rate = tokens[name] / best[name]
            print(f"| {name} | {best[name]:.2f} | {rate:,.0f} | {rate / base_rate:.2f}x "
                  f"| {cpu[name]:.2f} | {tokens[name] / cpu[name]:,.0f} |")
            results.append({"method": name, "seconds": best[name], "tokens": tokens[name],
                            "tokens_per_s": rate, "speedup": rate / base_rate,
                            "cpu_seconds": cpu[name]})
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "benchmark": "prepare_throughput", "date": time.strftime("%Y-%m-%d"),
            "machine": platform.platform(), "cores": cores, "python": platform.python_version(),
            "input_mb": text_bytes / 1e6, "vocab": args.vocab, "repeats": args.repeats,
            "same_token_stream": same, "load_average": [load_before, load_after],
            "results": results}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
