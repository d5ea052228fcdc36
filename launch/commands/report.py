"""`strata report RUN_DIR [RUN_DIR ...]`: a table of each run's numbers and one PNG of its curves.

The reading, the numbers and the plot are engine.report's; this module parses the arguments,
lays out the table (one column per run) and says where the PNG went.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="look at runs: a table (loss, val, throughput, resumes, checkpoints) and a PNG of the curves",
        description="Reads each RUN_DIR (metrics.jsonl, config.yaml, summary.json, checkpoints/) and prints "
        "one table column per run: status, steps, tokens, train/val loss, tokens/s, MFU, grad-norm spikes, "
        "resumes, committed checkpoints, model size. Writes one PNG with loss, learning rate, tokens/s "
        "(+ MFU), grad norm and, when logged, mixture weights and sequence length; several runs are "
        "overlaid. A run still going (no summary.json) is reported from what it has logged.",
    )
    p.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (holds metrics.jsonl)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PNG",
        help="where to write the plot (default: RUN_DIR/report.png for one run, ./report.png for several)",
    )
    p.add_argument(
        "--x",
        choices=["step", "tokens"],
        default=None,
        help="x axis of the plot (default: step for one run, tokens for several: equal tokens is the fair comparison)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the summaries as JSON (with the plot's path) instead of the table",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.report import RunDirError, load_run, plot_runs, summarize, summary_json

    dirs = [Path(d) for d in args.run_dirs]
    try:
        runs = [load_run(d, name) for d, name in zip(dirs, run_names(dirs), strict=True)]
    except RunDirError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    summaries = [summarize(r) for r in runs]
    out = (
        Path(args.out)
        if args.out
        else (dirs[0] / "report.png" if len(dirs) == 1 else Path("report.png"))
    )
    x = args.x or ("step" if len(runs) == 1 else "tokens")
    plot = plot_runs(runs, out, x)
    if args.json:
        print(summary_json(summaries, plot))
        return 0
    from rich.console import Console

    console = Console()
    console.print(summary_table(summaries))
    for summary in summaries:
        for problem in _problems(summary):
            console.print(f"[yellow]warning[/yellow] {summary['name']}: {problem}", soft_wrap=True)
    console.print(f"plot: {plot} (x: {x})", highlight=False, soft_wrap=True)
    return 0


def run_names(dirs: list[Path]) -> list[str]:
    """Each directory's name; parent/name where two runs share a name."""
    names = [d.resolve().name for d in dirs]
    return [
        f"{d.resolve().parent.name}/{name}" if names.count(name) > 1 else name
        for d, name in zip(dirs, names, strict=True)
    ]


def summary_table(summaries: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="strata report", title_justify="left", caption_justify="left")
    table.add_column("", style="bold")
    for summary in summaries:
        table.add_column(summary["name"], overflow="fold")
    rows = [
        ("status", _status),
        ("steps", lambda s: f"{_int(s['steps_done'])} / {_int(s['steps_planned'])}"),
        ("tokens seen", lambda s: _int(s["tokens_seen"])),
        ("train-step time", lambda s: _duration(s["train_time_s"])),
        ("train loss (last)", lambda s: _at(s["train_loss_last"], "loss")),
        ("train loss (min)", lambda s: _at(s["train_loss_min"], "loss")),
        ("val loss (last)", lambda s: _val(s["val"]["last"])),
        ("val loss (best)", lambda s: _val(s["val"]["best"])),
        *_val_set_rows(summaries),
        ("tokens/s (median)", _throughput),
        ("tokens/s per device", lambda s: _num(s["tokens_per_s_per_device_median"], ",.0f")),
        ("MFU (median)", lambda s: _pct(s["mfu_median"])),
        ("data wait (median)", lambda s: _pct(s["data_wait_frac_median"], ".2f")),
        ("peak memory", lambda s: _num(s["peak_mem_gb"], ".1f", " GiB")),
        ("final lr", lambda s: _num(s["lr_final"], ".3g")),
        ("grad norm", _grad_norm),
        ("non-finite / skipped", _bad_steps),
        ("resumes", _resumes),
        ("checkpoints", _checkpoints),
        ("continual from", _continual),
        ("model", _model),
        ("seq len x batch", _shape),
        (
            "schedule",
            lambda s: f"{s['config']['schedule'] or '-'}, peak lr {_num(s['config']['lr'], '.3g')}",
        ),
    ]
    optional = {
        "MFU (median)": "mfu_median",
        "peak memory": "peak_mem_gb",
        "continual from": "continual",
    }
    for label, cell in rows:
        key = optional.get(label)
        if key and all(s[key] is None for s in summaries):
            continue
        table.add_row(label, *(cell(s) for s in summaries))
    if any(s["bad_lines"] for s in summaries):
        table.add_row("bad metrics lines", *(_bad_lines(s["bad_lines"]) for s in summaries))
    table.caption = (
        f"train-step time: {summaries[0]['train_time_note']}; grad-norm spikes: "
        f"{summaries[0]['grad_norm']['spike_rule']}"
    )
    return table


