"""Model-family specs: one registered object bundling what the engine needs of a family.

A family registers its model class, FLOPs-per-token function, tensor-parallel plan and HF
state-dict converter under a name; the engine looks families up by `model.family`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from models.config import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[ModelConfig], nn.Module]
    """Constructs the model (call under `torch.device('meta')` then `materialize`)."""
    flops_per_token: Callable[[ModelConfig, int], float]
    """Training FLOPs (fwd + bwd) per token at a given sequence length, attention included."""
    parallelize_tp: Callable[..., None] | None = None
    """`parallelize_tp(model, tp_mesh, **options)`: applies the family's tensor-parallel plan over
    a 1-D TP DeviceMesh; options are `sequence_parallel` / `loss_parallel` (a family that cannot
    honour one raises ValueError naming the field)."""
    hf_adapter: str | None = None
    """Dotted module path of the HF converter (imported lazily by `load_hf_adapter`), a module
    with `hf_config(cfg)`, `to_hf(state_dict)`, `from_hf(state_dict)`, `model_config_from_hf(d)`."""
    hf_model_types: tuple[str, ...] = ()
    """The HF `config.json` `model_type` values this family's converter reads."""
    cp_layout: str = "zigzag"
    """How context parallelism splits a row over ranks (models.context_parallel): `zigzag`
    balances causal softmax attention; `contiguous` lets a recurrent state pass rank to rank."""

    def load_hf_adapter(self) -> Any:
        if self.hf_adapter is None:
            raise NotImplementedError(f"model family {self.name!r} has no Hugging Face converter")
        return importlib.import_module(self.hf_adapter)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(family: str) -> ModelSpec:
    _import_families()
    if family not in _REGISTRY:
        raise KeyError(f"model.family: unknown family {family!r} (known: {sorted(_REGISTRY)})")
    return _REGISTRY[family]


def spec_for_hf_model_type(model_type: Any) -> ModelSpec:
    """The family whose HF converter reads `model_type` (from an HF directory's config.json)."""
    _import_families()
    for spec in _REGISTRY.values():
        if model_type in spec.hf_model_types:
            return spec
    known = sorted(t for spec in _REGISTRY.values() for t in spec.hf_model_types)
    raise ValueError(f"model_type: {model_type!r} is not supported (supported: {', '.join(known)})")


def _import_families() -> None:
    # Importing a family module registers it.
    import models.llama  # noqa: F401

    try:
        import models.gla  # noqa: F401
    except ModuleNotFoundError as err:  # the GLA family may be absent in a partial install
        if err.name != "models.gla":
            raise
