"""The cluster's shared secret: where it comes from, and reading it safely.

The secret is what makes a process a member of an ``auth`` cluster (see :mod:`dpwa_core.auth`
for what the handshake does with it). It is read once, when the config is loaded, and is never
logged, printed or written anywhere: not even when it was written into the wrong key. Error
messages about the ``auth`` section show a value only when it is plainly not a secret (a
variable name such as ``DPWA_SECRET``, a path that was found); anything else appears as
``<hidden, N characters>``.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dpwa_core.errors import ConfigError

__all__ = ["MAX_SECRET_BYTES", "AuthSettings", "file_is_private", "load_secret"]

MAX_SECRET_BYTES = 64 * 1024
"""A secret file larger than this is a mistake (a wrong path), not a secret."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNSAFE_IN_PATH = re.compile(r"[\s=]")


@dataclass(frozen=True)
class AuthSettings:
    """Where the shared secret comes from, and the secret itself (never printed).

    Build it with :func:`load_secret`; ``source`` says where the secret was read, for messages.
    """

    source: str
    secret: bytes = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("an empty secret authenticates nobody")


def load_secret(
    *,
    env: str | None = None,
    path: str | None = None,
    where: str = "auth",
    allow_readable_file: bool = False,
) -> bytes:
    """Read a shared secret from the environment variable ``env`` or the file ``path``.

    A file's trailing newline is dropped, so ``echo secret > file`` works. The file must be a
    regular file (a symlink to one is followed; a FIFO, device or folder is refused without
    blocking) that no other user may write, and, unless ``allow_readable_file``, that only its
    owner may read or write (``chmod 600``). An empty secret is refused. Messages never show
    the secret, nor a variable name or path that might be it.

    Args:
        env: name of an environment variable holding the secret.
        path: path of a file holding the secret.
        where: the config source, for error messages.
        allow_readable_file: accept a file that group or others may read (never one they may
            write); the config key ``auth.allow_readable_secret_file``.

    Returns:
        The secret's bytes.

    Raises:
        ConfigError: neither or both are given, the variable is unset or empty, the file is
            missing, unreadable, not a regular file, empty, larger than 64 KiB, writable by
            group or others, or readable by them without ``allow_readable_file``.
    """
    if (env is None) == (path is None):
        raise ConfigError(
            f"{where}: key 'auth' needs exactly one of secret_env (an environment variable) "
            "or secret_file (a path), e.g. auth: {secret_env: DPWA_SECRET}."
        )
    if env is not None:
        value = os.environ.get(env)
        if not value:
            state = "is not set" if value is None else "is empty"
            shown = shown_env_name(env)
            name, why = env, ""
            if shown != repr(env):
                name = "DPWA_SECRET"
                why = " (the name is hidden: it looks like a token, maybe the secret itself)"
            raise ConfigError(
                f"{where}: key 'auth.secret_env' names {shown}{why}, which {state} in this "
                f"process's environment. Export the cluster's shared secret, e.g. "
                f"{name}=$(cat secret.txt), on every node."
            )
        return value.encode()
    assert path is not None
    data, mode = _read_secret_file(path, where)
    data = data.rstrip(b"\r\n")
    if not data:
        raise ConfigError(
            f"{where}: key 'auth.secret_file': {path!r} is empty; write the cluster's shared "
            "secret into it (e.g. python -c 'import secrets; print(secrets.token_hex(32))')."
        )
    if os.name == "posix":
        _check_mode(path, mode, where, allow_readable_file)
    return data


def file_is_private(path: str) -> bool:
    """Whether only the file's owner may read ``path`` (always True where modes mean nothing)."""
    if os.name != "posix":
        return True
    return not stat.S_IMODE(os.stat(path).st_mode) & (stat.S_IRWXG | stat.S_IRWXO)