def _val_set_rows(summaries: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Rows for each data.val_sets NAME any run logged (val_loss/NAME)."""
    names = sorted({name for s in summaries for name in s["val_sets"]})
    rows = []
    for name in names:
        for which in ("last", "best"):

            def cell(s: dict[str, Any], name: str = name, which: str = which) -> str:
                return _val((s["val_sets"].get(name) or {}).get(which))

            rows.append((f"val {name} ({which})", cell))
    return rows


def _problems(summary: dict[str, Any]) -> list[str]:
    problems = [summary["config_problem"]] if summary["config_problem"] else []
    if summary["model"].get("problem"):
        problems.append(summary["model"]["problem"])
    return problems


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _num(value: Any, fmt: str, unit: str = "") -> str:
    return f"{value:{fmt}}{unit}" if isinstance(value, int | float) else "-"


def _pct(value: Any, fmt: str = ".1f") -> str:
    return f"{100 * value:{fmt}}%" if isinstance(value, int | float) else "-"


def _duration(seconds: float | None) -> str:
    from engine.metrics import format_duration

    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else format_duration(seconds)


def _status(s: dict[str, Any]) -> str:
    color = {"finished": "green"}.get(s["status"], "yellow")
    return f"[{color}]{s['status']}[/{color}]"


def _at(point: dict[str, Any] | None, key: str) -> str:
    if point is None:
        return "-"
    value = point[key]
    return (
        f"{value:.4f} @ {point['step']:,}"
        if value is not None
        else f"non-finite @ {point['step']:,}"
    )


def _val(point: dict[str, Any] | None) -> str:
    if point is None:
        return "-"
    bpb = f" ({point['val_bpb']:.3f} bits/byte)" if point["val_bpb"] is not None else ""
    return f"{point['val_loss']:.4f}{bpb} @ {point['step']:,}"


def _throughput(s: dict[str, Any]) -> str:
    devices = f" on {s['devices']} device{'s' if s['devices'] != 1 else ''}" if s["devices"] else ""
    return _num(s["tokens_per_s_median"], ",.0f") + devices


def _grad_norm(s: dict[str, Any]) -> str:
    g = s["grad_norm"]
    if g["median"] is None:
        return "-"
    return f"median {g['median']:.3g}, max {g['max']:.3g}, {g['spikes']} spike{'s' if g['spikes'] != 1 else ''}"


def _bad_steps(s: dict[str, Any]) -> str:
    skipped = f", {s['skipped_steps']} skipped steps" if s["skipped_steps"] is not None else ""
    return f"{s['non_finite_losses']} non-finite losses{skipped}"


def _resumes(s: dict[str, Any]) -> str:
    if not s["resumes"]:
        return "none"
    parts = []
    for r in s["resumes"]:
        before, after = r.get("saved_world_size"), r.get("world_size")
        ranks = f"{after} rank{'' if after == 1 else 's'}"
        world = f"{before} -> {ranks}" if before is not None and before != after else ranks
        parts.append(f"step {r['step']:,} ({world})")
    return ", ".join(parts)


def _checkpoints(s: dict[str, Any]) -> str:
    found = s["checkpoints"]
    text = ", ".join(f"{step:,}" for step in found["committed"]) or "none"
    if found["broken"]:
        text += "; not usable: " + ", ".join(
            f"{b['step']:,} ({b['problem']})" for b in found["broken"]
        )
    return text


def _continual(s: dict[str, Any]) -> str:
    c = s["continual"]
    if c is None:
        return "-"
    origin = f" (step {c['source_step']:,})" if c.get("source_step") is not None else ""
    return f"{c['source']}{origin}; step {c['step']}, schedule {c['schedule']}, data {c['data']}, optimizer {c['optimizer']}"


def _model(s: dict[str, Any]) -> str:
    m = s["model"]
    if m["params"] is None:
        return m["family"]
    return f"{m['family']}, {_count(m['params'])} params ({_count(m['non_embedding_params'])} non-embedding)"


def _shape(s: dict[str, Any]) -> str:
    c = s["config"]
    per_step = f" = {c['tokens_per_step']:,} tokens/step" if c["tokens_per_step"] else ""
    return f"{c['seq_len'] or '-'} x {c['global_batch_size'] or '-'}{per_step}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bad_lines(bad: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in bad.items()) or "0"
