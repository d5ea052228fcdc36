"""Acceptance: `prepare` SIGKILLed at several points, rerun with the same arguments, ends with
byte-identical shards and manifest to an uninterrupted run, without redoing committed shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prepare_testing import corpus_texts, make_tokenizer, output_files, write_jsonl

from data_pipeline.formats.writer import STATE_DIR, STATE_FILE
from data_pipeline.prepare import PrepareOptions, prepare
from tests.conftest import on_small_disk, small_disk_supported

REPO = Path(__file__).resolve().parents[2]

# Runs prepare in a child process. FAULT=commit:K kills the process (SIGKILL, from inside) in the
# window after shard K's files were moved into place but before the state recorded them;
# FAULT=finish kills it after the index and lengths.npy were written but before the manifest.
DRIVER = """
import os, signal, sys
from data_pipeline.formats import writer as w
from data_pipeline.prepare import PrepareOptions, prepare

fault = os.environ.get("FAULT", "")
if fault.startswith("commit:"):
    target = int(fault.split(":")[1])
    original = w.ShardSetWriter._save_state
    def save_state(self):
        if len(self.shards) == target + 1 and not self.finished:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self)
    w.ShardSetWriter._save_state = save_state
elif fault == "finish":
    original_finish = w.ShardSetWriter.finish
    def finish(self):
        lengths = original_finish(self)
        os.kill(os.getpid(), signal.SIGKILL)
    w.ShardSetWriter.finish = finish

inputs, out, tokenizer, fmt = sys.argv[1:5]
prepare(inputs.split(","), out, PrepareOptions(format=fmt, tokenizer=tokenizer, shard_size="6kb",
                                               workers=2, progress=False))
"""


def start(args: list[str], fault: str = "") -> subprocess.Popen:
    env = {**os.environ, "FAULT": fault, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def committed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / STATE_DIR / STATE_FILE).read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def kill_when(proc: subprocess.Popen, out: Path, min_shards: int, timeout: float = 120) -> int:
    """SIGKILL `proc` from outside once `min_shards` shards are committed; return that count."""
    deadline = time.monotonic() + timeout
    while committed_shards(out) < min_shards:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return committed_shards(out)


def shard_mtimes(out: Path) -> dict[str, int]:
    state = json.loads((out / STATE_DIR / STATE_FILE).read_text())
    return {name: (out / name).stat().st_mtime_ns for s in state["shards"] for name in s["files"]}


def test_sigkill_at_several_points_then_resume_is_byte_identical(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    texts = corpus_texts(3000, seed=1)
    half = len(texts) // 2
    inputs = [write_jsonl(tmp_path / "a.jsonl", texts[:half]),
              write_jsonl(tmp_path / "b.jsonl", texts[half:])]
    with open(tmp_path / "b.jsonl", "ab") as fh:  # rejected records must be counted once
        fh.write(b"not json\n" + b'{"text": "  "}\n')
    args = lambda out: [",".join(map(str, inputs)), str(out), str(tokenizer), "mds"]  # noqa: E731

    reference = tmp_path / "reference"  # uninterrupted, in this process (same arguments)
    prepare(inputs, reference, PrepareOptions(tokenizer=str(tokenizer), shard_size="6kb",
                                              workers=2, progress=False))
    expected = output_files(reference)
    total_shards = committed_shards(reference)
    assert total_shards >= 40

    out = tmp_path / "resumed"
    # 1) killed inside a commit: shard 2's files are in place, the state does not know yet
    assert start(args(out), fault="commit:2").wait() == -signal.SIGKILL
    assert committed_shards(out) == 2
    # 2) killed from outside while running, a third of the way in
    reached = kill_when(start(args(out)), out, total_shards // 3)
    assert total_shards // 3 <= reached < total_shards
    # 3) killed after the last shard, before the manifest
    assert start(args(out), fault="finish").wait() == -signal.SIGKILL
    assert committed_shards(out) == total_shards and not (out / "manifest.json").exists()
    before = shard_mtimes(out)
    # 4) the last run finishes the job without rewriting any committed shard
    assert start(args(out)).wait() == 0
    assert shard_mtimes(out) == before
    assert output_files(out) == expected  # every shard, index, lengths.npy and manifest.json

    manifest = json.loads(expected["manifest.json"])
    assert manifest["counts"]["documents"] == len(texts)
    assert manifest["rejected"] == {"invalid_json": 1, "empty_document": 1}


def _worker_pids() -> list[int]:
    """Child processes of this test process that are multiprocessing spawn workers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"multiprocessing" in cmdline and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_a_killed_worker_is_a_clear_error_and_the_rerun_resumes(tmp_path):
    import threading

    from data_pipeline.prepare import WorkerDied

    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    source = write_jsonl(tmp_path / "in.jsonl", corpus_texts(4000, seed=2))
    options = PrepareOptions(tokenizer=str(tokenizer), shard_size="6kb", workers=2,
                             batch_bytes=20_000, progress=False)
    prepare([source], tmp_path / "reference", options)

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            prepare([source], tmp_path / "out", options)
            outcome.append(None)
        except BaseException as exc:  # reported to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not _worker_pids() and thread.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for pid in _worker_pids()[:1]:
        os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert isinstance(outcome[0], WorkerDied), outcome
    prepare([source], tmp_path / "out", options)
    assert output_files(tmp_path / "out") == output_files(tmp_path / "reference")


