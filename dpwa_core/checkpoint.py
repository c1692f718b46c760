"""Checkpoints: save what a node needs to resume, and load it back, in one safetensors file.

A checkpoint holds the model as the flat float32 vector its adapter makes (tensor ``model``),
the optimizer's state as a second flat float32 vector (tensor ``optimizer``, from the adapter's
optimizer hooks), and in the header's string metadata: the format and its version, the node's
name, clock and loss, the framework, and the fingerprints of both layouts. It is written with
``safetensors.numpy``: no pickle, no code, only tensors and strings. docs/CHECKPOINT.md
describes the file field by field.

:func:`save` is atomic: a crash or an error while writing leaves the previous checkpoint as it
was. :func:`load` checks the whole file against the running node before it writes anything, so
a missing, truncated, corrupt, hostile or foreign file raises :class:`CheckpointError` with the
model, the optimizer and the node untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from dpwa_core._log import get_logger
from dpwa_core.errors import CheckpointError, DpwaError
from dpwa_core.layout import Layout, describe_fingerprint
from dpwa_core.optimizer_state import OptimizerLayout

if TYPE_CHECKING:
    from dpwa_core.connect import Gossip

__all__ = ["FORMAT", "MAX_HEADER", "VERSION", "Checkpoint", "CheckpointError", "load", "save"]

FORMAT = "dpwa.checkpoint"
"""The ``format`` metadata value every dpwa checkpoint carries."""
VERSION = 1
"""The checkpoint format version this module writes and reads."""
MAX_HEADER = 1 << 20
"""Bytes of safetensors header (JSON) a checkpoint may have at most; ours take a few hundred."""

_MAX_TEXT = 4096  # characters of one metadata string at most
_MAX_FOREIGN_STATE = 8  # optimizer elements per model element read without an optimizer
_HASH = re.compile(r"[0-9a-f]{16}")
_COUNT = re.compile(r"[0-9]{1,19}")
_REQUIRED = (
    "format",
    "version",
    "node",
    "clock",
    "loss",
    "framework",
    "model_size",
    "model_shape_hash",
    "model_layout",
)
_OPTIMIZER = ("optimizer_kind", "optimizer_size", "optimizer_shape_hash", "optimizer_layout")

_log = get_logger("checkpoint")


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load` restored.

    Attributes:
        path: the file loaded.
        node: the name of the node that saved it.
        clock: the node's clock (samples trained) when it was saved; now the node's clock.
        loss: the node's last loss when it was saved; now the node's loss.
        framework: the framework of the model that saved it (``"torch"``, ...).
        model: the model layout's description.
        optimizer: the saved optimizer's kind (e.g. ``"torch.optim.Adam"``), or None when the
            saving node had no optimizer.
        has_optimizer: whether the file carries optimizer state.
        optimizer_loaded: whether that state was written into ``gossip.optimizer`` (False when
            the loading node has no optimizer).
    """

    path: Path
    node: str
    clock: float
    loss: float
    framework: str
    model: str
    optimizer: str | None
    has_optimizer: bool
    optimizer_loaded: bool


