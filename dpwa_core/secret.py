"""The cluster's shared secret: where it comes from, and reading it safely.

The secret is what makes a process a member of an ``auth`` cluster (see :mod:`dpwa_core.auth`
for what the handshake does with it). It is read once, when the config is loaded, and is never
logged, printed or written anywhere.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from dpwa_core.errors import ConfigError

__all__ = ["MAX_SECRET_BYTES", "AuthSettings", "file_is_private", "load_secret"]

MAX_SECRET_BYTES = 64 * 1024
"""A secret file larger than this is a mistake (a wrong path), not a secret."""


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


def load_secret(*, env: str | None = None, path: str | None = None, where: str = "auth") -> bytes:
    """Read a shared secret from the environment variable ``env`` or the file ``path``.

    A file's trailing newline is dropped, so ``echo secret > file`` works. A file that others
    may read is accepted (the cluster's operator decides), but an empty secret is refused.

    Args:
        env: name of an environment variable holding the secret.
        path: path of a file holding the secret.
        where: the config source, for error messages.

    Returns:
        The secret's bytes.

    Raises:
        ConfigError: neither or both are given, the variable is unset or empty, the file is
            missing, unreadable, empty or larger than 64 KiB.
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
            raise ConfigError(
                f"{where}: key 'auth.secret_env' names {env!r}, which {state} in this process's "
                f"environment. Export the cluster's shared secret, e.g. "
                f"{env}=$(cat secret.txt), on every node."
            )
        return value.encode()
    assert path is not None
    try:
        if os.stat(path).st_size > MAX_SECRET_BYTES:
            raise ConfigError(
                f"{where}: key 'auth.secret_file': {path!r} is larger than "
                f"{MAX_SECRET_BYTES} bytes; point it at the file holding only the secret."
            )
        with open(path, "rb") as file:
            data = file.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"{where}: key 'auth.secret_file': cannot read {path!r}: {exc.strerror}. "
            "Check the path and its permissions."
        ) from exc
    data = data.rstrip(b"\r\n")
    if not data:
        raise ConfigError(
            f"{where}: key 'auth.secret_file': {path!r} is empty; write the cluster's shared "
            "secret into it (e.g. python -c 'import secrets; print(secrets.token_hex(32))')."
        )
    return data


def file_is_private(path: str) -> bool:
    """Whether only the file's owner may read ``path`` (always True where modes mean nothing)."""
    if os.name != "posix":
        return True
    return not stat.S_IMODE(os.stat(path).st_mode) & (stat.S_IRWXG | stat.S_IRWXO)
