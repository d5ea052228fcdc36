"""Checkpoint mirror: a copy of each committed checkpoint in object storage (s3://, gs://, oci://,
azure://) or another path, `<mirror>/step_N/...` with the COMPLETE marker uploaded last, uploaded
in the background (one at a time, retried, never fatal), pruned, and fetched back (download, then
verify, then rename). Where nodes have no disk in common each node uploads its own files and the
marker listing every node's files follows once all are in. Choosing, loading and agreeing between
ranks stay in engine.checkpoint.
Transfers use mosaicml-streaming's storage layer; it has no delete (pruning calls the uploader's own
client) and its LocalUploader lists its local side (a path mirror is listed with os.walk here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from engine.checkpoint import (
    MARKER,
    TMP_SUFFIX,
    _first_line,
    _fsync_dir,
    _fsync_tree,
    step_dir_name,
    verify,
)
from engine.config import ConfigError

log = logging.getLogger(__name__)

SCHEMES = ("s3", "gs", "oci", "azure")  # "" = a local or network-mounted path
UPLOAD_ATTEMPTS = 3  # of a whole step directory; each file also gets streaming's own retry
FILE_ATTEMPTS = 2
RETRY_BACKOFF_S = 1.0  # doubled after each failed attempt
# S3-protocol error codes (boto3, also gs:// with HMAC keys) that no retry fixes: give up at once
PERMANENT_ERRORS = {"403", "404", "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def check_mirror_url(url: str) -> str:
    """The URL without a trailing slash, or a ConfigError naming `checkpoint.mirror`."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("", *SCHEMES):
        raise ConfigError(f"checkpoint.mirror: unsupported scheme {scheme}:// in {url} (use s3://, gs://, oci://, azure:// or a path)")
    if scheme and not urllib.parse.urlparse(url).netloc:
        raise ConfigError(f"checkpoint.mirror: {url} names no bucket")
    return url.rstrip("/") or url


