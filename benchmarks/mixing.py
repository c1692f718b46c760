"""How many training steps each averaging scheme needs to 90%, with no network and no CPU race.

The lab race (``benchmarks/race.py``) measures systems: links, threads and 4 trainers on 2 cores
all count. This benchmark takes them away to see the averaging alone. The race's nodes (same
data shards, MLP, SGD with momentum 0.9, batch 64, lr 0.05) step in lockstep in one process, and
each scheme mixes them in one of these ways:

- ``localsgd:P``: every ``P`` steps every model becomes the exact average (what
  ``PeriodicModelAverager`` does).
- ``pair:D``: each node pulls one random other node; the pull lands ``D`` steps after it was
  asked for, and the node blends it staleness-corrected, as dpwa does:
  ``current + f * (peer_then - own_then)``. The next pull is asked for at once. ``D`` stands
  for the link: in the race a pull took ~2 steps at 1 Gbit/s and ~4 at 100 Mbit/s.
- ``pair:D:mom``: the same, and SGD's momentum buffers are blended with the same factor
  (``(1 - f) * own + f * peer_then``), as if the pull carried them too.
- ``expo:D``: the same blend, but the ``r``-th pull of node ``i`` reads node
  ``(i + 2**(r mod L)) mod n`` (``L = ceil(log2 n)``): the one-peer exponential graph (Ying et
  al. 2021). In each round every node reads a different one, and for ``n`` a power of two ``L``
  rounds at factor 0.5 make every model the exact average.
- ``pair:D:drift``: the lead ``peer_then - own_then`` is clipped (``robust.clip``) and drift
  corrected (``drift_correction: 0.2``) as dpwa's defaults do, by the library's own classes.
- ``pair:D:f0.7``: another factor (default 0.5); options combine (``pair:4:mom:f0.6``).

The mean test accuracy of the nodes' own models is measured every 4 steps; the table gives the
first step at which it reached the target, the step from which it stayed there, and the final
accuracy. One run per scheme; ``--seeds`` averages nothing, it runs each seed in turn.

Usage::

    python benchmarks/mixing.py --schemes localsgd:16,pair:2,pair:2:mom,pair:4,pair:4:mom
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))

import race  # noqa: E402
import race_common as rc  # noqa: E402

from dpwa_core.drift import DriftCorrection  # noqa: E402
from dpwa_core.robust import Clipper, RobustSettings  # noqa: E402

EVERY = 4
"""Steps between two measurements of the mean test accuracy."""


@dataclass(frozen=True)
class Scheme:
    """One way of mixing the nodes (see the module docstring for the spelling)."""

    kind: str
    steps: int
    factor: float = 0.5
    momentum: bool = False
    drift: bool = False

    @classmethod
    def parse(cls, text: str) -> Scheme:
        """Read ``localsgd:P``, ``pair:D[:mom][:fX]`` or ``expo:D[...]``; a ValueError says
        what is wrong."""
        kind, _, rest = text.partition(":")
        parts = rest.split(":") if rest else []
        if kind not in ("localsgd", "pair", "expo") or not parts or not parts[0].isdigit():
            raise ValueError(f"scheme {text!r}: expected localsgd:P, pair:D or expo:D[:mom][:fX]")
        steps, factor, momentum, drift = int(parts[0]), 0.5, False, False
        if steps < 1:
            raise ValueError(f"scheme {text!r}: the step count must be at least 1")
        for option in parts[1:]:
            if kind != "localsgd" and option == "mom":
                momentum = True
            elif kind != "localsgd" and option == "drift":
                drift = True
            elif kind != "localsgd" and option.startswith("f"):
                try:
                    factor = float(option[1:])
                except ValueError:
                    factor = -1.0
                if not 0 < factor <= 1:
                    raise ValueError(f"scheme {text!r}: a factor is fX with X in (0, 1]")
            else:
                raise ValueError(f"scheme {text!r}: unknown option {option!r}")
        return cls(kind, steps, factor, momentum, drift)

    def __str__(self) -> str:
        text = f"{self.kind}:{self.steps}"
        if self.momentum:
            text += ":mom"
        if self.drift:
            text += ":drift"
        if self.factor != 0.5:
            text += f":f{self.factor:g}"
        return text


@dataclass
class Pull:
    """A pull in flight: when it lands and what was read when it was asked for."""

    lands: int
    own: torch.Tensor
    peer: torch.Tensor
    peer_momentum: torch.Tensor | None


def momentum_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The flat momentum buffers of ``model``'s parameters (zeros where SGD has none yet)."""
    parts = []
    for p in model.parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        parts.append(torch.zeros(p.numel()) if buf is None else buf.detach().reshape(-1))
    return torch.cat(parts)


