"""The trainer's profiler window: torch.profiler over `logging.profile_steps` steps from
`logging.profile_at`, written per rank to RUN_DIR/profile/ as a Chrome/Perfetto trace
(`rankR_stepS.trace.json.gz`), the top operators as a text table, and on CUDA optionally an
allocator snapshot for pytorch.org/memory_viz. Owns the window only; the steps are the trainer's.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch

SNAPSHOT_ENTRIES = 100_000  # allocator events kept for the memory snapshot


class StepProfiler:
    """`before(step)` / `after(step)` around each optimizer step (0-based `step` = steps done)."""

    def __init__(self, run_dir: Path, rank: int, device: torch.device, profile_at: int, profile_steps: int,
                 memory_snapshot: bool = False):
        self.out = Path(run_dir) / "profile"
        self.rank, self.device = rank, device
        self.first, self.last = profile_at, profile_at + profile_steps - 1  # 1-based logged steps
        self.memory_snapshot = memory_snapshot and device.type == "cuda"
        if memory_snapshot and not self.memory_snapshot and rank == 0:
            print(f"logging.memory_snapshot: CUDA only, not taken on {device.type}; the trace still "
                  "records CPU memory per operator", flush=True)
        self._prof: torch.profiler.profile | None = None

    @classmethod
    def from_config(cls, cfg, run_dir: Path, rank: int, device: torch.device) -> StepProfiler | None:
        if not cfg.logging.profile_at:
            return None
        log = cfg.logging
        return cls(run_dir, rank, device, log.profile_at, log.profile_steps, log.memory_snapshot)

    def before(self, step: int) -> None:
        if step + 1 != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._prof.__enter__()

    def after(self, step: int) -> None:
        """`step` = steps done after this one; closes the window after its last step."""
        if self._prof is None or step < self.last:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self._write(prof)

    def close(self) -> None:
        """A run that ends inside the window still writes what it traced."""
        if self._prof is not None:
            self.after(self.last)

    def _write(self, prof: torch.profiler.profile) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}_step{self.first}"
        raw = self.out / f".{stem}.trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(self.out / f".{stem}.trace.json.gz.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(self.out / f".{stem}.trace.json.gz.tmp", self.out / f"{stem}.trace.json.gz")
        raw.unlink()
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        (self.out / f"{stem}.ops.txt").write_text(
            f"steps {self.first}-{self.last}, rank {self.rank}, {self.device}; top operators by {sort}\n{table}\n"
        )
        if self.memory_snapshot:
            torch.cuda.memory._dump_snapshot(str(self.out / f"{stem}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            print(f"profile of steps {self.first}-{self.last} written to {self.out}/ ({stem}.trace.json.gz: "
                  "open in ui.perfetto.dev or chrome://tracing)", flush=True)
