"""Checkpoints: one DCP directory per step, committed atomically, resolved with fallback.

Layout: `<run>/checkpoints/step_00000100/` holding the DCP shards of model + optimizer
(resharded on load to whatever mesh the new run has), `trainer_state.json` (step, counters,
schedule and sampler state: world-size independent), `rng_rank<r>.pt`, and `COMPLETE`
(written last, lists every file's size). Everything is written into `step_N.tmp` and renamed
when complete, so a crash leaves no directory that looks complete. A checkpoint with a missing
or mismatching marker, or whose load raises, is skipped with a warning for the previous one.
With `checkpoint.mirror` each committed directory is also uploaded (engine.checkpoint_mirror),
and a resume that finds no usable local checkpoint fetches the newest intact one from there.
Nodes without a disk in common (found by a probe file at start) need the mirror: each writes its
own files locally, uploads them, and the marker goes up only once every node's part is in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from engine.config import ConfigError
from engine.dist import DistContext, all_gather_object, all_reduce_sum, barrier
from engine.errors import CheckpointSaveError

if TYPE_CHECKING:
    from engine.checkpoint_mirror import CheckpointMirror

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
TMP_SUFFIX = ".tmp"
PROBE_PREFIX = ".shared-disk-probe-"
# A rank that misses the probe looks again for this long: a network file system may show a new
# file only once its cached directory attributes expire (NFS: acdirmin, 30 s by default).
PROBE_PATIENCE_S = float(os.environ.get("STRATA_SHARED_DISK_WAIT_S", "35"))
PROBE_LOOK_INTERVAL_S = 0.5


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_tree(path: Path) -> dict[str, int]:
    sizes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
        sizes[str(file.relative_to(path))] = file.stat().st_size
    return sizes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(step: int, tmp: Path, final: Path) -> None:
    """Writes the completion marker into the finished `tmp`, then renames it to `final`; a
    checkpoint already there (a step saved again) is replaced only once the new one is in place."""
    sizes = _fsync_tree(tmp)
    marker = tmp / (MARKER + TMP_SUFFIX)
    marker.write_text(json.dumps({"step": step, "files": sizes}))
    with marker.open("rb") as handle:
        os.fsync(handle.fileno())
    marker.replace(tmp / MARKER)
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable completion marker"
    for rel, size in sizes.items():
        file = path / rel
        if not file.is_file():
            return f"missing file {rel}"
        if file.stat().st_size != size:
            return f"file {rel} has {file.stat().st_size} bytes, expected {size}"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Committed step directories, newest first (temp directories excluded)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)


# The optimizer state is saved flattened (every hyperparameter keyed by its parameter's FQN):
# ranks holding different parameters (pipeline stages) then write disjoint keys, and a
# checkpoint loads at any pp degree. Older checkpoints keep one `params` list per group.
FLAT_OPTIMIZER = StateDictOptions(flatten_optimizer_state_dict=True)


def _optimizer_options(path: Path) -> StateDictOptions:
    """How the checkpoint at `path` holds its optimizer state (flattened unless it is older)."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    grouped = any(k.startswith("optim.param_groups.") and k.endswith(".params") for k in keys)
    return StateDictOptions() if grouped else FLAT_OPTIMIZER


def tied_copies(model: torch.nn.Module) -> dict[str, str]:
    """Name of each copy of a tied weight the model holds -> the name checkpoints keep it under
    (a pipeline's last stage holds the embedding as its output projection: engine.pipeline)."""
    return model.tied_copy_names() if hasattr(model, "tied_copy_names") else {}


def _copy_source(key: str, copies: dict[str, str]) -> str | None:
    """For a model or flattened optimizer state dict key of a tied copy, the key it is saved
    under (`state.output_embeddings.weight.exp_avg` -> `state.tok_embeddings.weight.exp_avg`);
    None for every other key."""
    for copy, source in copies.items():
        for prefix in ("", "state.", "param_groups."):
            if key == prefix + copy or key.startswith(prefix + copy + "."):
                return prefix + source + key[len(prefix + copy) :]
    return None


