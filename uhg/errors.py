"""Errors a user can act on.

Every error raised for bad input (a missing file, a wrong key, an impossible value) is a
`UhgError`. The CLI prints its message without a traceback and exits with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UhgError(Exception):
    """Base class: the message says what was wrong, where, and what was expected."""


class ConfigError(UhgError, ValueError):
    """A configuration file, key or value is invalid."""


class GeometryError(UhgError, ValueError):
    """Unknown geometry name or a store/model built for another geometry."""


class StoreError(UhgError):
    """A Zarr store is missing, corrupt, incomplete or of the wrong schema."""


class ConditionError(UhgError, ValueError):
    """An event condition (luminosity, incident energy, ...) is missing or out of range."""


class CheckpointError(UhgError):
    """A checkpoint or model export is missing, corrupt or unsafe to load."""


class TrainingError(UhgError):
    """Training cannot go on (non-finite loss, unsupported ZeRO stage, ...)."""