def set_momentum(model: nn.Module, optimizer: torch.optim.Optimizer, flat: torch.Tensor) -> None:
    """Write ``flat`` into the momentum buffers (creating them if SGD has not yet)."""
    offset = 0
    for p in model.parameters():
        part = flat[offset : offset + p.numel()].view_as(p)
        state = optimizer.state[p]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = part.clone()
        else:
            state["momentum_buffer"].copy_(part)
        offset += p.numel()


class Cluster:
    """The race's nodes in one process, stepped in lockstep and mixed by one scheme."""

    def __init__(self, spec: dict[str, Any], scheme: Scheme, seed: int) -> None:
        self.scheme = scheme
        self.world = int(spec["world"])
        hidden = rc.hidden_of(spec)
        self.models = [rc.make_model(0, hidden) for _ in range(self.world)]  # one start
        self.optimizers = [rc.make_optimizer(m, spec) for m in self.models]
        shards = [rc.load_data(spec, r) for r in range(self.world)]
        batch = int(spec["batch_size"])
        self.batches = [
            rc.batches(x, y, batch, seed * 1000 + r) for r, (x, y, _, _) in enumerate(shards)
        ]
        self.test_x = torch.from_numpy(shards[0][2])
        self.test_y = torch.from_numpy(shards[0][3])
        self.rng = np.random.default_rng(seed)
        self.pulls: list[Pull | None] = [None] * self.world
        self.blends = [0] * self.world
        self.rounds = [0] * self.world  # pulls asked so far, per node (expo's schedule)
        self.last_blend = [0] * self.world
        size = sum(p.numel() for p in self.models[0].parameters())
        self.clippers = [Clipper(RobustSettings(), size) for _ in range(self.world)]
        self.drifts = [DriftCorrection(size, 0.2) for _ in range(self.world)]
        self.steps = 0

    def flat(self, rank: int) -> torch.Tensor:
        return parameters_to_vector(self.models[rank].parameters()).detach().clone()

    def step(self) -> None:
        """One SGD step on every node, then the scheme's mixing."""
        for model, optimizer, batches in zip(
            self.models, self.optimizers, self.batches, strict=True
        ):
            images, labels = next(batches)
            rc.sgd_step(model, optimizer, images, labels)
        self.steps += 1
        if self.scheme.kind == "localsgd":
            if self.steps % self.scheme.steps == 0:
                self._average()
        else:
            self._gossip()

    def _average(self) -> None:
        mean = sum(self.flat(r) for r in range(self.world)) / self.world
        for rank, model in enumerate(self.models):
            vector_to_parameters(mean.clone(), model.parameters())
            self.blends[rank] += 1

    def _gossip(self) -> None:
        now = [self.flat(r) for r in range(self.world)]  # what a pull asked now reads
        momenta = (
            [momentum_of(m, o) for m, o in zip(self.models, self.optimizers, strict=True)]
            if self.scheme.momentum
            else None
        )
        f = self.scheme.factor
        for rank in range(self.world):
            pull = self.pulls[rank]
            if pull is not None and self.steps >= pull.lands:
                lead = pull.peer - pull.own
                if self.scheme.drift:
                    self._correct(rank, lead.numpy(), pull.own.numpy())
                self.last_blend[rank] = self.steps
                blended = now[rank] + f * lead
                vector_to_parameters(blended, self.models[rank].parameters())
                now[rank] = blended
                if momenta is not None and pull.peer_momentum is not None:
                    mine = momenta[rank]
                    set_momentum(
                        self.models[rank],
                        self.optimizers[rank],
                        (1 - f) * mine + f * pull.peer_momentum,
                    )
                self.blends[rank] += 1
                self.pulls[rank] = None
            if self.pulls[rank] is None:
                peer = self.peer_of(rank)
                self.rounds[rank] += 1
                self.pulls[rank] = Pull(
                    self.steps + self.scheme.steps,
                    now[rank].clone(),
                    now[peer].clone(),
                    momenta[peer].clone() if momenta is not None else None,
                )

    def _correct(self, rank: int, lead: np.ndarray, own: np.ndarray) -> None:
        """Clip ``lead`` and add the drift correction to it, in place, as a dpwa node does."""
        squares = float(np.dot(lead.astype(np.float64), lead))
        squares = self.clippers[rank].clip_lead(lead, squares, "peer", own)
        steps = self.steps - self.last_blend[rank]
        self.drifts[rank].apply(lead, self.scheme.factor, steps, squares=squares)

    def peer_of(self, rank: int) -> int:
        """The node ``rank``'s next pull reads: random, or the exponential graph's."""
        if self.scheme.kind == "expo":
            hops = max(1, (self.world - 1).bit_length())
            return (rank + 2 ** (self.rounds[rank] % hops)) % self.world
        return int(self.rng.choice([r for r in range(self.world) if r != rank]))

    def accuracy(self) -> float:
        """Mean test accuracy of the nodes' own models."""
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        (m(self.test_x).argmax(1) == self.test_y).float().mean().item()
                        for m in self.models
                    ]
                )
            )