class _QuietExistingDir(logging.Filter):
    """streaming warns that the local side of an uploader is not empty: here it never is."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exists and not empty" not in record.getMessage()


logging.getLogger("streaming.base.storage.upload").addFilter(_QuietExistingDir())


class RemoteStore:
    """One mirror location: list, upload, download and delete files by path relative to it."""

    def __init__(self, url: str, scratch: Path) -> None:
        self.url = check_mirror_url(url)
        parsed = urllib.parse.urlparse(self.url)
        self.scheme, self.bucket, self.key_prefix = parsed.scheme, parsed.netloc, parsed.path.strip("/")
        self.scratch = Path(scratch)  # the local side streaming's uploaders insist on
        self._root_uploader = None
        self._downloader = None

    def _uploader(self, local_dir: Path, remote: str):
        from streaming.base.storage import CloudUploader

        return CloudUploader.get((str(local_dir), remote), keep_local=True, exist_ok=True, retry=FILE_ATTEMPTS)

    def _root(self):
        """An uploader for the mirror root: its client lists and deletes (connects on first use)."""
        if self._root_uploader is None:
            self._root_uploader = self._uploader(self.scratch, self.url)
        return self._root_uploader

    def _key(self, rel: str) -> str:
        return f"{self.key_prefix}/{rel}" if self.key_prefix else rel

    def files(self, prefix: str = "") -> list[str]:
        """Paths (relative to the mirror) of every file whose path starts with `prefix`."""
        if not self.scheme:
            base = Path(self.url)
            found = [str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()] if base.is_dir() else []
            return sorted(rel for rel in found if rel.startswith(prefix))
        if self.scheme == "azure":  # streaming's AzureUploader has no list_objects
            container = self._root().azure_service.get_container_client(self.bucket)
            keys = [blob.name for blob in container.list_blobs(name_starts_with=self._key(prefix))]
        else:
            keys = self._root().list_objects(prefix) or []
        strip = len(self.key_prefix) + 1 if self.key_prefix else 0
        return sorted(key[strip:] for key in keys)

    def upload(self, local_dir: Path, dest: str, rels: list[str]) -> None:
        """Uploads `local_dir/<rel>` to `<mirror>/<dest>/<rel>`, in the order given."""
        if not self.scheme:  # streaming's local copy does not create subdirectories
            for rel in rels:
                (Path(self.url) / dest / rel).parent.mkdir(parents=True, exist_ok=True)
        uploader = self._uploader(local_dir, f"{self.url}/{dest}")
        for rel in rels:
            uploader.upload_file(rel)

    def download(self, rel: str, local: Path) -> None:
        from streaming.base.storage import CloudDownloader

        if self._downloader is None:  # one client for all files
            self._downloader = CloudDownloader.get(self.url if self.scheme else None)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.unlink(missing_ok=True)  # streaming's download skips a file that exists
        self._downloader.download(f"{self.url}/{rel}", str(local))

    def delete(self, rels: list[str]) -> None:
        """Deletes these files (they must exist: callers take them from `files`)."""
        if not self.scheme:
            for rel in rels:
                (Path(self.url) / rel).unlink(missing_ok=True)
            for rel in rels:  # the step directories left empty
                with_parent = (Path(self.url) / rel).parent
                if with_parent != Path(self.url) and with_parent.is_dir() and not any(with_parent.iterdir()):
                    with_parent.rmdir()
            return
        client = self._root()
        for rel in rels:
            key = self._key(rel)
            if self.scheme == "s3":
                client.s3.delete_object(Bucket=self.bucket, Key=key)
            elif self.scheme == "gs" and client.authentication.name == "HMAC":
                client.gcs_client.delete_object(Bucket=self.bucket, Key=key)
            elif self.scheme == "gs":
                client.gcs_client.bucket(self.bucket).blob(key).delete()
            elif self.scheme == "oci":
                client.client.delete_object(client.namespace, self.bucket.split("@")[0], key)
            else:  # azure
                client.azure_service.get_container_client(self.bucket).delete_blob(key)


def _error_code(err: BaseException) -> str | None:
    """The S3-protocol error code of a botocore ClientError (None for any other error)."""
    response = getattr(err, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _steps(files: list[str]) -> dict[int, list[str]]:
    """step -> its files (relative to the step directory) in a mirror listing."""
    by_step: dict[int, list[str]] = {}
    for rel in files:
        top, _, rest = rel.partition("/")
        if top.startswith("step_") and top[5:].isdigit() and rest:
            by_step.setdefault(int(top[5:]), []).append(rest)
    return by_step


class CheckpointMirror:
    """Uploads checkpoints in a background thread and fetches them back.

    A checkpoint committed on a disk every rank shares goes up whole from rank 0 (`submit`).
    One written across nodes' own disks goes up in parts: each node sends its own files
    (`submit_part`, no marker; `part_error` says how it went), then rank 0, once engine.checkpoint
    has agreed that every part is in, uploads the marker listing them all (`publish`) or counts
    the checkpoint failed (`give_up`). One transfer is in flight at a time (a new one waits for
    it). A failed transfer is retried `UPLOAD_ATTEMPTS` times, then reported and counted; training
    never stops for it.
    """

    def __init__(self, url: str, keep_last: int, scratch: Path) -> None:
        self.store = RemoteStore(url, scratch)
        self.url, self.keep_last = self.store.url, keep_last
        self._thread: threading.Thread | None = None
        self.uploaded: list[int] = []
        self.failed_uploads = 0
        self.last_error: str | None = None
        self.part_error: str | None = None

    # -- uploading --------------------------------------------------------------------------
    def submit(self, step: int, step_dir: Path) -> None:
        """Starts uploading a committed step directory, after the transfer in flight (if any)."""
        self._start(self._upload_whole, step, Path(step_dir))

    def submit_part(self, step: int, step_dir: Path, files: list[str]) -> None:
        """Starts uploading `files` of `step_dir` (this node's part of a checkpoint written across
        nodes) to `<mirror>/step_N/`, no marker; `part_error` is None once `wait` says it is in."""
        self.wait()
        self.part_error = None
        self._start(self._upload_part, step, Path(step_dir), files)

    def publish(self, step: int, sizes: dict[str, int]) -> None:
        """Starts uploading the marker of a step every file of which (`sizes`: relative path ->
        bytes, every node's) is already in the mirror; counted as uploaded once it is there."""
        self._start(self._upload_marker, step, sizes)

    def unmark(self, step: int) -> str | None:
        """Removes the marker an earlier save of `step` left in the mirror (its files are about to
        be replaced: it must not look complete meanwhile); the error if that failed, else None."""
        try:
            self._remove_marker(step_dir_name(step))
            return None
        except Exception as err:  # any store error: this step's upload is then counted failed
            return _first_line(err)

    def give_up(self, step: int, reason: str) -> None:
        """Counts and reports a step that will not be in the mirror (a node's part failed)."""
        self._count(step, reason, attempts=None)

    def wait(self) -> None:
        """Blocks until the transfer in flight (if any) has succeeded or given up."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def busy(self) -> bool:
        """Whether a transfer is still running (`wait` would block)."""
        return self._thread is not None and self._thread.is_alive()

    def summary(self) -> str:
        return (f"checkpoint mirror {self.url}: {len(self.uploaded)} uploaded, {self.failed_uploads} failed"
                + (f" (last error: {self.last_error})" if self.failed_uploads else ""))  # fmt: skip

    def upload(self, step: int, step_dir: Path) -> None:
        """The step's files first, its COMPLETE marker last (an earlier copy's marker removed first)."""
        files = sorted(json.loads((step_dir / MARKER).read_text())["files"])
        name = step_dir_name(step)
        self._remove_marker(name)
        self.store.upload(step_dir, name, [*files, MARKER])

    def _remove_marker(self, name: str) -> None:
        old_marker = f"{name}/{MARKER}"
        if old_marker in self.store.files(name + "/"):  # re-saving a step: incomplete until re-marked
            self.store.delete([old_marker])

    def _start(self, target, *args) -> None:
        self.wait()
        # not a daemon: an exiting process (a requeue, say) finishes the transfer first
        self._thread = threading.Thread(target=target, args=args, name=f"checkpoint-mirror-{args[0]}")
        self._thread.start()

    def _retrying(self, what: str, action) -> tuple[str | None, int]:
        """Runs `action` until it succeeds, at most `UPLOAD_ATTEMPTS` times (a permanent error:
        once); (None or the last error, attempts made)."""
        attempts, error = 0, None
        while attempts < UPLOAD_ATTEMPTS:
            attempts += 1
            try:
                action()
                return None, attempts
            except Exception as err:  # any store error: the run goes on with its local checkpoints
                error = self.last_error = _first_line(err)
                log.warning("upload of %s to %s failed (attempt %d/%d): %s", what, self.url, attempts,
                            UPLOAD_ATTEMPTS, error)  # fmt: skip
                if _error_code(err) in PERMANENT_ERRORS:
                    break
                if attempts < UPLOAD_ATTEMPTS:
                    time.sleep(RETRY_BACKOFF_S * 2 ** (attempts - 1))
        return error, attempts

    def _upload_whole(self, step: int, step_dir: Path) -> None:
        error, attempts = self._retrying(step_dir.name, lambda: self.upload(step, step_dir))
        self._count(step, error, attempts, local_copy=True)

    def _upload_part(self, step: int, step_dir: Path, files: list[str]) -> None:
        what = f"{step_dir_name(step)} ({len(files)} file(s) of {socket.gethostname()})"
        error, attempts = self._retrying(what, lambda: self.store.upload(step_dir, step_dir_name(step), files))
        if error is not None:
            self.part_error = f"{what}: {error} after {attempts} attempt(s)"
            log.error(f"error: checkpoint mirror: uploading {self.part_error}; training goes on")

    def _upload_marker(self, step: int, sizes: dict[str, int]) -> None:
        name = step_dir_name(step)

        def upload_marker() -> None:
            self.store.scratch.mkdir(parents=True, exist_ok=True)
            local = Path(tempfile.mkdtemp(prefix=f"{name}.marker.", suffix=TMP_SUFFIX, dir=self.store.scratch))
            try:
                (local / MARKER).write_text(json.dumps({"step": step, "files": sizes}))
                self.store.upload(local, name, [MARKER])
            finally:
                shutil.rmtree(local, ignore_errors=True)

        error, attempts = self._retrying(f"{name}/{MARKER}", upload_marker)
        self._count(step, error, attempts)

    def _count(self, step: int, error: str | None, attempts: int | None, local_copy: bool = False) -> None:
        """Counts a step as uploaded (then prunes the mirror) or as failed (reported)."""
        if error is not None:
            self.failed_uploads += 1
            self.last_error = error
            tried = f" after {attempts} attempt(s)" if attempts else ""
            intact = "the local checkpoint is intact" if local_copy else "the previous mirrored checkpoints are intact"
            # WARNING and up reach stderr even where logging is not set up
            log.error(f"error: checkpoint mirror: uploading {step_dir_name(step)} to {self.url} failed{tried} "
                      f"({error}); training goes on, {intact} ({self.failed_uploads} failed upload(s) so far)")  # fmt: skip
            return
        self.uploaded.append(step)
        try:
            self.prune(keep=step)
        except Exception as err:
            log.warning("checkpoint mirror: pruning %s failed (%s)", self.url, _first_line(err))

    def prune(self, keep: int | None = None) -> None:
        """Keeps the newest `keep_last` complete steps (and `keep`, the one just uploaded, even if
        another run left newer ones here); deletes older ones and incomplete leftovers (called
        after an upload, so none is in flight). A marker goes first: never a complete-looking half."""
        by_step = _steps(self.store.files())
        complete = sorted((s for s, files in by_step.items() if MARKER in files), reverse=True)
        doomed = [s for s in by_step if s not in complete[: self.keep_last] and s != keep]
        for step in sorted(doomed):
            name, files = step_dir_name(step), by_step[step]
            if MARKER in files:
                self.store.delete([f"{name}/{MARKER}"])
            self.store.delete([f"{name}/{rel}" for rel in files if rel != MARKER])

    # -- fetching ---------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps whose COMPLETE marker is in the mirror, newest first (their files are checked on fetch)."""
        return sorted((s for s, files in _steps(self.store.files()).items() if MARKER in files), reverse=True)

    def fetch(self, step: int, root: Path) -> str | None:
        """Downloads the step into `root/step_N` (via a temp dir, verified against its marker,
        then renamed); None when it is there and intact, else why not. Safe when nodes sharing
        `root` race: each downloads into its own temp dir and the first rename wins."""
        name = step_dir_name(step)
        final = Path(root) / name
        if verify(final) is None:  # a node sharing this disk got it first
            return None
        remote = set(self.store.files(name + "/"))
        if f"{name}/{MARKER}" not in remote:
            return "no completion marker in the mirror"
        Path(root).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", suffix=TMP_SUFFIX, dir=root))  # pruned like a crashed save
        try:
            self.store.download(f"{name}/{MARKER}", tmp / MARKER)
            try:
                files = json.loads((tmp / MARKER).read_text())["files"]
            except (ValueError, KeyError, TypeError):
                return "unreadable completion marker in the mirror"
            missing = sorted(rel for rel in files if f"{name}/{rel}" not in remote)
            if missing:
                return f"file {missing[0]} missing in the mirror"
            for rel in sorted(files):
                self.store.download(f"{name}/{rel}", tmp / rel)
            problem = verify(tmp)
            if problem:
                return f"{problem} (as downloaded from the mirror)"
            _fsync_tree(tmp)
            _install(tmp, final)
            _fsync_dir(Path(root))
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, final: Path) -> None:
    """Renames a verified download into place; a broken directory of that name is moved aside,
    an intact one (a racing node's) is kept."""
    for _ in range(3):
        try:
            tmp.rename(final)
            return
        except OSError:  # `final` exists and is not empty
            if verify(final) is None:
                return
            aside = Path(tempfile.mkdtemp(prefix=f"{final.name}.broken.", suffix=TMP_SUFFIX, dir=final.parent))
            with contextlib.suppress(OSError):  # another node may have moved it first
                final.rename(aside / final.name)
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not move the downloaded checkpoint into {final}")


def mirror_writable(url: str, scratch: Path) -> str | None:
    """None when a probe file can be written, listed and deleted in the mirror, else the error."""
    probe_dir = Path(tempfile.mkdtemp(prefix=".mirror-probe-", dir=scratch))
    (probe_dir / "probe").write_text("strata doctor\n")
    rel = f".strata-probe-{socket.gethostname()}-{os.getpid()}"
    local_root = None if "://" in url else Path(url)  # a path mirror: leave no directory behind
    root_existed = local_root is not None and local_root.exists()
    try:
        store = RemoteStore(url, scratch)
        store.upload(probe_dir, rel, ["probe"])
        if f"{rel}/probe" not in store.files(rel + "/"):
            return "the uploaded probe file is not listed"
        store.delete([f"{rel}/probe"])
        return None
    except Exception as err:
        return _first_line(err)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
        for made in ([local_root / rel] + ([] if root_existed else [local_root])) if local_root else []:
            with contextlib.suppress(OSError):  # only if empty: never anything else's
                made.rmdir()
