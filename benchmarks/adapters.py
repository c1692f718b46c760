"""``to_flat``, ``from_flat`` and ``interpolate`` of a 100 MiB model in each framework.

The model is the same in every framework: 4 dense layers of 2560 x 2560 (100 MiB of float32
weights, plus 40 KiB of biases). PyTorch packs its ``(out, in)`` Linear weights transposed into
the canonical ``(in, out)`` layout, so its figures include that transpose; Keras and Flax store
``(in, out)`` already. ``torch-zc`` is the same PyTorch model flattened by
``dpwa_torch.flatten_`` (what ``connect()`` does to CPU models): its parameters are views into
one canonical flat tensor, so every operation is one pass over it.

- ``to_flat``: into a preallocated buffer (``out=``), as the node's snapshot does.
- ``from_flat``: a flat vector into the model (PyTorch and Keras in place; JAX builds new
  arrays).
- ``interpolate``: blend a peer's vector into the model with factor 0.5, as ``update_wait``
  does.
- ``memcpy``: ``np.copyto`` of the same number of bytes between two preallocated buffers: the
  floor. It is timed interleaved with every figure (memcpy, operation, memcpy, ...), so a
  machine whose load changes during the run still compares like with like; each ratio is the
  operation's median over the memcpy median of the same loop. The target is at most 3x.

A second table times a training step (forward, backward, SGD with momentum; one torch thread)
of a small MLP and a small CNN, with ordinary parameters and flattened ones, interleaved: the
views must not slow training down (strided Linear and Conv weights take other kernel paths).

Run by hand: ``python benchmarks/adapters.py [--mib 100] [--repeats 10] [--frameworks torch jax]``
``[--train-steps 20]``. Prints two tables of median milliseconds and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

MiB = 1024 * 1024
LAYERS = 4


def _width(mib: int) -> int:
    """The layer width that makes LAYERS square weight matrices hold ``mib`` MiB."""
    return int(round((mib * MiB / 4 / LAYERS) ** 0.5))


def _torch_model(width: int) -> Any:
    import torch

    with torch.no_grad():
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(LAYERS)])


def _keras_model(width: int) -> Any:
    import keras

    return keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(LAYERS)]
    )


def _jax_model(width: int) -> Any:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Dense4(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            for _ in range(LAYERS):
                x = nn.Dense(width)(x)
            return x

    return Dense4().init(jax.random.key(0), jnp.ones((1, width)))


def _torch_flat_model(width: int) -> Any:
    import dpwa_torch

    model = _torch_model(width)
    dpwa_torch.flatten_(model)
    return model


BUILDERS: dict[str, Callable[[int], Any]] = {
    "torch": _torch_model,
    "torch-zc": _torch_flat_model,
    "keras": _keras_model,
    "jax": _jax_model,
}


class Memcpy:
    """numpy copy of the same bytes between two preallocated buffers: the local floor."""

    def __init__(self, nbytes: int) -> None:
        self.src = np.ones(nbytes // 4, np.float32)
        self.dst = np.empty_like(self.src)

    def __call__(self) -> None:
        np.copyto(self.dst, self.src)


def _median_ms(run: Callable[[], object], repeats: int, floor: Memcpy) -> tuple[float, float]:
    """Median ms of ``run`` and of the memcpy timed between its runs."""
    run()  # warm-up: first-touch page faults, caches, compilation
    floor()
    times, floors = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        floor()
        middle = time.perf_counter()
        run()
        times.append(time.perf_counter() - middle)
        floors.append(middle - start)
    return 1000 * statistics.median(times), 1000 * statistics.median(floors)


def measure(framework: str, width: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(ms, memcpy ms) of to_flat (into out=), to_flat (allocating) and from_flat."""
    from dpwa_core.adapters import get_adapter

    adapter = get_adapter(framework.partition("-")[0])
    model = BUILDERS[framework](width)
    size = adapter.layout(model).size
    out = np.empty(size, np.float32)
    flat = np.random.default_rng(0).standard_normal(size).astype(np.float32)

    def block(result: Any) -> Any:
        if framework == "jax":  # jax dispatches asynchronously: wait for the arrays
            import jax

            jax.block_until_ready(result)
        return result

    floor = Memcpy(4 * size)
    return {
        "to_flat(out)": _median_ms(lambda: adapter.to_flat(model, out=out), repeats, floor),
        "to_flat": _median_ms(lambda: adapter.to_flat(model), repeats, floor),
        "from_flat": _median_ms(lambda: block(adapter.from_flat(model, flat)), repeats, floor),
        "interpolate": _median_ms(
            lambda: block(adapter.interpolate(model, flat, 0.5)), repeats, floor
        ),
    }


