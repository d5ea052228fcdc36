"""Hugging Face interop on disk: Strata checkpoint -> HF directory, and HF directory -> Strata weights.

Writes safetensors (sharded with `model.safetensors.index.json` above a size), config.json,
generation_config.json and the run's tokenizer; reads single/sharded safetensors (or
`pytorch_model.bin`, weights only). Parameter renaming is the model family's `hf_adapter`
(models/hf_llama.py, models/gla.py); this module owns only files and checkpoints.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from data_pipeline.manifest import building_dir
from models.config import ModelConfig
from models.spec import get_spec, spec_for_hf_model_type

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # HF's default max_shard_size ("5GB")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_adapter(cfg: ModelConfig) -> Any:
    """The family's HF converter module; a clear error for families without one."""
    spec = get_spec(cfg.family)
    if spec.hf_adapter is None:
        raise ValueError(f"model.family: {cfg.family!r} has no Hugging Face converter")
    return spec.load_hf_adapter()


# --------------------------------------------------------------------------- writing


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Groups tensors in order into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index; returns the file names."""
    shards = _shard(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SAFE_WEIGHTS), metadata=metadata)
        return [SAFE_WEIGHTS]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=metadata)
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    return [*names, SAFE_INDEX]


def _token_ids(tokenizer_path: Path | None) -> dict[str, int]:
    """bos/eos ids of the run's tokenizer (EOS doubles as BOS: Strata appends EOS to documents)."""
    if tokenizer_path is None:
        return {}
    from data_pipeline.tokenizer import find_eos_id, load_tokenizer

    try:
        _, eos = find_eos_id(load_tokenizer(tokenizer_path))
    except ValueError:
        return {}
    return {"bos_token_id": eos, "eos_token_id": eos}


