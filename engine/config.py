"""The typed config tree (YAML in, `--set a.b=c` overrides) and its loading.

Sections mirror the packages: `model` (models.config), `data` (data_pipeline.config),
`schedule` (engine.schedules); the training-side sections live here. A bad config raises
`ConfigError` naming the field path; the CLI turns it into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from data_pipeline.config import DataConfig, check_metric_names
from engine.continual import ContinualConfig
from engine.errors import ConfigError  # re-exported: `from engine.config import ConfigError` works
from engine.schedules import ScheduleConfig, build_schedule
from models.config import ModelConfig

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class OptimConfig(BaseModel):
    model_config = STRICT

    lr: float = Field(3e-3, gt=0, description="peak learning rate; 'auto' in YAML = Step Law (METHODS §8)")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    fused: bool | None = Field(None, description="fused AdamW kernel; None = when the device supports it")
    # engine/step_guard.py: a step with a non-finite loss or grad norm is always skipped
    skip_spike_sigma: float = Field(
        0.0, ge=0, description="also skip a step whose loss or grad norm > mean + sigma * std of the last skip_window applied steps; 0 = off (OLMo-core: 6)"
    )
    skip_window: int = Field(128, ge=2, description="applied steps the spike rule looks back over")
    max_skipped_in_a_row: int = Field(
        8, gt=0, description="end the run (exit 3, no checkpoint of the bad state) after this many skipped steps in a row"
    )


class EvalTaskConfig(BaseModel):
    """A train.eval_tasks value written as a mapping: the task file scored k-shot (engine.downstream)."""

    model_config = STRICT

    path: str = Field(description="JSONL task file")
    num_fewshot: int = Field(0, ge=0, description="solved examples before each item, as lm-evaluation-harness")
    fewshot_from: str | None = Field(
        None, description="JSONL file of the same format the examples are drawn from; None = the task file (never the item itself)"
    )
    seed: int = Field(1234, description="few-shot sampling seed (lm-evaluation-harness's default 1234)")


def as_eval_task(value: str | EvalTaskConfig) -> EvalTaskConfig:
    """A train.eval_tasks value as a mapping: a plain path is the file scored 0-shot."""
    return EvalTaskConfig(path=value) if isinstance(value, str) else value


class TrainConfig(BaseModel):
    model_config = STRICT

    steps: int = Field(100, gt=0, description="optimizer steps in the run")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    eval_every: int = Field(0, ge=0, description="steps between evals on data.val_path; 0 = only at the end")
    eval_batches: int = Field(0, ge=0, description="val batches per eval; 0 = the whole val set")
    run_dir: str = Field("runs/default", description="output directory of the run")
    num_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0 = all cores")
    deterministic: bool = Field(False, description="torch deterministic algorithms (CPU tests)")
    hang_timeout_s: float = Field(
        0, ge=0, description="a rank with no step, eval or checkpoint finishing for this long dumps its stacks to "
        "RUN_DIR/hangs/ and exits 124 (Ray restarts the run); longer than the slowest step, eval or save; 0 = off",
    )
    eval_tasks: dict[str, str | EvalTaskConfig] = Field(
        default_factory=dict,
        description="multiple-choice tasks scored at every eval, NAME: JSONL file (0-shot) or NAME: {path, "
        "num_fewshot, fewshot_from, seed} (engine.downstream), logged as task_acc/NAME and task_acc_norm/NAME",
    )

    @field_validator("eval_tasks", mode="wrap")
    @classmethod
    def _eval_tasks(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> dict[str, str | EvalTaskConfig]:
        """A mapping value is validated as EvalTaskConfig on its own, so an error names
        `train.eval_tasks.NAME.FIELD` (not the union member pydantic tried)."""
        if isinstance(value, dict):
            value = {name: _eval_task_value(name, spec) for name, spec in value.items()}
        return check_metric_names(handler(value), "task")


def _eval_task_value(name: str, spec: Any) -> str | EvalTaskConfig:
    if isinstance(spec, (str, EvalTaskConfig)):
        return spec
    if not isinstance(spec, dict):
        raise ValidationError.from_exception_data("EvalTaskConfig", [{
            "type": PydanticCustomError("eval_task", "expected a task file path or a mapping {path, num_fewshot, fewshot_from, seed}"),
            "loc": (name,), "input": spec,
        }])  # fmt: skip
    try:
        return EvalTaskConfig.model_validate(spec)
    except ValidationError as err:
        raise ValidationError.from_exception_data("EvalTaskConfig", [
            {"type": e["type"], "loc": (name, *e["loc"]), "input": e["input"], **({"ctx": e["ctx"]} if "ctx" in e else {})}
            for e in err.errors()
        ]) from None


class Float8Config(BaseModel):
    """Float8 training with torchao (engine.float8): Linear layers compute in float8 on H100-class GPUs."""

    model_config = STRICT

    enabled: bool = Field(False, description="float8 matmuls in the Linear layers (NVIDIA compute capability >= 8.9)")
    recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise", description="torchao scaling recipe: one scale per tensor (fastest), or per row (more accurate)"
    )
    fsdp_float8_all_gather: bool = Field(
        False, description="FSDP2 all-gathers the weights in float8 (half the bytes of bf16); tensorwise only"
    )
    skip: list[str] = Field(
        default_factory=lambda: ["output"],
        description="module names (globs, e.g. layers.*.feed_forward.w2) kept in high precision; "
        "Linears whose in/out features are not multiples of 16 are always kept",
    )
    emulate: bool = Field(False, description="torchao's emulation (plain matmuls): runs anywhere, for CPU tests only")

    @model_validator(mode="after")
    def _check(self) -> Float8Config:
        if self.fsdp_float8_all_gather and self.recipe != "tensorwise":
            raise ValueError(
                f"fsdp_float8_all_gather needs recipe: tensorwise (float8 all-gather uses one scale per "
                f"weight), not {self.recipe}"
            )
        return self


class ParallelConfig(BaseModel):
    model_config = STRICT

    dp_replicate: int = Field(1, gt=0, description="HSDP replicas (pure data parallel groups)")
    dp_shard: int = Field(-1, description="FSDP2 shard degree; -1 = the rest of the world size")
    tp: int = Field(1, gt=0, description="tensor-parallel degree")
    cp: int = Field(
        1, gt=0, description="context-parallel degree: each row's tokens split over cp ranks (long sequences)"
    )
    pp: int = Field(
        1, gt=0, description="pipeline-parallel degree: the layers split into stages over pp ranks (engine.pipeline)"
    )
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = Field(
        "1f1b", description="pipeline schedule; interleaved_1f1b runs pp_stages_per_rank stages on each rank"
    )
    pp_microbatches: int | None = Field(
        None, gt=0, description="pipeline micro-batches per step and rank; None = the rank's rows / data.micro_batch_size"
    )
    pp_stages_per_rank: int | None = Field(
        None, gt=1, description="interleaved_1f1b: stages (model chunks) per rank; None = 2"
    )
    sequence_parallel: bool = Field(False, description="TP: shard norms/residual along the sequence")
    loss_parallel: bool = Field(False, description="TP: keep the vocab sharded through the loss")
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    ac_every: int = Field(2, gt=0, description="selective AC: checkpoint every k-th block")
    ac_selective: Literal["block", "op"] = Field(
        "block", description="selective AC granularity: every ac_every-th block, or op-level (save matmul outputs, recompute the rest)"
    )
    compile: bool = Field(False, description="torch.compile each block")
    accumulate_unsharded_grads: bool = Field(
        False,
        description="gradient accumulation under FSDP2: reduce-scatter once, after the last micro-batch "
        "(full-size gradients held between micro-batches: less communication, more memory); "
        "HSDP's cross-replica all-reduce always waits for the last micro-batch",
    )
    float8: Float8Config = Field(default_factory=Float8Config)

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError("dp_shard must be a positive degree or -1 (the rest of the world)")
        if self.pp_stages_per_rank is not None and self.pp_schedule != "interleaved_1f1b":
            raise ValueError(f"pp_stages_per_rank needs pp_schedule interleaved_1f1b ({self.pp_schedule} runs one stage per rank)")
        return self


class CheckpointConfig(BaseModel):
    model_config = STRICT

    every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(3, gt=0)
    async_save: bool = False
    save_final: bool = True
    max_failed_saves: int = Field(3, gt=0, description="saves that may fail in a row (a full disk, say) before the run stops with "
                                  "exit 74; a failed save is reported, its partial files removed, and training goes on")
    mirror: str | None = Field(None, description="also upload each checkpoint here (s3://bucket/prefix, gs://, oci://, azure://, or a path), "
                               "in the background; `--resume` with no local checkpoint fetches the newest intact one from here")
    mirror_keep_last: int | None = Field(None, gt=0, description="complete checkpoints kept in the mirror; None = keep_last")


class LoggingConfig(BaseModel):
    model_config = STRICT

    log_every: int = Field(10, gt=0, description="steps between metric records")
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float | None = Field(None, gt=0, description="device peak FLOP/s for MFU; None = known table")
    wandb_project: str | None = Field(None, description="also log to Weights & Biases under this project (pip install wandb); None = off")
    wandb_entity: str | None = Field(None, description="W&B team or user; None = the logged-in account's default")
    wandb_mode: Literal["online", "offline"] = Field("online", description="offline: RUN_DIR/wandb only, for a later `wandb sync`")
    profile_at: int = Field(0, ge=0, description="first step traced by torch.profiler (RUN_DIR/profile/); 0 = off")
    profile_steps: int = Field(3, gt=0, description="steps in the profiler trace")
    memory_snapshot: bool = Field(False, description="CUDA: also dump an allocator snapshot (pytorch.org/memory_viz) of the traced steps")

    @field_validator("wandb_project")
    @classmethod
    def _wandb_installed(cls, value: str | None) -> str | None:
        import importlib.util

        if value is not None and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb is not installed: pip install wandb (or strata[wandb])")
        return value


class LaunchConfig(BaseModel):
    model_config = STRICT

    launcher: Literal["local", "ray", "slurm"] = "local"
    nproc: int = Field(1, gt=0, description="processes per node (local / ray workers per node)")


class StrataConfig(BaseModel):
    model_config = STRICT

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)

    @model_validator(mode="after")
    def _check_cross_section(self) -> StrataConfig:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        return self

    @model_validator(mode="after")
    def _check_schedule_fits(self, info: ValidationInfo) -> StrataConfig:
        """A schedule that cannot run (say schedule.warmup_steps > train.steps) fails at load,
        naming schedule.<field>, not when the ranks start: it is built over the steps that
        engine.continual.run_schedule will build it over.

        Not checked where this config does not fix the schedule yet: a continual run before
        resolve_continual pins its start step (which then builds the schedule itself, after the
        assignment that re-runs this validator: info.field_name), schedule=continue (the source's
        schedule runs), a start step at or past train.steps (run_schedule names train.steps). A
        rewarm from the "current" LR with none pinned gets optim.lr as a stand-in: boundaries do
        not depend on it (`strata resume` loads such configs before the LR is known).
        """
        policy = self.continual
        if info.field_name is not None or policy.source_schedule is not None:
            return self
        if policy.active and not policy.resolved:
            return self
        start = policy.start_step or 0
        if self.train.steps <= start:
            return self
        current_lr = self.optim.lr if policy.current_lr is None else policy.current_lr
        build_schedule(self.schedule, self.optim.lr, self.train.steps - start, start_step=start, current_lr=current_lr)
        return self


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    # a whole-config check (no loc) names its fields itself, e.g. "schedule.warmup_steps: ..."
    return f"{path}: {message}{more}" if path else f"{message}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a','b'], c) with c parsed as a YAML scalar (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Sets each `a.b=c` in `tree`; a number indexes a list (`data.sources.0.path=DIR`)."""
    for text in overrides:
        path, value = parse_override(text)
        node: dict | list = tree
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                key: str | int = _list_index(node, part, path[:depth])
            else:
                key = part
                if not last:
                    node.setdefault(part, {})
            if last:
                node[key] = value  # type: ignore[index]
            elif not isinstance(node[key], (dict, list)):  # type: ignore[index]
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            else:
                node = node[key]  # type: ignore[index]
    return tree


def _list_index(items: list, part: str, parents: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"{'.'.join(parents)}: {part!r} is not an index of this list of {len(items)} "
                          f"(use 0..{len(items) - 1}, or set the whole list)")
    return int(part)


def config_from_dict(tree: dict) -> StrataConfig:
    try:
        return StrataConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def load_config(source: str | Path | dict | None, overrides: list[str] | None = None) -> StrataConfig:
    """YAML path (or an already-parsed dict) + `a.b=c` overrides -> validated config."""
    tree = {} if source is None else (dict(source) if isinstance(source, dict) else read_yaml(source))
    tree = apply_overrides(_deep_copy(tree), overrides or [])
    from engine.hparams import resolve_auto_hparams  # Step Law for `auto` values (METHODS §8)

    try:
        tree, _ = resolve_auto_hparams(tree)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return config_from_dict(tree)


def _deep_copy(tree: dict | list) -> dict | list:
    """Copies the dicts and lists (overrides write into them), not the leaves."""
    if isinstance(tree, list):
        return [_deep_copy(v) if isinstance(v, (dict, list)) else v for v in tree]
    return {k: _deep_copy(v) if isinstance(v, (dict, list)) else v for k, v in tree.items()}


def dump_config(cfg: StrataConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
