"""``to_flat`` and ``from_flat`` of a 100 MiB model in each framework, beside a numpy memcpy.

The model is the same in every framework: 4 dense layers of 2560 x 2560 (100 MiB of float32
weights, plus 40 KiB of biases). PyTorch packs its ``(out, in)`` Linear weights transposed into
the canonical ``(in, out)`` layout, so its figures include that transpose; Keras and Flax store
``(in, out)`` already.

- ``to_flat``: into a preallocated buffer (``out=``), as the node's snapshot does.
- ``from_flat``: a flat vector into the model (PyTorch and Keras in place; JAX builds new
  arrays).
- ``memcpy``: ``np.copyto`` of the same number of bytes between two preallocated buffers: the
  floor. It is timed interleaved with every figure (memcpy, operation, memcpy, ...), so a
  machine whose load changes during the run still compares like with like; each ratio is the
  operation's median over the memcpy median of the same loop. The target is at most 3x.

Run by hand: ``python benchmarks/adapters.py [--mib 100] [--repeats 10] [--frameworks torch jax]``.
Prints a table of median milliseconds, each over memcpy, and one JSON line.
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


BUILDERS: dict[str, Callable[[int], Any]] = {
    "torch": _torch_model,
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

    adapter = get_adapter(framework)
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100, help="model size in MiB")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure")
    parser.add_argument("--frameworks", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
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
    columns = ["to_flat(out)", "to_flat", "from_flat"]
    print(f"{'framework':<10}" + "".join(f"{c:>14}{'memcpy':>9}{'x':>7}" for c in columns))
    for framework, row in results.items():
        print(
            f"{framework:<10}"
            + "".join(
                f"{row[c][0]:>14.2f}{row[c][1]:>9.2f}{row[c][0] / row[c][1]:>7.2f}" for c in columns
            )
        )
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
            }
        )
    )


if __name__ == "__main__":
    main()
