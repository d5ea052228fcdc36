"""Nodes without a shared disk: two ranks, each a "node" with its own disk, find at start that
they share no checkpoint directory. Without checkpoint.mirror both stop with a config error
(exit 2). With one, each node uploads its own files and the marker lists every node's files; a
node whose upload fails means no marker; a 2-node run on fresh empty disks resumes from the
mirror and continues the uninterrupted losses (1e-4). Nodes are simulated two ways: two roots
in one file system (fast, in-process checkpointers), and two processes each with a private
tmpfs mounted on the same run directory path (unshare), launched with `strata train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from distributed_runs import assert_close, losses, run_in_ranks, run_tree, shared_run

from engine.checkpoint import MARKER, Checkpointer, list_checkpoints, verify
from engine.config import ConfigError
from engine.dist import DistContext
from tests.conftest import (
    REPO,
    small_disk_command,
    small_disk_supported,
    stepped_model_and_optimizer,
)

STEPS, EVERY = 8, 3  # checkpoints at 3 and 6 (no final one): the resume starts from 6
NODE_TIMEOUT_S = 240


def _node_files(world_size: int) -> set[str]:
    """Every file of a checkpoint of the two-Linear model saved by `world_size` ranks."""
    return {".metadata", "trainer_state.json", *(f"__{r}_0.distcp" for r in range(world_size)),
            *(f"rng_rank{r}.pt" for r in range(world_size))}  # fmt: skip


def _saving_node(rank: int, base: str, mirror: str | None, failing_step: int | None) -> dict:
    """One rank = one node whose checkpoint root is its own directory: saves steps 1-3 (rank 1's
    upload of `failing_step` fails), then a fresh checkpointer on an empty root loads the newest
    mirrored one."""
    import torch.distributed as dist

    from engine import checkpoint_mirror

    dist.init_process_group("gloo")
    ctx = DistContext(rank, 2, 0, torch.device("cpu"))
    root = Path(base) / f"node{rank}"
    try:
        saver = Checkpointer(root, ctx, keep_last=2, mirror=mirror)
    except ConfigError as err:
        return {"config_error": str(err)}
    checkpoint_mirror.RETRY_BACKOFF_S = 0.01
    model, optimizer = stepped_model_and_optimizer(0)  # replicated, as data parallel ranks hold it
    for step in (1, 2, 3):
        upload = saver.mirror.store.upload
        if rank == 1 and step == failing_step:
            def refused(*args, **kwargs):
                raise ConnectionError("Could not connect to the endpoint URL")
            saver.mirror.store.upload = refused
        saver.save(step, model, optimizer, {"tokens_seen": step})
        saver.poll()
        saver.wait()
        saver.mirror.store.upload = upload
    left_behind = sorted(p.name for p in root.iterdir())
    fresh, fresh_optimizer = stepped_model_and_optimizer(7)
    loader = Checkpointer(Path(base) / f"fresh{rank}", ctx, mirror=mirror)
    path, state = loader.load_latest(fresh, fresh_optimizer)
    weights_equal = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    return {"shared": saver.shared_disk, "left_behind": left_behind, "loaded": str(path.relative_to(base)),
            "state": state, "weights_equal": weights_equal, "uploaded": saver.mirror.uploaded,
            "failed": saver.mirror.failed_uploads, "last_error": saver.mirror.last_error}  # fmt: skip


def test_two_roots_without_a_mirror_are_a_config_error_on_every_rank(tmp_path):
    results = run_in_ranks(_saving_node, 2, tmp_path / "out", str(tmp_path), None, None)
    for result in results:
        assert result["config_error"].startswith("checkpoint.mirror: the nodes do not share "), result
        assert "a directory every node shares" in result["config_error"] and "object storage" in result["config_error"]
    assert not (tmp_path / "node0").exists()  # the probe and the directory made for it are gone


def test_each_node_uploads_its_files_the_marker_lists_all_and_a_failed_part_means_no_marker(tmp_path):
    mirror = tmp_path / "mirror"
    node0, node1 = run_in_ranks(_saving_node, 2, tmp_path / "out", str(tmp_path), str(mirror), 2)
    assert node0["shared"] is False and node1["shared"] is False
    assert node0["uploaded"] == [1, 3] and node0["failed"] == 1  # rank 0 counts whole checkpoints
    assert "rank 1: step_00000002" in node0["last_error"] and "Could not connect" in node0["last_error"], node0
    assert node1["failed"] == 0 and "Could not connect" in node1["last_error"]  # a node's own part: reported there
    # step 2 got node 0's files but no marker: pruned as incomplete once step 3 was complete
    assert sorted(p.name for p in mirror.iterdir()) == ["step_00000001", "step_00000003"]
    for step in ("step_00000001", "step_00000003"):
        marker = json.loads((mirror / step / MARKER).read_text())
        assert set(marker["files"]) == _node_files(2) and verify(mirror / step) is None
    # local parts are never committed and are gone once uploaded: nothing on either node looks complete
    assert node0["left_behind"] == [] and node1["left_behind"] == []
    for rank, node in enumerate((node0, node1)):  # each fresh node fetched the mirror's newest into its own root
        assert node["loaded"] == f"fresh{rank}/step_00000003" and node["state"]["tokens_seen"] == 3
        assert node["weights_equal"] and verify(tmp_path / f"fresh{rank}" / "step_00000003") is None


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_one_process_shares_its_disk_and_commits_as_before(tmp_path):
    saver = Checkpointer(tmp_path, DistContext(0, 1, 0, torch.device("cpu")))
    model, optimizer = stepped_model_and_optimizer(0)
    saver.save(1, model, optimizer, {"tokens_seen": 1})
    assert saver.shared_disk and [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert set(json.loads((tmp_path / "step_00000001" / MARKER).read_text())["files"]) == _node_files(1)


# -- two processes, each with its own tmpfs on the run directory's path ----------------------
needs_namespaces = pytest.mark.skipif(not small_disk_supported(), reason="needs unprivileged user + mount namespaces (unshare)")
# each node: `strata train` on its own tmpfs, then what it left there copied out ($2) for the asserts
NODE_SCRIPT = 'mnt="$1"; kept="$2"; shift 2; "$@"; code=$?\ncp -a "$mnt/." "$kept"; exit $code\n'


def _two_nodes(tmp_path: Path, name: str, config: Path, *train_args: str) -> list[tuple[int, str, Path]]:
    """Runs `strata train CONFIG ARGS` as ranks 0 and 1 of 2, each on its own empty 64 MiB tmpfs
    mounted on tmp_path/disk; (exit code, output, copy of its disk) per rank."""
    from launch.local import free_port

    port = free_port()
    procs = []
    for rank in range(2):
        kept = tmp_path / name / f"node{rank}"
        kept.mkdir(parents=True)
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = small_disk_command(tmp_path / "disk", "64m", NODE_SCRIPT, str(kept), sys.executable, "-m", "launch.cli",
                                     "train", str(config), *train_args)  # fmt: skip
        log = (tmp_path / name / f"node{rank}.log").open("w")
        procs.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log, kept))  # fmt: skip
    results = []
    for rank, (proc, log, kept) in enumerate(procs):
        try:
            proc.wait(timeout=NODE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other, _, _ in procs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
                    other.wait()
        log.close()
        results.append((proc.returncode, (tmp_path / name / f"node{rank}.log").read_text(), kept))
    return results


def _node_config(tmp_path: Path, corpus: Path, **overrides) -> Path:
    config = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
    config.write_text(yaml.safe_dump(run_tree(corpus, tmp_path / "disk" / "run", steps=STEPS, **overrides)))
    return config


@needs_namespaces
def test_without_a_mirror_both_nodes_stop_at_once_naming_checkpoint_mirror(tiny_corpus, tmp_path):
    config = _node_config(tmp_path, tiny_corpus, **{"checkpoint.every": EVERY})
    for code, out, _ in _two_nodes(tmp_path, "run", config):
        assert code == 2, out
        assert "config error: checkpoint.mirror: the nodes do not share" in out, out


@needs_namespaces
def test_two_nodes_checkpoint_to_the_mirror_and_resume_from_it_on_empty_disks(tiny_corpus, tmp_path, tmp_path_factory):
    mirror = tmp_path / "mirror"  # outside the tmpfs: both nodes see it, as they would a bucket
    config = _node_config(tmp_path, tiny_corpus, **{"checkpoint.every": EVERY, "checkpoint.save_final": False,
                          "checkpoint.async_save": True, "checkpoint.mirror": str(mirror)})  # fmt: skip
    (code0, out0, disk0), (code1, out1, disk1) = _two_nodes(tmp_path, "first", config)
    assert code0 == 0 and code1 == 0, out0 + out1
    assert f"checkpoint mirror {mirror}: 2 uploaded, 0 failed" in out0, out0
    for step in ("step_00000003", "step_00000006"):
        assert verify(mirror / step) is None, step
        assert set(json.loads((mirror / step / MARKER).read_text())["files"]) == _node_files(2)
    for disk in (disk0, disk1):  # each node's partial directories were removed, none committed
        assert not list((disk / "run" / "checkpoints").glob("step_*")), list((disk / "run" / "checkpoints").iterdir())
    reference = losses(shared_run("fsdp2", tmp_path_factory, tiny_corpus, 2, steps=20))  # one shared disk
    assert_close(losses(disk0 / "run"), reference, range(1, STEPS + 1))

    (code0, out0, disk0), (code1, out1, disk1) = _two_nodes(tmp_path, "resumed", config, "--resume", str(tmp_path / "disk" / "run"))
    assert code0 == 0 and code1 == 0, out0 + out1
    for disk in (disk0, disk1):  # each node fetched its own copy
        assert verify(disk / "run" / "checkpoints" / "step_00000006") is None
    assert f"fetched checkpoint {mirror}/step_00000006" in out0, out0
    assert f"resumed from {tmp_path / 'disk' / 'run' / 'checkpoints' / 'step_00000006'} at step 6" in out0, out0
    resumed = losses(disk0 / "run")
    assert sorted(resumed) == [7, 8]
    assert_close(resumed, reference, [7, 8])
