"""Pull time through ``Node`` on loopback, beside gloo and a raw socket, in one run.

Each method moves the same bytes between two processes as a request/answer pair (a pull):

- ``raw socket``: a 1-byte request, the answer with ``sendall`` / ``recv_into``; the floor.
- ``gloo``: torch.distributed gloo ``send``/``recv`` of a 1-element request, then the tensor.
- ``memcpy``: ``numpy.copyto`` of the same bytes in this process; the floor for shared memory.
- ``Node tcp``: one node publishes, the other pulls over TCP (``transport: tcp``); the time is
  ``PullResult.elapsed`` (request sent to last byte received). ``Node tcp e2e`` adds what the
  training thread sees: ``update_send`` (which also copies the puller's own parameters into its
  snapshot) plus ``update_wait``.
- ``Node shm``: the same through shared memory (``transport: auto`` on one host): the request
  and a 148-byte answer over TCP, then a copy from the peer's segment.

Run by hand (takes about a minute): ``python benchmarks/pull_throughput.py [--sizes 4 100]``.
Prints a table of median milliseconds and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import socket
import statistics
import sys
import time
from typing import Any

import numpy as np
from _ports import free_ports

MiB = 1024 * 1024


# --- raw socket ---------------------------------------------------------------------------
def _raw_server(port: int, nbytes: int, repeats: int) -> None:
    data = memoryview(np.ones(nbytes // 4, np.float32)).cast("B")
    with socket.create_server(("127.0.0.1", port)) as listener:
        conn, _ = listener.accept()
        with conn:
            for _ in range(repeats):
                conn.recv(1)
                conn.sendall(data)


def _raw_client(port: int, nbytes: int, repeats: int, out: Any) -> None:
    buf = memoryview(np.empty(nbytes // 4, np.float32)).cast("B")
    times = []
    with _connect_retry(port) as conn:
        for _ in range(repeats):
            start = time.perf_counter()
            conn.sendall(b"x")
            got = 0
            while got < nbytes:
                got += conn.recv_into(buf[got:], nbytes - got)
            times.append(time.perf_counter() - start)
    out.put(times)


def _connect_retry(port: int) -> socket.socket:
    for _ in range(200):
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


# --- gloo ---------------------------------------------------------------------------------
def _gloo(rank: int, port: int, nbytes: int, repeats: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensor = torch.ones(nbytes // 4, dtype=torch.float32)
    request = torch.zeros(1)
    times = []
    for _ in range(repeats + 1):  # the first exchange warms up gloo's pairs
        if rank == 0:
            dist.recv(request, src=1)
            dist.send(tensor, dst=1)
        else:
            start = time.perf_counter()
            dist.send(request, dst=0)
            dist.recv(tensor, src=0)
            times.append(time.perf_counter() - start)
    dist.destroy_process_group()
    if rank == 1:
        out.put(times[1:])


# --- Node ---------------------------------------------------------------------------------
def _node(name: str, config: dict[str, Any], nbytes: int, repeats: int, out: Any) -> None:
    import dpwa_core

    params = np.ones(nbytes // 4, np.float32)
    with dpwa_core.Node(config, name, seed=0) as node:
        if name == "w1":
            node.update_send(params, 1.0)
            out.get()  # the puller says when it is done
            return
        elapsed, e2e = [], []
        while len(elapsed) < repeats + 1:
            start = time.perf_counter()
            node.update_send(params, 1.0)
            result = node.update_wait(1.0)
            if result is None:
                time.sleep(0.05)  # w1 still starting
                continue
            e2e.append(time.perf_counter() - start)
            elapsed.append(result.elapsed)
        out.put((elapsed[1:], e2e[1:]))


def _run(targets: list[tuple[Any, tuple[Any, ...]]], queue: Any) -> Any:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=t, args=a) for t, a in targets]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode is None:
            p.kill()
    return result


def measure(nbytes: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per pull of ``nbytes`` for each method."""
    ctx = mp.get_context("spawn")
    rows: dict[str, float] = {}
    q = ctx.Queue()
    port = free_ports(1)[0]
    rows["raw socket"] = _median_ms(
        _run([(_raw_server, (port, nbytes, repeats)), (_raw_client, (port, nbytes, repeats, q))], q)
    )
    try:
        import torch.distributed  # noqa: F401

        port = free_ports(1)[0]
        rows["gloo"] = _median_ms(
            _run(
                [(_gloo, (0, port, nbytes, repeats, q)), (_gloo, (1, port, nbytes, repeats, q))], q
            )
        )
    except ImportError:
        print("torch is not installed: skipping gloo", file=sys.stderr)
    for transport in ("tcp", "shm"):
        elapsed, e2e = _measure_node(ctx, q, nbytes, repeats, transport)
        rows[f"Node {transport}"] = _median_ms(elapsed)
        rows[f"Node {transport} e2e"] = _median_ms(e2e)
    rows["memcpy"] = _median_ms(_memcpy(nbytes, repeats))
    return rows


def _measure_node(
    ctx: Any, q: Any, nbytes: int, repeats: int, transport: str
) -> tuple[list[float], list[float]]:
    ports = free_ports(2)
    config = {
        "start": "own",  # single pulls are measured, not training from one model
        "nodes": [
            {"name": f"w{i + 1}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)
        ],
        "timeout_ms": 30_000,
        "pull_probability": 1.0,
        "transport": transport,
    }
    done = ctx.Queue()
    procs = [
        ctx.Process(target=_node, args=("w1", config, nbytes, repeats, done)),
        ctx.Process(target=_node, args=("w2", config, nbytes, repeats, q)),
    ]
    for p in procs:
        p.start()
    elapsed, e2e = q.get(timeout=600)
    done.put("stop")
    for p in procs:
        p.join(timeout=60)
    return elapsed, e2e


def _memcpy(nbytes: int, repeats: int) -> list[float]:
    """numpy copy of the same bytes between two preallocated buffers: the local floor."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return times[1:]


def _median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 4, 25, 100], help="MiB per pull"
    )
    parser.add_argument("--repeats", type=int, default=15, help="pulls per method and size")
    args = parser.parse_args()
    results = {}
    for size in args.sizes:
        print(f"measuring {size} MiB ...", file=sys.stderr, flush=True)
        results[f"{size}MiB"] = measure(size * MiB, args.repeats)
    methods = list(next(iter(results.values())))
    print(f"\nmedian ms per pull over {args.repeats} pulls, loopback, {platform.node()}")
    print(f"{'method':<12}" + "".join(f"{k:>12}" for k in results))
    for method in methods:
        print(f"{method:<12}" + "".join(f"{results[k][method]:>12.2f}" for k in results))
    ratios = [("Node tcp", "gloo"), ("Node shm", "memcpy")]
    for name, reference in ratios:
        if all(reference in r for r in results.values()):
            label = f"{name.split()[1]}/{reference}"
            print(
                f"{label:<12}"
                + "".join(f"{r[name] / r[reference]:>12.2f}" for r in results.values())
            )
    print(json.dumps({"benchmark": "pull_throughput", "repeats": args.repeats, "ms": results}))


if __name__ == "__main__":
    main()
