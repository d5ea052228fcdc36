"""`strata --help` stays fast: building the parser imports no command's heavy dependencies
(torch above all); commands import them inside `run()`. Also: what the parser lists without
importing them (export's dtypes, the config error type) matches the modules that own it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_building_the_parser_does_not_import_torch():
    code = "import sys, launch.cli; launch.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_export_dtype_choices_are_the_exporters():
    from engine.export import DTYPES
    from launch.commands.export import DTYPE_NAMES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)


def test_config_error_is_one_type_wherever_it_is_imported():
    from engine.config import ConfigError as from_config
    from engine.errors import ConfigError

    assert from_config is ConfigError
