"""Parameter renaming between Strata and Hugging Face state dicts, shared by every family's converter.

A family gives its per-layer and top-level name tables; this module strips wrapper prefixes
(compile, activation checkpointing, FSDP1), maps names both ways, and handles tied lm_heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_STRATA_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def strip_wrappers(name: str) -> str:
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


@dataclass(frozen=True)
class HFNaming:
    label: str  # e.g. "Llama", for error messages
    layer_names: dict[str, str]  # Strata name inside a layer -> HF name inside a layer
    top_names: dict[str, str]  # Strata top-level name -> HF top-level name
    hf_ignored: re.Pattern | None = None  # HF buffers with no Strata counterpart (e.g. inv_freq)
    _layer_from_hf: dict[str, str] = field(init=False)
    _top_from_hf: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_layer_from_hf", {hf: ours for ours, hf in self.layer_names.items()})
        object.__setattr__(self, "_top_from_hf", {hf: ours for ours, hf in self.top_names.items()})

    def to_hf(self, state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for raw_name, tensor in state_dict.items():
            name = strip_wrappers(raw_name)
            if name in self.top_names:
                out[self.top_names[name]] = tensor
                continue
            match = _STRATA_LAYER.match(name)
            if match is None or match.group(2) not in self.layer_names:
                raise KeyError(f"to_hf: no HF name for Strata {self.label} parameter {raw_name!r}")
            out[f"model.layers.{match.group(1)}.{self.layer_names[match.group(2)]}"] = tensor
        if tied:
            out.pop("lm_head.weight", None)
        return out

    def from_hf(self, state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            if self.hf_ignored is not None and self.hf_ignored.search(name):
                continue
            if name in self._top_from_hf:
                if not (name == "lm_head.weight" and tied):
                    out[self._top_from_hf[name]] = tensor
                continue
            match = _HF_LAYER.match(name)
            if match is None or match.group(2) not in self._layer_from_hf:
                raise KeyError(f"from_hf: HF parameter {name!r} has no Strata {self.label} counterpart")
            out[f"layers.{match.group(1)}.{self._layer_from_hf[match.group(2)]}"] = tensor
        return out
