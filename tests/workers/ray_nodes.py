"""Training functions that tests/test_ray.py runs inside Ray actors with ``dpwa_core.ray.run``.

They live in their own module because Ray pickles a function by reference: the actors import
this file (the test puts this folder on the workers' ``PYTHONPATH``).

The test steers a run through files in a shared folder: a node writes ``NAME.pid`` when the
test may kill it, ``NAME.progress`` with its step count, and every node stops training once
``stop`` exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpwa_core.ray import NodeContext

SAFETY_SECONDS = 240.0  # a node stops on its own after this long, whatever the test does


def train_digits(ctx: NodeContext, folder: str, victim: str) -> dict[str, Any]:
    """Train a small MLP on this node's label-skewed shard of the digits, gossiping.

    ``victim`` writes its pid at step 50 of its first run so the test can kill it.
    """
    import torch

    from dpwa_demo.data import load_digits_data

    torch.set_num_threads(1)
    shared = Path(folder)
    data = load_digits_data(ctx.num_nodes, "labels")
    x, y = (torch.from_numpy(a) for a in data.shard(ctx.rank))
    torch.manual_seed(100 * ctx.restarts + ctx.rank)  # a restarted node starts from scratch
    model = torch.nn.Sequential(
        torch.nn.Linear(data.inputs, 32), torch.nn.ReLU(), torch.nn.Linear(32, data.classes)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(ctx.rank)
    give_up = time.monotonic() + SAFETY_SECONDS
    step, loss = 0, 2.3
    with ctx.connect(model, seed=ctx.rank) as gossip:
        gossip.node.wait_for_peers(timeout=60)
        while not (shared / "stop").exists() and time.monotonic() < give_up:
            step += 1
            batch = torch.randint(0, len(y), (32,), generator=generator)
            gossip.update_send(loss, samples=32)
            optimizer.zero_grad()
            loss_t = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss_t.backward()
            optimizer.step()
            loss = loss_t.item()
            gossip.update_wait(loss)
            if step % 25 == 0:
                (shared / f"{ctx.name}.progress").write_text(f"{ctx.restarts} {step}")
            if step % 100 == 0:
                print(f"step {step} loss {loss:.3f}", flush=True)
            if step == 50 and ctx.name == victim and ctx.restarts == 0:
                (shared / f"{ctx.name}.pid").write_text(str(os.getpid()))
        stats = gossip.node.stats()
        with torch.no_grad():
            logits = model(torch.from_numpy(data.x_test))
            accuracy = float((logits.argmax(1).numpy() == data.y_test).mean())
        params = gossip.adapter.to_flat(model).copy()
    return {
        "name": ctx.name,
        "restarts": ctx.restarts,
        "steps": step,
        "accuracy": accuracy,
        "pulls_ok": stats["pulls_ok"],
        "params": params,
    }


def exchange(ctx: NodeContext, folder: str, victim: str, faulty: str) -> dict[str, Any]:
    """Trade flat vectors with a plain Node until ``stop`` exists; ``faulty`` raises.

    ``victim`` writes its pid once it has pulled, so the test can kill it. At the end each node
    waits for all the others (``wait_for_all``), which counts failed nodes as done.
    """
    shared = Path(folder)
    if ctx.name == faulty:
        raise ValueError(f"{ctx.name} fails on purpose")
    give_up = time.monotonic() + SAFETY_SECONDS
    pulls = 0
    with ctx.node(seed=ctx.rank) as node:
        params = np.full(1000, ctx.rank, np.float32)
        while not (shared / "stop").exists() and time.monotonic() < give_up:
            node.update_send(params, 1.0)
            result = node.update_wait(1.0)
            if result is not None:
                pulls += 1
                result.blend_into(params)
                if ctx.name == victim and pulls == 5:
                    (shared / f"{ctx.name}.pid").write_text(str(os.getpid()))
            time.sleep(0.01)
        all_done = ctx.wait_for_all(timeout=120)
    address = list(ctx.config.node(ctx.name).address)
    return {"name": ctx.name, "pulls": pulls, "address": address, "all_done": all_done}


def wait_briefly(ctx: NodeContext, folder: str) -> bool | None:
    """w1 waits one second for the others, then says so in a file; the others wait for it."""
    shared = Path(folder)
    if ctx.name == "w1":
        all_done = ctx.wait_for_all(timeout=1.0)
        (shared / "w1.waited").touch()
        return all_done
    give_up = time.monotonic() + SAFETY_SECONDS
    while not (shared / "w1.waited").exists() and time.monotonic() < give_up:
        time.sleep(0.05)
    return None
