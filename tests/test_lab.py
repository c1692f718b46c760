"""The network lab (benchmarks/lab.py): shaped links, private /dev/shm, namespaces, teardown.

Timing checks are lower bounds only (a shaped link cannot be beaten however busy the machine is);
the one upper bound has a 5x margin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.lab import Lab, LabUnavailable, lab_available, measure, tbf_params  # noqa: E402

MakeLab = Callable[..., Lab]


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _lab_netns(lab: Lab) -> set[str]:
    return {lab.switch_netns, *(host.netns for host in lab.hosts)}


def test_lab_available_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert lab_available() == (False, "the network lab needs root (network namespaces, tc)")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "tc" else f"/bin/{tool}")
    ok, reason = lab_available()
    assert not ok and "needs tc" in reason


def test_lab_refuses_a_public_subnet_and_bad_rates() -> None:
    with pytest.raises(ValueError, match="private IPv4"):
        Lab(rates_mbit=[10, 10], subnet="8.8.8.0/24")
    with pytest.raises(ValueError, match="positive rate"):
        Lab(rates_mbit=[10, 0])


def test_both_directions_of_every_link_are_shaped(lab: MakeLab) -> None:
    rates = [20.0, 50.0, 100.0]
    made = lab(rates_mbit=rates)
    for host, rate in zip(made.hosts, rates, strict=True):
        for netns, dev in ((host.netns, "eth0"), (made.switch_netns, f"h{host.index}")):
            out = subprocess.run(
                ["tc", "-j", "-n", netns, "qdisc", "show", "dev", dev],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (qdisc,) = [q for q in json.loads(out) if q.get("root")]
            assert qdisc["kind"] == "tbf", (netns, dev, qdisc)
            assert qdisc["options"]["rate"] == rate * 1e6 / 8, (netns, dev, qdisc)
            burst = tbf_params(rate)[0]  # tc rounds it to its clock ticks
            assert qdisc["options"]["burst"] == pytest.approx(burst, rel=0.01), (netns, dev)


def test_a_transfer_cannot_beat_the_shape_up_or_down(lab: MakeLab) -> None:
    # Host 1's link is the slow one: 0 -> 1 is held by its downlink, 1 -> 0 by its uplink.
    made = lab(rates_mbit=[100, 20])
    nbytes = 3_000_000
    shaped = nbytes * 8 / 20e6
    for src, dst in ((0, 1), (1, 0)):
        rx_before, tx_before = made.counters(dst)[0], made.counters(src)[1]
        seconds = measure(made, src, dst, nbytes)
        assert 0.7 * shaped <= seconds <= 5 * shaped, (src, dst, seconds)
        assert made.counters(dst)[0] - rx_before >= nbytes
        assert made.counters(src)[1] - tx_before >= nbytes


def test_spawn_runs_in_the_host_namespace_with_env_and_cwd(lab: MakeLab, tmp_path: Path) -> None:
    made = lab(rates_mbit=[100, 100])
    code = (
        "import os, socket; print(sorted(os.listdir('/sys/class/net')));"
        "print(os.environ['LAB_MARK'], os.getcwd());"
        f"s = socket.socket(); s.bind(('{made.hosts[1].ip}', 0)); print('bound')"
    )
    proc = made.spawn(
        1,
        [sys.executable, "-c", code],
        env={**os.environ, "LAB_MARK": "m1"},
        stdout=subprocess.PIPE,
        cwd=tmp_path,
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.decode().splitlines() == ["['eth0', 'lo']", f"m1 {tmp_path}", "bound"]


def test_dev_shm_is_private_to_each_host(lab: MakeLab) -> None:
    made = lab(rates_mbit=[100, 100])
    probe = f"/dev/shm/dpwa-lab-test-{os.getpid()}"
    assert made.spawn(0, ["sh", "-c", f"echo x > {probe}"]).wait(30) == 0
    assert made.spawn(0, ["test", "-e", probe]).wait(30) == 0, "same host shares its /dev/shm"
    assert made.spawn(1, ["test", "-e", probe]).wait(30) == 1, "host 1 saw host 0's /dev/shm"
    assert not os.path.exists(probe), "the root namespace saw host 0's /dev/shm"


def test_leaving_the_block_on_an_error_kills_everything_and_deletes_namespaces(
    lab: MakeLab,
) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    with pytest.raises(RuntimeError, match="boom"), lab(rates_mbit=[10, 10], grace=0.5) as made:
        names = _lab_netns(made)
        assert names <= _netns()
        tree = made.spawn(0, ["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE)
        assert tree.stdout is not None
        child = int(tree.stdout.readline())
        deaf = made.spawn(1, [sys.executable, "-c", stubborn])
        raise RuntimeError("boom")
    assert not names & _netns()
    assert tree.poll() is not None and deaf.poll() is not None
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), "the spawned process's child outlived the lab"
    made.close()  # idempotent


def test_a_failed_build_says_why_and_leaves_nothing(lab: MakeLab) -> None:
    before = _netns()
    with pytest.raises(LabUnavailable, match="mount"):
        lab(rates_mbit=[10, 10], name="pytestbad", shm_size="nonsense")
    assert _netns() == before


@pytest.mark.usefixtures("lab")  # only for its skip: this lab lives in a child process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_tears_the_lab_down(sig: signal.Signals) -> None:
    script = (
        "import sys, time\n"
        "from benchmarks.lab import Lab\n"
        "with Lab(rates_mbit=[10, 10], name='pytestsig') as lab:\n"
        "    sleeper = lab.spawn(0, ['sleep', '600'])\n"
        "    print(sleeper.pid, lab.switch_netns, *(h.netns for h in lab.hosts), flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    pid, *names = proc.stdout.readline().decode().split()
    assert len(names) == 3 and set(names) <= _netns()
    proc.send_signal(sig)
    proc.wait(30)
    assert proc.returncode != 0
    assert not set(names) & _netns()
    assert _gone(int(pid)), "the spawned process outlived its lab"


@pytest.mark.usefixtures("lab")
def test_cleanup_removes_what_a_crashed_lab_left() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [f"dpwalab-pytestleft-{dead.pid}-0-{part}" for part in ("sw", "h0")]
    alive = f"dpwalab-pytestleft-{os.getppid()}-0-h0"  # a live process's lab is spared
    sleeper = None
    try:
        for name in [*left, alive]:
            subprocess.run(["ip", "netns", "add", name], check=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", left[1], "sleep", "600"])
        time.sleep(0.2)
        assert sorted(Lab.cleanup("pytestleft")) == sorted(left)
        assert sleeper.wait(10) != 0
        assert alive in _netns() and not set(left) & _netns()
        assert Lab.cleanup("pytestleft", force=True) == [alive]
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
        for name in [*left, alive]:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_keyword_only_use_matches_the_contract(lab: MakeLab) -> None:
    made = lab(rates_mbit=[100, 100, 100], name="pytestapi", subnet="10.78.0.0/24")
    assert [host.ip for host in made.hosts] == ["10.78.0.1", "10.78.0.2", "10.78.0.3"]
    assert all(host.netns.startswith("dpwalab-pytestapi-") for host in made.hosts)
    rx, tx = made.counters(2)
    assert isinstance(rx, int) and isinstance(tx, int)
