"""Training metrics: MFU, the sinks (metrics.jsonl, TensorBoard, optionally Weights & Biases),
the live progress line.

Kept out of the trainer loop: the loop hands over numbers, this module formats and writes
them (rank 0 only).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets (SXM parts).
KNOWN_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "GH200": 989e12,
}


def device_peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU, from the config override or the known table."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, peak in KNOWN_PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


WANDB_ID_FILE = "wandb_run_id"  # a resumed run appends to the same W&B run


class MetricsSink:
    """Appends records to metrics.jsonl, TensorBoard and (when `wandb` is given) a W&B run."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: dict | None = None):
        """`wandb`: {"project", "entity", "mode", "config"} (logging.wandb_*, the resolved config)."""
        self.path = run_dir / "metrics.jsonl"
        self.failed_writes = 0
        torn = _ends_mid_line(self.path)
        self.file = self.path.open("a")
        if torn:  # a crash cut the last record: keep the next one on a line of its own
            self.file.write("\n")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_write_errors()
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.wandb = _start_wandb(run_dir, **wandb) if wandb else None

    def _append(self, record: dict) -> None:
        """One line of metrics.jsonl. A failed write (a full disk) never stops training: it is
        counted, said once, and the line may be lost or torn (readers skip torn lines)."""
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            self.failed_writes += 1
            if self.failed_writes == 1:
                print(f"warning: writing {self.path} failed ({err.strerror}); training goes on, records that cannot be "
                      "written are lost (counted at the end)", file=sys.stderr, flush=True)  # fmt: skip

    def write(self, record: dict) -> None:
        self._append(record)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
        if self.tb is not None:
            try:
                for key, value in scalars.items():
                    self.tb.add_scalar(key, value, record["step"])
            except OSError as err:  # its writer thread failed (a full disk): raised here, at every later call
                self._stop_tensorboard(err)
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def event(self, step: int, kind: str, **fields) -> None:
        """A non-metric record (`{"step", "event": kind, ...}`), e.g. where a run resumed; JSONL only."""
        self._append({"step": step, "event": kind, **fields})

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            self.failed_writes += 1
        if self.failed_writes:
            print(f"warning: {self.failed_writes} write(s) to {self.path} failed; its last records may be missing",
                  file=sys.stderr, flush=True)  # fmt: skip
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError as err:
                self._stop_tensorboard(err)
        if self.wandb is not None:
            self.wandb.finish()

    def _stop_tensorboard(self, err: OSError) -> None:
        """A TensorBoard event file that cannot be written: said once, never fatal; TensorBoard
        logging stops for this process (metrics.jsonl goes on; a resume writes a new event file)."""
        tb, self.tb = self.tb, None
        print(f"warning: writing TensorBoard events to {tb.log_dir} failed ({err.strerror or err}); training goes on, "
              "TensorBoard logging stops until the run is resumed", file=sys.stderr, flush=True)  # fmt: skip
        try:
            tb.close()
        except OSError:
            pass


def _quiet_tensorboard_write_errors() -> None:
    """TensorBoard's writer thread dies on a failed write (a full disk) and Python prints its
    traceback; the sink reports that failure itself (the next add_scalar raises it), so the
    traceback of an OSError in that thread is left out. Installed once per process."""
    previous = threading.excepthook
    if getattr(previous, "strata_tensorboard_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.strata_tensorboard_quiet = True
    threading.excepthook = hook


def _start_wandb(run_dir: Path, project: str, entity: str | None, mode: str, config: dict):
    """The run's W&B run: named after the run directory, files under RUN_DIR/wandb, its id kept
    in RUN_DIR/wandb_run_id so every resume of the run logs into the same W&B run."""
    import uuid

    import wandb

    id_file = run_dir / WANDB_ID_FILE
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12])
    run_id = id_file.read_text().strip()
    return wandb.init(
        project=project, entity=entity, mode=mode, id=run_id, resume="allow", name=run_dir.name,
        dir=str(run_dir), config=config, settings=wandb.Settings(console="off"),
    )  # fmt: skip


class ProgressLine:
    """One status line per report: step, loss, lr, throughput, MFU and ETA."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.total, self.start, self.enabled = total_steps, start_step, enabled
        self.t0 = time.perf_counter()

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        done = step + 1 - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        parts = [f"step {step + 1}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        if "tokens_per_s" in record:  # an eval between two log steps has no timing window
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.4f}")
        parts.append(f"ETA {format_duration(eta)}")
        print(" | ".join(parts), file=sys.stdout, flush=True)
