"""Argument types and options shared by several `strata` commands.

Owns what argparse checks before a command runs (positive counts, byte sizes, `--set KEY=VALUE`),
so a wrong value fails at once with `argument --flag: ...` and exit code 2. It does not know
what any command does with the values.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def byte_size(text: str) -> str:
    """argparse type: a size such as 64MB, 512kb or 1048576 (kept as text; parsed again by the writer)."""
    from data_pipeline.formats.writer import parse_size

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


class _ExtendOverrides(argparse.Action):
    """`--set a=1 b=2 --set c=3` -> [a=1, b=2, c=3]; a value without '=' is refused at once."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        for value in values:
            if "=" not in value:
                hint = " (give the config file before --set)" if value.endswith((".yaml", ".yml")) else ""
                parser.error(f"argument --set: expected KEY=VALUE, got {value!r}{hint}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *values])


def add_set_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """The config override option every config-taking command shares: `--set KEY=VALUE ...`."""
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action=_ExtendOverrides, default=[], metavar="KEY=VALUE",
        help=help or "override config fields, e.g. --set optim.lr=1e-3 train.steps=100 "
        "(values parsed as YAML; several per --set, and --set repeatable)",
    )