def _train_models() -> dict[str, Callable[[], Any]]:
    from torch import nn

    def mlp() -> Any:
        return nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    def cnn() -> Any:
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    return {"mlp": mlp, "cnn": cnn}


def measure_training(steps: int) -> dict[str, dict[str, float]]:
    """Median ms of a training step with ordinary and with flattened parameters, interleaved."""
    import dpwa_torch
    import torch

    torch.set_num_threads(1)
    inputs = {"mlp": torch.randn(256, 784), "cnn": torch.randn(64, 3, 32, 32)}
    results: dict[str, dict[str, float]] = {}
    for name, build in _train_models().items():
        steppers = {}
        for variant in ("plain", "views"):
            torch.manual_seed(0)
            model = build()
            if variant == "views":
                dpwa_torch.flatten_(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model: Any = model, optimizer: Any = optimizer, x: Any = inputs[name]) -> None:
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()

            step()  # warm-up
            steppers[variant] = step
        times: dict[str, list[float]] = {variant: [] for variant in steppers}
        for _ in range(steps):
            for variant, step in steppers.items():
                start = time.perf_counter()
                step()
                times[variant].append(time.perf_counter() - start)
        results[name] = {v: 1000 * statistics.median(t) for v, t in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100, help="model size in MiB")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure")
    parser.add_argument("--frameworks", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument(
        "--train-steps", type=int, default=20, help="training steps per variant (0: skip)"
    )
    args = parser.parse_args()
    width = _width(args.mib)
    nbytes = 4 * LAYERS * width * (width + 1)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for framework in args.frameworks:
        print(f"measuring {framework} ...", file=sys.stderr, flush=True)
        try:
            results[framework] = measure(framework, width, args.repeats)
        except ImportError as exc:
            print(f"{framework} is not installed ({exc}): skipping", file=sys.stderr)
    print(
        f"\nmedian ms over {args.repeats} runs, {LAYERS} x Dense({width}, {width}) = "
        f"{nbytes / MiB:.1f} MiB, {platform.node()}; x = over the memcpy timed in the same loop"
    )
    columns = ["to_flat(out)", "to_flat", "from_flat", "interpolate"]
    print(f"{'framework':<10}" + "".join(f"{c:>14}{'memcpy':>9}{'x':>7}" for c in columns))
    for framework, row in results.items():
        print(
            f"{framework:<10}"
            + "".join(
                f"{row[c][0]:>14.2f}{row[c][1]:>9.2f}{row[c][0] / row[c][1]:>7.2f}" for c in columns
            )
        )
    training: dict[str, dict[str, float]] = {}
    if args.train_steps > 0 and any(fw.startswith("torch") for fw in results):
        print("measuring training steps with and without views ...", file=sys.stderr, flush=True)
        training = measure_training(args.train_steps)
        print(
            f"\ntraining step, median ms over {args.train_steps} interleaved steps, 1 torch thread"
        )
        print(f"{'model':<10}{'plain':>10}{'views':>10}{'x':>7}")
        for name, row in training.items():
            ratio = row["views"] / row["plain"]
            print(f"{name:<10}{row['plain']:>10.2f}{row['views']:>10.2f}{ratio:>7.2f}")
    print(
        json.dumps(
            {
                "benchmark": "adapters",
                "mib": round(nbytes / MiB, 2),
                "repeats": args.repeats,
                "ms": {
                    fw: {k: round(v[0], 3) for k, v in row.items()} for fw, row in results.items()
                },
                "memcpy_ms": {
                    fw: {k: round(v[1], 3) for k, v in row.items()} for fw, row in results.items()
                },
                "ratio": {
                    fw: {k: round(v[0] / v[1], 2) for k, v in row.items()}
                    for fw, row in results.items()
                },
                "train_step_ms": {
                    name: {k: round(v, 2) for k, v in row.items()} for name, row in training.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
