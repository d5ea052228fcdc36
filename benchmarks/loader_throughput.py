"""Tokens/s delivered by Strata's train loader vs raw `streaming.StreamingDataset` iteration.

Both read the same MDS ShardSet (written here with the real writer, or given with --data).
Baseline: iterate StreamingDataset (shuffle off) and count the tokens of every document.
Strata: `build_train_loader` (shuffled per-epoch order, packing, document-masking labels and
position ids, int64 tensors), run synchronously (prefetch=0: its full cost on the calling
thread) and with background prefetch (what the trainer's thread waits for). Prints a table and
writes benchmarks/results/loader_throughput.json; never asserts a time.

    .venv/bin/python benchmarks/loader_throughput.py [--docs 20000] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from data_pipeline.config import DataConfig, SourceConfig  # noqa: E402
from data_pipeline.formats import open_shardset  # noqa: E402
from data_pipeline.formats.writer import ShardSetWriter  # noqa: E402
from data_pipeline.loader import build_train_loader  # noqa: E402
from data_pipeline.manifest import MANIFEST_NAME, write_json_atomic  # noqa: E402
from data_pipeline.prepare import build_manifest  # noqa: E402

EOS_ID = 0
VOCAB = 32000


def write_shardset(out_dir: Path, n_docs: int, mean_len: int, seed: int) -> None:
    """A synthetic MDS ShardSet: log-normal document lengths, random uint16 tokens + EOS."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, rng.lognormal(np.log(mean_len), 0.8, size=n_docs).astype(np.int64))
    writer = ShardSetWriter(
        out_dir,
        "mds",
        np.dtype(np.uint16),
        shard_size_bytes=16 << 20,
        compression=None,
        fingerprint={"benchmark": "loader_throughput", "docs": n_docs, "seed": seed},
        snapshot=lambda: {},
    )
    for length in lengths:
        doc = rng.integers(1, VOCAB, size=int(length), dtype=np.uint16)
        doc[-1] = EOS_ID
        writer.add(doc)
    written = writer.finish()
    manifest = build_manifest(
        format_name="mds",
        dtype=np.dtype(np.uint16),
        eos_token="<eos>",
        eos_id=EOS_ID,
        tokenizer_info={"synthetic": True, "vocab_size": VOCAB},
        counts={"documents": len(written), "tokens": int(written.sum())},
        lengths=written,
        shards=writer.shards,
        options={},
        provenance={"method": "benchmarks/loader_throughput.py", "parent": None},
    )
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    writer.mark_complete()


def raw_streaming(data_dir: Path, batch: int, predownload: int | None) -> tuple[int, float]:
    """Tokens and seconds for plain StreamingDataset iteration over one whole epoch.

    (A whole epoch: breaking out early leaves streaming's background threads working.)
    `predownload` None is streaming's default (8 * batch_size samples ready ahead); its ready
    thread then sleeps 7 ms whenever it is that far ahead, which caps iteration speed.
    """
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = StreamingDataset(
        local=str(data_dir), shuffle=False, batch_size=batch, predownload=predownload
    )
    tokens = 0
    start = time.perf_counter()
    for sample in dataset:
        tokens += len(sample["tokens"])
    return tokens, time.perf_counter() - start


def raw_reader(data_dir: Path, max_tokens: int) -> tuple[int, float]:
    """Tokens and seconds for sequential ShardSet.get over documents (Strata's reader alone)."""
    shardset = open_shardset(data_dir)
    tokens = 0
    start = time.perf_counter()
    for doc_id in range(len(shardset)):
        tokens += len(shardset.get(doc_id))
        if tokens >= max_tokens:
            break
    return tokens, time.perf_counter() - start


def strata_loader(
    data_dir: Path, max_tokens: int, seq_len: int, batch: int, prefetch: int
) -> tuple[int, float]:
    """Tokens (input_ids) and seconds for the train loader delivering steps up to max_tokens."""
    cfg = DataConfig(
        sources=[SourceConfig(path=str(data_dir))],
        seq_len=seq_len,
        global_batch_size=batch,
        micro_batch_size=batch,
        prefetch=prefetch,
    )
    loader = build_train_loader(cfg, rank=0, world_size=1)
    tokens = 0
    start = time.perf_counter()
    while tokens < max_tokens:
        for micro in loader.next_step():
            tokens += micro["input_ids"].numel()
    elapsed = time.perf_counter() - start
    loader.close()
    return tokens, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, help="existing MDS ShardSet (default: write a synthetic one)"
    )
    parser.add_argument("--docs", type=int, default=20000, help="synthetic set: documents")
    parser.add_argument(
        "--mean-len", type=int, default=400, help="synthetic set: median tokens per document"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument(
        "--tokens", type=int, default=8_000_000, help="tokens to read per measurement"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per row")
    parser.add_argument(
        "--demo-tokens-per-s",
        type=float,
        default=10_000.0,
        help="what the CPU demo model trains per second (upper end)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "loader_throughput.json"
    )
    args = parser.parse_args()

    tmp = None
    data_dir = args.data
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="strata-loader-bench-"))
        data_dir = tmp / "shardset"
        t0 = time.perf_counter()
        write_shardset(data_dir, args.docs, args.mean_len, seed=0)
        print(f"wrote synthetic MDS ShardSet ({args.docs} docs) in {time.perf_counter() - t0:.1f}s")
    try:
        total_tokens = int(open_shardset(data_dir).lengths.sum())
        max_tokens = total_tokens  # every reader delivers one epoch's worth
        runs = {
            "raw StreamingDataset, default": lambda: raw_streaming(data_dir, args.batch, None),
            "raw StreamingDataset, predownload": lambda: raw_streaming(
                data_dir, args.batch, 100_000
            ),
            "raw ShardSet.get, sequential": lambda: raw_reader(data_dir, max_tokens),
            "strata loader, prefetch=0": lambda: strata_loader(
                data_dir, max_tokens, args.seq_len, args.batch, 0
            ),
            "strata loader, prefetch=4": lambda: strata_loader(
                data_dir, max_tokens, args.seq_len, args.batch, 4
            ),
        }
        rows = dict.fromkeys(runs, 0.0)
        for _ in range(args.repeats):  # rows interleaved, so machine load hits them alike
            for name, run in runs.items():
                tokens, seconds = run()
                rows[name] = max(rows[name], tokens / seconds)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    baseline = max(rate for name, rate in rows.items() if name.startswith("raw StreamingDataset"))
    print(
        f"\nloader throughput: {total_tokens:,} tokens (one epoch) per run, best of {args.repeats}"
    )
    print(
        f"seq_len={args.seq_len} batch={args.batch}  demo consumption={args.demo_tokens_per_s:,.0f} tok/s\n"
    )
    print("time/token vs raw = (fastest raw StreamingDataset tokens/s) / (row's tokens/s)\n")
    print(f"{'reader':34} {'tokens/s':>14} {'time/token vs raw':>18} {'x demo':>8}")
    results = []
    for name, rate in rows.items():
        overhead = baseline / rate
        print(f"{name:34} {rate:14,.0f} {overhead:17.2f}x {rate / args.demo_tokens_per_s:8.0f}")
        results.append(
            {
                "reader": name,
                "tokens_per_s": rate,
                "time_per_token_vs_raw_streaming": overhead,
                "x_demo": rate / args.demo_tokens_per_s,
            }
        )
    record = {
        "benchmark": "loader_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} cpus={os.cpu_count()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "tokens_in_set": total_tokens,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
