"""Step Law defaults (METHODS.md §8): the learning rate and batch size for a model and token budget.

Owns the formula, the non-embedding parameter count it needs, and the resolution of
`optim.lr: auto` / `data.tokens_per_step: auto` (or `data.global_batch_size: auto`) in a raw
config tree. It does not validate the rest of the config (engine/config.py does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from models.config import ModelConfig

STEP_LAW_LR_COEF, STEP_LAW_LR_N_EXP, STEP_LAW_LR_D_EXP = 1.79, -0.713, 0.307
STEP_LAW_BATCH_COEF, STEP_LAW_BATCH_D_EXP = 0.58, 0.571
AUTO = "auto"


def step_law(n_params_non_embedding: float, n_tokens: float) -> tuple[float, float]:
    """(lr_opt, batch_opt in tokens) = (1.79 N^-0.713 D^0.307, 0.58 D^0.571) (Li et al. 2025)."""
    if n_params_non_embedding <= 0:
        raise ValueError(
            f"params: non-embedding parameter count must be > 0, got {n_params_non_embedding}"
        )
    if n_tokens <= 0:
        raise ValueError(f"tokens: training token count must be > 0, got {n_tokens}")
    lr = STEP_LAW_LR_COEF * n_params_non_embedding**STEP_LAW_LR_N_EXP * n_tokens**STEP_LAW_LR_D_EXP
    batch_tokens = STEP_LAW_BATCH_COEF * n_tokens**STEP_LAW_BATCH_D_EXP
    return lr, batch_tokens


def step_law_tokens_for_steps(steps: int) -> float:
    """D such that D = steps * B_opt(D): the budget when the batch is chosen by Step Law too.

    D = steps * 0.58 D^0.571  =>  D = (0.58 steps)^(1 / (1 - 0.571)).
    """
    if steps <= 0:
        raise ValueError(f"train.steps: must be > 0, got {steps}")
    return (STEP_LAW_BATCH_COEF * steps) ** (1.0 / (1.0 - STEP_LAW_BATCH_D_EXP))


def non_embedding_params(model_cfg: ModelConfig) -> int:
    """Parameters outside the token embedding and the output head (Step Law's N).

    Builds the model on the meta device (no memory), then drops every nn.Embedding and any
    top-level Linear producing vocab_size logits.
    """
    from models.spec import get_spec

    with torch.device("meta"):
        model = get_spec(model_cfg.family).build(model_cfg)
    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            excluded.update(id(p) for p in module.parameters())
    for child in model.children():
        if isinstance(child, nn.Linear) and child.out_features == model_cfg.vocab_size:
            excluded.update(id(p) for p in child.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)


@dataclass(frozen=True)
class AutoHparams:
    """What `resolve_auto_hparams` decided, for the run log."""

    n_params_non_embedding: int
    n_tokens: int
    lr: float | None  # None: the config's lr was not auto
    global_batch_size: int | None  # None: the config's batch was not auto
    notes: tuple[str, ...]


def _get(tree: dict, section: str, key: str, default: Any) -> Any:
    node = tree.get(section) or {}
    if not isinstance(node, dict):
        raise ValueError(f"{section}: must be a mapping")
    return node.get(key, default)


def resolve_auto_hparams(tree: dict[str, Any]) -> tuple[dict[str, Any], AutoHparams | None]:
    """Replaces Step-Law `auto` values in a raw config tree (before validation).

    Signature: `resolve_auto_hparams(tree) -> (new_tree, info)`; `tree` is the parsed YAML with
    overrides applied; `info` is None when nothing was `auto` (the tree is returned unchanged).
    Call it from config loading before `StrataConfig.model_validate`. Recognized:
    - `optim.lr: auto` -> Step Law lr for N = non-embedding params of `model`, D = training tokens.
    - `data.tokens_per_step: auto` or `data.global_batch_size: auto` -> Step Law batch, rounded to
      whole sequences of `data.seq_len` and to a multiple of `data.micro_batch_size`; written as
      `data.global_batch_size` (and `data.tokens_per_step` is dropped, unless DataConfig has a
      field of that name, which then receives the token count).
    D = train.steps * tokens per step; with the batch auto too, D solves D = steps * B_opt(D).
    Raises ValueError naming the field when a value it needs is invalid.
    """
    from data_pipeline.config import DataConfig

    data = dict(tree.get("data") or {})
    lr_auto = _get(tree, "optim", "lr", None) == AUTO
    batch_key = next(
        (k for k in ("tokens_per_step", "global_batch_size") if data.get(k) == AUTO), None
    )
    if not lr_auto and batch_key is None:
        return tree, None

    try:
        model_cfg = ModelConfig.model_validate(tree.get("model") or {})
    except Exception as err:  # pydantic error; re-raised with the section named
        raise ValueError(f"model: {err}") from None
    defaults = DataConfig.model_fields
    seq_len = int(data.get("seq_len", defaults["seq_len"].default))
    micro = int(data.get("micro_batch_size", defaults["micro_batch_size"].default))
    steps = int(_get(tree, "train", "steps", 100))
    n_params = non_embedding_params(model_cfg)
    notes: list[str] = []

    global_batch: int | None = None  # stays None when the batch is not auto
    if batch_key is not None:
        batch_tokens = step_law_tokens_for_steps(steps) / steps
        sequences = max(micro, micro * round(batch_tokens / seq_len / micro))
        global_batch = sequences
        notes.append(
            f"data.{batch_key}: auto -> {sequences} sequences x {seq_len} = {sequences * seq_len} tokens/step "
            f"(Step Law B_opt = {batch_tokens:.4g} tokens)"
        )
        data.pop("tokens_per_step", None)
        data["global_batch_size"] = sequences
        if "tokens_per_step" in defaults:
            data["tokens_per_step"] = sequences * seq_len
    batch_sequences = global_batch or int(
        data.get("global_batch_size", defaults["global_batch_size"].default)
    )
    n_tokens = steps * batch_sequences * seq_len

    lr: float | None = None
    if lr_auto:
        lr, _ = step_law(n_params, n_tokens)
        notes.append(
            f"optim.lr: auto -> {lr:.4g} (Step Law, N = {n_params:,} non-embedding params, D = {n_tokens:,} tokens)"
        )

    new_tree = dict(tree)
    new_tree["data"] = data
    if lr is not None:
        new_tree["optim"] = {**(tree.get("optim") or {}), "lr": lr}
    return new_tree, AutoHparams(n_params, n_tokens, lr, global_batch, tuple(notes))


def parse_count(text: str) -> float:
    """'1e9', '400M', '1.5B', '2T', '10k' -> float (for the CLI)."""
    text = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(text[-1:].lower())
    try:
        value = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a count (e.g. 1e9, 400M, 1.5B, 2T)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r}: must be a positive finite count")
    return value
