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
40      8      creator's process id
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

Segments are removed when the node closes. If the node is killed, Python's resource tracker
process removes them, and :func:`remove_stale` removes any whose creator is no longer alive.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import struct
import sys
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np

from dpwa_core._log import get_logger

__all__ = ["SHM_DIR", "SharedSegment", "available", "remove_stale", "valid_name"]

_log = get_logger("shm")

SHM_DIR = "/dev/shm"
"""Where POSIX shared memory appears as files (Linux)."""
_MAGIC = b"DPWASHM1"
_HEAD = struct.Struct("<8s16sQQQQQ")  # magic, token, size, hash, pid, slot_bytes, reserved
_META = struct.Struct("<Qdd")  # sequence, clock, loss
_META_OFFSET = 64
_DATA_OFFSET = 128
_ALIGN = 64
_NAME = re.compile(r"dpwa-(\d{1,10})-[0-9a-f]{16}")
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


class SharedSegment:
    """One segment: two float32 slots with their sequence counters, clocks and losses.

    Make one with :meth:`create` (the writer) or :meth:`attach` (a reader).
    """

    def __init__(
        self,
        name: str,
        token: bytes,
        size: int,
        shape_hash: int,
        buffer: memoryview,
        owner: shared_memory.SharedMemory | None,
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
        self._buffer = buffer
        self._owner = owner
        self._mapping = mapping
        slot_bytes = _slot_bytes(size)
        self._slots = tuple(
            np.frombuffer(buffer, np.float32, size, _DATA_OFFSET + i * slot_bytes) for i in (0, 1)
        )
        # One aligned 8-byte word per field: loads and stores of it are single instructions.
        self._seq = np.frombuffer(buffer, np.uint64, 2 * 3, _META_OFFSET)[::3]
        self._meta = np.frombuffer(buffer, np.float64, 2 * 3, _META_OFFSET).reshape(2, 3)

    @classmethod
    def create(cls, size: int, shape_hash: int) -> SharedSegment:
        """Create a new segment for ``size`` float32 elements per slot.

        Args:
            size: float32 elements per slot.
            shape_hash: the layout hash readers must match.

        Raises:
            OSError: shared memory could not be created (for example /dev/shm is full).
        """
        remove_stale()
        token = secrets.token_bytes(TOKEN_BYTES)
        name = f"dpwa-{os.getpid()}-{secrets.token_hex(8)}"
        owner = shared_memory.SharedMemory(name=name, create=True, size=_total_bytes(size))
        buffer = owner.buf
        assert buffer is not None
        _HEAD.pack_into(
            buffer, 0, _MAGIC, token, size, shape_hash, os.getpid(), _slot_bytes(size), 0
        )
        buffer[_META_OFFSET:_DATA_OFFSET] = bytes(_DATA_OFFSET - _META_OFFSET)
        return cls(name, token, size, shape_hash, buffer, owner, None)

    @classmethod
    def attach(cls, name: str, token: bytes, size: int, shape_hash: int) -> SharedSegment:
        """Map a peer's segment read-only after checking it is the one the peer announced.

        Args:
            name: the segment name the peer sent; anything but a dpwa segment name is refused.
            token: the token the peer sent; it must match the segment's header.
            size: float32 elements per slot of *our* layout.
            shape_hash: *our* layout hash.

        Raises:
            ValueError: the name, token, size, hash or file size does not match.
            OSError: the segment does not exist here (the peer is on another host).
        """
        if not valid_name(name):
            raise ValueError(f"not a dpwa shared-memory segment name: {name[:80]!r}")
        total = _total_bytes(size)
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            actual = os.fstat(fd).st_size
            if actual < total:
                raise ValueError(f"segment {name} has {actual} bytes, our layout needs {total}")
            mapping = mmap.mmap(fd, total, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            magic, seg_token, seg_size, seg_hash, _pid, slot_bytes, _ = _HEAD.unpack_from(
                mapping, 0
            )
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
            mapping.close()
            raise
        return cls(name, token, size, shape_hash, memoryview(mapping), None, mapping)

    def slot(self, index: int) -> np.ndarray:
        """The float32 view of slot ``index`` (0 or 1); read-only for a reader."""
        return self._slots[index]

    def begin_write(self, index: int) -> None:
        """Mark slot ``index`` as being written (its sequence becomes odd)."""
        self._seq[index] += np.uint64(1)

    def end_write(self, index: int, clock: float, loss: float) -> None:
        """Store the slot's clock and loss, then mark it consistent (its sequence becomes even)."""
        self._meta[index, 1] = clock
        self._meta[index, 2] = loss
        self._seq[index] += np.uint64(1)

    def sequence(self, index: int) -> int:
        """The slot's sequence counter: odd while it is being written."""
        return int(self._seq[index])

    def read(
        self,
        index: int,
        sequence: int,
        out: np.ndarray,
        copy: Callable[[np.ndarray, np.ndarray], object] = np.copyto,
    ) -> tuple[float, float] | None:
        """Copy slot ``index`` into ``out`` if it still holds version ``sequence``.

        Args:
            index: the slot, 0 or 1.
            sequence: the even sequence number the writer announced for the slot.
            out: a float32 array of :attr:`size` elements.
            copy: ``copy(out, slot)`` does the copy (e.g. checking values on the way).

        Returns:
            ``(clock, loss)`` when the copy is consistent, or None when the slot was
            rewritten before or during the copy (``out`` then holds garbage).
        """
        if sequence % 2 or int(self._seq[index]) != sequence:
            return None
        clock, loss = float(self._meta[index, 1]), float(self._meta[index, 2])
        copy(out, self._slots[index])
        if int(self._seq[index]) != sequence:
            return None
        return clock, loss

    def close(self) -> None:
        """Unmap the segment; the writer also removes it. Safe to call twice.

        An array still viewing a slot keeps the memory mapped until it is dropped.
        """
        self._slots = ()
        self._seq = np.empty(0, np.uint64)
        self._meta = np.empty((0, 3), np.float64)
        buffer, self._buffer = self._buffer, memoryview(b"")
        owner, self._owner = self._owner, None
        mapping, self._mapping = self._mapping, None
        try:
            buffer.release()
            if mapping is not None:
                mapping.close()
            if owner is not None:
                owner.close()
        except BufferError:
            _log.debug("segment %s is still viewed; it is unmapped when the view goes", self.name)
        if owner is not None:
            with contextlib.suppress(FileNotFoundError):
                owner.unlink()

    def __repr__(self) -> str:
        role = "writer" if self._owner is not None else "reader"
        return f"SharedSegment({self.name!r}, {role}, size={self.size})"


def remove_stale() -> list[str]:
    """Remove this user's dpwa segments whose creating process is gone.

    Returns:
        The names removed.
    """
    if not available():
        return []
    removed = []
    uid = os.getuid()
    for name in os.listdir(SHM_DIR):
        match = _NAME.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if os.stat(path, follow_symlinks=False).st_uid != uid or _alive(int(match[1])):
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            _log.debug("could not remove stale segment %s: %s", name, exc)
            continue
        removed.append(name)
    if removed:
        _log.info("removed %d stale shared-memory segment(s) of dead nodes", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
