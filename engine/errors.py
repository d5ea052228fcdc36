"""The error a config that cannot run raises: `ConfigError`, a one-line message naming the field.

Kept in a module with no imports so the CLI (launch/cli.py) can catch it without importing
torch; `engine.config` re-exports it, and every `from engine.config import ConfigError` works.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the field path."""