def save(gossip: Gossip[Any], path: str | os.PathLike[str]) -> Path:
    """Write ``gossip``'s model, optimizer state, clock and loss to ``path``, atomically.

    The file is first written to a temporary file in the same folder, flushed and fsynced,
    then renamed over ``path`` (``os.replace``) and the folder fsynced: a reader sees the old
    checkpoint or the new one, never a mix, and a failure leaves no temporary file behind.
    A model or optimizer state that is not finite is refused, so a diverged run never
    overwrites a good checkpoint.

    Args:
        gossip: the handle returned by :func:`dpwa_core.connect`; its optimizer
            (``gossip.optimizer``) is saved when it is not None.
        path: the checkpoint file, conventionally ``*.safetensors``; its folder must exist.

    Returns:
        The path written, as a :class:`~pathlib.Path`.

    Raises:
        CheckpointError: the model or optimizer state is not finite, the optimizer's state is
            not built yet (PyTorch builds it at the first ``optimizer.step()``), or the file
            cannot be written (the message names it).

    Example:
        >>> if step % 500 == 0:                                   # doctest: +SKIP
        ...     dpwa_core.checkpoint.save(gossip, "w1.safetensors")
    """
    from safetensors.numpy import save as serialize

    target = Path(path)
    adapter = gossip.adapter
    node = gossip.node
    layout = adapter.layout(gossip.state)
    clock, loss = float(node.clock), float(node.loss)
    if not math.isfinite(clock) or clock < 0:
        raise CheckpointError(f"{target}: the node's clock is {clock}; nothing was written")
    if not math.isfinite(loss):
        raise CheckpointError(
            f"{target}: the node's last loss is {loss}; a diverged run is not saved "
            "(nothing was written)"
        )
    model = adapter.to_flat(gossip.state)
    _check_finite(model, f"{target}: the model", "nothing was written")
    tensors = {"model": model}
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "node": node.name,
        "clock": repr(clock),
        "loss": repr(loss),
        "framework": adapter.framework_name,
        "model_size": str(layout.size),
        "model_shape_hash": f"{layout.shape_hash:016x}",
        "model_layout": layout.describe()[:_MAX_TEXT],
    }
    if gossip.optimizer is not None:
        opt_layout, flat = _optimizer_flat(gossip, target)
        metadata.update(
            optimizer_kind=opt_layout.kind[:_MAX_TEXT],
            optimizer_size=str(opt_layout.size),
            optimizer_shape_hash=f"{opt_layout.shape_hash:016x}",
            optimizer_layout=opt_layout.describe()[:_MAX_TEXT],
        )
        if opt_layout.size > 0:
            _check_finite(flat, f"{target}: the optimizer state", "nothing was written")
            tensors["optimizer"] = flat
    data = serialize(tensors, metadata=metadata)
    _write_atomic(target, data)
    _log.info(
        "%s saved a checkpoint to %s (clock %g, %s)",
        node.name,
        target,
        clock,
        "with optimizer state" if "optimizer" in tensors else "model only",
    )
    return target


