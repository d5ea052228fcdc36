"""Reading run directories back: the one metrics.jsonl reader, a run's summary, the report plot.

Owns how a run's history is reconstructed from metrics.jsonl (torn lines counted, train and
eval records of a step merged, steps re-done after a resume replacing the earlier ones) and
what `strata report` says and draws about it. It writes nothing into a run but the PNG asked
for; the table itself is the CLI's (launch/commands/report.py).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

METRICS_FILE = "metrics.jsonl"
RECORD_START = '{"step": '  # how MetricsSink (json.dumps) begins every line
SPIKE_FACTOR = 5.0  # a logged grad norm above this times the running median is a spike
SPIKE_WINDOW = 50  # the running median looks back over this many logged grad norms
SPIKE_MIN_HISTORY = 5  # and needs at least this many before it judges
EXIT_STATUS = {0: "finished", 75: "stopped for requeue (exit 75)", 3: "diverged (exit 3)",
               74: "stopped: checkpoint saves failing (exit 74)"}


def closing_line(summary: dict[str, Any], run_dir: str | Path) -> str:
    """Where a run stands and where its outputs are, from its summary.json fields (exit_code,
    step, tokens_seen, val): the trainer's last line, and the Ray launcher's."""
    code = summary.get("exit_code")
    state = {0: "finished", 75: "stopped for a requeue", 3: "diverged", 74: "stopped: checkpoints failing"}.get(code, f"ended with exit code {code}")
    val = summary.get("val") or {}
    scores = f", val loss {val['val_loss']:.4f}" if "val_loss" in val else ""
    scores += f" ({val['val_bpb']:.3f} bits/byte)" if "val_bpb" in val else ""
    line = (f"run {state} at step {summary.get('step', 0):,} ({summary.get('tokens_seen', 0):,} tokens){scores}; outputs in "
            f"{run_dir}/ (config.yaml, metrics.jsonl, report.png, tb/, checkpoints/); `strata report {run_dir}`")
    if code == 74:
        line += f"; free space on the checkpoint disk, then `strata train --resume {run_dir}`"
    return line


class MetricsHistory(NamedTuple):
    """A run's history as its last process saw it."""

    records: list[dict[str, Any]]
    """One merged record per logged step (train window and eval of a step together), by step."""
    resumes: list[dict[str, Any]]
    """The `{"step", "event": "resume", ...}` records, in file order."""
    bad_lines: dict[str, int]
    """Unreadable lines by reason (a crash can leave the last line torn); never fatal."""


def read_metrics(path: str | Path) -> MetricsHistory:
    """Reads metrics.jsonl (or the one in a run directory `path`) into the run's final history.

    A resume event at step s starts a new segment: the earlier segment's records after s were
    re-done, so they are dropped. A step going backwards with no event before it (a process
    that found no checkpoint and started over) drops the earlier records from that step on.
    A line torn by a crash and then appended to by the next process is split at the start of
    the appended record; the torn part is counted.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    resumes: list[dict[str, Any]] = []
    bad: Counter[str] = Counter()
    last_step: int | None = None
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        record = _parse_line(line, bad)
        if record is None:
            continue
        step = record["step"]
        if record.get("event") is not None:
            if record["event"] == "resume":
                by_step = {s: r for s, r in by_step.items() if s <= step}
                resumes.append(record)
                last_step = step
            continue
        if last_step is not None and step < last_step:
            by_step = {s: r for s, r in by_step.items() if s < step}
        by_step.setdefault(step, {}).update(record)
        last_step = step
    records = [by_step[s] for s in sorted(by_step)]
    return MetricsHistory(records, resumes, dict(bad))


def _parse_line(line: str, bad: Counter[str]) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        tail = line.rfind(RECORD_START, 1)  # a torn line with the next process's record after it
        record = _parse_line(line[tail:], Counter()) if tail > 0 else None
        bad["invalid JSON (torn or corrupt line)"] += 1
        return record
    if not isinstance(record, dict):
        bad["not a JSON object"] += 1
        return None
    if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
        bad["no integer step"] += 1
        return None
    return record


def train_windows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of logged training windows (an eval that fell between two log steps writes
    a record with that one step's loss and no timing: not a window)."""
    return [r for r in records if "step_time_s" in r]


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def _median(values: list[Any]) -> float | None:
    values = _finite(values)
    return statistics.median(values) if values else None


