"""Errors a user can act on. Every message names the offending value and says how to fix it.

The CLI prints these as one paragraph without a traceback; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import difflib


class ClToolkitError(Exception):
    """Base class of the errors meant for the person running the toolkit."""


class ConfigError(ClToolkitError, ValueError):
    """A config key, value or name that cannot be used."""


class DatasetNotFoundError(ClToolkitError, FileNotFoundError):
    """Dataset files are missing; the message says where we looked and how to get them."""


class NonFiniteLossError(ClToolkitError, FloatingPointError):
    """Training produced a NaN or Inf loss."""


class ResumeError(ClToolkitError):
    """A run directory cannot be resumed (different config, corrupt files)."""


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