def _load_into(state: dict[str, dict], path: Path, copies: dict[str, str]) -> dict[str, dict]:
    """DCP-loads `state` ({"model": ..., "optim": ...}) in place; tied copies read their
    source's keys (renamed for the load and back: DCP replaces non-tensor values in the dict)."""
    request = {part: {_copy_source(k, copies) or k: v for k, v in sd.items()} for part, sd in state.items()}
    with _one_process_is_the_intent():
        dcp.load(request, checkpoint_id=str(path))
    return {part: dict(zip(state[part], request[part].values(), strict=True)) for part in state}


# what a load error says when the checkpoint is intact but holds another model (a config change)
MISMATCH_MARKERS = ("Size mismatch", "size mismatch", "Missing key", "Unexpected key")


class CheckpointMismatch(ConfigError):
    """An intact checkpoint whose tensors do not fit this run's model or optimizer: the config
    changed. Not corruption, so no fallback: falling back to step 0 would overwrite the run."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"checkpoint {path} does not fit this run's model ({detail}); the config's model (or optim) "
            "section differs from the one it was saved with: resume with the run's own config.yaml"
        )


@contextlib.contextmanager
def _one_process_is_the_intent() -> Iterator[None]:
    """DCP warns on every save/load without a process group; a one-process run means it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _warn_skip(path: Path | str, problem: str, loud: bool = True) -> None:
    log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    if loud:
        print(f"warning: skipping checkpoint {path}: {problem}; using the previous one", flush=True)


def _first_line(err: BaseException) -> str:
    """A one-line description of a load failure (DCP wraps each rank's error in its message)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in reversed(lines) if ":" in line and not line.startswith("File ")), lines[-1] if lines else "")
    return f"{type(err).__name__}: {detail[:300]}" if detail else type(err).__name__


def _free_space_note(root: Path, err: BaseException) -> str:
    """The free space on the checkpoint disk, for a save error that does not say the disk is full
    (torch.save on a full disk: "unexpected pos 704 vs 598"); empty when it says so or is unknown."""
    if "No space left on device" in str(err):
        return ""
    try:
        free = shutil.disk_usage(root).free
    except OSError:  # a lost mount
        return ""
    return f" ({free / 2**20:,.1f} MiB free on the disk of {root})"


def latest_checkpoint(root: Path, loud: bool = True) -> Path | None:
    """Newest intact checkpoint under `root`, warning about each broken one it skips."""
    for path in list_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        _warn_skip(path, problem, loud)
    return None


def resolve_checkpoint(source: str | Path) -> Path:
    """A run directory, a checkpoints directory or one step directory -> an intact step dir."""
    source = Path(source)
    if (source / MARKER).exists() or source.name.startswith("step_"):
        problem = verify(source)
        if problem:
            raise FileNotFoundError(f"checkpoint {source} is not usable: {problem}")
        return source
    for root in (source / "checkpoints", source):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no intact checkpoint under {source}")


# -- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator this process uses, in a form `torch.load(weights_only=True)` reads."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- one disk or one per node ---------------------------------------------------------------
def one_disk_for_all(root: Path, ctx: DistContext) -> bool:
    """Whether every rank sees the files rank 0 writes under `root` (one file system shared by
    all nodes). Rank 0 creates an empty probe file with a random name there, every rank looks
    for it (one broadcast, one all-reduce), rank 0 removes it and any directory it made for it.
    True in a single process, and where rank 0 cannot write the probe (nothing to tell by)."""
    if not ctx.distributed:
        return True
    name: list[str | None] = [None]
    made = [p for p in (root, *root.parents) if not p.exists()]
    if ctx.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f"{PROBE_PREFIX}{secrets.token_hex(8)}"
            probe.touch(exist_ok=False)
            name[0] = probe.name
        except OSError as err:
            log.warning("cannot write a probe file under %s (%s): assuming every rank shares it", root, _first_line(err))
    dist.broadcast_object_list(name, src=0)
    seen = name[0] is None or (root / name[0]).is_file()
    deadline = time.monotonic() + PROBE_PATIENCE_S
    while not seen and time.monotonic() < deadline:  # costs time only where the disk is not shared
        time.sleep(PROBE_LOOK_INTERVAL_S)
        with contextlib.suppress(OSError):
            os.listdir(root)  # a directory read also refreshes a network file system's view of it
        seen = (root / name[0]).is_file()
    unseen = all_reduce_sum(0 if seen else 1, ctx)  # also: every rank has looked before it is removed
    if ctx.is_main and name[0] is not None:
        (root / name[0]).unlink(missing_ok=True)
        for path in made:  # only if empty: never anything else's
            with contextlib.suppress(OSError):
                path.rmdir()
    return unseen == 0


def agreed_problem(problem: str | None, ctx: DistContext) -> str | None:
    """This rank's problem with a checkpoint, or, where it has none but another rank has one,
    that other rank's (one all-reduce): a checkpoint is used only where it is usable everywhere."""
    others = all_reduce_sum(0 if problem is None else 1, ctx)
    return problem or ("broken on another rank" if others else None)