def test_ctrl_c_is_the_parents_alone_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Workers ignore SIGINT (the parent stops the pool; no traceback per worker); the CLI says
    that the committed shards are kept and that the same command resumes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import data_pipeline.prepare as prepare_module
    from launch.cli import main as strata

    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    encoder_args = (tokenizer.read_text(), 0, "uint16", "text", 0)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=prepare_module._init_worker, initargs=encoder_args) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "prepare", interrupted)
    write_jsonl(tmp_path / "in.jsonl", ["one\n"])
    out = tmp_path / "out"
    assert strata(["prepare", str(tmp_path / "in.jsonl"), "--out", str(out), "--tokenizer", str(tokenizer)]) == 130
    assert f"prepare: interrupted; the shards committed to {out} are kept" in capsys.readouterr().err


@pytest.mark.skipif(not small_disk_supported(), reason="needs unprivileged user + mount namespaces (unshare) for a small tmpfs")
def test_a_full_disk_is_a_clear_error_and_the_rerun_after_freeing_space_resumes(tmp_path):
    """`strata prepare` onto a 64 KiB tmpfs fills it: exit 1 with a line saying what to do, the
    half-written shard's staging files removed, the committed shards kept; with more space the
    same command finishes with the uninterrupted run's bytes."""
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    inputs = write_jsonl(tmp_path / "a.jsonl", corpus_texts(1200, seed=2))
    reference = tmp_path / "reference"
    prepare([inputs], reference, PrepareOptions(tokenizer=str(tokenizer), shard_size="6kb", workers=1, progress=False))
    assert sum(len(data) for data in output_files(reference).values()) > 2 * 64 * 1024  # more than the disk holds

    command = '"$2" -m launch.cli prepare "$3" --out "$1/out" --tokenizer "$4" --shard-size 6kb --workers 1 --quiet'
    script = (f'{command}; echo "first exit $?"\n'
              'ls -a "$1/out/.strata_state"; cp -a "$1/out" "$5/partial"\n'
              f'mount -o remount,size=8m "$1" && {command}; echo "second exit $?"\n'
              'cp -a "$1/out" "$5/out"\n')  # fmt: skip
    done = on_small_disk(tmp_path / "disk", "64k", script, sys.executable, str(inputs), str(tokenizer), str(tmp_path))
    out = done.stdout + done.stderr
    assert "first exit 1" in out and "second exit 0" in out, out
    assert "strata prepare: error: No space left on device" in out and "run the same command again" in out, out
    assert "staging" not in out.split("first exit 1")[1].split("second exit")[0], out  # the .strata_state listing
    assert 1 <= committed_shards(tmp_path / "partial") < committed_shards(reference)
    assert output_files(tmp_path / "out") == output_files(reference)
