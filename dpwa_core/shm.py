"""Shared-memory snapshots: co-located peers copy parameters without a socket.

A node that serves through shared memory keeps its two snapshot buffers in one POSIX
shared-memory segment (``/dev/shm/dpwa-<pid>-<16 hex digits>``) instead of private memory, so
publishing costs nothing extra. Layout of a segment (little-endian):

======  =====  ====================================================================
offset  bytes  field
======  =====  ====================================================================
0       8      magic ``b"DPWASHM1"``
8       16     token: random bytes, also sent over TCP to prove the segment is ours
24      8      size: float32 elements per slot
32      8      layout hash (the wire header's ``hash`` field)
40      8      creator's process id (for people reading ``ls /dev/shm``; nothing uses it)
48      8      bytes per slot (``4 * size`` rounded up to 64)
56      8      reserved, zero
64      24     slot 0: sequence (u64), clock (f64), loss (f64)
88      24     slot 1: sequence (u64), clock (f64), loss (f64)
112     16     reserved, zero
128     ...    slot 0 data, then slot 1 data
======  =====  ====================================================================

Each slot is guarded by a sequence counter (a seqlock): the writer makes it odd before it
writes the slot and even after, so a reader that copies a slot and finds the same even counter
before and after the copy holds a consistent snapshot. The writer never waits for a reader.

**The writer** maps its segment read-write. It creates the file itself (``O_CREAT | O_EXCL |
O_NOFOLLOW``, mode 600), reserves its memory with ``posix_fallocate`` (a full ``/dev/shm`` is
an :class:`OSError` at creation, not a SIGBUS later) and holds a shared ``flock`` on it for the
segment's lifetime: that lock, not the process id, says the segment is alive.

**A reader never maps a peer's segment.** A peer's answer names a file in ``/dev/shm``, where
every user can create files, so :meth:`SharedSegment.attach` opens only a name of the exact
form above, refuses anything that is not a regular file (checked with ``lstat`` before the open
and ``fstat`` after it), opens it with ``O_NOFOLLOW | O_NONBLOCK`` (a symbolic link is refused,
a FIFO cannot block the open), and refuses a file that is not owned by our user, that other
users may write, or whose size is not exactly the one our layout implies. It then reads the
header and the slots from the descriptor with ``pread``. A segment that shrinks under a reader
therefore gives a short read, which :meth:`SharedSegment.read` reports as a torn copy (None),
never a SIGBUS; one removed under a reader stays readable through the open descriptor (the
sequence check still guards each copy); one replaced under the same name is not seen (the
descriptor holds the old file). Reading costs a kernel copy instead of a user-space one:
slower than ``memcpy`` from a mapping, still well ahead of TCP (``benchmarks/pull_throughput.py``).

**Deadlines.** :meth:`SharedSegment.attach` and :meth:`SharedSegment.read` take an optional
``deadline`` (a :func:`time.monotonic` value): attach raises :class:`TimeoutError` (an
:class:`OSError`) once it has passed; read checks it before each chunk of
:data:`CHUNK_BYTES` and returns None when it has passed. Nothing here blocks otherwise.

**Cleanup.** Segments are removed when the node closes. If the node is killed, Python's
resource tracker process removes them, and :func:`remove_stale` removes the ones nobody holds
locked any more: it locks each of our user's regular segment files with ``LOCK_EX | LOCK_NB``
and removes only those it could lock. So a live segment of a process in another PID namespace
sharing ``/dev/shm`` (containers sharing IPC), whose pid means nothing here, is kept. The lock
belongs to the open file description: a child forked by the creator (without ``exec``) inherits
it, and the segment counts as alive until the creator and all such children are gone (the
children still map it too). A forked child's :meth:`SharedSegment.close` never removes the
segment; only the creating process does. The descriptor is close-on-exec, so programs the node
starts do not hold it. A file of another user, a symbolic link or anything but a regular file is
never touched. An empty file is given a minute's grace (its creator may be about to lock it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker

import numpy as np

from dpwa_core._log import get_logger

__all__ = ["CHUNK_BYTES", "SHM_DIR", "SharedSegment", "available", "remove_stale", "valid_name"]

_log = get_logger("shm")

SHM_DIR = "/dev/shm"
"""Where POSIX shared memory appears as files (Linux)."""
CHUNK_BYTES = 1 << 20
"""Bytes a reader copies per ``pread``; the deadline is checked and ``check`` called per chunk."""
_MAGIC = b"DPWASHM1"
_HEAD = struct.Struct("<8s16sQQQQQ")  # magic, token, size, hash, pid, slot_bytes, reserved
_META = struct.Struct("<Qdd")  # sequence, clock, loss
_META_OFFSET = 64
_DATA_OFFSET = 128
_ALIGN = 64
_NAME = re.compile(r"dpwa-(\d{1,10})-[0-9a-f]{16}")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_GRACE_S = 60.0  # remove_stale leaves an empty, unlocked file this young alone
TOKEN_BYTES = 16


def available() -> bool:
    """Whether this platform exposes POSIX shared memory as files under :data:`SHM_DIR`."""
    return sys.platform.startswith("linux") and os.path.isdir(SHM_DIR)


def valid_name(name: str) -> bool:
    """Whether ``name`` has the exact form of a dpwa segment name (nothing else is opened)."""
    return _NAME.fullmatch(name) is not None


def _slot_bytes(size: int) -> int:
    return -(-4 * size // _ALIGN) * _ALIGN


def _total_bytes(size: int) -> int:
    return _DATA_OFFSET + 2 * max(_slot_bytes(size), _ALIGN)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _open_checked(name: str, total: int) -> int:
    """Open segment ``name`` read-only; raise ValueError unless it is a plausible segment.

    Plausible: a regular file (not a link, FIFO, device...), owned by our user, not writable by
    other users, of exactly ``total`` bytes.
    """
    path = os.path.join(SHM_DIR, name)
    mode = os.lstat(path).st_mode  # FileNotFoundError: not on this host
    if not stat.S_ISREG(mode):
        raise ValueError(f"segment {name} refused: {_kind(mode)}")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a link since the lstat
            raise ValueError(f"segment {name} refused: a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        uid = os.geteuid()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"segment {name} refused: {_kind(info.st_mode)}")
        if info.st_uid != uid:
            raise ValueError(f"segment {name} refused: owned by uid {info.st_uid}, not {uid}")
        if info.st_mode & 0o022:
            raise ValueError(
                f"segment {name} refused: other users may write it "
                f"(mode {stat.S_IMODE(info.st_mode):o})"
            )
        if info.st_size != total:
            raise ValueError(f"segment {name} has {info.st_size} bytes, our layout needs {total}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class SharedSegment:
    """One segment: two float32 slots with their sequence counters, clocks and losses.

    Make one with :meth:`create` (the writer, which maps it) or :meth:`attach` (a reader,
    which reads it with ``pread`` and never maps it).
    """

    def __init__(
        self,
        name: str,
        token: bytes,
        size: int,
        shape_hash: int,
        fd: int,
        mapping: mmap.mmap | None,
    ) -> None:
        self.name = name
        """The segment's name (the file name under :data:`SHM_DIR`)."""
        self.token = token
        """Random bytes written in the header; the writer sends them to readers over TCP."""
        self.size = size
        """Float32 elements per slot."""
        self.shape_hash = shape_hash
        """The layout hash the segment was made for."""
        self._fd = fd
        self._mapping = mapping
        self._creator = os.getpid() if mapping is not None else -1
        self._lock = threading.Lock()  # a read and close() never overlap (the fd is not reused)
        self._slot_bytes = _slot_bytes(size)
        self._buffer = memoryview(b"") if mapping is None else memoryview(mapping)
        if mapping is None:
            self._slots: tuple[np.ndarray, ...] = ()
            self._seq = np.empty(0, np.uint64)
            self._meta = np.empty((0, 3), np.float64)
            return
        buffer = self._buffer
        self._slots = tuple(
            np.frombuffer(buffer, np.float32, size, _DATA_OFFSET + i * self._slot_bytes)
            for i in (0, 1)
        )
        # One aligned 8-byte word per field: loads and stores of it are single instructions.
        self._seq = np.frombuffer(buffer, np.uint64, 2 * 3, _META_OFFSET)[::3]
        self._meta = np.frombuffer(buffer, np.float64, 2 * 3, _META_OFFSET).reshape(2, 3)

    @classmethod
    def create(cls, size: int, shape_hash: int) -> SharedSegment:
        """Create a new segment for ``size`` float32 elements per slot.

        The returned writer holds a shared ``flock`` on the file until :meth:`close` (see the
        module's docstring for what that means for forked children).

        Args:
            size: float32 elements per slot.
            shape_hash: the layout hash readers must match.

        Raises:
            OSError: shared memory could not be created (for example /dev/shm is full).
        """
        remove_stale()
        token = secrets.token_bytes(TOKEN_BYTES)
        name = f"dpwa-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        total = _total_bytes(size)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            # Locked while still empty: remove_stale() leaves empty files alone for a while.
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.posix_fallocate(fd, 0, total)
            mapping = mmap.mmap(fd, total)  # MAP_SHARED, read-write; it holds a dup of fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            raise
        resource_tracker.register(f"/{name}", "shared_memory")  # removes it if we are killed
        _HEAD.pack_into(
            mapping, 0, _MAGIC, token, size, shape_hash, os.getpid(), _slot_bytes(size), 0
        )
        return cls(name, token, size, shape_hash, fd, mapping)

    @classmethod
    def attach(
        cls,
        name: str,
        token: bytes,
        size: int,
        shape_hash: int,
        *,
        deadline: float | None = None,
    ) -> SharedSegment:
        """Open a peer's segment for reading after checking it is the one the peer announced.

        Nothing is mapped: :meth:`read` copies with ``pread``. The open never blocks.

        Args:
            name: the segment name the peer sent; anything but a dpwa segment name is refused.
            token: the token the peer sent; it must match the segment's header.
            size: float32 elements per slot of *our* layout.
            shape_hash: *our* layout hash.
            deadline: a :func:`time.monotonic` value; refuse once it has passed.

        Raises:
            ValueError: the name is not a segment name; the file is not a regular file (a
                FIFO, a symbolic link...), is not owned by our user, may be written by other
                users, or is not exactly the size our layout implies; or its magic, token,
                size or layout hash does not match.
            TimeoutError: ``deadline`` has passed (an :class:`OSError`).
            OSError: the segment does not exist here (:class:`FileNotFoundError`: the peer is on
                another host) or cannot be opened.
        """
        if _passed(deadline):
            raise TimeoutError(f"deadline passed before attaching segment {name[:80]!r}")
        if not valid_name(name):
            raise ValueError(f"not a dpwa shared-memory segment name: {name[:80]!r}")
        fd = _open_checked(name, _total_bytes(size))
        try:
            head = os.pread(fd, _HEAD.size, 0)
            if len(head) != _HEAD.size:
                raise ValueError(f"segment {name} refused: it shrank while being opened")
            magic, seg_token, seg_size, seg_hash, _pid, slot_bytes, _ = _HEAD.unpack(head)
            problems = []
            if magic != _MAGIC:
                problems.append("bad magic")
            if seg_token != token:
                problems.append("token differs from the one the peer sent")
            if seg_size != size or slot_bytes != _slot_bytes(size):
                problems.append(f"{seg_size} elements per slot, ours {size}")
            if seg_hash != shape_hash:
                problems.append(f"layout hash {seg_hash:016x}, ours {shape_hash:016x}")
            if problems:
                raise ValueError(f"segment {name} refused: " + "; ".join(problems))
        except BaseException:
            os.close(fd)
            raise
        return cls(name, token, size, shape_hash, fd, None)

    def slot(self, index: int) -> np.ndarray:
        """The writer's float32 view of slot ``index`` (0 or 1).

        Raises:
            ValueError: this is a reader (it does not map the segment; use :meth:`read`).
        """
        if self._mapping is None:
            raise ValueError("a reader does not map the segment; use read()")
        return self._slots[index]

    def begin_write(self, index: int) -> None:
        """Mark slot ``index`` as being written (its sequence becomes odd). Writer only."""
        self._seq[index] += np.uint64(1)

    def end_write(self, index: int, clock: float, loss: float) -> None:
        """Store the slot's clock and loss, then mark it consistent (its sequence becomes even)."""
        self._meta[index, 1] = clock
        self._meta[index, 2] = loss
        self._seq[index] += np.uint64(1)

    def sequence(self, index: int) -> int:
        """The slot's sequence counter: odd while it is being written.

        Raises:
            ValueError: a reader found the segment shrunk or closed.
        """
        if self._mapping is not None:
            return int(self._seq[index])
        with self._lock:
            meta = self._read_meta(index)
        if meta is None:
            raise ValueError(f"segment {self.name} shrank or was closed")
        return meta[0]

    def _read_meta(self, index: int) -> tuple[int, float, float] | None:
        """The slot's (sequence, clock, loss) read with pread; None on a short read."""
        if self._fd < 0:
            return None
        raw = os.pread(self._fd, _META.size, _META_OFFSET + index * _META.size)
        if len(raw) != _META.size:
            return None
        sequence, clock, loss = _META.unpack(raw)
        return int(sequence), float(clock), float(loss)

    def read(
        self,
        index: int,
        sequence: int,
        out: np.ndarray,
        copy: Callable[[np.ndarray, np.ndarray], object] | None = None,
        *,
        check: Callable[[np.ndarray], object] | None = None,
        deadline: float | None = None,
    ) -> tuple[float, float] | None:
        """Copy slot ``index`` into ``out`` if it still holds version ``sequence``.

        The slot is read from the file with ``pread``, :data:`CHUNK_BYTES` at a time, straight
        into ``out``. Anything that goes wrong with the segment (it shrank, vanished, was
        rewritten, an I/O error, the deadline passed, the segment was closed) returns None;
        only exceptions raised by ``copy`` or ``check`` themselves, or a ValueError for an
        unusable ``out``, propagate.

        Args:
            index: the slot, 0 or 1.
            sequence: the even sequence number the writer announced for the slot.
            out: a C-contiguous, writable float32 array of :attr:`size` elements.
            copy: for callers written for the mapped segment: called once, as
                ``copy(out, out)``, after the whole slot has landed in ``out`` (there is no
                mapped source any more). A copying callback such as :func:`numpy.copyto` then
                copies nothing; a checking one sees every value. Prefer ``check``.
            check: called with each chunk of ``out`` (a view) right after it landed, while it
                is in cache, e.g. to look for NaN and Inf. Its return value is ignored.
            deadline: a :func:`time.monotonic` value; the copy stops (None) once it has
                passed, checked before each chunk.

        Returns:
            ``(clock, loss)`` when the copy is consistent, or None when the slot was
            rewritten before or during the copy, the segment shrank or could not be read, or
            the deadline passed (``out`` then holds garbage).

        Raises:
            ValueError: ``out`` is not a contiguous writable float32 array of :attr:`size`.
        """
        if (
            out.dtype != np.float32
            or out.size != self.size
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(f"out must be a writable contiguous float32 array of {self.size}")
        if sequence % 2 or index not in (0, 1):
            return None
        with self._lock:
            try:
                result = self._read_locked(index, sequence, out, check, deadline)
            except OSError as exc:
                _log.debug("reading segment %s failed: %s", self.name, exc)
                return None
        if result is not None and copy is not None:
            copy(out, out)
        return result

    def _read_locked(
        self,
        index: int,
        sequence: int,
        out: np.ndarray,
        check: Callable[[np.ndarray], object] | None,
        deadline: float | None,
    ) -> tuple[float, float] | None:
        before = self._read_meta(index)
        if before is None or before[0] != sequence:
            return None
        fd = self._fd
        data = out.data.cast("B")
        offset = _DATA_OFFSET + index * self._slot_bytes
        per_chunk = CHUNK_BYTES // 4
        for start in range(0, data.nbytes, CHUNK_BYTES):
            if _passed(deadline):
                return None
            view = data[start : start + CHUNK_BYTES]
            if os.preadv(fd, [view], offset + start) != view.nbytes:
                return None  # the file shrank under us
            if check is not None:
                first = start // 4
                check(out[first : first + per_chunk])
        after = self._read_meta(index)
        if after is None or after[0] != sequence:
            return None
        return before[1], before[2]

    def close(self) -> None:
        """Close the segment; the writer's creating process also removes it. Safe to call twice.

        A writer's array still viewing a slot keeps the memory mapped until it is dropped. In a
        child forked from the creator, close only drops the child's copies: the segment stays.
        """
        with self._lock:
            fd, self._fd = self._fd, -1
        self._slots = ()
        self._seq = np.empty(0, np.uint64)
        self._meta = np.empty((0, 3), np.float64)
        buffer, self._buffer = self._buffer, memoryview(b"")
        mapping, self._mapping = self._mapping, None
        if mapping is not None and self._creator == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))
            with contextlib.suppress(Exception):
                resource_tracker.unregister(f"/{self.name}", "shared_memory")
        try:
            buffer.release()
            if mapping is not None:
                mapping.close()
        except BufferError:
            _log.debug("segment %s is still viewed; it is unmapped when the view goes", self.name)
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        role = "writer" if self._mapping is not None else "reader"
        return f"SharedSegment({self.name!r}, {role}, size={self.size})"


