"""The layout of a flat parameter buffer: the shapes of the tensors it holds, in order.

Two nodes may only average when their layouts agree. The wire carries a *fingerprint* of the
layout (the number of elements and a 64-bit hash of the shapes) so a mismatch is caught before a
single parameter byte is used.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Layout"]

_DESCRIBE_SHAPES = 8  # shapes spelled out in a description before eliding the rest


@dataclass(frozen=True)
class Layout:
    """The ordered shapes of the tensors packed into one flat float32 buffer.

    Args:
        shapes: one tuple of non-negative ints per tensor, in buffer order.

    Example:
        >>> layout = Layout([(784, 128), (128,)])
        >>> layout.size
        100480
    """

    shapes: tuple[tuple[int, ...], ...]

    def __init__(self, shapes: Iterable[Sequence[int]]) -> None:
        normalized = []
        for shape in shapes:
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"a layout shape cannot have a negative dimension: {dims}")
            normalized.append(dims)
        object.__setattr__(self, "shapes", tuple(normalized))

    @classmethod
    def flat(cls, size: int) -> Layout:
        """The layout of a plain vector of ``size`` elements (one tensor of shape ``(size,)``)."""
        return cls([(size,)])

    @property
    def size(self) -> int:
        """Total number of float32 elements."""
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def nbytes(self) -> int:
        """Size of the flat float32 buffer in bytes."""
        return 4 * self.size

    @property
    def shape_hash(self) -> int:
        """A 64-bit hash of the ordered shapes; equal layouts have equal hashes."""
        text = ";".join("x".join(str(d) for d in shape) for shape in self.shapes)
        digest = hashlib.blake2b(text.encode("ascii"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    @property
    def fingerprint(self) -> tuple[int, int]:
        """``(size, shape_hash)``: what the wire carries to compare layouts."""
        return self.size, self.shape_hash

    def describe(self) -> str:
        """A short human-readable summary, for log lines and error messages."""
        return describe_fingerprint(self.size, self.shape_hash, self.shapes)


def describe_fingerprint(
    size: int, shape_hash: int, shapes: Sequence[Sequence[int]] | None = None
) -> str:
    """Spell out a layout fingerprint, with its first shapes when they are known."""
    text = f"{size} elements, shape hash {shape_hash:016x}"
    if shapes is not None:
        shown = ", ".join(
            "x".join(str(d) for d in s) or "scalar" for s in shapes[:_DESCRIBE_SHAPES]
        )
        more = len(shapes) - _DESCRIBE_SHAPES
        if more > 0:
            shown += f", ... {more} more"
        text += f", {len(shapes)} tensors [{shown}]"
    return text
