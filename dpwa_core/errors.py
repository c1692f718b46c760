"""Exceptions raised by dpwa.

Every error a user can cause derives from :class:`DpwaError`, so one ``except`` clause
catches them all. Messages say what was wrong, where, and what to do.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AuthError",
    "CheckpointError",
    "ConfigError",
    "DpwaError",
    "InterpolationError",
    "PluginError",
    "ProtocolError",
]


class DpwaError(Exception):
    """Base class of every error dpwa raises on purpose."""


class ConfigError(DpwaError, ValueError):
    """The configuration is invalid: the message names the file, the key and the fix."""


class PluginError(DpwaError):
    """An interpolation plugin could not be loaded, or two plugins claim one name."""


class InterpolationError(DpwaError, ValueError):
    """An interpolation strategy returned a factor that is NaN or outside [0, 1]."""


class AdapterError(DpwaError):
    """No adapter fits a model, or an adapter was given state it cannot map."""


class ProtocolError(DpwaError):
    """A peer sent bytes that do not follow the wire protocol (see docs/PROTOCOL.md)."""


class AuthError(ProtocolError):
    """A peer failed the shared-secret handshake, or only one side has ``auth`` configured."""


class CheckpointError(DpwaError):
    """A checkpoint could not be written, or a file is not a checkpoint this node can resume from.

    The message names the file and what was wrong; a failed load changed nothing
    (:mod:`dpwa_core.checkpoint`).
    """
