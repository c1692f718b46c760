"""Shared-memory segments that a hostile or broken process put in /dev/shm, or changed under us.

Real files in /dev/shm, real processes. Every file a test makes is removed by the ``made``
fixture, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from dpwa_core import shm
from dpwa_core.shm import SharedSegment

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs POSIX shared memory files")

_WAIT_S = 60.0  # generous: only a hang or a crash should ever reach it
_NO_TRACKER = (
    "import multiprocessing.resource_tracker as rt\n"
    "rt.register = lambda *args: None  # kill -9 must leave the file to remove_stale()\n"
)


def _name(pid: int | None = None) -> str:
    return f"dpwa-{os.getpid() if pid is None else pid}-{secrets.token_hex(8)}"


def _path(name: str) -> str:
    return os.path.join(shm.SHM_DIR, name)


def _exists(name: str) -> bool:
    return os.path.lexists(_path(name))


@pytest.fixture
def made() -> Iterator[list[str]]:
    """Names of files in /dev/shm to remove after the test."""
    names: list[str] = []
    try:
        yield names
    finally:
        for name in names:
            if _exists(name):
                os.unlink(_path(name))


@pytest.fixture
def writer() -> Iterator[SharedSegment]:
    segment = SharedSegment.create(1000, 0x5EED)
    segment.begin_write(0)
    segment.slot(0)[:] = 2.5
    segment.end_write(0, 7.0, 2.5)
    try:
        yield segment
    finally:
        segment.close()


def _copy_of(segment: SharedSegment, name: str, extra: int = 0) -> None:
    """Write a copy of ``segment``'s file under ``name``, ``extra`` bytes longer (or shorter)."""
    with open(_path(segment.name), "rb") as handle:
        data = handle.read()
    data = data + bytes(extra) if extra >= 0 else data[:extra]
    fd = os.open(_path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class _Lines:
    """Lines a child process prints, read by a thread so a wait can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._process = process
        self._stream = process.stdout
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self._stream:
            self._queue.put(line)
        self._queue.put(None)  # end of output: the child is gone

    def next(self) -> str:
        try:
            line = self._queue.get(timeout=_WAIT_S)
        except queue.Empty:
            raise AssertionError(f"the child printed nothing in {_WAIT_S} s") from None
        if line is None:
            code = self._process.wait(timeout=_WAIT_S)
            raise AssertionError(f"the child ended with {code} (SIGBUS is -7) before its line")
        return line.strip()


def _start(code: str, *args: str, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*(prefix or []), sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=_WAIT_S)


def _removed_once_unlocked(name: str) -> None:
    """remove_stale() removes ``name`` once its creator's death released the lock."""
    deadline = time.monotonic() + _WAIT_S
    while name not in shm.remove_stale():
        assert time.monotonic() < deadline, f"{name} still locked {_WAIT_S} s after the kill"
        time.sleep(0.02)
    assert not _exists(name)


# --- files that are not segments ------------------------------------------------------------

_ATTACH_TIMED = """
import json, sys, time
from dpwa_core import shm
from dpwa_core.shm import SharedSegment
start = time.monotonic()
try:
    SharedSegment.attach(sys.argv[1], bytes(16), 1000, 0x5EED)
    outcome = "attached"
except (OSError, ValueError) as exc:
    outcome = f"{type(exc).__name__}: {exc}"
attach_s = time.monotonic() - start
start = time.monotonic()
removed = shm.remove_stale()
print(json.dumps({"outcome": outcome, "attach_s": attach_s,
                  "remove_stale_s": time.monotonic() - start, "removed": removed}))
"""


def test_a_fifo_named_like_a_segment_is_refused_at_once(made: list[str]) -> None:
    name = _name()
    made.append(name)
    os.mkfifo(_path(name), 0o600)
    # In a child: if the open blocked, only the child would hang (and be killed).
    child = subprocess.run(
        [sys.executable, "-c", _ATTACH_TIMED, name],
        capture_output=True,
        text=True,
        timeout=_WAIT_S,
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert report["outcome"] == f"ValueError: segment {name} refused: a FIFO"
    assert report["attach_s"] < 2.0 and report["remove_stale_s"] < 2.0
    assert name not in report["removed"] and _exists(name)


def test_a_symbolic_link_is_refused(writer: SharedSegment, made: list[str]) -> None:
    link, dangling = _name(), _name()
    made.extend([link, dangling])
    os.symlink(_path(writer.name), _path(link))  # following it would find a valid segment
    os.symlink(_path(_name()), _path(dangling))
    for name in (link, dangling):
        with pytest.raises(ValueError, match="a symbolic link"):
            SharedSegment.attach(name, writer.token, 1000, 0x5EED)
    removed = shm.remove_stale()
    assert link not in removed and dangling not in removed
    assert _exists(link) and _exists(dangling) and _exists(writer.name)


@pytest.mark.parametrize("extra", [64, 4096, -64, -1000])
def test_a_file_of_another_size_is_refused(
    writer: SharedSegment, made: list[str], extra: int
) -> None:
    name = _name()
    made.append(name)
    _copy_of(writer, name, extra)  # header, token and all: only the size is wrong
    with pytest.raises(ValueError, match="bytes, our layout needs"):
        SharedSegment.attach(name, writer.token, 1000, 0x5EED)


def test_an_exact_copy_is_accepted(writer: SharedSegment, made: list[str]) -> None:
    """The control for the refusals around it: the same file with nothing wrong attaches."""
    name = _name()
    made.append(name)
    _copy_of(writer, name)
    reader = SharedSegment.attach(name, writer.token, 1000, 0x5EED)
    out = np.zeros(1000, np.float32)
    assert reader.read(0, writer.sequence(0), out) == (7.0, 2.5)
    assert np.all(out == 2.5)
    reader.close()


def test_a_file_of_another_user_is_refused_and_left_alone(
    writer: SharedSegment, made: list[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    name = _name(pid=4_000_000_000)  # no such process: only its owner protects it
    made.append(name)
    _copy_of(writer, name)
    os.chown(_path(name), 65534, 65534)
    with pytest.raises(ValueError, match="owned by uid 65534"):
        SharedSegment.attach(name, writer.token, 1000, 0x5EED)
    assert name not in shm.remove_stale() and _exists(name)


def test_a_file_other_users_may_write_is_refused(writer: SharedSegment, made: list[str]) -> None:
    name = _name()
    made.append(name)
    _copy_of(writer, name)
    os.chmod(_path(name), 0o666)
    with pytest.raises(ValueError, match="other users may write"):
        SharedSegment.attach(name, writer.token, 1000, 0x5EED)


# --- segments that change under a reader ----------------------------------------------------

_READER = """
import json, sys, threading
import numpy as np
from dpwa_core.shm import SharedSegment
name, token, size, sequence = sys.argv[1], bytes.fromhex(sys.argv[2]), *map(int, sys.argv[3:5])
segment = SharedSegment.attach(name, token, size, 1)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
out = np.empty(size, np.float32)
ok = torn = 0
while not stop.is_set():
    if segment.read(0, sequence, out) is None:
        torn += 1
        if torn == 1:
            print("torn", flush=True)
    else:
        assert np.all(out == 4.0)
        ok += 1
        if ok == 1:
            print("ready", flush=True)
segment.close()
print(json.dumps({"ok": ok, "torn": torn}), flush=True)
"""


def test_a_reader_survives_its_segment_shrinking_and_changing_under_it() -> None:
    size = 25 * (1 << 20) // 4  # 25 MiB per slot: a copy takes long enough to be cut mid-way
    segment = SharedSegment.create(size, 1)
    path = _path(segment.name)
    total = os.path.getsize(path)
    reader = None
    try:
        segment.begin_write(0)
        segment.slot(0)[:] = 4.0
        segment.end_write(0, 1.0, 4.0)
        sequence = segment.sequence(0)
        # From here on this process never touches its own mapping: it is shrunk under it too.
        reader = _start(_READER, segment.name, segment.token.hex(), str(size), str(sequence))
        lines = _Lines(reader)
        assert lines.next() == "ready"
        os.truncate(path, 128 + 4 * size // 2)  # half of slot 0 is gone
        assert lines.next() == "torn"
        os.truncate(path, 0)  # all of it
        os.truncate(path, total)  # back to its size, zeros: another sequence, so still refused
        time.sleep(0.05)  # give the reader a few reads of that state (not needed to pass)
        assert reader.stdin is not None
        reader.stdin.write("stop\n")
        reader.stdin.flush()
        report = json.loads(lines.next())
        code = reader.wait(timeout=_WAIT_S)
        assert reader.stderr is not None
        assert code == 0, f"reader ended with {code} (SIGBUS is -7): {reader.stderr.read()}"
        assert report["ok"] >= 1 and report["torn"] >= 1
    finally:
        if reader is not None:
            _kill(reader)
        segment.close()
    assert not os.path.exists(path)


def test_a_segment_removed_or_replaced_under_a_reader_stays_readable(made: list[str]) -> None:
    segment = SharedSegment.create(1000, 3)
    try:
        segment.begin_write(0)
        segment.slot(0)[:] = 1.0
        segment.end_write(0, 1.0, 1.0)
        reader = SharedSegment.attach(segment.name, segment.token, 1000, 3)
        total = os.path.getsize(_path(segment.name))
        os.unlink(_path(segment.name))
        out = np.zeros(1000, np.float32)
        assert reader.read(0, segment.sequence(0), out) == (1.0, 1.0)
        # Someone puts another file under the name: the reader still reads the one it opened.
        made.append(segment.name)
        with open(_path(segment.name), "wb") as handle:
            handle.write(b"\xff" * total)
        segment.begin_write(1)
        segment.slot(1)[:] = 2.0
        segment.end_write(1, 2.0, 2.0)
        assert reader.read(1, segment.sequence(1), out) == (2.0, 2.0)
        assert np.all(out == 2.0)
        with pytest.raises(ValueError, match="token differs"):
            SharedSegment.attach(segment.name, segment.token, 1000, 3)
        reader.close()
    finally:
        segment.close()  # removes the impostor file too (same name): fine, it is ours


def test_a_deadline_that_passed_stops_attach_and_read(writer: SharedSegment) -> None:
    past = time.monotonic() - 1.0
    with pytest.raises(TimeoutError, match="deadline passed"):
        SharedSegment.attach(writer.name, writer.token, 1000, 0x5EED, deadline=past)
    assert issubclass(TimeoutError, OSError)  # the puller's except (OSError, ValueError)
    reader = SharedSegment.attach(writer.name, writer.token, 1000, 0x5EED, deadline=None)
    out = np.zeros(1000, np.float32)
    sequence = writer.sequence(0)
    assert reader.read(0, sequence, out, deadline=past) is None
    assert reader.read(0, sequence, out, deadline=time.monotonic() + 600) == (7.0, 2.5)
    reader.close()


def test_a_deadline_passing_between_chunks_stops_the_copy() -> None:
    size = 4 * shm.CHUNK_BYTES // 4
    segment = SharedSegment.create(size, 2)
    try:
        segment.begin_write(0)
        segment.end_write(0, 1.0, 1.0)
        reader = SharedSegment.attach(segment.name, segment.token, size, 2)
        deadline = time.monotonic() + 0.05
        chunks = []

        def slow_check(chunk: np.ndarray) -> None:
            chunks.append(len(chunk))
            while time.monotonic() < deadline:  # the deadline passes during the first chunk
                time.sleep(0.01)

        out = np.empty(size, np.float32)
        assert reader.read(0, segment.sequence(0), out, check=slow_check, deadline=deadline) is None
        assert chunks == [shm.CHUNK_BYTES // 4]
        reader.close()
    finally:
        segment.close()


# --- remove_stale() and live segments whose pid means nothing here --------------------------

_CREATOR = (
    _NO_TRACKER
    + """
import os, sys, time
from dpwa_core.shm import SharedSegment
segment = SharedSegment.create(1000, 1)
print(segment.name, os.getpid(), flush=True)
time.sleep(600)
"""
)

# Run as pid 1 of a new PID namespace: fork until a child has pid argv[1], which runs argv[2].
_NAMESPACE_CREATOR = """
import os, sys
target = int(sys.argv[1])
while True:
    pid = os.fork()
    if pid == 0:
        if os.getpid() >= target:
            exec(compile(sys.argv[2], "creator", "exec"))
        os._exit(0)
    os.waitpid(pid, 0)
    if pid >= target:
        os._exit(0)
"""


def _pid_nobody_has_here() -> int:
    """A pid below 300 that no process has in our namespace.

    Linux hands out pids below 300 only until the first wrap-around (it then restarts at 300),
    so a free one stays free; a new PID namespace reaches it after a few hundred forks.
    """
    for pid in range(30, 300):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    pytest.skip("every pid below 300 is taken in this namespace")


def test_remove_stale_keeps_a_live_segment_of_another_pid_namespace() -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux's unshare")
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()}")
    target = _pid_nobody_has_here()
    prefix = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child"]
    creator = _start(_NAMESPACE_CREATOR, str(target), _CREATOR, prefix=prefix)
    name = ""
    try:
        name, inner_pid = _Lines(creator).next().split()
        assert int(inner_pid) == target and name.startswith(f"dpwa-{inner_pid}-")
        assert _exists(name)
        # The pid in the name is nobody's here, yet its creator is alive (in its namespace).
        assert not os.path.exists(f"/proc/{inner_pid}")
        assert name not in shm.remove_stale()
        assert _exists(name)
        _kill(creator)  # --kill-child: the namespace's init, then everything in it, dies
        _removed_once_unlocked(name)
    finally:
        _kill(creator)
        if name and _exists(name):
            os.unlink(_path(name))


def test_remove_stale_keeps_a_locked_segment_whatever_pid_its_name_says() -> None:
    creator = _start(_CREATOR)
    renamed = ""
    try:
        name, _pid = _Lines(creator).next().split()
        renamed = _name(pid=4_000_000_000)  # not a pid at all (pid_t is 32 bits)
        os.rename(_path(name), _path(renamed))  # same file, same lock
        assert renamed not in shm.remove_stale() and _exists(renamed)
        _kill(creator)
        _removed_once_unlocked(renamed)
    finally:
        _kill(creator)
        if renamed and _exists(renamed):
            os.unlink(_path(renamed))


_FORKING_CREATOR = (
    _NO_TRACKER
    + """
import os, sys, time
from dpwa_core.shm import SharedSegment
segment = SharedSegment.create(1000, 1)
closer = os.fork()
if closer == 0:
    segment.close()  # a forked child's close must not remove its parent's segment
    os._exit(0)
os.waitpid(closer, 0)
holder = os.fork()
if holder == 0:
    time.sleep(600)  # holds the inherited descriptor, hence the lock
    os._exit(0)
print(segment.name, holder, flush=True)
time.sleep(600)
"""
)


def test_a_forked_child_keeps_the_segment_alive_and_does_not_remove_it() -> None:
    creator = _start(_FORKING_CREATOR)
    name, holder = "", 0
    try:
        name, holder_text = _Lines(creator).next().split()
        holder = int(holder_text)
        assert _exists(name)  # the first child closed its copy: still there
        _kill(creator)
        assert name not in shm.remove_stale() and _exists(name)  # the holder still has it
        os.kill(holder, signal.SIGKILL)
        _removed_once_unlocked(name)
    finally:
        _kill(creator)
        if holder:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGKILL)
        if name and _exists(name):
            os.unlink(_path(name))
