"""Race worker for hivemind: ``hivemind.Optimizer`` in the quickstart's local-updates mode.

Run (inside host R of the lab, with the hivemind venv's python)::

    /work/hm-venv/bin/python benchmarks/race_workers/hivemind_worker.py --spec SPEC.json --rank R

Settings (hivemind's quickstart, docs/user/quickstart.md), each overridable from
``spec["options"]``: ``target_batch_size=10000`` (samples summed over all peers per hivemind
epoch; one parameter-averaging round per epoch), ``batch_size_per_step=spec["batch_size"]``,
``use_local_updates=True`` (every ``opt.step()`` applies the local gradient; parameters are
averaged in the background), ``matchmaking_time=3.0``, ``averaging_timeout=10.0``,
``verbose=True``. The wrapped optimizer is the race's ``make_optimizer`` (SGD, ``spec["lr"]``,
momentum 0.9).

Networking: one libp2p daemon per rank, listening and announcing only
``/ip4/{spec["hosts"][R]}/tcp/{spec["base_port"] + 100 + R}``; no IPFS bootstrap, no relays,
no AutoNAT, no NAT port mapping. Rank 0 starts first and writes its multiaddrs to
``{out}/hivemind-peers.txt`` (tagged with ``start_at`` so a stale file is never used); the
others wait for that file and join through it.

blocked_s of a step: the wall time of ``opt.step()`` minus the time the wrapped torch
optimizer's own ``step`` took inside it (measured by wrapping that method), i.e. progress
reports, waiting for a background averaging round to land, applying its result and any
``load_state_from_peers`` hivemind decides to run.

Behaviour worth knowing when reading the results (hivemind 1.1.12): with local updates and
background state averaging, every ``opt.step()`` after an epoch boundary waits for that epoch's
averaging round (at least ``matchmaking_time`` of matchmaking, then the all-reduce), and the
progress tracker extrapolates each peer's samples at its last measured speed while it is
blocked, so on a small fast model the swarm declares a new epoch soon after every round and
spends most of its time blocked. ``options.target_batch_size`` changes the cadence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import race_common as rc  # noqa: E402

PEERS_FILE = "hivemind-peers.txt"
PORT_OFFSET = 100
GRACE_S = 15.0  # the contract: never run past start_at + seconds + 15 s


class _AveragingLog(logging.Handler):
    """Counts hivemind's state-averaging outcomes from its log records."""

    _ok = re.compile(r"Averaged parameters with (\d+) peers")

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.ok = 0
        self.failed = 0
        self.group_sizes: list[int] = []
        self.failures: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = self._ok.search(msg)
        if m:
            self.ok += 1
            self.group_sizes.append(int(m.group(1)))
        elif msg.startswith("Averaging failed with"):
            self.failed += 1
            kind = msg.removeprefix("Averaging failed with").strip()
            self.failures[kind] = self.failures.get(kind, 0) + 1


