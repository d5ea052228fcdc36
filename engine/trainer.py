"""The training loop: build model, optimizer, schedule and loader; step; eval; checkpoint.

The loop stays short: metrics formatting (engine.metrics), checkpoint I/O (engine.checkpoint),
parallelism (engine.parallel) and data order (data_pipeline) live elsewhere. The loss is the
mean over every label token of the global batch, whatever the world size or accumulation, so
runs at different topologies follow the same curve.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipeline.manifest import write_json_atomic
from engine.checkpoint import Checkpointer, CheckpointSaveError, latest_checkpoint
from engine.config import StrataConfig, dump_config
from engine.continual import resolve_continual, run_schedule, start_continual_run
from engine.dist import DistContext, all_reduce_sum
from engine.downstream import prepare_tasks, task_metrics
from engine.evaluate import evaluate_shardset, token_byte_lengths
from engine.float8 import precompute_float8_scales
from engine.metrics import MetricsSink, ProgressLine, device_peak_flops
from engine.optim import build_optimizer
from engine.parallel import (
    build_mesh,
    clip_grad_norm_,
    context_parallel_plan,
    loss_context,
    parallelize_model,
    resolve_degrees,
    set_microbatch_grad_sync,
    total_grad_norm,
)
from engine.profiling import StepProfiler
from engine.report import closing_line, load_run, plot_runs
from engine.signals import CHECKPOINT_FAILED_EXIT_CODE, REQUEUE_EXIT_CODE, StopRequest
from engine.step_guard import DIVERGED_EXIT_CODE, StepGuard, TrainingDiverged
from engine.watchdog import HangWatchdog
from models.spec import get_spec


@contextlib.contextmanager
def _reported_if_failing(what: str) -> Iterator[None]:
    """A run's closing outputs are not worth a crash at its end: a write that fails (a full disk) is said."""
    try:
        yield
    except OSError as err:
        print(f"warning: could not write {what} ({err.strerror or err})", file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    exit_code: int
    step: int
    tokens_seen: int
    final_loss: float | None
    val: dict | None
    tokens_per_s: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(cfg: StrataConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU unless FSDP2's mixed-precision policy already computes in bf16."""
    if device.type == "cuda" and dist.is_initialized():
        return None
    choice = cfg.train.dtype
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" else "float32"
    return torch.bfloat16 if choice == "bfloat16" else None


def build_model(cfg: StrataConfig, ctx: DistContext, mesh=None) -> torch.nn.Module:
    """Meta-device build, materialized on the device and initialized identically on every rank."""
    spec = get_spec(cfg.model.family)
    with torch.device("meta"):
        model = spec.build(cfg.model)
    model.to_empty(device=ctx.device)
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    return parallelize_model(model, cfg.parallel, ctx, spec, mesh)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, z_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to differentiate, summed NLL) over the label tokens (!= -100): the summed NLL plus
    z_coef x the summed log^2 Z when z-loss is on. Under loss parallel, call inside `loss_context`."""
    logits = logits.float().flatten(0, 1)
    flat_labels = labels.flatten()
    nll = F.cross_entropy(logits, flat_labels, ignore_index=-100, reduction="sum")
    loss = nll
    if z_coef:
        mask = flat_labels != -100
        loss = loss + z_coef * (torch.logsumexp(logits[mask], dim=-1) ** 2).sum()
    return loss, nll


def val_sets(cfg: StrataConfig) -> list[tuple[str, str]]:
    """(metric suffix, ShardSet path) of every evaluated set: data.val_path unnamed, then data.val_sets."""
    main = [("", cfg.data.val_path)] if cfg.data.val_path else []
    return main + [(f"/{name}", path) for name, path in sorted(cfg.data.val_sets.items())]


def find_tokenizer(cfg: StrataConfig) -> Path | None:
    candidates = [s.path for s in cfg.data.sources] + [path for _, path in val_sets(cfg)]
    for base in candidates:
        for path in (Path(base) / "tokenizer.json", Path(base).parent / "tokenizer.json"):
            if path.is_file():
                return path
    return None


class Trainer:
    def __init__(self, cfg: StrataConfig, ctx: DistContext, resume: bool = False, loader=None):
        """`loader` defaults to the data pipeline's loader over `cfg.data` (benchmarks pass synthetic ones)."""
        cfg = resolve_continual(cfg)  # a continual run: pin its source, start step and LR (engine.continual)
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.train.run_dir)
        self.eval_tasks = prepare_tasks(cfg.train.eval_tasks, find_tokenizer(cfg), cfg.model.max_seq_len)  # engine.downstream
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        if ctx.device.type == "cpu" and cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.train.seed)
        # ranks of one PP x CP x TP group read the same batch: the loader shards over dp only
        self.dims = resolve_degrees(cfg.parallel, ctx.world_size)
        self.dp_rank, self.dp_size = self.dims.dp_rank(ctx.rank), self.dims.dp_size
        mesh = build_mesh(self.dims, ctx.device.type) if dist.is_initialized() else None
        self.context_parallel = context_parallel_plan(cfg, self.dims, mesh, ctx.rank)
        self.pipeline, self.pp_group = None, None
        if self.dims.pp > 1:  # this rank's stages; self.model holds their modules (engine.pipeline)
            from engine.pipeline import Pipeline

            self.pipeline = Pipeline(cfg, ctx, self.dims, mesh, token_loss, shard_for=self.context_parallel)
            self.model, self.pp_group = self.pipeline.parts, self.pipeline.group
        else:
            self.model = build_model(cfg, ctx, mesh)
        self.autocast = autocast_dtype(cfg, ctx.device)
        self.lr_max = float(cfg.optim.lr)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.lr_max, ctx.device)
        self.schedule = run_schedule(cfg, self.lr_max)
        if loader is None:
            from data_pipeline.loader import build_train_loader

            data_steps = cfg.train.steps  # the horizon of a changing mixture (data.mixture)
            if cfg.continual.active and cfg.continual.data == "new":  # a fresh sampler counts from 0
                data_steps -= cfg.continual.start_step or 0
            loader = build_train_loader(cfg.data, self.dp_rank, self.dp_size, total_steps=data_steps)
        self.loader = loader
        longest = getattr(loader, "longest_sequence", cfg.data.seq_len)  # data.decomposition: 2^max bucket
        if longest > cfg.model.max_seq_len:
            raise ValueError(f"data.decomposition: rows of {longest} tokens exceed model.max_seq_len ({cfg.model.max_seq_len})")
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", ctx, cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save,
            mirror=cfg.checkpoint.mirror, mirror_keep_last=cfg.checkpoint.mirror_keep_last,
        )
        self.stop = StopRequest().install()
        self.guard = StepGuard.from_config(cfg.optim)
        self._token_bytes: dict = {}  # tokenizer path -> bytes per token id (run_eval)
        self.step, self.tokens_seen = 0, 0
        self.resumed_from: dict | None = None  # where this process picked the run up (a metrics event)
        spec = get_spec(cfg.model.family)
        self.flops_per_token_at = functools.lru_cache(maxsize=32)(
            lambda row_len: spec.flops_per_token(cfg.model, row_len)
        )  # by row length: data.decomposition changes it from step to step
        self.peak_flops = device_peak_flops(ctx.device, cfg.logging.peak_flops)
        resumed = resume and self._resume()
        if cfg.continual.active and not resumed:  # the run's own checkpoints win over its source
            start_continual_run(self)
        seed_everything(cfg.train.seed + 1_000_003 * self.step + ctx.rank)

    # -- state -------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            "tokens_seen": self.tokens_seen,
            "schedule": self.schedule.state_dict(),
            "loader": self.loader.state_dict(),
            "step_guard": self.guard.state_dict(),
            "world_size": self.ctx.world_size,
        }

    def _resume(self) -> bool:
        found = self.checkpointer.load_latest(self.model, self.optimizer)  # skips broken ones, says so
        if found is None:
            if self.ctx.is_main:
                start = "the continual source" if self.cfg.continual.active else "step 0"
                print(f"no checkpoint under {self.run_dir / 'checkpoints'}: starting from {start}", flush=True)
            return False
        path, state = found
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.schedule.load_state_dict(state["schedule"])
        self.loader.load_state_dict(state["loader"])
        if "step_guard" in state:  # checkpoints before the guard have none: start it fresh
            self.guard.load_state_dict(state["step_guard"])
        self.resumed_from = {"checkpoint": str(path), "world_size": self.ctx.world_size, "saved_world_size": state.get("world_size")}
        if self.ctx.is_main:
            print(f"resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens seen)", flush=True)
        return True

    def save(self, blocking: bool | None = None) -> Path:
        """Checkpoints this step; async (committed when written) if configured, unless `blocking`."""
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.trainer_state(), blocking=blocking)

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> tuple[float, float, int]:
        """Forward/backward over this rank's micro-batches, then the optimizer step unless the
        step guard skips it; returns (loss, grad_norm, tokens)."""
        device = self.ctx.device
        shards = [self.context_parallel(mb, device) for mb in micro_batches] if self.context_parallel else None
        row_position_ids = [mb.get("position_ids") for mb in micro_batches]  # the pipeline's stages shard themselves
        if shards:  # context parallel: this rank's part of every row
            micro_batches = [{key: shard.take(mb.get(key)) for key in ("input_ids", "labels", "position_ids")}
                             for mb, shard in zip(micro_batches, shards, strict=True)]  # fmt: skip
        local_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
        global_tokens = all_reduce_sum(local_tokens, self.ctx) / (self.dims.tp * self.dims.pp)  # TP ranks and PP stages share a batch
        # FSDP averages gradients over its ranks; scale so the result is the global token mean.
        scale = self.dims.fsdp_size / max(global_tokens, 1)
        z_coef = self.cfg.model.z_loss
        loss_sum = 0.0
        if self.pipeline is not None:  # only the last stage's ranks compute (and sum) the loss
            documents = not self.cfg.data.cross_document_attention
            loss_sum = self.pipeline.step(micro_batches, scale, z_coef, documents, self.autocast, row_position_ids)
            micro_batches = []  # consumed by the schedule
        for i, mb in enumerate(micro_batches):
            set_microbatch_grad_sync(self.model, i == len(micro_batches) - 1, self.cfg.parallel.accumulate_unsharded_grads)
            input_ids = mb["input_ids"].to(device, non_blocking=True)
            labels = mb["labels"].to(device, non_blocking=True)
            position_ids = mb.get("position_ids") if not self.cfg.data.cross_document_attention else None
            position_ids = position_ids.to(device, non_blocking=True) if position_ids is not None else None
            with torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None):
                if shards:
                    logits = self.model(input_ids, position_ids, shard=shards[i])
                else:
                    logits = self.model(input_ids, position_ids)
            with loss_context(logits):  # loss parallel: vocab-sharded logits into the loss
                loss, nll = token_loss(logits, labels, z_coef)
                (loss * scale).backward()
            loss_sum += (nll.full_tensor() if hasattr(nll, "full_tensor") else nll).item()
        counted_elsewhere = self.pipeline.counted_elsewhere if self.pipeline is not None else []  # a tied copy
        if self.cfg.optim.grad_clip > 0:
            grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip, self.pp_group, counted_elsewhere)
        else:
            grad_norm = total_grad_norm(self.model.parameters(), self.pp_group, counted_elsewhere)
        grad_norm = float(grad_norm)
        loss = all_reduce_sum(loss_sum, self.ctx) / self.dims.tp / max(global_tokens, 1)
        verdict = self.guard.check(self.step + 1, loss, grad_norm)  # global values: every rank agrees
        if verdict.apply:
            lr = self.schedule(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            precompute_float8_scales(self.model, self.cfg.parallel.float8)  # FSDP2 float8 all-gather only
        elif self.ctx.is_main:
            print(f"step {self.step + 1} skipped: {verdict.reason}", flush=True)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, int(global_tokens)

    # -- eval --------------------------------------------------------------------------------
    def run_eval(self) -> dict | None:
        """val_loss/val_tokens/val_bpb on data.val_path, the same keys + /NAME for data.val_sets;
        task_acc/NAME and task_acc_norm/NAME for train.eval_tasks (engine.downstream)."""
        sets = val_sets(self.cfg)
        if not sets and not self.eval_tasks:
            return None
        result = {}
        for suffix, path in sets:
            result.update({f"{key}{suffix}": value for key, value in self._evaluate_set(path).items()})
        result.update(task_metrics(
            self.model, self.eval_tasks, self.ctx.device, self.autocast, self.cfg.data.micro_batch_size * self.cfg.data.seq_len,
            rank=self.dp_rank, world_size=self.dp_size, reduce=lambda v: all_reduce_sum(v, self.ctx) / self.dims.batch_sharers,
        ))  # fmt: skip
        return result

    def _evaluate_set(self, path: str) -> dict:
        from data_pipeline.formats import open_shardset

        shardset = open_shardset(path)
        tokenizer = shardset.tokenizer_path or find_tokenizer(self.cfg)
        if tokenizer not in self._token_bytes:  # bytes per token id, for bits per byte
            self._token_bytes[tokenizer] = token_byte_lengths(tokenizer) if tokenizer else None
        return evaluate_shardset(
            self.model,
            shardset,
            self.cfg.data.seq_len,
            self.cfg.data.micro_batch_size * self.dp_size,
            self.ctx.device,
            self.autocast,
            self._token_bytes[tokenizer],
            max_batches=self.cfg.train.eval_batches,
            cross_document_attention=self.cfg.data.cross_document_attention,
            rank=self.dp_rank,
            world_size=self.dp_size,
            reduce=lambda v: all_reduce_sum(v, self.ctx) / self.dims.tp,  # CP ranks score apart
            shard_for=self.context_parallel,
        )

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        sink = MetricsSink(self.run_dir, cfg.logging.tensorboard, self._wandb_options()) if ctx.is_main else None
        progress = ProgressLine(cfg.train.steps, self.step, cfg.logging.progress and ctx.is_main)
        profiler = StepProfiler.from_config(cfg, self.run_dir, ctx.rank, ctx.device)
        watchdog = HangWatchdog(cfg.train.hang_timeout_s, self.run_dir, ctx.rank)
        if sink and self.resumed_from:
            sink.event(self.step, "resume", **self.resumed_from)
        window_tokens, window_time, window_data, window_loss, window_steps, window_flops = 0, 0.0, 0.0, 0.0, 0, 0.0
        loss, val, exit_code = None, None, 0
        run_start, run_tokens = time.perf_counter(), 0
        try:
            while self.step < cfg.train.steps:
                watchdog.progress(f"step {self.step + 1}")
                if profiler:
                    profiler.before(self.step)
                t0 = time.perf_counter()
                micro_batches = self.loader.next_step()
                t1 = time.perf_counter()
                try:
                    loss, grad_norm, tokens = self.train_step(micro_batches)
                except TrainingDiverged as err:
                    if ctx.is_main:
                        print(f"training diverged: {err}", flush=True)
                    exit_code = DIVERGED_EXIT_CODE
                    break
                window_flops += tokens * self.flops_per_token_at(micro_batches[0]["input_ids"].shape[1])
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                lr = self.schedule(self.step)
                self.step += 1
                if profiler:
                    profiler.after(self.step)
                self.tokens_seen += tokens
                run_tokens += tokens
                window_tokens += tokens
                if math.isfinite(loss):  # a skipped non-finite step is counted in skipped_steps instead
                    window_loss += loss
                    window_steps += 1
                window_time += t2 - t0
                window_data += t1 - t0
                record = None
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.steps:
                    tokens_per_s = window_tokens / max(window_time, 1e-9)
                    record = {
                        "step": self.step,
                        "loss": window_loss / window_steps if window_steps else math.nan,  # mean since the last record
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_seen": self.tokens_seen,
                        "tokens_per_s": tokens_per_s,
                        "tokens_per_s_per_device": tokens_per_s / ctx.world_size,
                        "data_wait_frac": window_data / max(window_time, 1e-9),
                        "skipped_steps": self.guard.skipped_total,
                        "step_time_s": window_time / max(cfg.logging.log_every, 1),
                        "mfu": (window_flops / max(window_time, 1e-9) / ctx.world_size / self.peak_flops)
                        if self.peak_flops
                        else None,
                    }
                    if hasattr(self.loader, "step_metrics"):  # mixture weights, curriculum length
                        record.update(self.loader.step_metrics())
                    if ctx.device.type == "cuda":
                        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                    window_tokens, window_time, window_data, window_loss, window_steps, window_flops = 0, 0.0, 0.0, 0.0, 0, 0.0
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                    watchdog.progress(f"the eval at step {self.step}")
                    val = self.run_eval()
                    if val:
                        record = {**(record or {"step": self.step, "loss": loss, "lr": lr}), **val}  # no window: no tokens/s
                if record is not None:
                    if sink:
                        sink.write(record)
                    progress.update(self.step - 1, record)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                    watchdog.progress(f"the checkpoint of step {self.step}")
                    self._checkpoint(self.save, sink)
                self._checkpoint(self.checkpointer.poll, sink)  # commits a finished async save
                if self.checkpointer.failed_in_a_row >= cfg.checkpoint.max_failed_saves:
                    if ctx.is_main:
                        print(f"stopping at step {self.step}: {self.checkpointer.failed_in_a_row} checkpoint saves in a row failed "
                              f"(checkpoint.max_failed_saves); exit {CHECKPOINT_FAILED_EXIT_CODE}", flush=True)  # fmt: skip
                    exit_code = CHECKPOINT_FAILED_EXIT_CODE
                    break
                if self._stop_agreed():
                    saved = self._checkpoint(lambda: self.save(blocking=True), sink)
                    self._checkpoint(self.checkpointer.wait, sink)  # its mirror upload (across nodes: its marker) ends first
                    if ctx.is_main:
                        done = f"checkpointed step {self.step}" if saved else "its checkpoint failed (a resume takes the last good one)"
                        print(f"stop requested ({self.stop.signal_name}): {done}; exiting {REQUEUE_EXIT_CODE} for requeue", flush=True)
                    exit_code = REQUEUE_EXIT_CODE
                    break
            if exit_code == 0:
                watchdog.progress("the final eval and checkpoint")
                val = self.run_eval()
                if val and sink:
                    sink.write({"step": self.step, **val})
                saved = not cfg.checkpoint.save_final or self._checkpoint(lambda: self.save(blocking=True), sink)
                if not (self._checkpoint(self.checkpointer.wait, sink) and saved):  # wait commits a pending async save
                    exit_code = CHECKPOINT_FAILED_EXIT_CODE
        finally:
            watchdog.close()
            if profiler:
                profiler.close()
            self.loader.close()
            if sink:
                sink.close()
                with _reported_if_failing("report.png"):  # `strata report` draws the same
                    plot_runs([load_run(self.run_dir)], self.run_dir / "report.png")
        elapsed = time.perf_counter() - run_start
        result = TrainResult(exit_code, self.step, self.tokens_seen, loss, val, run_tokens / max(elapsed, 1e-9))
        if ctx.is_main:
            with _reported_if_failing("summary.json"):
                write_json_atomic(self.run_dir / "summary.json", result.__dict__)
            print(closing_line(result.__dict__, self.run_dir), flush=True)
        return result

    def _checkpoint(self, action: Callable[[], object], sink: MetricsSink | None) -> bool:
        """Runs a save, poll or wait of the checkpointer: False when a save failed, which is
        reported (stdout and a `checkpoint_failed` event in metrics.jsonl), not raised."""
        try:
            action()
            return True
        except CheckpointSaveError as err:
            if self.ctx.is_main:
                last = latest_checkpoint(self.checkpointer.root, loud=False)
                print(f"error: {err}; its partial files are removed and the last good checkpoint is "
                      f"{last.name if last else 'none'} ({self.checkpointer.failed_in_a_row} failed in a row; the run "
                      f"stops at checkpoint.max_failed_saves={self.cfg.checkpoint.max_failed_saves})", flush=True)  # fmt: skip
            if sink:
                sink.event(self.step, "checkpoint_failed", saving_step=err.step, reason=err.reason)
            return False

    def _wandb_options(self) -> dict | None:
        log = self.cfg.logging
        if not log.wandb_project:
            return None
        config = self.cfg.model_dump(mode="json")
        return {"project": log.wandb_project, "entity": log.wandb_entity, "mode": log.wandb_mode, "config": config}

    def _stop_agreed(self) -> bool:
        return all_reduce_sum(1 if self.stop.requested else 0, self.ctx) > 0
