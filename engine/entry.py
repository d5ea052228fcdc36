"""The one training entry point every launcher calls: config in, process group up, train, exit code.

`run_training` is what `strata train`, the local/Ray/SLURM launchers and torchrun all reach;
it never parses command lines and never starts processes.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.config import ConfigError, StrataConfig, load_config
from engine.dist import init_distributed, shutdown


def resolve_config(config: str | Path | dict | StrataConfig | None, overrides: list[str], resume: str | None) -> StrataConfig:
    """The config of a new run, or of a resumed one (its saved config.yaml + overrides)."""
    if isinstance(config, StrataConfig):
        return load_config(config.model_dump(mode="json"), overrides) if overrides else config
    if config is None:
        if resume is None:
            raise ConfigError("a config file is required (or --resume RUN_DIR)")
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml in that run directory")
        return load_config(saved, [*overrides, f"train.run_dir={resume}"])
    cfg = load_config(config, overrides)
    if resume is not None:
        cfg = load_config(cfg.model_dump(mode="json"), [f"train.run_dir={resume}"])
    return cfg


def check_data_paths(cfg: StrataConfig) -> None:
    """Every ShardSet the run reads holds a manifest: a wrong path stops before any work (not at
    the first eval, steps later), naming the field. A remote (scheme://) set's manifest is fetched."""
    from data_pipeline.manifest import MANIFEST_NAME

    data = cfg.data
    fields = [(f"data.sources.{i}.path", source.path) for i, source in enumerate(data.sources)]
    fields += [("data.val_path", data.val_path)] if data.val_path else []
    fields += [(f"data.val_sets.{name}", path) for name, path in sorted(data.val_sets.items())]
    fields += [("data.decomposition.path", data.decomposition.path)] if data.decomposition else []
    for field, path in fields:
        if "://" in path:  # remote MDS: fetching its manifest (cached for the loader) is the check, on rank 0
            if os.environ.get("RANK", "0") != "0":
                continue
            from data_pipeline.formats import open_shardset

            try:
                open_shardset(path, data.cache_dir)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"{field}: {err}") from None
        elif not (Path(path) / MANIFEST_NAME).is_file():
            what = "no such directory" if not Path(path).exists() else f"not a ShardSet (no {MANIFEST_NAME})"
            raise ConfigError(f"{field}: {what}: {path}")


def check_new_run_dir(run_dir: str | Path) -> None:
    """A fresh run must not overwrite another: a run directory that holds checkpoints is refused
    (its config.yaml, metrics and checkpoints would be replaced); `--resume` continues it."""
    from engine.checkpoint import list_checkpoints

    found = list_checkpoints(Path(run_dir) / "checkpoints")
    if found:
        raise ConfigError(
            f"train.run_dir: {run_dir} already holds a run (checkpoints up to {found[0].name}); "
            f"continue it with `strata train --resume {run_dir}`, or pick a new train.run_dir"
        )


def run_training(
    config: str | Path | dict | StrataConfig | None,
    overrides: list[str] | None = None,
    resume: str | None = None,
):
    """Trains and returns the TrainResult (its `exit_code` is what a launcher should exit with)."""
    from engine.trainer import Trainer

    cfg = resolve_config(config, overrides or [], resume)
    check_data_paths(cfg)
    ctx = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, ctx, resume=resume is not None).fit()
    finally:
        shutdown()
