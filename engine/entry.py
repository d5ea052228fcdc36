"""The one training entry point every launcher calls: config in, process group up, train, exit code.

`run_training` is what `strata train`, the local/Ray/SLURM launchers and torchrun all reach;
it never parses command lines and never starts processes.
"""

from __future__ import annotations

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


def run_training(
    config: str | Path | dict | StrataConfig | None,
    overrides: list[str] | None = None,
    resume: str | None = None,
):
    """Trains and returns the TrainResult (its `exit_code` is what a launcher should exit with)."""
    from engine.trainer import Trainer

    cfg = resolve_config(config, overrides or [], resume)
    ctx = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, ctx, resume=resume is not None).fit()
    finally:
        shutdown()