def run(
    spec: dict[str, Any], scheme: Scheme, steps: int, seed: int, target: float
) -> dict[str, Any]:
    """Train ``steps`` lockstep steps under ``scheme``; the curve and its figures."""
    cluster = Cluster(spec, scheme, seed)
    curve = [(0, cluster.accuracy())]
    started = time.perf_counter()
    while cluster.steps < steps:
        cluster.step()
        if cluster.steps % EVERY == 0 or cluster.steps == steps:
            curve.append((cluster.steps, cluster.accuracy()))
        if cluster.steps % 50 == 0:
            print(
                f"[mixing] {scheme} seed {seed}: {cluster.steps}/{steps} steps, "
                f"mean acc {curve[-1][1]:.3f} ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    first = next((s for s, a in curve if a >= target), None)
    return {
        "scheme": str(scheme),
        "seed": seed,
        "steps_to_target": first,
        "steps_held": race.held_from([(float(s), a) for s, a in curve], target),
        "final_acc": curve[-1][1],
        "blends_per_node": float(np.mean(cluster.blends)),
        "curve": curve,
    }


def _cell(value: float | None) -> str:
    return "never" if value is None else f"{value:g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schemes", default="localsgd:16,pair:2,pair:2:mom,pair:4,pair:4:mom")
    parser.add_argument("--steps", type=int, default=300, help="lockstep steps per scheme")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--iid", action="store_true", help="iid shards (default: label-skewed)")
    parser.add_argument("--seeds", default="0", help="comma-separated; one run per seed")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--hidden", default="2048,512")
    parser.add_argument("--results", default=None, help="append the JSON line to this file")
    args = parser.parse_args(argv)
    try:
        schemes = [Scheme.parse(s) for s in args.schemes.split(",") if s]
        seeds = [int(s) for s in args.seeds.split(",") if s]
        hidden = [int(h) for h in args.hidden.split(",") if h]
    except ValueError as e:
        parser.error(str(e))
    if args.steps < 1 or args.world < 2:
        parser.error("--steps must be at least 1 and --world at least 2")
    torch.set_num_threads(1)
    spec = {
        "data_path": race.mnist_path(),
        "world": args.world,
        "skew": not args.iid,
        "seed": 0,
        "lr": 0.05,
        "batch_size": 64,
        "hidden": hidden,
    }
    results = [run(spec, s, args.steps, seed, args.target) for s in schemes for seed in seeds]
    shards = "iid" if args.iid else "label-skewed"
    print(
        f"\n## {args.world} nodes in lockstep, {shards} shards, MLP {hidden}, {args.steps} steps\n"
    )
    print(f"scheme | seed | steps to {args.target:.0%} | stays from | final acc | blends/node")
    print("---|---:|---:|---:|---:|---:")
    for r in results:
        print(
            f"{r['scheme']} | {r['seed']} | {_cell(r['steps_to_target'])} | "
            f"{_cell(r['steps_held'])} | {r['final_acc']:.1%} | {r['blends_per_node']:.0f}"
        )
    line = json.dumps(
        {"benchmark": "mixing", "spec": spec, "steps": args.steps, "results": results}
    )
    print("\n" + line)
    if args.results:
        with open(args.results, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