def _log(message: str) -> None:
    print(f"hivemind worker: {message}", file=sys.stderr, flush=True)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (via /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_descendants() -> int:
    """SIGKILL whatever this process started that is still alive (averagers, DHT, p2pd)."""
    pids = _descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _wait_for_peers(path: Path, start_at: float, timeout_s: float) -> list[str]:
    """Rank 0's multiaddrs from ``path``, once it holds the ones of this run (``start_at``)."""
    deadline = time.time() + timeout_s
    tag = f"# start_at={start_at!r}"
    while time.time() < deadline:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        if lines and lines[0] == tag and len(lines) > 1:
            return [line for line in lines[1:] if line.strip()]
        time.sleep(0.1)
    raise TimeoutError(
        f"hivemind worker: rank 0 did not publish its multiaddrs in {path} "
        f"within {timeout_s:.0f} s "
        f"(expected a first line {tag!r}); is rank 0 running and its DHT up?"
    )


def main() -> None:
    spec, rank = rc.worker_args(__doc__)

    # Every unix socket (p2pd's control socket, each p2p client's) and multiprocessing temp dir
    # of this worker goes into one private directory, removed at exit even after a hard kill of
    # hivemind's helper processes (they would leave /tmp/hivemind-*.sock and /tmp/pymp-* behind).
    scratch = tempfile.mkdtemp(prefix=f"hm-r{rank}-", dir="/tmp")
    tempfile.tempdir = scratch
    code = 0
    try:
        _run(spec, rank, scratch)
    except BaseException:  # noqa: BLE001  (report, then clean up hivemind's processes)
        traceback.print_exc()
        code = 1
    finally:
        left = _kill_descendants()
        if left:
            _log(f"rank {rank}: killed {left} leftover processes")
        shutil.rmtree(scratch, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: hivemind's atexit joins can hang


def _run(spec: dict[str, Any], rank: int, scratch: str) -> None:
    opts: dict[str, Any] = dict(spec.get("options") or {})
    out = Path(spec["out"])
    start_at = float(spec["start_at"])
    end_at = start_at + float(spec["seconds"])
    hard_deadline = end_at + GRACE_S - 2.0
    finished = threading.Event()
    done_lock = threading.Lock()
    recorder: rc.Recorder | None = None
    extra_of: list[Any] = []  # filled with extra(state) once the optimizer exists
    t_train0 = time.time()

    def finish_once(state: str) -> None:
        with done_lock:
            if not finished.is_set() and recorder is not None:
                finished.set()
                recorder.finish(extra_of[0](state) if extra_of else {"state": state})

    def watchdog() -> None:
        # Hivemind can block in setup or inside opt.step (a retrying load_state_from_peers, a
        # stuck round): write what we have and leave before the orchestrator's kill.
        while not finished.wait(0.5):
            if time.time() >= hard_deadline - 4.0:
                _log(f"rank {rank}: watchdog exit")
                try:
                    finish_once("watchdog")
                finally:
                    _kill_descendants()
                    shutil.rmtree(scratch, ignore_errors=True)
                    os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()

    # hivemind's own logging goes to stderr (the worker's log); the orchestrator reads the JSON.
    import hivemind  # noqa: PLC0415  (after sys.path is set; slow import)
    from hivemind.p2p import P2P  # noqa: PLC0415

    P2P._UNIX_SOCKET_PREFIX = f"/unix{scratch}/hivemind-"

    ip = spec["hosts"][rank]
    port = int(spec["base_port"]) + int(opts.get("port_offset", PORT_OFFSET)) + rank
    maddr = f"/ip4/{ip}/tcp/{port}"
    p2p_kwargs = dict(
        host_maddrs=[maddr],
        announce_maddrs=[maddr],
        use_ipfs=False,
        use_relay=False,
        use_auto_relay=False,
        auto_nat=False,
        nat_port_map=False,
    )
    peers_path = out / PEERS_FILE
    t_setup = time.time()
    if rank == 0:
        dht = hivemind.DHT(start=True, **p2p_kwargs)
        visible = [str(a) for a in dht.get_visible_maddrs()]
        tmp = peers_path.with_suffix(".tmp")
        tmp.write_text(f"# start_at={start_at!r}\n" + "\n".join(visible) + "\n", encoding="utf-8")
        os.replace(tmp, peers_path)
    else:
        join_timeout = float(opts.get("join_timeout_s", max(60.0, start_at - time.time())))
        visible = _wait_for_peers(peers_path, start_at, join_timeout)
        dht = hivemind.DHT(initial_peers=visible, start=True, **p2p_kwargs)
    dht_ready_s = time.time() - t_setup
    _log(f"rank {rank}: DHT up at {maddr} in {dht_ready_s:.1f} s")

    shared_start = bool(opts.get("shared_start", True))
    run = rc.setup(spec, rank, seed_offset=0 if shared_start else rank)
    model, recorder = run.model, run.recorder

    averaging_log = _AveragingLog()
    logging.getLogger("hivemind.optim.state_averager").addHandler(averaging_log)

    settings = dict(
        target_batch_size=int(opts.get("target_batch_size", 10000)),
        batch_size_per_step=int(spec["batch_size"]),
        use_local_updates=bool(opts.get("use_local_updates", True)),
        matchmaking_time=float(opts.get("matchmaking_time", 3.0)),
        averaging_timeout=float(opts.get("averaging_timeout", 10.0)),
        load_state_timeout=float(opts.get("load_state_timeout", 30.0)),
        verbose=bool(opts.get("verbose", True)),
    )
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=str(opts.get("run_id", f"race-{int(start_at)}")),
        optimizer=run.optimizer,
        **settings,
    )

    # Time the wrapped torch optimizer's own step (run inside opt.step, in hivemind's executor).
    local_step_s = [0.0]
    inner = opt.opt
    inner_step = inner.step

    def timed_step(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner_step(*a, **kw)
        finally:
            local_step_s[0] += time.perf_counter() - t

    inner.step = timed_step

    load_state = {"calls": 0, "seconds": 0.0}
    orig_load_state = opt.load_state_from_peers

    def counted_load_state(**kw: Any) -> None:
        t = time.perf_counter()
        try:
            orig_load_state(**kw)
        finally:
            load_state["calls"] += 1
            load_state["seconds"] += time.perf_counter() - t

    opt.load_state_from_peers = counted_load_state

    setup_s = time.time() - t_setup

    def extra(state: str) -> dict[str, Any]:
        tracker = opt.tracker
        glob = tracker.global_progress
        return {
            "state": state,
            "settings": settings,
            "shared_start": shared_start,
            "maddr": maddr,
            "dht_ready_s": round(dht_ready_s, 3),
            "setup_s": round(setup_s, 3),
            "late_start_s": round(max(0.0, t_train0 - start_at), 3),
            "local_epoch": int(opt.local_epoch),
            "global_epoch": int(tracker.global_epoch),
            "global_samples_accumulated": int(glob.samples_accumulated),
            "global_num_peers": int(glob.num_peers),
            "averaging_rounds_ok": averaging_log.ok,
            "averaging_rounds_failed": averaging_log.failed,
            "averaging_failures": averaging_log.failures,
            "averaging_group_sizes": averaging_log.group_sizes,
            "load_state_from_peers": {k: round(v, 3) for k, v in load_state.items()},
            "local_optimizer_step_s": round(local_step_s[0], 3),
        }

    extra_of.append(extra)
    model.train()

    def step(images: Any, labels: Any) -> tuple[float, float]:
        nonlocal t_train0
        if run.recorder.steps == 0:
            t_train0 = time.time()  # the first step starts right after the recorder's start
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        t1 = time.perf_counter()
        before = local_step_s[0]
        opt.step()
        local = local_step_s[0] - before
        blocked = max(0.0, (time.perf_counter() - t1) - local)
        run.pace.pace((t1 - t0) + local)
        return float(loss.detach()), blocked

    rc.train(run, step, f"rank {rank}")
    finish_once("ok")

    # Bounded shutdown: hivemind may wait up to averaging_timeout for a round in flight.
    def shutdown() -> None:
        try:
            opt.shutdown()
        finally:
            dht.shutdown()

    stopper = threading.Thread(target=shutdown, daemon=True)
    stopper.start()
    stopper.join(timeout=max(1.0, min(12.0, hard_deadline - time.time())))
    if stopper.is_alive():
        _log(f"rank {rank}: hivemind shutdown still running; killing its processes")
    finished.set()


if __name__ == "__main__":
    main()