def load(
    gossip: Gossip[Any], path: str | os.PathLike[str], *, name_check: bool = True
) -> Checkpoint:
    """Resume ``gossip`` from a checkpoint written by :func:`save`.

    Everything is checked before anything is written: the file's size against what this
    node's layouts need, the safetensors header (at most :data:`MAX_HEADER` bytes), the format
    and version, every metadata field, the node's name, both layout fingerprints (a mismatch
    names both layouts), and each tensor's dtype (float32), shape and values (all finite).
    Then the model is written through the adapter (``gossip.state`` takes the result), the
    optimizer state too (``gossip.optimizer`` takes the result), and the node's clock and loss
    are set. If writing the optimizer fails, the model is put back as it was.

    The model layout is canonical (docs/LAYOUT.md), so a model saved by one framework loads
    into the same architecture in another; optimizer state does not cross frameworks, and its
    fingerprint refuses it.

    Args:
        gossip: the handle returned by :func:`dpwa_core.connect`. A PyTorch or Keras optimizer
            builds its state at its first step: take one training step before loading (the
            load overwrites what that step did).
        path: the checkpoint file.
        name_check: refuse a checkpoint saved by a node of another name (the default). Pass
            False to start a new node from another node's checkpoint.

    Returns:
        A :class:`Checkpoint` saying what was loaded.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or corrupt, is not a dpwa
            checkpoint of a version this dpwa reads, belongs to another node, was saved from
            another model or optimizer, or holds values that are not finite. Nothing changed.

    Example:
        >>> if os.path.exists("w1.safetensors"):                  # doctest: +SKIP
        ...     dpwa_core.checkpoint.load(gossip, "w1.safetensors")
    """
    source = Path(path)
    adapter = gossip.adapter
    node = gossip.node
    layout = adapter.layout(gossip.state)
    opt_layout: OptimizerLayout | None = None
    if gossip.optimizer is not None:
        try:
            opt_layout = adapter.optimizer_layout(gossip.optimizer, gossip.state)
        except DpwaError as exc:
            raise CheckpointError(
                f"{source}: cannot read this node's optimizer layout ({exc}); nothing was loaded"
            ) from exc
    try:
        with open(source, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            header_len, header = _read_header(f, source, total)
            meta = _metadata(source, header)
            expected = _check_layouts(source, meta, node.name, name_check, layout, opt_layout)
            _check_entries(source, header, expected)
            size = 8 + header_len + 4 * sum(expected.values())
            if total != size:
                raise CheckpointError(
                    f"{source}: {total} bytes, but its header and this node's layouts make "
                    f"{size}; truncated or damaged"
                )
            f.seek(0)
            data = f.read(size + 1)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {source}: {exc}") from exc
    if len(data) != size:
        raise CheckpointError(f"{source}: changed while it was read; try again")
    clock = _number(source, meta, "clock")
    loss = _number(source, meta, "loss")
    tensors = _tensors(source, data)
    model = tensors["model"]
    _check_finite(model, f"{source}: the model", "nothing was loaded")
    saved_kind = meta.get("optimizer_kind")
    optimizer_flat = None
    if opt_layout is not None and saved_kind is not None:
        optimizer_flat = tensors.get("optimizer", np.zeros(0, np.float32))
        _check_finite(optimizer_flat, f"{source}: the optimizer state", "nothing was loaded")
    elif saved_kind is not None:
        _log.warning(
            "%s: %s holds %s state but this node has no optimizer; only the model is loaded "
            "(pass optimizer= to connect to resume it)",
            node.name,
            source,
            saved_kind,
        )
    elif opt_layout is not None:
        _log.warning(
            "%s: %s holds no optimizer state; the model is loaded, the optimizer is left as is",
            node.name,
            source,
        )
    _apply(gossip, source, model, optimizer_flat)
    node.clock = clock
    node.loss = loss
    result = Checkpoint(
        path=source,
        node=meta["node"],
        clock=clock,
        loss=loss,
        framework=meta["framework"],
        model=meta["model_layout"],
        optimizer=saved_kind,
        has_optimizer="optimizer" in tensors or saved_kind is not None,
        optimizer_loaded=optimizer_flat is not None,
    )
    _log.info("%s resumed from %s (node %s, clock %g)", node.name, source, meta["node"], clock)
    return result


def _read_header(f: BinaryIO, source: Path, total: int) -> tuple[int, dict[str, Any]]:
    """The header's length and its parsed JSON, read only when the length is sane."""
    if total < 8:
        raise CheckpointError(f"{source}: {total} bytes, too short for a safetensors file")
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > MAX_HEADER:
        raise CheckpointError(
            f"{source}: header of {header_len} bytes, more than {MAX_HEADER}; not a dpwa checkpoint"
        )
    if 8 + header_len > total:
        raise CheckpointError(
            f"{source}: header of {header_len} bytes but the file has {total}; truncated"
        )
    raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{source}: the safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: the safetensors header is not a JSON object")
    return header_len, header


def _check_layouts(
    source: Path,
    meta: dict[str, str],
    name: str,
    name_check: bool,
    layout: Layout,
    opt_layout: OptimizerLayout | None,
) -> dict[str, int]:
    """Check version, node and fingerprints; return the tensors the file must hold, by size."""
    if meta["version"] != str(VERSION):
        raise CheckpointError(
            f"{source}: checkpoint version {meta['version'][:20]!r}; this dpwa reads version "
            f"{VERSION} (save it again with this dpwa)"
        )
    if name_check and meta["node"] != name:
        raise CheckpointError(
            f"{source}: the checkpoint is node {meta['node'][:80]!r}'s, this node is {name!r}; "
            "load each node's own file, or pass name_check=False to start this node from it"
        )
    clock = _number(source, meta, "clock")
    if clock < 0:
        raise CheckpointError(f"{source}: metadata clock is {clock}, must be >= 0")
    _number(source, meta, "loss")
    size, shape_hash = _fingerprint(source, meta, "model")
    if (size, shape_hash) != layout.fingerprint:
        raise CheckpointError(
            f"{source}: saved from another model: the file's is "
            f"{describe_fingerprint(size, shape_hash)} ({meta['model_layout'][:300]}), "
            f"this node's is {layout.describe()}"
        )
    expected = {"model": layout.size}
    if "optimizer_kind" not in meta:
        return expected
    opt_size, opt_hash = _fingerprint(source, meta, "optimizer")
    if opt_layout is not None and (opt_size, opt_hash) != opt_layout.fingerprint:
        raise CheckpointError(
            f"{source}: saved with another optimizer: the file's is "
            f"{meta['optimizer_kind'][:200]} ({describe_fingerprint(opt_size, opt_hash)}; "
            f"{meta['optimizer_layout'][:300]}), this node's is {opt_layout.describe()}"
        )
    if opt_layout is None and opt_size > _MAX_FOREIGN_STATE * max(layout.size, 1):
        raise CheckpointError(
            f"{source}: claims {opt_size} elements of optimizer state for a model of "
            f"{layout.size}; damaged?"
        )
    if opt_size > 0:
        expected["optimizer"] = opt_size
    return expected


def _optimizer_flat(gossip: Gossip[Any], target: Path) -> tuple[OptimizerLayout, np.ndarray]:
    adapter = gossip.adapter
    try:
        opt_layout = adapter.optimizer_layout(gossip.optimizer, gossip.state)
        flat = adapter.optimizer_to_flat(gossip.optimizer, gossip.state)
    except DpwaError as exc:
        raise CheckpointError(
            f"{target}: cannot save the optimizer's state ({exc}); nothing was written"
        ) from exc
    return opt_layout, flat


def _apply(
    gossip: Gossip[Any], source: Path, model: np.ndarray, optimizer: np.ndarray | None
) -> None:
    """Write the model, then the optimizer; put the model back if the optimizer fails."""
    adapter = gossip.adapter
    backup = adapter.to_flat(gossip.state) if optimizer is not None else None
    try:
        state = adapter.from_flat(gossip.state, model)
    except DpwaError as exc:
        raise CheckpointError(
            f"{source}: the model was refused ({exc}); nothing was loaded"
        ) from exc
    if optimizer is not None and backup is not None:
        try:
            new_optimizer = adapter.optimizer_from_flat(gossip.optimizer, state, optimizer)
        except DpwaError as exc:
            # In-place frameworks wrote the model already; immutable ones made a new state.
            adapter.from_flat(gossip.state, backup)
            raise CheckpointError(
                f"{source}: the optimizer state was refused ({exc}); nothing was loaded"
            ) from exc
        gossip.optimizer = new_optimizer
    gossip.state = state


def _metadata(source: Path, header: dict[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: no dpwa metadata; not a dpwa checkpoint")
    for key, value in meta.items():
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            raise CheckpointError(
                f"{source}: metadata {str(key)[:40]!r} must be a string of at most "
                f"{_MAX_TEXT} characters"
            )
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{source}: format is {str(meta.get('format'))[:80]!r}, not a dpwa checkpoint "
            f"({FORMAT!r})"
        )
    fields = _REQUIRED + (_OPTIMIZER if "optimizer_kind" in meta else ())
    missing = [key for key in fields if key not in meta]
    if missing:
        raise CheckpointError(f"{source}: metadata lacks {', '.join(missing)}; file damaged?")
    if not meta["node"] or not meta["framework"]:
        raise CheckpointError(f"{source}: metadata node and framework must not be empty")
    return meta


def _number(source: Path, meta: dict[str, str], key: str) -> float:
    try:
        value = float(meta[key])
    except ValueError:
        raise CheckpointError(
            f"{source}: metadata {key} is {meta[key][:40]!r}, not a number"
        ) from None
    if not math.isfinite(value):
        raise CheckpointError(f"{source}: metadata {key} is {value}, must be finite")
    return value


def _fingerprint(source: Path, meta: dict[str, str], prefix: str) -> tuple[int, int]:
    size_text, hash_text = meta[f"{prefix}_size"], meta[f"{prefix}_shape_hash"]
    if not _COUNT.fullmatch(size_text) or not _HASH.fullmatch(hash_text):
        raise CheckpointError(
            f"{source}: metadata {prefix}_size/{prefix}_shape_hash are {size_text[:40]!r}/"
            f"{hash_text[:40]!r}; expected a count and 16 hex digits"
        )
    return int(size_text), int(hash_text, 16)


def _check_entries(source: Path, header: dict[str, Any], expected: dict[str, int]) -> None:
    """The header lists exactly the expected tensors, each 1-D float32 of the right size."""
    names = sorted(key for key in header if key != "__metadata__")
    if names != sorted(expected):
        raise CheckpointError(
            f"{source}: tensors {names[:8]}, expected {sorted(expected)}; file damaged?"
        )
    for name, size in expected.items():
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") != "F32":
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            raise CheckpointError(f"{source}: tensor {name} is {str(dtype)[:20]}, not float32")
        if entry.get("shape") != [size]:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {str(entry.get('shape'))[:60]}, "
                f"expected [{size}]"
            )


def _tensors(source: Path, data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load as deserialize

    try:
        loaded = deserialize(data)
    except Exception as exc:  # the parser's own error types; any of them means a bad file
        raise CheckpointError(f"{source}: not a valid safetensors file ({exc})") from exc
    # frombuffer views of the bytes are read-only; the adapters get arrays of their own.
    return {name: np.array(value, dtype=np.float32) for name, value in loaded.items()}


def _check_finite(flat: np.ndarray, what: str, outcome: str) -> None:
    if flat.size and not np.isfinite(flat).all():
        bad = int(flat.size - np.count_nonzero(np.isfinite(flat)))
        raise CheckpointError(f"{what} has {bad} values that are NaN or infinite; {outcome}")


def _write_atomic(target: Path, data: bytes) -> None:
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {target}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint {target}: {exc}") from exc
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; folders cannot be opened on Windows, where this is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