def grad_norm_spikes(norms: list[float]) -> int:
    """Logged grad norms above SPIKE_FACTOR x the median of the previous SPIKE_WINDOW ones."""
    spikes, history = 0, []
    for norm in norms:
        if len(history) >= SPIKE_MIN_HISTORY and norm > SPIKE_FACTOR * statistics.median(
            history[-SPIKE_WINDOW:]
        ):
            spikes += 1
        history.append(norm)
    return spikes


# -- one run --------------------------------------------------------------------------------
@dataclass
class Run:
    """What a run directory holds, read once: history, resolved config, summary.json, continual.json."""

    run_dir: Path
    name: str
    history: MetricsHistory
    config: dict[str, Any]
    config_problem: str | None
    final: dict[str, Any] | None  # summary.json (written when a process ends)
    continual: dict[str, Any] | None  # continual.json


class RunDirError(ValueError):
    """A path that is not a run directory (the message names it)."""


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    from engine.config import ConfigError, read_yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    if not (run_dir / METRICS_FILE).is_file():
        raise RunDirError(
            f"no {METRICS_FILE} in {run_dir} (not a run directory, or no step logged yet)"
        )
    config, problem = {}, None
    try:
        config = read_yaml(run_dir / "config.yaml")
    except ConfigError as err:
        problem = str(err)
    return Run(
        run_dir=run_dir,
        name=name or run_dir.name,
        history=read_metrics(run_dir / METRICS_FILE),
        config=config,
        config_problem=problem,
        final=_read_json(run_dir / "summary.json"),
        continual=_read_json(run_dir / "continual.json"),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def model_facts(model_section: dict[str, Any]) -> dict[str, Any]:
    """Family and parameter counts of the config's model, built on the meta device (no memory)."""
    facts: dict[str, Any] = {
        "family": model_section.get("family", "llama"),
        "params": None,
        "non_embedding_params": None,
    }
    if not model_section:
        return facts
    import torch
    from pydantic import ValidationError

    from engine.hparams import non_embedding_params
    from models.config import ModelConfig
    from models.spec import get_spec

    try:
        model_cfg = ModelConfig(**model_section)
        with torch.device("meta"):
            model = get_spec(model_cfg.family).build(model_cfg)
    except ValidationError as err:  # a run from an older config schema, say
        first = err.errors()[0]
        where = ".".join(["model", *(str(part) for part in first["loc"])])
        facts["problem"] = f"{where}: {first['msg'].removeprefix('Value error, ')}"
        return facts
    except (TypeError, KeyError) as err:  # an unknown family
        facts["problem"] = f"model.family: {err}"
        return facts
    facts["params"] = sum(p.numel() for p in model.parameters())
    facts["non_embedding_params"] = non_embedding_params(model_cfg)
    return facts


def config_facts(config: dict[str, Any]) -> dict[str, Any]:
    data, train = _section(config, "data"), _section(config, "train")
    decomposition = (
        data.get("decomposition") if isinstance(data.get("decomposition"), dict) else None
    )
    seq_len, batch = data.get("seq_len"), data.get("global_batch_size")
    tokens_per_step = (
        seq_len * batch if isinstance(seq_len, int) and isinstance(batch, int) else None
    )
    if decomposition and decomposition.get("tokens_per_step"):
        tokens_per_step = decomposition["tokens_per_step"]
    return {
        "seq_len": "curriculum (data.decomposition)" if decomposition else seq_len,
        "global_batch_size": batch,
        "tokens_per_step": tokens_per_step,
        "schedule": _section(config, "schedule").get("name"),
        "lr": _section(config, "optim").get("lr"),
        "steps": train.get("steps"),
        "log_every": _section(config, "logging").get("log_every"),
        "sources": [
            s.get("name") or Path(str(s.get("path", "?"))).name
            for s in data.get("sources") or []
            if isinstance(s, dict)
        ],
    }


def checkpoint_facts(run_dir: Path) -> dict[str, Any]:
    """Committed (intact) checkpoint steps, and the step directories that are not usable."""
    from engine.checkpoint import list_checkpoints, verify

    committed, broken = [], []
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        step = int(path.name[len("step_") :])
        problem = verify(path)
        if problem is None:
            committed.append(step)
        else:
            broken.append({"step": step, "problem": problem})
    return {"committed": committed, "broken": broken}


def continual_facts(continual: dict[str, Any] | None) -> dict[str, Any] | None:
    if continual is None:
        return None

    def policy(part: str) -> Any:
        value = continual.get(part)
        return value.get("policy") if isinstance(value, dict) else None

    return {
        "source": continual.get("source"),
        "source_step": continual.get("source_step"),
        "start_step": continual["step"].get("start")
        if isinstance(continual.get("step"), dict)
        else None,
        "step": policy("step"),
        "schedule": policy("schedule"),
        "data": policy("data"),
        "optimizer": str(continual.get("optimizer", "")).split(" ")[0] or None,
    }


def run_status(run: Run, last_step: int | None) -> str:
    if run.final is None:
        return "in progress / stopped (no summary.json)"
    code, step = run.final.get("exit_code"), run.final.get("step")
    if _is_stale(run.final, last_step):
        return f"in progress / stopped (summary.json is from an earlier process, at step {step})"
    return EXIT_STATUS.get(code, f"failed (exit {code})")


def _is_stale(final: dict[str, Any], last_step: int | None) -> bool:
    """summary.json is written when a process ends: a later process that logged past it has not."""
    step = final.get("step")
    return not isinstance(step, int) or (last_step is not None and last_step > step)


def val_set_suffixes(records: list[dict[str, Any]]) -> list[str]:
    """ "" for data.val_path's `val_loss`, "/NAME" for each data.val_sets `val_loss/NAME` logged."""
    keys = {k for r in records for k in r if k == "val_loss" or k.startswith("val_loss/")}
    return sorted(k[len("val_loss") :] for k in keys)


def _val_summary(records: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    """The last and the best (lowest loss) eval of one val set, with their steps and bits/byte."""
    loss_key, bpb_key = f"val_loss{suffix}", f"val_bpb{suffix}"
    evals = [r for r in records if _finite([r.get(loss_key)])]

    def point(record: dict[str, Any] | None) -> dict[str, Any] | None:
        if record is None:
            return None
        bpb = _finite([record.get(bpb_key)])
        return {
            "step": record["step"],
            "val_loss": record[loss_key],
            "val_bpb": bpb[0] if bpb else None,
        }

    return {
        "last": point(evals[-1] if evals else None),
        "best": point(min(evals, key=lambda r: r[loss_key]) if evals else None),
    }


def _loss_point(step_loss: tuple[int, float] | None) -> dict[str, Any] | None:
    if step_loss is None:
        return None
    step, loss = step_loss
    return {"step": step, "loss": loss if math.isfinite(loss) else None}


def summarize(run: Run) -> dict[str, Any]:
    """The run's numbers, all taken from what the run directory says (JSON-ready: no NaN)."""
    records = run.history.records
    windows = train_windows(records)
    last = windows[-1] if windows else {}
    losses = [
        (r["step"], float(r["loss"])) for r in windows if isinstance(r.get("loss"), int | float)
    ]
    finite_losses = [(s, v) for s, v in losses if math.isfinite(v)]
    grad_norms = _finite([r.get("grad_norm") for r in windows])
    config = config_facts(run.config)
    last_logged = records[-1]["step"] if records else None
    steps_done, tokens_seen = last_logged, last.get("tokens_seen")
    # summary.json, when it is this process's, knows the step it ended at (maybe past the last log)
    if run.final is not None and not _is_stale(run.final, last_logged):
        steps_done, tokens_seen = run.final["step"], run.final.get("tokens_seen", tokens_seen)
    train_time = None  # engine.trainer logs step_time_s = the window's time / logging.log_every
    if isinstance(config["log_every"], int) and windows:
        train_time = sum(_finite([r.get("step_time_s") for r in windows])) * config["log_every"]
    rate = _finite([last.get("tokens_per_s"), last.get("tokens_per_s_per_device")])
    peak_mem = _finite([r.get("peak_mem_gb") for r in windows])
    return {
        "run_dir": str(run.run_dir),
        "name": run.name,
        "status": run_status(run, last_logged),
        "exit_code": run.final.get("exit_code") if run.final else None,
        "steps_done": steps_done,
        "steps_planned": config["steps"],
        "last_logged_step": last_logged,
        "tokens_seen": tokens_seen,
        "train_time_s": train_time,
        "train_time_note": "sum over logged windows of step_time_s x logging.log_every: time inside "
        "training steps (data waits included; startup, evals and checkpoint saves not)",
        "train_loss_last": _loss_point(losses[-1] if losses else None),
        "train_loss_min": _loss_point(
            min(finite_losses, key=lambda sv: sv[1]) if finite_losses else None
        ),
        "val": _val_summary(records, ""),
        "val_sets": {
            suffix[1:]: _val_summary(records, suffix)
            for suffix in val_set_suffixes(records)
            if suffix
        },
        "tokens_per_s_median": _median([r.get("tokens_per_s") for r in windows]),
        "tokens_per_s_per_device_median": _median(
            [r.get("tokens_per_s_per_device") for r in windows]
        ),
        "devices": round(rate[0] / rate[1]) if len(rate) == 2 and rate[1] > 0 else None,
        "mfu_median": _median([r.get("mfu") for r in windows]),
        "data_wait_frac_median": _median([r.get("data_wait_frac") for r in windows]),
        "peak_mem_gb": max(peak_mem) if peak_mem else None,
        "lr_final": last.get("lr"),
        "grad_norm": {
            "median": statistics.median(grad_norms) if grad_norms else None,
            "max": max(grad_norms) if grad_norms else None,
            "spikes": grad_norm_spikes(grad_norms),
            "spike_rule": f"> {SPIKE_FACTOR:g}x the median of the previous {SPIKE_WINDOW} logged values",
        },
        "non_finite_losses": len(losses) - len(finite_losses),
        "skipped_steps": last.get("skipped_steps"),
        "resumes": [
            {k: e.get(k) for k in ("step", "checkpoint", "world_size", "saved_world_size")}
            for e in run.history.resumes
        ],
        "checkpoints": checkpoint_facts(run.run_dir),
        "continual": continual_facts(run.continual),
        "model": model_facts(_section(run.config, "model")),
        "config": config,
        "config_problem": run.config_problem,
        "logged_records": len(records),
        "bad_lines": run.history.bad_lines,
    }


# -- the plot -------------------------------------------------------------------------------
@dataclass
class _Series:
    """One run's columns for plotting, x in steps or tokens."""

    name: str
    x_of_step: Any  # step -> x
    windows: list[dict[str, Any]]
    evals: dict[str, list[dict[str, Any]]]  # val-set suffix -> records holding val_loss{suffix}
    resumes: list[int]
    mixture_keys: list[str] = field(default_factory=list)


def _series(run: Run, x: str) -> _Series:
    import numpy as np

    records = run.history.records
    windows = train_windows(records)
    if x == "tokens":
        known = [
            (r["step"], r["tokens_seen"])
            for r in windows
            if isinstance(r.get("tokens_seen"), int | float)
        ]
        steps = np.array([s for s, _ in known] or [0], dtype=float)
        tokens = np.array([t for _, t in known] or [0], dtype=float)
        if known and known[0][0] > 0:  # tokens grow in proportion to steps before the first record
            steps, tokens = np.concatenate([[0.0], steps]), np.concatenate([[0.0], tokens])

        def x_of_step(step):
            return np.interp(step, steps, tokens)
    else:

        def x_of_step(step):
            return np.asarray(step, dtype=float)

    mixture_keys = sorted({k for r in windows for k in r if k.startswith("mixture_weight/")})
    evals = {
        suffix: [r for r in records if _finite([r.get(f"val_loss{suffix}")])]
        for suffix in val_set_suffixes(records)
    }
    return _Series(
        run.name, x_of_step, windows, evals, [e["step"] for e in run.history.resumes], mixture_keys
    )


def _column(series: _Series, key: str) -> tuple[list[float], list[float]]:
    rows = [(r["step"], r[key]) for r in series.windows if isinstance(r.get(key), int | float)]
    steps = [s for s, _ in rows]
    return list(series.x_of_step(steps)) if steps else [], [v for _, v in rows]


def save_figure(fig: Any, out: str | Path) -> Path:
    """Writes a matplotlib figure as PNG atomically (temp file, then os.replace) and closes it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def report_panels(runs: list[Run]) -> list[str]:
    """The plot's panels: four always, mixture weights and sequence length when a run logged them."""
    logged = {key for run in runs for r in train_windows(run.history.records) for key in r}
    panels = ["loss", "lr", "throughput", "grad_norm"]
    if any(key.startswith("mixture_weight/") for key in logged):
        panels.append("mixture")
    if "seq_len" in logged:
        panels.append("seq_len")
    return panels


def plot_runs(runs: list[Run], out: str | Path, x: str = "step") -> Path:
    """One PNG: loss (train line, val markers), LR, tokens/s (+ MFU), grad norm; mixture weights
    and sequence length when a run logged them. Each run is one colour; dashed lines = resumes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("step", "tokens"):
        raise ValueError(f"x: expected 'step' or 'tokens', got {x!r}")
    series = [_series(run, x) for run in runs]
    panels = report_panels(runs)
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3.6 * rows), dpi=100, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(series) > 1
    drawers = {
        "loss": _draw_loss,
        "lr": _draw_lr,
        "throughput": _draw_throughput,
        "grad_norm": _draw_grad_norm,
        "mixture": _draw_mixture,
        "seq_len": _draw_seq_len,
    }
    for ax, panel in zip(axes.flat, panels, strict=False):
        for k, s in enumerate(series):
            color = colors[k % len(colors)]
            drawers[panel](ax, s, color, several)
            for step in s.resumes:
                ax.axvline(
                    float(s.x_of_step(step)), color=color, linestyle="--", linewidth=1, alpha=0.6
                )
        ax.set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    resumed = any(s.resumes for s in series)
    title = " vs ".join(s.name for s in series) + (
        "   (dashed: resumed from a checkpoint)" if resumed else ""
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def _label(series: _Series, what: str, several: bool) -> str:
    return f"{series.name} {what}" if several else what


def _draw_loss(ax, s: _Series, color: str, several: bool) -> None:
    ax.plot(*_column(s, "loss"), color=color, linewidth=1.2, label=_label(s, "train", several))
    markers = "osD^v<>p*"
    for k, (suffix, evals) in enumerate(s.evals.items()):
        ax.plot(
            s.x_of_step([r["step"] for r in evals]),
            [r[f"val_loss{suffix}"] for r in evals],
            markers[k % len(markers)],
            color=color,
            markersize=5,
            markeredgecolor="black",
            label=_label(s, f"val {suffix[1:]}" if suffix else "val", several),
        )
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss", fontsize=9)


def _draw_lr(ax, s: _Series, color: str, several: bool) -> None:
    ax.plot(*_column(s, "lr"), color=color, linewidth=1.2, label=s.name if several else None)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_title("learning rate", fontsize=9)


def _draw_throughput(ax, s: _Series, color: str, several: bool) -> None:
    ax.plot(
        *_column(s, "tokens_per_s"),
        color=color,
        linewidth=1.2,
        label=_label(s, "tokens/s", several),
    )
    ax.set_ylabel("tokens/s")
    mfu_x, mfu = _column(s, "mfu")
    if mfu:
        twin = _twin(ax)
        twin.plot(mfu_x, [100 * v for v in mfu], color=color, linestyle=":", linewidth=1.2)
        twin.set_ylabel("MFU % (dotted)")
    ax.set_title("throughput", fontsize=9)


def _draw_grad_norm(ax, s: _Series, color: str, several: bool) -> None:
    xs, norms = _column(s, "grad_norm")
    positive = [(a, b) for a, b in zip(xs, norms, strict=True) if b > 0 and math.isfinite(b)]
    if positive:
        ax.plot(
            *zip(*positive, strict=True),
            color=color,
            linewidth=1.0,
            label=s.name if several else None,
        )
        ax.set_yscale("log")
    ax.set_ylabel("grad norm (before clipping)")
    ax.set_title("gradient norm", fontsize=9)


def _draw_mixture(ax, s: _Series, color: str, several: bool) -> None:
    styles = ["-", "--", "-.", (0, (1, 1))]
    for k, key in enumerate(s.mixture_keys):
        source = key.split("/", 1)[1]
        style = {"color": color, "linestyle": styles[k % len(styles)]} if several else {}
        ax.plot(*_column(s, key), linewidth=1.2, label=_label(s, source, several), **style)
    ax.set_ylabel("source weight")
    ax.set_ylim(0, 1)
    temp_x, temperature = _column(s, "mixture_temperature")
    if temperature:
        twin = _twin(ax)
        twin.plot(
            temp_x, temperature, color=color if several else "black", linestyle=":", linewidth=1.2
        )
        twin.set_ylabel("temperature T (dotted)")
    ax.set_title("data mixture", fontsize=9)


def _draw_seq_len(ax, s: _Series, color: str, several: bool) -> None:
    xs, lengths = _column(s, "seq_len")
    if lengths:
        ax.step(
            xs, lengths, where="post", color=color, linewidth=1.0, label=s.name if several else None
        )
        ax.set_yscale("log", base=2)
    ax.set_ylabel("sequence length")
    ax.set_title("sequence length per logged step", fontsize=9)


def _twin(ax):
    """The panel's right-hand axis, made once and shared by every run drawn on the panel."""
    if not hasattr(ax, "_report_twin"):
        ax._report_twin = ax.twinx()
    return ax._report_twin


def summary_json(summaries: list[dict[str, Any]], plot: Path | None) -> str:
    return json.dumps(
        {"plot": str(plot) if plot else None, "runs": summaries}, indent=1, allow_nan=False
    )