def _write_tokenizer(tokenizer_path: Path, out_dir: Path) -> None:
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    from data_pipeline.tokenizer import find_eos_id, load_tokenizer

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    try:
        eos, _ = find_eos_id(load_tokenizer(tokenizer_path))
        config.update({"eos_token": eos, "bos_token": eos})
    except ValueError:
        pass
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_hf(
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Writes an HF model directory from a Strata state dict, atomically (temp dir + rename).

    `dtype` (float32 / bfloat16 / float16) casts floating tensors; None keeps them as stored.
    An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--hf {out_dir}: directory exists and is not empty (pass --overwrite)"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    adapter = hf_adapter(model_cfg)
    tensors = {}
    for name, tensor in adapter.to_hf(state_dict, model_cfg).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(DTYPES[dtype])
        tensors[name] = tensor.contiguous().clone()  # safetensors refuses shared storage
    stored_dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    tokenizer = Path(tokenizer_path) if tokenizer_path is not None else None

    with building_dir(out_dir) as tmp:
        write_safetensors(tensors, tmp, max_shard_bytes)
        ids = _token_ids(tokenizer)
        config = {
            **adapter.hf_config(model_cfg),
            **ids,
            "torch_dtype": str(stored_dtype).removeprefix("torch."),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({**ids, "do_sample": False}, indent=2)
        )
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
    return out_dir


# --------------------------------------------------------------------------- Strata checkpoints


def load_checkpoint_weights(
    checkpoint: str | Path,
) -> tuple[dict[str, torch.Tensor], ModelConfig, Path]:
    """(model state dict on CPU, ModelConfig, run dir) of a Strata checkpoint, without a process group.

    `checkpoint`: a run directory, its checkpoints/ directory or one step directory
    (engine.checkpoint.resolve_checkpoint picks the newest intact one). The model config is
    the run's `config.yaml` (a step dir lives at RUN/checkpoints/step_N).
    """
    import torch.distributed.checkpoint as dcp

    from engine.checkpoint import resolve_checkpoint
    from engine.config import load_config

    step_dir = resolve_checkpoint(checkpoint)
    run_dir = step_dir.parent.parent
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{step_dir}: no config.yaml in its run directory {run_dir}")
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = get_spec(cfg.model.family).build(cfg.model)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # reading in one process without a process group is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(step_dir))
    return state["model"], cfg.model, run_dir


def find_run_tokenizer(run_dir: Path) -> Path | None:
    """The run's tokenizer.json: in the run directory, else next to its data sources."""
    if (run_dir / "tokenizer.json").is_file():
        return run_dir / "tokenizer.json"
    from engine.config import load_config
    from engine.trainer import find_tokenizer

    return find_tokenizer(load_config(run_dir / "config.yaml"))


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_path: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Strata checkpoint -> HF directory that `transformers.AutoModelForCausalLM` loads."""
    state_dict, model_cfg, run_dir = load_checkpoint_weights(checkpoint)
    tokenizer = tokenizer_path if tokenizer_path is not None else find_run_tokenizer(run_dir)
    return save_hf(
        state_dict,
        model_cfg,
        out_dir,
        tokenizer_path=tokenizer,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )


# --------------------------------------------------------------------------- reading HF


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, sharded safetensors (index), or .bin."""
    hf_dir = Path(hf_dir)
    for index_name, loader in ((SAFE_INDEX, _load_safetensors), (BIN_INDEX, _load_bin)):
        index_path = hf_dir / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            tensors: dict[str, torch.Tensor] = {}
            for file in sorted(set(weight_map.values())):
                tensors.update(loader(hf_dir / file))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise ValueError(
                    f"{index_path}: tensors listed but not found in the shards: {missing[:5]}"
                )
            return tensors
    if (hf_dir / SAFE_WEIGHTS).is_file():
        return _load_safetensors(hf_dir / SAFE_WEIGHTS)
    if (hf_dir / BIN_WEIGHTS).is_file():
        return _load_bin(hf_dir / BIN_WEIGHTS)
    raise FileNotFoundError(
        f"{hf_dir}: no {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"missing weight shard {path}")
    return load_file(str(path), device="cpu")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"missing weight shard {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_checkpoint(
    hf_dir: str | Path, **model_overrides: Any
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(Strata ModelConfig, Strata state dict) of a local HF directory; the family is picked by
    config.json's `model_type` (llama/qwen3 -> llama, gla -> gla)."""
    model_cfg = read_hf_model_config(hf_dir, **model_overrides)
    adapter = hf_adapter(model_cfg)
    return model_cfg, adapter.from_hf(read_hf_weights(hf_dir), read_hf_config(hf_dir))


def read_hf_model_config(hf_dir: str | Path, **model_overrides: Any) -> ModelConfig:
    """The Strata ModelConfig equivalent to an HF directory's config.json, by its `model_type`."""
    hf_cfg = read_hf_config(hf_dir)
    try:
        adapter = spec_for_hf_model_type(hf_cfg.get("model_type")).load_hf_adapter()
        return adapter.model_config_from_hf(hf_cfg, **model_overrides)
    except ValueError as err:
        raise ValueError(f"{Path(hf_dir) / 'config.json'}: {err}") from None


def load_hf_into_model(model: nn.Module, hf_dir: str | Path) -> ModelConfig:
    """Copies an HF directory's weights into a materialized Strata model; returns their ModelConfig.

    Works on a plain model and on one already parallelized (FSDP2 / TP DTensors): every rank
    reads the full tensors and keeps its shard. Strict: every name and (global) shape must
    match; tensors are cast to each parameter's dtype.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    model_cfg, state_dict = load_hf_checkpoint(hf_dir)
    own = get_model_state_dict(model)
    # pipeline stages (engine.pipeline) hold part of the model: the directory must match the whole
    expected = model.whole_model_shapes() if hasattr(model, "whole_model_shapes") else {n: tuple(t.shape) for n, t in own.items()}
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{hf_dir}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state_dict.items():
        if expected[name] != tuple(tensor.shape):
            raise ValueError(
                f"{hf_dir}: {name} has shape {tuple(tensor.shape)}, the model expects {expected[name]}"
            )
    from engine.checkpoint import tied_copies

    state_dict |= {copy: state_dict[source] for copy, source in tied_copies(model).items()}  # a pipeline's last stage
    state_dict = {name: tensor.to(own[name].dtype) for name, tensor in state_dict.items() if name in own}
    set_model_state_dict(
        model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True)
    )
    return model_cfg


def build_model_from_checkpoint(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelConfig, Path]:
    """A Strata model (eval mode) holding a run's or checkpoint's weights, its ModelConfig and
    the run directory (for the run's tokenizer)."""
    state_dict, model_cfg, run_dir = load_checkpoint_weights(checkpoint)
    return _model_holding(state_dict, model_cfg, device), model_cfg, run_dir


def _model_holding(
    state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, device: str | torch.device
) -> nn.Module:
    """The family's model built on `device` with exactly `state_dict`'s weights, in eval mode."""
    with torch.device("meta"):
        model = get_spec(model_cfg.family).build(model_cfg)
    model.to_empty(device=device)
    model.init_weights()  # non-persistent buffers (RoPE tables); parameters are overwritten next
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def build_model_from_hf(
    hf_dir: str | Path, device: str | torch.device = "cpu", **model_overrides: Any
) -> tuple[nn.Module, ModelConfig]:
    """A Strata model (eval mode) holding an HF directory's weights, and its ModelConfig."""
    model_cfg, state_dict = load_hf_checkpoint(hf_dir, **model_overrides)
    return _model_holding(state_dict, model_cfg, device), model_cfg