def _read_secret_file(path: str, where: str) -> tuple[bytes, int]:
    """The file's first bytes (at most one past the limit) and its mode, from one open file.

    Opened without blocking, so a FIFO with no writer cannot hang the load; the checks use
    ``fstat`` on the opened file, so they are about the very file read (a symlink's target).
    """
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, name, 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as exc:
        raise ConfigError(
            f"{where}: key 'auth.secret_file': cannot read {_shown_missing_path(path)}: "
            f"{exc.strerror}. Check the path and its permissions."
        ) from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                f"{where}: key 'auth.secret_file': {path!r} is {_kind(info.st_mode)}, not a "
                "regular file; point it at a plain file holding only the secret."
            )
        if info.st_size > MAX_SECRET_BYTES:
            raise ConfigError(
                f"{where}: key 'auth.secret_file': {path!r} is larger than "
                f"{MAX_SECRET_BYTES} bytes; point it at the file holding only the secret."
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SECRET_BYTES:
            chunk = os.read(descriptor, MAX_SECRET_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(
            f"{where}: key 'auth.secret_file': cannot read {path!r}: {exc.strerror}. "
            "Check the path and its permissions."
        ) from None
    finally:
        os.close(descriptor)
    if size > MAX_SECRET_BYTES:  # it grew after fstat
        raise ConfigError(
            f"{where}: key 'auth.secret_file': {path!r} is larger than "
            f"{MAX_SECRET_BYTES} bytes; point it at the file holding only the secret."
        )
    return b"".join(chunks), stat.S_IMODE(info.st_mode)


def _check_mode(path: str, mode: int, where: str, allow_readable: bool) -> None:
    fix = f"chmod 600 {shlex.quote(path)}"
    writers = _who(mode, stat.S_IWGRP, stat.S_IWOTH)
    if writers:
        raise ConfigError(
            f"{where}: key 'auth.secret_file': {path!r} (mode {mode:04o}) may be written by "
            f"{writers}, who could then choose the cluster's secret. Fix it: {fix}. "
            "(allow_readable_secret_file permits reading by others, never writing.)"
        )
    if allow_readable:
        return
    readers = _who(mode, stat.S_IRWXG & ~stat.S_IWGRP, stat.S_IRWXO & ~stat.S_IWOTH)
    if readers:
        raise ConfigError(
            f"{where}: key 'auth.secret_file': {path!r} (mode {mode:04o}) may be read by "
            f"{readers}, who would learn the cluster's secret. Fix it: {fix}. If everyone who "
            "can read it may know the secret, set allow_readable_secret_file: true in 'auth'."
        )


def _who(mode: int, group_bits: int, other_bits: int) -> str:
    pairs = ((group_bits, "its group"), (other_bits, "other users"))
    return " and ".join(name for bits, name in pairs if mode & bits)


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


# What messages may show of values from the ``auth`` section.


def hidden(value: Any) -> str:
    """Describe a value that must not be shown: its type and size, never its content.

    ``true``, ``false`` and ``null`` are shown as they are: they cannot be a secret.
    """
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return f"<hidden, {len(value)} characters>"
    if isinstance(value, (bytes, bytearray)):
        return f"<hidden, {len(value)} bytes>"
    if isinstance(value, (list, tuple, set, frozenset, Mapping)):
        items = "item" if len(value) == 1 else "items"
        return f"<hidden {type(value).__name__} of {len(value)} {items}>"
    return f"<hidden {type(value).__name__}>"


def looks_random(text: str) -> bool:
    """Whether ``text`` looks like a generated token (hex, base64) rather than a chosen name."""
    if len(text) < 16:
        return False
    digits = sum(char.isdigit() for char in text)
    mixed_case = any(char.islower() for char in text) and any(char.isupper() for char in text)
    return digits >= 0.3 * len(text) or (mixed_case and digits > 0)


def is_env_name(name: Any) -> bool:
    """Whether ``name`` is a portable environment variable name: letters, digits and ``_``."""
    return isinstance(name, str) and _ENV_NAME.fullmatch(name) is not None


def shown_env_name(name: Any) -> str:
    """``repr(name)`` when it is plainly a variable name (e.g. DPWA_SECRET), else hidden.

    A name longer than 64 characters, or one that looks like a generated token, is hidden: it
    may be the secret itself, written where its variable's name belongs.
    """
    if is_env_name(name) and len(name) <= 64 and not looks_random(name):
        return repr(name)
    return hidden(name)


def _shown_missing_path(path: str) -> str:
    """A path that could not be opened, unless its last part could be the secret itself."""
    last = os.path.basename(path.rstrip(os.sep)) or path
    if _UNSAFE_IN_PATH.search(last) or looks_random(last) or len(path) > 4096:
        return (
            f"the file {hidden(last)} (its name is hidden: it looks like a secret, not a file name)"
        )
    return repr(path)
