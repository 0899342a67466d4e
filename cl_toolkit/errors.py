"""Errors a user can act on. Every message names the offending value and says how to fix it.

The CLI prints these as one paragraph without a traceback (``HYDRA_FULL_ERROR=1`` adds it) and
exits with ``exit_code``: 2 for input the user can fix before running (a config value, a missing
dataset, a path), 1 for failures while running. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib


class ClToolkitError(Exception):
    """Base class of the errors meant for the person running the toolkit."""

    exit_code = 1


class ConfigError(ClToolkitError, ValueError):
    """A config key, value or name that cannot be used."""

    exit_code = 2


class UsageError(ClToolkitError, FileNotFoundError):
    """A command-line argument that cannot be used (a missing path, an empty directory)."""

    exit_code = 2


class DatasetNotFoundError(ClToolkitError, FileNotFoundError):
    """Dataset files are missing; the message says where we looked and how to get them."""

    exit_code = 2


class NonFiniteLossError(ClToolkitError, FloatingPointError):
    """Training produced a NaN or Inf loss."""


class ResumeError(ClToolkitError):
    """A run directory cannot be resumed (different config, corrupt files)."""

    exit_code = 2


class PluginError(ClToolkitError):
    """A third-party plugin failed to load or raised."""


def suggest(name: str, valid) -> str:
    """'Did you mean ...?' text for a misspelt name."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def unknown_name(kind: str, name: str, valid) -> ConfigError:
    valid = sorted(valid)
    return ConfigError(
        f"Unknown {kind} {name!r}.{suggest(name, valid)} Valid {kind} names: "
        f"{', '.join(valid)}."
    )