# -- saving and loading ---------------------------------------------------------------------
@dataclass
class _PendingSave:
    step: int
    tmp: Path
    final: Path
    future: Any


@dataclass
class _NodeUpload:
    """A checkpoint written across nodes' own disks whose parts are being uploaded."""

    step: int
    tmp: Path  # this node's part
    sizes: dict[str, int]  # every node's files: the marker rank 0 uploads once all parts are in


class Checkpointer:
    """Saves (sync or async) and loads the checkpoints of one run directory.

    At most one async save is in flight: `poll()` (every step) commits it once all ranks have
    written it, the next save or `wait()` waits for it; the commit (marker + rename) only ever
    follows finished writes, so a checkpoint never looks complete early. With a `mirror` URL,
    rank 0 uploads each committed directory in the background (`wait()` waits for it too).

    A save that fails on any rank (ENOSPC, a lost mount) raises `CheckpointSaveError` on every
    rank from the call that finds it (`save`, `poll` or `wait`: for an async save, possibly the
    next `save`, which then starts nothing), after its partial files are removed;
    `failed_in_a_row` counts such failures since the last commit.

    Nodes without a disk in common (`shared_disk` False, probed at construction; a ConfigError
    naming checkpoint.mirror without a mirror): each node's local rank 0 tends its own
    `step_N.tmp`, which holds only that node's files and is never committed locally. At commit
    the ranks gather every node's file list (the union is the marker), and each node uploads its
    own files in the background. All ranks then agree that every node's part is in (an all-gather)
    at the first point every rank reaches once all uploads are done: `poll` (one all-reduce per
    step while parts are uploading), else the next commit or `wait`, which block for them; the
    uploads stay in the background (no stall) and a crash between saves loses at most the step in
    upload. Rank 0 then uploads the marker, last, or, if any node's part failed, counts the step
    failed (never fatal); each node removes its local part either way.
    """

    def __init__(self, root: Path, ctx: DistContext, keep_last: int = 3, async_save: bool = False,
                 mirror: str | None = None, mirror_keep_last: int | None = None):  # fmt: skip
        self.root, self.ctx, self.keep_last, self.async_save = Path(root), ctx, keep_last, async_save
        self._pending: _PendingSave | None = None
        self.failed_in_a_row = 0
        self.mirror: CheckpointMirror | None = None
        if mirror:
            from engine.checkpoint_mirror import CheckpointMirror  # it builds on this module

            self.mirror = CheckpointMirror(mirror, mirror_keep_last or keep_last, scratch=self.root)
        self.shared_disk = one_disk_for_all(self.root, ctx)
        if not self.shared_disk and self.mirror is None:
            raise ConfigError(
                f"checkpoint.mirror: the nodes do not share {self.root} (a file rank 0 wrote there is not seen by every "
                "rank); checkpoints need a directory every node shares (train.run_dir on a shared file system) or a "
                "mirror in object storage: set checkpoint.mirror to s3://, gs://, oci://, azure:// or a shared path"
            )
        self._uploading: _NodeUpload | None = None
        # async writes run collectives from a background thread: give them their own group
        self._async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict,
        blocking: bool | None = None,
    ) -> Path:
        """Writes everything into `step_N.tmp` on all ranks, then commits it with a rename.

        Async (`blocking=False`, or None with async_save on): returns once the state is staged
        in host memory; the files are written in the background and committed later.
        """
        self._finish_async_save()
        if self._uploading is not None and self._uploading.step == step:  # its part is read from `tmp`
            self._settle_upload(block=True)
        blocking = not self.async_save if blocking is None else blocking
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + TMP_SUFFIX)
        with self._failing_together(step, tmp):
            if self._tends_disk:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT_OPTIMIZER)
        copies = tied_copies(model)  # saved once, under their source's names
        state = {part: {k: v for k, v in sd.items() if _copy_source(k, copies) is None}
                 for part, sd in (("model", model_sd), ("optim", optim_sd))}  # fmt: skip
        with self._failing_together(step, tmp):
            torch.save(rng_state(), tmp / f"rng_rank{self.ctx.rank}.pt")
            if self.ctx.is_main:
                (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        if blocking:
            with self._failing_together(step, tmp), _one_process_is_the_intent():
                dcp.save(state, checkpoint_id=str(tmp))  # a write error is raised on every rank
            self._commit(step, tmp, final)
        else:
            with self._failing_together(step, tmp), _one_process_is_the_intent():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
            self._pending = _PendingSave(step, tmp, final, getattr(future, "upload_completion", future))
        return final

    @property
    def _tends_disk(self) -> bool:
        """Whether this rank creates, prunes and cleans up the step directories of its disk:
        rank 0 of a shared disk, each node's local rank 0 otherwise."""
        return self.ctx.is_main if self.shared_disk else self.ctx.local_rank == 0

    def wait(self) -> Path | None:
        """Finishes and commits the async save in flight, if any, then waits for the mirror
        upload in flight (across nodes: every part, then the marker); returns the directory
        committed here, if any (across nodes: where a resume would fetch it to)."""
        final = self._finish_async_save()
        self._settle_upload(block=True)
        if self.mirror is not None and self.ctx.is_main:
            self.mirror.wait()
            if self.mirror.uploaded or self.mirror.failed_uploads:
                print(self.mirror.summary(), flush=True)
        return final

    close = wait

    def _finish_async_save(self) -> Path | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        with self._failing_together(pending.step, pending.tmp):
            pending.future.result()
        self._commit(pending.step, pending.tmp, pending.final)
        return pending.final

    def poll(self) -> Path | None:
        """Commits the async save in flight once every rank has finished writing it (a cheap
        check, meant to be called every step); returns the committed directory, if any.
        Across nodes it also publishes the checkpoint in upload once every node's part is in."""
        self._settle_upload(block=False)
        if self._pending is None:  # the same on every rank: saves happen at the same steps
            return None
        unfinished = 0 if self._pending.future.done() else 1
        if all_reduce_sum(unfinished, self.ctx) > 0:
            return None
        return self._finish_async_save()

    def _commit(self, step: int, tmp: Path, final: Path) -> None:
        barrier(self.ctx)  # every rank's shards are on disk
        if not self.shared_disk:
            self._commit_across_nodes(step, tmp)
            return
        with self._failing_together(step, tmp):
            if self.ctx.is_main:
                if self.mirror is not None:  # its upload may read a directory this commit replaces or prunes
                    self.mirror.wait()
                _install(step, tmp, final)
        self.failed_in_a_row = 0
        if self.ctx.is_main:
            try:
                self._prune()
            except OSError as err:  # the new checkpoint is in place: pruning can wait for the next one
                log.warning("pruning old checkpoints in %s failed: %s", self.root, _first_line(err))
            if self.mirror is not None:
                self.mirror.submit(step, final)

    def _commit_across_nodes(self, step: int, tmp: Path) -> None:
        """No disk holds the whole checkpoint: after the previous one is settled, the ranks
        gather every node's file list (the marker to be) and each node starts uploading its own."""
        assert self.mirror is not None
        self._settle_upload(block=True)  # one checkpoint in upload at a time
        stale_marker_error = None
        if self.ctx.is_main:  # before any node uploads (the gather below orders it): the previous
            self.mirror.wait()  # marker and its pruning of the mirror are done, a re-saved step unmarked
            stale_marker_error = self.mirror.unmark(step)
        with self._failing_together(step, tmp):
            listing = _fsync_tree(tmp) if self._tends_disk else {}
        listings = all_gather_object(listing, self.ctx)
        self._uploading = _NodeUpload(step, tmp, {rel: size for part in listings for rel, size in part.items()})
        self.failed_in_a_row = 0
        if self._tends_disk:
            try:
                self._prune(keep=tmp)
            except OSError as err:
                log.warning("pruning old checkpoints in %s failed: %s", self.root, _first_line(err))
            if stale_marker_error is None:
                self.mirror.submit_part(step, tmp, sorted(listing))
            else:
                self.mirror.part_error = f"removing the marker of an earlier save of this step: {stale_marker_error}"

    def _settle_upload(self, block: bool) -> None:
        """Across nodes: once every node's part of the checkpoint in upload is in the mirror (or
        has failed), rank 0 publishes its marker (or counts it failed) and each node removes its
        local part. `block` False (poll): only if no node is still uploading (one all-reduce)."""
        pending = self._uploading
        if pending is None:  # the same on every rank
            return
        assert self.mirror is not None
        if not block and all_reduce_sum(1 if self._tends_disk and self.mirror.busy() else 0, self.ctx) > 0:
            return
        self._uploading = None
        error = None
        if self._tends_disk:
            self.mirror.wait()
            error = self.mirror.part_error
            shutil.rmtree(pending.tmp, ignore_errors=True)  # never loadable alone; the mirror has it (or not)
        errors = all_gather_object(error, self.ctx)
        if self.ctx.is_main:
            failed = [f"rank {rank}: {err}" for rank, err in enumerate(errors) if err]
            if failed:
                self.mirror.give_up(pending.step, "; ".join(failed))
            else:
                self.mirror.publish(pending.step, pending.sizes)

    @contextlib.contextmanager
    def _failing_together(self, step: int, tmp: Path) -> Iterator[None]:
        """Runs a part of a save, then agrees with every rank (one all-reduce, which is also a
        barrier) whether it failed anywhere; if so, rank 0 removes `tmp` and every rank raises
        `CheckpointSaveError` naming each failed rank's error."""
        error: str | None = None
        try:
            yield
        except (Exception, CheckpointException) as err:  # ENOSPC, a lost mount; DCP's error is a BaseException
            error = _first_line(err) + _free_space_note(self.root, err)
        if not all_reduce_sum(error is not None, self.ctx):
            return
        errors = all_gather_object(error, self.ctx)
        if self._tends_disk:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what the failed save took
        self.failed_in_a_row += 1
        reasons = sorted({e for e in errors if e})
        ranks = [r for r, e in enumerate(errors) if e]
        where = f" on rank(s) {', '.join(map(str, ranks))}" if self.ctx.distributed else ""
        raise CheckpointSaveError(step, f"{'; '.join(reasons)}{where}")

    def _prune(self, keep: Path | None = None) -> None:
        """Keeps the newest `keep_last` intact checkpoints; drops leftovers of crashed saves
        (all temp directories but `keep`, a part in upload)."""
        good = [p for p in list_checkpoints(self.root) if verify(p) is None]
        for old in good[self.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob("step_*" + TMP_SUFFIX):
            if leftover != keep:
                shutil.rmtree(leftover, ignore_errors=True)

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Restores model (+ optimizer) resharded to this run's mesh; returns the trainer state."""
        if optimizer is None:
            state = _load_into({"model": get_model_state_dict(model)}, path, tied_copies(model))
            set_model_state_dict(model, state["model"])
        else:
            options = _optimizer_options(path)
            model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
            state = _load_into({"model": model_sd, "optim": optim_sd}, path, tied_copies(model))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=options)  # fmt: skip
        rng_file = path / f"rng_rank{self.ctx.rank}.pt"
        if not rng_file.exists():  # a rank the saving run did not have
            rng_file = path / "rng_rank0.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return json.loads((path / STATE_FILE).read_text())

    def load_latest(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[Path, dict] | None:
        """Loads the newest checkpoint that verifies and loads; skips (and says so) the others.

        Rank 0's list is tried, a checkpoint only where it verifies on every rank (all-reduce),
        and DCP raises a failed read on every rank, so all ranks skip the same checkpoints. With
        a mirror and no usable local checkpoint, the newest intact mirrored one is downloaded and
        loaded. Without a disk in common a local step directory is only a copy fetched from the
        mirror, so the mirror is asked first (the fetch keeps a local copy that is intact).
        None when there is none anywhere.
        """
        names = [[p.name for p in list_checkpoints(self.root)] if self.shared_disk else []]
        if self.ctx.distributed:
            dist.broadcast_object_list(names, src=0)
        for path in (self.root / name for name in names[0]):
            problem = agreed_problem(verify(path), self.ctx)
            if problem is None:
                loaded, problem = self._try_load(path, model, optimizer)
                if loaded is not None:
                    return path, loaded
            _warn_skip(path, problem, loud=self.ctx.is_main)
        return self._load_from_mirror(model, optimizer) if self.mirror is not None else None

    def _try_load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> tuple[dict | None, str]:  # fmt: skip
        """(trainer state, "") or (None, why loading failed); a config mismatch raises."""
        try:
            return self.load(path, model, optimizer), ""
        except (Exception, CheckpointException) as err:  # a corrupt file of the right size
            if any(marker in str(err) for marker in MISMATCH_MARKERS):
                raise CheckpointMismatch(path, _first_line(err)) from None
            return None, f"loading failed ({_first_line(err)})"

    def _load_from_mirror(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                          ) -> tuple[Path, dict] | None:  # fmt: skip
        """Newest first, each node's LOCAL_RANK 0 downloads a mirrored step for its node (the
        others wait); all ranks load it once every rank sees it intact, else try the previous."""
        assert self.mirror is not None
        for step in self._mirror_steps():
            problem = None
            if self.ctx.local_rank == 0:
                try:
                    problem = self.mirror.fetch(step, self.root)
                except Exception as err:  # the store failed mid-download: try the previous step
                    problem = f"download failed ({_first_line(err)})"
            barrier(self.ctx)
            path = self.root / step_dir_name(step)
            problem = agreed_problem(problem or verify(path), self.ctx)
            if problem is None:
                if self.ctx.is_main:
                    print(f"fetched checkpoint {self.mirror.url}/{path.name} into {path}", flush=True)
                loaded, problem = self._try_load(path, model, optimizer)
                if loaded is not None:
                    return path, loaded
            _warn_skip(f"{self.mirror.url}/{path.name}", problem, loud=self.ctx.is_main)
        return None

    def _mirror_steps(self) -> list[int]:
        """The mirror's complete steps, newest first, as rank 0 lists them (the same on every rank)."""
        assert self.mirror is not None
        listing: list = [None]
        if self.ctx.is_main:
            try:
                listing[0] = self.mirror.complete_steps()
            except Exception as err:
                listing[0] = _first_line(err)
        if self.ctx.distributed:
            dist.broadcast_object_list(listing, src=0)
        if isinstance(listing[0], str):
            raise ConfigError(f"checkpoint.mirror: cannot list {self.mirror.url} ({listing[0]}); "
                              "no local checkpoint either, so resuming would start over at step 0")  # fmt: skip
        return listing[0]
