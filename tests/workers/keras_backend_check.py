"""Check the Keras adapter on the backend that KERAS_BACKEND names; print one JSON line.

Usage: KERAS_BACKEND={tensorflow,jax,torch} python keras_backend_check.py PORT
(keras_backend_node.py runs :func:`check` too, before its node starts, to save a process.)

Builds one Conv2D + BatchNormalization + Dense model and reports what
tests/test_keras_backends.py compares across backends: which frameworks keras imported, the
layout, whether from_flat/to_flat/interpolate round-trip bit for bit (and leave no alias to the
caller's vector), which adapter detection picks, the model's outputs for one fixed vector and
input (equal outputs on every backend mean the vector means the same weights), and the
optimizer hooks (an Adam after two fit batches: layout, bit-identical round trip, training
goes on from the written state).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import keras
import numpy as np

import dpwa_core
from dpwa_core.adapters import detect_adapter, get_adapter, lerp_inplace

layers = keras.layers


def build(batch_norm: bool = True) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Conv2D(4, 3, padding="same", activation="relu"),
            *([layers.BatchNormalization()] if batch_norm else []),
            layers.Dropout(0.5),  # a seed-generator state: an integer variable, left out
            layers.GlobalAveragePooling2D(),
            layers.Dense(3),
        ]
    )


def _imported() -> list[str]:
    return sorted(m for m in ("tensorflow", "jax", "torch") if m in sys.modules)


def check(port: int) -> dict[str, Any]:
    """The report (see the module docstring); ``port`` is a free one for a 1-node connect()."""
    # Not keras.utils.set_random_seed: it seeds TensorFlow too, importing it on every backend.
    adapter = get_adapter("keras")
    model = build()
    report: dict[str, Any] = {
        "backend": keras.backend.backend(),
        "imported": _imported(),
        "layout": [list(s) for s in adapter.layout(model).shapes],
        "shape_hash": adapter.layout(model).shape_hash,
        "detected": type(detect_adapter(model)).__name__,
        # Keras-on-torch layers are torch modules: the torch adapter must refuse them itself,
        # whatever order detection asks the adapters in.
        "torch_handles": get_adapter("torch").handles(model) if "torch" in sys.modules else None,
        "connect_adapter": "",
    }

    size = adapter.layout(model).size
    vector = np.abs(np.random.default_rng(1).standard_normal(size)).astype(np.float32)
    before = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    written = vector.copy()
    adapter.from_flat(model, written)
    written[:] = -7.0  # the model must not share the caller's vector
    report["roundtrip"] = bool(np.array_equal(adapter.to_flat(model), vector))
    out = np.empty(size, np.float32)
    adapter.to_flat(model, out=out)
    report["to_flat_out"] = bool(np.array_equal(out, vector))

    x = np.random.default_rng(2).standard_normal((2, 6, 6, 2)).astype(np.float32)
    report["outputs"] = keras.ops.convert_to_numpy(model(x, training=False)).tolist()

    peer = before.copy()
    expected = vector.copy()
    lerp_inplace(expected, peer, 0.25)
    adapter.interpolate(model, peer, 0.25)
    peer[:] = 99.0
    report["interpolate"] = bool(np.array_equal(adapter.to_flat(model), expected))

    half = keras.Sequential([keras.Input((3,)), layers.Dense(2, dtype="bfloat16")])
    flat = np.array([0.5, -1.0, 2.0, 0.25, 3.0, -0.75, 1.5, 4.0], np.float32)
    adapter.from_flat(half, flat)
    report["bfloat16_roundtrip"] = bool(np.array_equal(adapter.to_flat(half), flat))

    # Optimizer state: an Adam after two fit batches.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    xs = np.random.default_rng(3).standard_normal((8, 6, 6, 2)).astype(np.float32)
    ys = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    model.fit(xs, ys, batch_size=4, epochs=1, shuffle=False, verbose=0)
    optimizer = model.optimizer
    layout = adapter.optimizer_layout(optimizer, model)
    state = adapter.optimizer_to_flat(optimizer, model)
    changed = state * np.float32(0.5)
    changed[0] = 7.0  # the iteration counter
    adapter.optimizer_from_flat(optimizer, model, changed)
    changed[1:] = -1.0  # no alias either
    again = adapter.optimizer_to_flat(optimizer, model)
    report["optimizer"] = {
        "kind": layout.kind,
        "names": list(layout.names[:5]),
        "size": layout.size,
        "fingerprint": list(layout.fingerprint),
        "counter_before": float(state[0]),
        "roundtrip": bool(
            again[0] == 7.0 and np.array_equal(again[1:], state[1:] * np.float32(0.5))
        ),
    }
    model.fit(xs, ys, batch_size=4, epochs=1, shuffle=False, verbose=0)
    report["optimizer"]["counter_after_fit"] = float(  # type: ignore[index]
        adapter.optimizer_to_flat(optimizer, model)[0]
    )

    # A write from a callback in the middle of fit is what fit trains on from then on (on JAX,
    # fit holds the state outside the variables; the adapter syncs it): with a learning rate
    # of 0, the weights written after batch 0 are the weights after the epoch, and the
    # counter written then has counted the three batches since.
    still = build(batch_norm=False)  # no moving statistics, which fit updates at any rate
    target = np.linspace(-1.0, 1.0, adapter.layout(still).size, dtype=np.float32)
    still.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")

    class WriteOnce(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            if batch == 0:
                adapter.from_flat(still, target)  # `still`, not self.model (which syncs)
                counter = adapter.optimizer_to_flat(still.optimizer, still)
                counter[0] = 100.0
                adapter.optimizer_from_flat(still.optimizer, still, counter)

    still.fit(xs, ys, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[WriteOnce()])
    report["mid_fit_write_kept"] = bool(np.array_equal(adapter.to_flat(still), target))
    report["mid_fit_counter"] = float(adapter.optimizer_to_flat(still.optimizer, still)[0])

    # connect() picks the Keras adapter by itself (a Keras model on torch is a torch Module).
    config = {
        "nodes": [{"name": "w1", "host": "127.0.0.1", "port": port}],
        "start": "own",
    }
    gossip = dpwa_core.connect(model, config, "w1")
    try:
        report["connect_adapter"] = type(gossip.adapter).__name__
    finally:
        gossip.close()
    report["imported_end"] = _imported()
    return report


def main() -> None:
    print(json.dumps(check(int(sys.argv[1]))))


if __name__ == "__main__":
    main()
