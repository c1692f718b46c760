"""A network lab on one machine: N hosts behind one switch, each link shaped, each /dev/shm private.

Every host is a network namespace with loopback and an ``eth0`` (one end of a veth pair); the other
end of each pair hangs off a Linux bridge in a "switch" namespace of its own. Nothing is added to
the root namespace, and the lab's only route is its own subnet, so traffic can go nowhere but
loopback and the other hosts. Both directions of every link are shaped with ``tbf`` at that host's
rate: the uplink on the egress of the host's ``eth0``, the downlink on the egress of the switch end.
``tbf`` counts whole Ethernet frames, so one TCP stream moves about 96% of the shaped rate in
payload: 9.6, 95.7 and 957 Mbit/s at 10, 100 and 1000 Mbit/s on a 2-core machine, where an
unshaped veth moves about 9 Gbit/s.

Each host also gets its own tmpfs on /dev/shm: a holder process keeps a private mount namespace per
host alive, and :meth:`Lab.spawn` enters it, so processes on one host share /dev/shm with each other
and with nobody else (shared-memory shortcuts between "different machines" cannot happen).

Needs root, ``ip``/``tc`` (iproute2) and ``unshare``/``nsenter`` (util-linux).

Example::

    from benchmarks.lab import Lab, lab_available

    ok, reason = lab_available()
    with Lab(rates_mbit=[100, 100, 10], name="demo") as lab:
        proc = lab.spawn(0, ["python", "-c", "print('hello from host 0')"])
        proc.wait()
        rx, tx = lab.counters(0)

Command line: ``python -m benchmarks.lab --hosts 3 --rate 100 --check`` measures host 0 <-> 1.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

__all__ = ["Host", "Lab", "LabUnavailable", "lab_available", "measure", "tbf_params"]

PREFIX = "dpwalab"
_TOOLS = ("ip", "tc", "unshare", "nsenter")
_seq = itertools.count()
_open_netns: set[str] = set()  # namespaces of labs open in this process (cleanup must spare them)
_sigterm_users = 0
_sigterm_saved: Any = None


class LabUnavailable(RuntimeError):
    """The lab cannot be built: not root, a tool missing, namespaces forbidden, a step failed."""


@dataclass(frozen=True)
class Host:
    """One lab host: its namespace, its address on the lab subnet and its link rate."""

    index: int
    netns: str
    ip: str
    rate_mbit: float
    slowdown: float = 1.0


def tbf_params(rate_mbit: float) -> tuple[int, int]:
    """The ``tbf`` burst and queue limit, in bytes, used for a link of ``rate_mbit``.

    The burst is 4 ms of traffic (rate/250), and never under 16 KiB, so that the kernel's timer
    granularity and GSO segments cannot hold the link under its rate. The queue holds 50 ms of
    traffic on top of the burst: deep enough that TCP keeps a link full, shallow enough that a
    transfer's latency stays that of a real switch port rather than bufferbloat.

    Returns:
        ``(burst_bytes, limit_bytes)``.
    """
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(16 * 1024, int(rate_bytes / 250))
    return burst, burst + int(rate_bytes * 0.050)


def _run(command: str | Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a setup command; a failure raises :class:`LabUnavailable` naming it and its stderr.

    A string command is split on whitespace (lab names and addresses hold no spaces).
    """
    argv = command.split() if isinstance(command, str) else list(command)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabUnavailable(f"lab: `{' '.join(argv)}` could not run: {exc}") from exc
    if check and done.returncode != 0:
        raise LabUnavailable(
            f"lab: `{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    return done


def lab_available() -> tuple[bool, str]:
    """Whether a lab can be built here, and if not why; never raises.

    Returns:
        ``(True, "")``, or ``(False, reason)`` such as ``"needs root"``.
    """
    try:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return False, "the network lab needs root (network namespaces, tc)"
        missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
        if missing:
            return False, f"the network lab needs {', '.join(missing)} (iproute2, util-linux)"
        probe = f"{PREFIX}-probe-{os.getpid()}-{next(_seq)}"
        made = _run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            return False, f"cannot create a network namespace here: {made.stderr.strip()}"
        _run(["ip", "netns", "delete", probe], check=False)
        return True, ""
    except Exception as exc:  # the contract: report, never raise
        return False, f"lab check failed: {exc}"


def _list_netns() -> list[str]:
    done = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _kill_netns_pids(netns: str) -> None:
    """SIGKILL whatever still runs in ``netns`` (a process that left its group, a leftover)."""
    for pid in _run(["ip", "netns", "pids", netns], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (a crashed lab's process nobody reaped yet) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl+C does: every ``with Lab(...)`` on the way out tears its lab down.
    raise SystemExit(128 + signum)


def _hold_sigterm() -> None:
    global _sigterm_users, _sigterm_saved
    if threading.current_thread() is not threading.main_thread():
        return
    if _sigterm_users == 0:
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            return  # somebody else handles SIGTERM; atexit still tears down
        _sigterm_saved = signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_users += 1


def _release_sigterm() -> None:
    global _sigterm_users
    if _sigterm_users == 0 or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_users -= 1
    if _sigterm_users == 0 and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _sigterm_saved)


class _signals_deferred:
    """Hold Ctrl+C and SIGTERM back while a teardown runs, then deliver them (main thread only)."""

    def __enter__(self) -> None:
        self.saved: dict[int, Any] = {}
        self.caught: list[int] = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(
                    sig, lambda signum, frame: self.caught.append(signum)
                )

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        for sig in self.caught:
            signal.raise_signal(sig)


class Lab:
    """N hosts in network namespaces behind a bridge, each link shaped with ``tbf``.

    The lab is built by the constructor and torn down by :meth:`close` (or leaving a ``with``
    block, an exception, Ctrl+C, SIGTERM or interpreter exit): spawned process groups get SIGTERM,
    then SIGKILL after ``grace`` seconds, and every namespace the lab made is deleted.

    Args:
        rates_mbit: one link rate per host, in Mbit/s (both directions).
        name: lab name; namespaces are ``dpwalab-<name>-<pid>-<seq>-h<i>`` and ``...-sw``.
        subnet: private IPv4 subnet for the hosts; host i gets its (i+1)-th address.
        slowdown: optional per-host compute slowdown, kept as metadata on :attr:`hosts`.
        shm_size: size of each host's private /dev/shm tmpfs.
        grace: seconds between SIGTERM and SIGKILL at teardown.

    Raises:
        ValueError: bad rates, name or subnet.
        LabUnavailable: a build command failed (what was built is torn down first).
    """

    def __init__(
        self,
        rates_mbit: Sequence[float],
        name: str = "lab",
        subnet: str = "10.77.0.0/24",
        slowdown: Sequence[float] | None = None,
        shm_size: str = "512m",
        grace: float = 3.0,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.]{1,24}", name):
            raise ValueError(f"lab name {name!r}: use 1-24 letters, digits, '_' or '.'")
        if not rates_mbit or any(not rate > 0 for rate in rates_mbit):
            raise ValueError(f"rates_mbit {list(rates_mbit)!r}: give one positive rate per host")
        if slowdown is not None and len(slowdown) != len(rates_mbit):
            raise ValueError("slowdown: give one factor per host, like rates_mbit")
        net = ipaddress.ip_network(subnet)
        addresses = list(itertools.islice(net.hosts(), len(rates_mbit)))
        if not isinstance(net, ipaddress.IPv4Network) or not net.is_private:
            raise ValueError(f"subnet {subnet!r}: the lab needs a private IPv4 subnet")
        if len(addresses) < len(rates_mbit):
            raise ValueError(f"subnet {subnet!r} has no room for {len(rates_mbit)} hosts")
        self.name = name
        self.grace = grace
        base = f"{PREFIX}-{name}-{os.getpid()}-{next(_seq)}"
        self.switch_netns = f"{base}-sw"
        factors = list(slowdown) if slowdown is not None else [1.0] * len(rates_mbit)
        self.hosts = [
            Host(i, f"{base}-h{i}", str(addresses[i]), float(rate), float(factors[i]))
            for i, rate in enumerate(rates_mbit)
        ]
        self._prefixlen = net.prefixlen
        self._shm_size = shm_size
        self._made: list[str] = []
        self._holders: list[subprocess.Popen[bytes]] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closed = False
        Lab.cleanup(name)
        atexit.register(self.close)
        _hold_sigterm()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building ---------------------------------------------------------------------------

    def _add_netns(self, netns: str) -> None:
        _run(f"ip netns add {netns}")
        self._made.append(netns)
        _open_netns.add(netns)
        _run(f"ip -n {netns} link set lo up")
        # No IPv6 on links made from now on (lo keeps ::1): neighbour discovery and MLD reports
        # would otherwise blur the byte counters. Best effort: a lab without it still works.
        sysctl = "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"
        _run(["ip", "netns", "exec", netns, "sh", "-c", sysctl], check=False)

    def _build(self) -> None:
        sw = self.switch_netns
        self._add_netns(sw)
        _run(f"ip -n {sw} link add br0 type bridge")
        _run(f"ip -n {sw} link set br0 up")
        for host in self.hosts:
            self._add_netns(host.netns)
            port = f"h{host.index}"
            _run(f"ip -n {sw} link add {port} type veth peer name eth0 netns {host.netns}")
            _run(f"ip -n {sw} link set {port} master br0 up")
            _run(f"ip -n {host.netns} addr add {host.ip}/{self._prefixlen} dev eth0")
            _run(f"ip -n {host.netns} link set eth0 up")
            burst, limit = tbf_params(host.rate_mbit)
            shape = f"root tbf rate {int(host.rate_mbit * 1e6)}bit burst {burst} limit {limit}"
            _run(f"tc -n {host.netns} qdisc replace dev eth0 {shape}")
            _run(f"tc -n {sw} qdisc replace dev {port} {shape}")
            self._start_holder(host)

    def _start_holder(self, host: Host) -> None:
        # The holder owns the host's mount namespace with its tmpfs /dev/shm; spawn() enters it.
        # It is `cat` on a pipe from us, so it exits by itself if this process dies.
        script = (
            f"mount -t tmpfs -o size={self._shm_size},mode=1777 {PREFIX}-shm /dev/shm"
            " && echo ready && exec cat >/dev/null"
        )
        argv = [
            "ip",
            "netns",
            "exec",
            host.netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
        ]
        holder = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._holders.append(holder)
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != b"ready":
            err = holder.stderr.read().decode(errors="replace") if holder.stderr else ""
            raise LabUnavailable(f"lab: `{' '.join(argv)}` failed: {err.strip()}")

    # -- using ------------------------------------------------------------------------------

    def spawn(
        self,
        i: int,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on host ``i``: in its network namespace, with its private /dev/shm.

        The process leads a new process group (killed as a whole at teardown); its pid is that
        of ``argv`` itself, since ``nsenter`` execs it.

        Args:
            i: host index.
            argv: program and arguments.
            env, stdout, stderr, stdin: as for :class:`subprocess.Popen`.
            cwd: working directory (default: this process's).

        Returns:
            The :class:`subprocess.Popen` of the process.
        """
        if self._closed:
            raise RuntimeError(f"lab {self.name!r} is closed")
        holder = self._holders[i]
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        command = ["nsenter", f"--target={holder.pid}", "--mount", "--net", f"--wd={wd}", "--"]
        proc = subprocess.Popen(
            [*command, *argv],
            env=None if env is None else dict(env),
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def counters(self, i: int) -> tuple[int, int]:
        """Bytes received and sent so far by host ``i``'s ``eth0``: ``(rx_bytes, tx_bytes)``."""
        done = _run(["ip", "-n", self.hosts[i].netns, "-s", "-j", "link", "show", "eth0"])
        stats = json.loads(done.stdout)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def counters_all(self) -> list[tuple[int, int]]:
        """:meth:`counters` of every host, read in one call from the switch's ports.

        A port receives what its host sends and sends what its host receives, so host ``i``'s
        ``(rx_bytes, tx_bytes)`` are the port's ``(tx_bytes, rx_bytes)``. One ``ip`` call for
        the whole lab: cheap enough to sample every half second while the hosts train.
        """
        done = _run(["ip", "-n", self.switch_netns, "-s", "-j", "link", "show"])
        ports = {link["ifname"]: link["stats64"] for link in json.loads(done.stdout)}
        out = []
        for host in self.hosts:
            stats = ports[f"h{host.index}"]
            out.append((int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])))
        return out

    # -- tearing down -----------------------------------------------------------------------

    def close(self) -> None:
        """Kill every spawned process group and delete every namespace; safe to call again."""
        if self._closed:
            return
        self._closed = True
        try:
            with _signals_deferred():
                self._kill(self._procs)
                for holder in self._holders:
                    if holder.stdin is not None:
                        holder.stdin.close()
                self._kill(self._holders)
                for holder in self._holders:
                    for pipe in (holder.stdout, holder.stderr):
                        if pipe is not None:
                            pipe.close()
                for netns in reversed(self._made):
                    _kill_netns_pids(netns)
                    _run(["ip", "netns", "delete", netns], check=False)
                    _open_netns.discard(netns)
                atexit.unregister(self.close)
        finally:
            # After the deferred signals are back: a SIGTERM held during teardown lands on the
            # handler this lab installed, and the caller's own handler is restored all the same.
            _release_sigterm()

    def _kill(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + (self.grace if sig == signal.SIGTERM else 5.0)
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @classmethod
    def cleanup(cls, name: str, force: bool = False) -> list[str]:
        """Delete namespaces left by crashed earlier labs called ``name``, killing what runs there.

        Namespaces of a lab whose process still lives are spared (another run may be using them)
        unless ``force`` is set; those of labs open in this process always are.

        Returns:
            The namespaces deleted.
        """
        pattern = re.compile(rf"{re.escape(PREFIX)}-{re.escape(name)}-(\d+)-\d+-(?:h\d+|sw)")
        removed = []
        for netns in _list_netns():
            match = pattern.fullmatch(netns)
            if match is None or netns in _open_netns:
                continue
            pid = int(match.group(1))
            if not force and pid != os.getpid() and _pid_alive(pid):
                continue
            _kill_netns_pids(netns)
            _run(["ip", "netns", "delete", netns], check=False)
            removed.append(netns)
        return removed


_RECEIVER = """
import socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(60)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
total, first = 0, None
while chunk := conn.recv(1 << 20):
    first = first or time.monotonic()
    total += len(chunk)
print(total, time.monotonic() - (first or time.monotonic()), flush=True)
"""

_SENDER = """
import socket, sys
left = int(sys.argv[3])
block = bytes(1 << 20)
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as conn:
    while left > 0:
        conn.sendall(block[: min(left, len(block))])
        left -= len(block)
"""


def measure(lab: Lab, src: int, dst: int, nbytes: int, port: int = 5201) -> float:
    """Send ``nbytes`` over TCP from host ``src`` to host ``dst``; the receiver's seconds.

    The time runs from the first byte received to the end of the stream, so it is what the
    link let through, not connection setup.

    Raises:
        RuntimeError: a side failed or fewer bytes arrived.
    """
    ip = lab.hosts[dst].ip
    receiver = lab.spawn(
        dst,
        [sys.executable, "-c", _RECEIVER, ip, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"lab: receiver on host {dst} failed: {receiver.communicate()[1]!r}")
        sender = lab.spawn(
            src, [sys.executable, "-c", _SENDER, ip, str(port), str(nbytes)], stderr=subprocess.PIPE
        )
        _, err = sender.communicate(timeout=120)
        if sender.returncode != 0:
            raise RuntimeError(f"lab: sender on host {src} failed: {err.decode(errors='replace')}")
        out, err = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    fields = out.split()
    if receiver.returncode != 0 or len(fields) != 2 or int(fields[0]) != nbytes:
        raise RuntimeError(
            f"lab: receiver on host {dst} got {out!r}: {err.decode(errors='replace')}"
        )
    return float(fields[1])


def _shm_private(lab: Lab) -> bool:
    """Whether a file made in host 0's /dev/shm is seen by host 0 only (not host 1, not root)."""
    probe = f"/dev/shm/{PREFIX}-probe-{os.getpid()}"
    lab.spawn(0, ["sh", "-c", f"echo x > {probe}"]).wait(30)
    seen_here = lab.spawn(0, ["test", "-e", probe]).wait(30) == 0
    seen_there = lab.spawn(1, ["test", "-e", probe]).wait(30) == 0
    return seen_here and not seen_there and not os.path.exists(probe)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.lab``: build a lab, check it (``--check``) or hold it until Ctrl+C."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lab", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    parser.add_argument(
        "--rate",
        type=float,
        nargs="+",
        default=[100.0],
        help="Mbit/s per link: one value for all hosts, or one per host",
    )
    parser.add_argument("--name", default="cli", help="lab name (default cli)")
    parser.add_argument("--subnet", default="10.77.0.0/24")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each check transfer")
    parser.add_argument(
        "--check",
        action="store_true",
        help="measure host 0 -> 1 and 1 -> 0 and whether /dev/shm is private",
    )
    parser.add_argument("--cleanup", action="store_true", help="only delete leftovers of --name")
    args = parser.parse_args(argv)
    if args.cleanup:
        print(f"removed {Lab.cleanup(args.name, force=True)}", file=sys.stderr)
        return 0
    ok, reason = lab_available()
    if not ok:
        print(f"lab unavailable: {reason}", file=sys.stderr)
        return 2
    rates = args.rate * args.hosts if len(args.rate) == 1 else args.rate
    if len(rates) != args.hosts or args.hosts < 2:
        parser.error("--hosts must be at least 2, and --rate one value or one per host")
    print(f"building {args.hosts} hosts at {rates} Mbit/s", file=sys.stderr)
    with Lab(rates_mbit=rates, name=args.name, subnet=args.subnet) as lab:
        for host in lab.hosts:
            print(f"host {host.index}: {host.ip} in netns {host.netns}", file=sys.stderr)
        if not args.check:
            print("lab up; Ctrl+C tears it down", file=sys.stderr)
            while True:
                time.sleep(3600)
        for src, dst in ((0, 1), (1, 0)):
            rate = min(rates[src], rates[dst])
            nbytes = int(rate * 1e6 / 8 * args.seconds)
            print(f"sending {nbytes} bytes host {src} -> {dst}", file=sys.stderr)
            seconds = measure(lab, src, dst, nbytes)
            print(
                f"host {src} -> {dst}: {nbytes * 8 / seconds / 1e6:.1f} Mbit/s (shaped at {rate:g})"
            )
        print(f"/dev/shm private per host: {_shm_private(lab)}")
    print("torn down", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
