"""Float8 training with torchao: swaps a model's nn.Linear layers for torchao's Float8Linear and
runs FSDP2's per-step float8 scale precompute. Owns the device/recipe checks and which layers
convert; the other parallelisms stay in engine.parallel. Tensor parallelism uses the families'
plain TP plans over Float8Linear (scales reduce over the sharded DTensor weight: the same
numbers as one process); torchao's float8 TP styles (float8 all-gather of activations) are not used.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import NamedTuple

import torch
import torch.nn as nn

from engine.config import ConfigError, Float8Config

# float8 GEMMs (torch._scaled_mm) need sm_89 (Ada) or sm_90 (Hopper) and later
MIN_CAPABILITY = (8, 9)
# the float8 GEMM kernels need both matmul dims divisible by 16
DIM_MULTIPLE = 16


class Float8Plan(NamedTuple):
    """Which Linear layers (by module name) float8 converts and which it keeps in high precision;
    `unmatched`: `skip` patterns that name no Linear layer (a typo, or a tied model's `output`)."""

    converted: list[str]
    skipped: list[str]
    unmatched: list[str] = []


def _import_torchao_float8() -> None:
    """Imports torchao.float8 without torch's once-per-process notice about torchao registering an
    Enum with pytree (printed by every rank, about torchao's internals, nothing a user can act on)."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.float8  # noqa: F401
    finally:
        pytree_log.setLevel(level)


def check_float8_supported(cfg: Float8Config, device: torch.device) -> None:
    """ConfigError naming the field unless torchao is installed and `device` runs float8 GEMMs
    (or `cfg.emulate`)."""
    try:
        _import_torchao_float8()
    except ImportError as err:  # not installed, or built for another torch
        raise ConfigError(f"parallel.float8.enabled: float8 training needs torchao ({err}): pip install 'strata[gpu]'") from None
    if cfg.emulate:
        return
    where = device.type
    if device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if torch.version.cuda and capability >= MIN_CAPABILITY:
            return
        where = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
    raise ConfigError(
        "parallel.float8.enabled: float8 training needs an NVIDIA GPU with compute capability >= 8.9 "
        f"(H100/H200/L40S/RTX 4090), this run is on {where}; set parallel.float8.emulate=true to test on CPU"
    )


def _keeps_high_precision(module: nn.Module, name: str, skip: list[str]) -> bool:
    dims_fit = module.in_features % DIM_MULTIPLE == 0 and module.out_features % DIM_MULTIPLE == 0
    return not dims_fit or any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def float8_plan(model: nn.Module, cfg: Float8Config) -> Float8Plan:
    """Every nn.Linear of `model` by name: converted, or skipped (`cfg.skip` globs, or dims not
    multiples of 16). Needs no torchao and works on a meta-device model (strata doctor)."""
    converted, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (skipped if _keeps_high_precision(module, name, cfg.skip) else converted).append(name)
    linears = converted + skipped
    unmatched = [p for p in cfg.skip if not any(fnmatch.fnmatchcase(name, p) for name in linears)]
    return Float8Plan(converted, skipped, unmatched)


def apply_float8(model: nn.Module, cfg: Float8Config, device: torch.device, fsdp: bool) -> Float8Plan | None:
    """Converts the plan's Linear layers in place (before TP / AC / compile / FSDP wrap them).
    `fsdp`: FSDP2 will shard the model, so `cfg.fsdp_float8_all_gather` takes effect."""
    if not cfg.enabled:
        return None
    check_float8_supported(cfg, device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(cfg.recipe),
        emulate=cfg.emulate,
        enable_fsdp_float8_all_gather=cfg.fsdp_float8_all_gather and fsdp,
    )
    plan = float8_plan(model, cfg)
    keep = set(plan.converted)
    convert_to_float8_training(model, module_filter_fn=lambda _module, name: name in keep, config=config)
    if config.enable_fsdp_float8_all_gather:
        for name in plan.converted:
            model.get_submodule(name).register_state_dict_post_hook(_plain_weight_in_state_dict)
    return plan


def _plain_weight_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    """Checkpoints hold plain tensors: FSDP float8 all-gather wraps each weight in torchao's
    WeightWithDynamicFloat8CastTensor, which DCP would pickle (a checkpoint only torchao could
    read, not a float8-off run nor `strata export`). The plain tensor shares its storage, so a
    DCP load into this state dict still lands in the parameter."""
    from torch.distributed.tensor import DTensor

    key = prefix + "weight"
    weight = state_dict.get(key)
    if isinstance(weight, DTensor) and hasattr(weight._local_tensor, "_tensor"):
        local = weight._local_tensor._tensor
        state_dict[key] = DTensor.from_local(
            local, weight.device_mesh, weight.placements, shape=weight.shape, stride=weight.stride()
        )
    elif weight is not None and hasattr(weight, "_tensor"):
        state_dict[key] = weight._tensor


def precompute_float8_scales(model: nn.Module, cfg: Float8Config) -> None:
    """After optimizer.step(): with FSDP2 float8 all-gather, one all-reduce computes every float8
    weight's scale for the next forward (torchao). A no-op in every other setting.
    (Before the first call, torchao's all-gather reduces the amax over the FSDP mesh only: with
    TP as well, step 1 scales each TP shard on its own; measured on CPU, FSDP2 x TP2 stays within
    5e-4 of one process over 8 steps; from step 2 on the scales are whole-tensor.)"""
    if cfg.enabled and cfg.fsdp_float8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