def remove_stale() -> list[str]:
    """Remove this user's dpwa segments that no process holds any more.

    A segment is stale when its file can be locked with ``flock(LOCK_EX | LOCK_NB)``: its
    creator (and any child forked from it) is gone. The pid in the name is not used, so a live
    segment of a process in another PID namespace is kept. Files of other users, symbolic
    links, anything but regular files, and empty files younger than a minute are left alone.

    Returns:
        The names removed.
    """
    if not available():
        return []
    removed = []
    for name in os.listdir(SHM_DIR):
        if _NAME.fullmatch(name) is None:
            continue
        try:
            if _remove_if_stale(os.path.join(SHM_DIR, name)):
                removed.append(name)
        except OSError as exc:
            _log.debug("could not check or remove segment %s: %s", name, exc)
    if removed:
        _log.info("removed %d stale shared-memory segment(s) of dead nodes", len(removed))
    return removed


def _remove_if_stale(path: str) -> bool:
    uid = os.geteuid()
    try:
        seen = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(seen.st_mode) or seen.st_uid != uid:
        return False
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a link since the lstat
            return False
        raise
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (seen.st_dev, seen.st_ino) or info.st_uid != uid:
            return False
        if info.st_size == 0 and time.time() - info.st_ctime < _CREATE_GRACE_S:
            return False  # maybe created a moment ago and not locked yet
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its creator holds it: alive, whatever its pid says here
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return False
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)
