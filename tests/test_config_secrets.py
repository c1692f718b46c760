"""The config's hostile inputs: secrets in the wrong key, readable secret files, YAML bombs.

No message, from ``load_config`` or from a real ``dpwa check`` process, may show a secret that
was written into the wrong key; a secret file others may read or write is refused; a FIFO does
not block; an alias bomb or a huge value fails at once with a short message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpwa_core.config import MAX_CONFIG_BYTES, Config, NodeSpec, load_config
from dpwa_core.errors import ConfigError

SECRET = "Zq9s3cr3tXv7Lw2pHr8K"  # distinctive, and an identifier: it could pass as a name
HEX = "f00d" + "c0ffee42" * 7 + "ab7"  # like secrets.token_hex(32), starting with a letter
NODES = [{"name": "w1", "host": "127.0.0.1", "port": 45000}]
posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes and FIFOs are POSIX")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPWA_NODE", raising=False)
    monkeypatch.setenv("DPWA_SECRET", "the-real-secret-value")
    for name in (SECRET, HEX):
        monkeypatch.delenv(name, raising=False)


def dpwa_check(path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``dpwa check PATH`` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "dpwa_core.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def fragments(secret: str) -> list[str]:
    """The secret and pieces of it: a cut secret must not show either."""
    return [secret, secret[:10], secret[-10:]]


# Each case: the auth section (or a whole document), the secret it holds, what the message says.
WRONG_KEYS: dict[str, tuple[Any, str, str]] = {
    "auth is the secret": ({"auth": SECRET}, SECRET, "'auth' must be a mapping"),
    "secret_env holds the secret with spaces": (
        {"auth": {"secret_env": f"my {SECRET} phrase"}},
        SECRET,
        "must name an environment variable",
    ),
    "secret_env holds NAME=secret": (
        {"auth": {"secret_env": f"DPWA_SECRET={SECRET}"}},
        SECRET,
        "must name an environment variable",
    ),
    "secret_env holds a hex token": (
        {"auth": {"secret_env": HEX}},
        HEX,
        "the name is hidden",
    ),
    "secret_env holds an identifier-like token": (
        {"auth": {"secret_env": SECRET}},
        SECRET,
        "the name is hidden",
    ),
    "secret_env holds a number": (
        {"auth": {"secret_env": 739184526}},
        "739184526",
        "must name an environment variable",
    ),
    "secret_file is a list": (
        {"auth": {"secret_file": [SECRET]}},
        SECRET,
        "'auth.secret_file' must be a file path",
    ),
    "secret_file is the secret": (
        {"auth": {"secret_file": SECRET}},
        SECRET,
        "its name is hidden",
    ),
    "auth is a list": ({"auth": [SECRET]}, SECRET, "'auth' must be a mapping"),
    "unknown key holds the secret": ({"auth": {"secret": SECRET}}, SECRET, "unknown 'secret'"),
    "unknown key next to a good one": (
        {"auth": {"secret_env": "DPWA_SECRET", "other": SECRET}},
        SECRET,
        "unknown 'other'",
    ),
    "the secret is an auth key": ({"auth": {SECRET: None}}, SECRET, "unknown <hidden key"),
    "allow_readable_secret_file holds the secret": (
        {"auth": {"secret_file": "s.txt", "allow_readable_secret_file": SECRET}},
        SECRET,
        "must be true or false",
    ),
    "the secret is a top-level key": ({SECRET: 1}, SECRET, "unknown key <hidden key"),
    "a hex token is a top-level key": ({HEX: 1}, HEX, "unknown key <hidden key"),
}


@pytest.mark.parametrize("case", list(WRONG_KEYS))
def test_a_secret_in_the_wrong_key_is_never_echoed(tmp_path: Path, case: str) -> None:
    extra, secret, expected = WRONG_KEYS[case]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": NODES, **extra}))

    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(path)
    message = str(caught.value)
    for piece in fragments(secret):
        assert piece not in message

    result = dpwa_check(path)
    assert result.returncode == 1, result
    assert result.stderr.startswith("dpwa: error: ") and "Traceback" not in result.stderr
    assert expected in result.stderr
    for piece in fragments(secret):
        assert piece not in result.stdout + result.stderr


def test_an_env_name_that_looks_like_one_is_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="names 'DPWA_TYPO_SECRET', which is not set"):
        load_config({"nodes": NODES, "auth": {"secret_env": "DPWA_TYPO_SECRET"}})


def test_a_missing_secret_file_with_a_plain_name_is_shown(tmp_path: Path) -> None:
    missing = tmp_path / "secret.txt"
    with pytest.raises(ConfigError, match=f"cannot read '{missing}'"):
        load_config({"nodes": NODES, "auth": {"secret_file": str(missing)}})


def test_a_config_built_with_a_secret_in_auth_does_not_show_it() -> None:
    with pytest.raises(ConfigError, match="must be an AuthSettings") as caught:
        Config(nodes=(NodeSpec("w1", "localhost", 45000),), auth={"secret": SECRET})  # type: ignore[arg-type]
    assert SECRET not in str(caught.value)


def test_check_summary_names_the_variable_never_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": NODES, "auth": {"secret_env": "DPWA_SECRET"}}))
    result = dpwa_check(path)
    assert result.returncode == 0, result
    assert "shared secret from environment variable DPWA_SECRET" in result.stdout
    assert "the-real-secret-value" not in result.stdout + result.stderr


# Secret files: who may read them, and what they are.


def secret_file(tmp_path: Path, mode: int, name: str = "secret.txt") -> Path:
    path = tmp_path / name
    path.write_text(f"{SECRET}\n")
    path.chmod(mode)
    return path


def auth_config(path: Path, **options: Any) -> dict[str, Any]:
    return {"nodes": NODES, "auth": {"secret_file": str(path), **options}}


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o650])
def test_a_secret_file_others_may_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path, mode)
    with pytest.raises(ConfigError, match="may be read by") as caught:
        load_config(auth_config(path))
    message = str(caught.value)
    assert f"chmod 600 {path}" in message and "allow_readable_secret_file: true" in message
    assert f"mode {mode:04o}" in message and SECRET not in message


@posix_only
def test_allow_readable_secret_file_accepts_a_group_readable_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = secret_file(tmp_path, 0o640)
    config = load_config(auth_config(path, allow_readable_secret_file=True))
    assert config.auth is not None and config.auth.secret == SECRET.encode()
    assert "allow_readable_secret_file is set" in caplog.text and SECRET not in caplog.text
    with pytest.raises(ConfigError, match="may be read by"):
        load_config(auth_config(path, allow_readable_secret_file=False))


@posix_only
@pytest.mark.parametrize("mode", [0o620, 0o602, 0o660, 0o666])
def test_a_secret_file_others_may_write_is_refused_even_when_reading_is_allowed(
    tmp_path: Path, mode: int
) -> None:
    path = secret_file(tmp_path, mode)
    with pytest.raises(ConfigError, match="may be written by") as caught:
        load_config(auth_config(path, allow_readable_secret_file=True))
    assert f"chmod 600 {path}" in str(caught.value)


@posix_only
@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_a_private_secret_file_is_accepted(tmp_path: Path, mode: int) -> None:
    config = load_config(auth_config(secret_file(tmp_path, mode)))
    assert config.auth is not None and config.auth.secret == SECRET.encode()


@posix_only
def test_a_symlink_is_judged_by_the_file_it_points_to(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(secret_file(tmp_path, 0o600))
    assert load_config(auth_config(link)).auth is not None
    public = tmp_path / "public-link"
    public.symlink_to(secret_file(tmp_path, 0o644, "public.txt"))
    with pytest.raises(ConfigError, match="may be read by"):
        load_config(auth_config(public))


def test_allow_readable_secret_file_needs_a_secret_file() -> None:
    with pytest.raises(ConfigError, match="only applies with secret_file"):
        load_config(
            {
                "nodes": NODES,
                "auth": {"secret_env": "DPWA_SECRET", "allow_readable_secret_file": True},
            }
        )


@posix_only
def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a regular file"):
        load_config(auth_config(tmp_path))


def load_within(config: Any, seconds: float) -> BaseException | None:
    """Load ``config`` in a daemon thread; fail the test if it takes longer than ``seconds``."""
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_config(config)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"load_config blocked for more than {seconds} s"
    return outcome[0]


@posix_only
def test_a_fifo_secret_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "secret.fifo"
    os.mkfifo(fifo, 0o600)
    error = load_within(auth_config(fifo), 5)
    assert isinstance(error, ConfigError) and "FIFO" in str(error), error

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(auth_config(fifo)))
    started = time.monotonic()
    result = dpwa_check(path, timeout=30)
    assert time.monotonic() - started < 20
    assert result.returncode == 1 and "not a regular file" in result.stderr


# YAML bombs and huge values.


def billion_laughs(key: str) -> str:
    """About 500 bytes that stand for 10**9 strings: nine levels of ten aliases each."""
    items = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    items += [f"&a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    return f"nodes: [{{name: w1, host: 127.0.0.1, port: 45000}}]\n{key}: [{', '.join(items)}]\n"


@pytest.mark.parametrize("key", ["auth", "timeout_ms", "constant", "tls"])
def test_an_alias_bomb_fails_at_once(tmp_path: Path, key: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs(key))
    assert path.stat().st_size < 600
    started = time.monotonic()
    with pytest.raises(ConfigError, match="may not use YAML aliases") as caught:
        load_config(path)
    assert time.monotonic() - started < 1
    assert "line 2, column" in str(caught.value) and len(str(caught.value)) < 300

    started = time.monotonic()
    result = dpwa_check(path, timeout=30)
    assert time.monotonic() - started < 10
    assert result.returncode == 1 and "may not use YAML aliases" in result.stderr
    assert len(result.stderr) < 400 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "text",
    [
        "nodes: &n [{name: w1, host: 127.0.0.1, port: 45000}]\n",  # an anchor alone
        "base: &b {value: 0.5}\n",
    ],
)
def test_anchors_are_refused_too(tmp_path: Path, text: str) -> None:
    path = tmp_path / "anchor.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="line 1, column .*may not use YAML aliases or anchors"):
        load_config(path)


def test_deep_nesting_is_refused_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("nodes: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested more than"):
        load_config(path)
    result = dpwa_check(path)
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_a_huge_integer_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    for digits in (400, 5000):  # past float's range; past int()'s default digit limit
        path.write_text(yaml.safe_dump({"nodes": NODES}) + f"timeout_ms: 1{'0' * digits}\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert len(str(caught.value)) < 400
        result = dpwa_check(path)
        assert result.returncode == 1 and "Traceback" not in result.stderr


def test_a_huge_value_is_cut_in_the_message(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    huge = [f"value-{i}" for i in range(60_000)]
    path.write_text(yaml.safe_dump({"nodes": NODES, "timeout_ms": huge}))
    assert path.stat().st_size < MAX_CONFIG_BYTES
    with pytest.raises(ConfigError, match=r"'timeout_ms' must be .*got \['value-0'") as caught:
        load_config(path)
    assert len(str(caught.value)) < 300 and "value-59999" not in str(caught.value)

    long_string = {"nodes": NODES, "interpolation": "x" * 500_000}
    with pytest.raises(ConfigError, match="must be a strategy name") as caught:
        load_config(long_string)
    assert len(str(caught.value)) < 300


def test_a_long_unknown_key_is_cut(tmp_path: Path) -> None:
    key = "a_plain_but_very_long_key_name_that_goes_on_and_on"
    with pytest.raises(
        ConfigError, match=r"unknown key 'a_plain_but_very'\.\.\. \(50 characters\)"
    ):
        load_config({"nodes": NODES, key: 1})


def test_a_config_over_one_mebibyte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "large.yaml"
    path.write_text(yaml.safe_dump({"nodes": NODES}) + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="is larger than 1024 KiB"):
        load_config(path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_config_file_is_refused_promptly() -> None:
    error = load_within("/dev/zero", 10)
    assert isinstance(error, ConfigError) and "larger than" in str(error)
