"""Which node a process runs: DPWA_NODE, then a launcher's rank; real launchers start real nodes.

torchrun runs for real when it is installed. Slurm, Open MPI and Kubernetes are not installed
here: their tests start the node processes with the environment those launchers give a process
(the launcher's environment, not the launcher), which is all dpwa reads from them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cluster

import dpwa_core
from dpwa_core.config import load_config
from dpwa_core.config_template import render_config
from dpwa_core.errors import ConfigError
from dpwa_core.launchers import (
    ARGUMENT_SOURCE,
    LAUNCHERS,
    NODE_ENV,
    NodeChoice,
    node_from_environment,
)

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "workers" / "rank_worker.py"
NAMES = ["w1", "w2", "w3", "w4"]
RANK_VARS = [launcher.rank_var for launcher in LAUNCHERS]
SIZE_VARS = [launcher.size_var for launcher in LAUNCHERS if launcher.size_var]
ALL_VARS = [NODE_ENV, *RANK_VARS, *SIZE_VARS]
PULLS = 3


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test runner itself may run under a launcher: start every test without its variables."""
    for var in ALL_VARS:
        monkeypatch.delenv(var, raising=False)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARS}
    env.update(extra)
    return env


def test_the_table_is_in_the_documented_order() -> None:
    assert [(x.rank_var, x.size_var) for x in LAUNCHERS] == [
        ("RANK", "WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("JOB_COMPLETION_INDEX", None),
    ]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=RANK_VARS)
@pytest.mark.parametrize("rank", [0, 3])
def test_every_rank_variable_picks_its_node(launcher: Any, rank: int) -> None:
    choice = node_from_environment(NAMES, {launcher.rank_var: str(rank)})
    assert choice == NodeChoice(NAMES[rank], f"{launcher.rank_var}={rank} ({launcher.name})")
    assert not choice.from_argument


def test_nothing_set_or_only_empty_values_choose_nothing() -> None:
    assert node_from_environment(NAMES, {}) is None
    assert node_from_environment(NAMES, dict.fromkeys(ALL_VARS, "")) is None
    assert node_from_environment(NAMES, {"WORLD_SIZE": "4", "LOCAL_RANK": "1"}) is None


def test_precedence_dpwa_node_then_ranks_in_table_order() -> None:
    env = {
        NODE_ENV: "w4",
        "RANK": "0",
        "SLURM_PROCID": "1",
        "OMPI_COMM_WORLD_RANK": "2",
        "JOB_COMPLETION_INDEX": "3",
    }
    expected = [
        ("w4", "DPWA_NODE"),
        ("w1", "RANK=0 (torchrun)"),
        ("w2", "SLURM_PROCID=1 (Slurm srun)"),
        ("w3", "OMPI_COMM_WORLD_RANK=2 (Open MPI mpirun)"),
        ("w4", "JOB_COMPLETION_INDEX=3 (Kubernetes indexed Job)"),
    ]
    for var, (name, source) in zip(list(env), expected, strict=True):
        assert node_from_environment(NAMES, env) == NodeChoice(name, source)
        env[var] = ""  # empty counts as unset: the next one decides
    assert node_from_environment(NAMES, env) is None


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "1e3", "0x1", "+2", "٣", "2 3"])
@pytest.mark.parametrize("launcher", LAUNCHERS, ids=RANK_VARS)
def test_a_rank_that_is_not_a_whole_number_is_an_error(launcher: Any, value: str) -> None:
    # A set but broken rank is an error, never a fall-through to the next variable.
    env = {"JOB_COMPLETION_INDEX": "0", launcher.rank_var: value}
    with pytest.raises(ConfigError) as info:
        node_from_environment(NAMES, env, where="cluster.yaml")
    message = str(info.value)
    assert message.startswith("cluster.yaml: ")
    assert f"{launcher.rank_var}={value!r} is not a rank" in message
    assert "whole number >= 0" in message and NODE_ENV in message


def test_surrounding_whitespace_in_a_rank_is_tolerated() -> None:
    assert node_from_environment(NAMES, {"RANK": " 2\n"}) == NodeChoice("w3", "RANK=2 (torchrun)")


@pytest.mark.parametrize(
    ("launcher", "hint"),
    [
        (LAUNCHERS[0], "torchrun --nproc-per-node 4"),
        (LAUNCHERS[1], "srun --ntasks 4"),
        (LAUNCHERS[2], "mpirun -n 4"),
        (LAUNCHERS[3], "completions: 4 and parallelism: 4"),
    ],
    ids=RANK_VARS,
)
def test_a_rank_past_the_last_node_says_how_many_processes_to_start(
    launcher: Any, hint: str
) -> None:
    with pytest.raises(ConfigError) as info:
        node_from_environment(NAMES, {launcher.rank_var: "5"}, where="cluster.yaml")
    message = str(info.value)
    assert f"cluster.yaml: {launcher.rank_var}=5 but the config has 4 nodes (w1..w4)" in message
    assert "start as many processes as the config has nodes" in message
    assert hint in message and "add nodes" in message
    with pytest.raises(ConfigError, match=r"RANK=1 but the config has 1 node \(solo\)"):
        node_from_environment(["solo"], {"RANK": "1"})


def test_an_unknown_dpwa_node_wins_and_fails_even_with_a_good_rank() -> None:
    with pytest.raises(ConfigError) as info:
        node_from_environment(NAMES, {NODE_ENV: "w9", "RANK": "0"}, where="c.yaml")
    message = str(info.value)
    assert "c.yaml: DPWA_NODE='w9'" in message and "no node named 'w9'" in message
    assert "w1, w2, w3, w4" in message


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({"RANK": "1", "WORLD_SIZE": "8"}, "WORLD_SIZE=8 (torchrun) but the config has 4 nodes"),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "SLURM_NTASKS=2 (Slurm srun)"),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "x"}, "OMPI_COMM_WORLD_SIZE=x"),
        ({"RANK": "1", "WORLD_SIZE": "4"}, None),
        ({"RANK": "1", "WORLD_SIZE": ""}, None),
        ({"JOB_COMPLETION_INDEX": "1"}, None),
        # The size of a launcher whose rank is not used does not matter.
        ({"RANK": "1", "WORLD_SIZE": "4", "SLURM_NTASKS": "1"}, None),
    ],
)
def test_a_launcher_size_other_than_the_node_count_is_one_warning(
    env: dict[str, str], warned: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dpwa")
    choice = node_from_environment(NAMES, env, where="cluster.yaml")
    assert choice is not None and choice.name == "w2"
    records = [r for r in caplog.records if r.name.startswith("dpwa")]
    if warned is None:
        assert records == []
    else:
        assert len(records) == 1 and records[0].levelno == logging.WARNING
        message = records[0].getMessage()
        assert message.startswith("cluster.yaml: ") and warned in message
        assert "start " in message


def test_config_choose_node_and_resolve_name(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(cluster(3))
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert config.choose_node(None) == NodeChoice("w3", "SLURM_PROCID=2 (Slurm srun)")
    assert config.resolve_name(None) == "w3"
    # A name passed wins over everything, and says so.
    choice = config.choose_node("w1")
    assert choice == NodeChoice("w1", ARGUMENT_SOURCE) and choice.from_argument
    monkeypatch.setenv(NODE_ENV, "w2")
    assert config.choose_node(None) == NodeChoice("w2", "DPWA_NODE")
    # An explicit environment replaces the process's own.
    assert config.choose_node(None, {"RANK": "0"}).name == "w1"
    with pytest.raises(ConfigError, match="which node is this process"):
        config.choose_node(None, {})


def test_the_which_node_error_lists_every_way(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(cluster(2))
    message = str(pytest.raises(ConfigError, config.resolve_name, None).value)
    assert "which node is this process?" in message and "name= (one of w1, w2)" in message
    for launcher in LAUNCHERS:
        assert f"{launcher.rank_var} ({launcher.name})" in message
    assert NODE_ENV in message


def test_a_real_node_logs_where_its_name_came_from(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dpwa")
    mapping = cluster(2)
    port = mapping["nodes"][1]["port"]
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with dpwa_core.Node(mapping) as node:
        assert node.name == "w2"
    lines = [r.getMessage() for r in caplog.records if r.name == "dpwa.node"]
    assert lines[0] == (
        f"w2 listening on 127.0.0.1:{port} (no auth: trusted networks only); "
        "node name from OMPI_COMM_WORLD_RANK=1 (Open MPI mpirun)"
    )
    caplog.clear()
    with dpwa_core.Node(mapping, "w1"):
        pass
    first = [r.getMessage() for r in caplog.records if r.name == "dpwa.node"][0]
    assert first.startswith("w1 listening on") and "node name from" not in first


def write_config(tmp_path: Path, count: int) -> tuple[Path, list[int]]:
    mapping = cluster(count, timeout_ms=2000)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path, [node["port"] for node in mapping["nodes"]]


def check_output(out: str, ports: list[int], sources: list[str]) -> None:
    """Each rank found its own node, said so in its first log line, and pulled from its peer."""
    for index, (port, source) in enumerate(zip(ports, sources, strict=True)):
        name = f"w{index + 1}"
        line = (
            f"LOG {name} listening on 127.0.0.1:{port} (no auth: trusted networks only); "
            f"node name from {source}"
        )
        assert line in out.splitlines(), f"no line {line!r} in:\n{out}"
        pulled = re.search(rf"^RESULT {name} pulls_ok=(\d+)$", out, re.MULTILINE)
        assert pulled and int(pulled.group(1)) >= PULLS, out


def torchrun() -> str | None:
    beside = Path(sys.executable).parent / "torchrun"
    return str(beside) if beside.exists() else shutil.which("torchrun")


@pytest.mark.skipif(torchrun() is None, reason="torchrun (PyTorch) is not installed")
def test_two_nodes_under_real_torchrun_pick_their_nodes_by_rank(tmp_path: Path) -> None:
    config, ports = write_config(tmp_path, 2)
    command = [torchrun(), "--standalone", "--nproc-per-node", "2", str(WORKER)]
    result = subprocess.run(
        [*command, str(config), str(tmp_path), str(PULLS)],
        env=clean_env(OMP_NUM_THREADS="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_output(result.stdout, ports, ["RANK=0 (torchrun)", "RANK=1 (torchrun)"])


def slurm_env(rank: int, size: int) -> dict[str, str]:
    return {
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(size),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
    }


def mpi_env(rank: int, size: int) -> dict[str, str]:
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(size),
    }


def kubernetes_env(rank: int, size: int) -> dict[str, str]:
    # An indexed Job sets the index (in the env and a pod annotation); it has no size variable.
    return {"JOB_COMPLETION_INDEX": str(rank), "HOSTNAME": f"dpwa-{rank}"}


@pytest.mark.parametrize(
    ("launcher", "make_env", "source"),
    [
        ("srun", slurm_env, "SLURM_PROCID={rank} (Slurm srun)"),
        ("mpirun", mpi_env, "OMPI_COMM_WORLD_RANK={rank} (Open MPI mpirun)"),
        (None, kubernetes_env, "JOB_COMPLETION_INDEX={rank} (Kubernetes indexed Job)"),
    ],
    ids=["slurm", "openmpi", "kubernetes"],
)
def test_two_nodes_with_a_launchers_environment_pick_their_nodes_by_rank(
    tmp_path: Path, launcher: str | None, make_env: Any, source: str
) -> None:
    """Node processes started with the environment srun / mpirun / an indexed Job gives each rank.

    This is the launcher's environment, not the launcher: the tests below run the real one
    where it is installed.
    """
    config, ports = write_config(tmp_path, 2)
    argv = [sys.executable, str(WORKER), str(config), str(tmp_path), str(PULLS)]
    procs = [
        subprocess.Popen(
            argv,
            env=clean_env(**make_env(rank, 2)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    check_output("".join(outputs), ports, [source.format(rank=r) for r in range(2)])


def open_mpi() -> bool:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return False
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    return "Open MPI" in version.stdout + version.stderr


@pytest.mark.skipif(not open_mpi(), reason="Open MPI's mpirun is not installed")
def test_two_nodes_under_real_mpirun_pick_their_nodes_by_rank(tmp_path: Path) -> None:
    config, ports = write_config(tmp_path, 2)
    as_root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    result = subprocess.run(
        ["mpirun", *as_root, "--oversubscribe", "-n", "2", sys.executable, str(WORKER)]
        + [str(config), str(tmp_path), str(PULLS)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sources = [f"OMPI_COMM_WORLD_RANK={r} (Open MPI mpirun)" for r in range(2)]
    check_output(result.stdout, ports, sources)


@pytest.mark.skipif(
    shutil.which("srun") is None or "SLURM_JOB_ID" not in os.environ,
    reason="needs srun inside a Slurm allocation",
)
def test_two_nodes_under_real_srun_pick_their_nodes_by_rank(tmp_path: Path) -> None:
    config, ports = write_config(tmp_path, 2)
    env = {k: v for k, v in os.environ.items() if k not in (NODE_ENV, "RANK")}
    result = subprocess.run(
        ["srun", "--ntasks", "2", "--nodes", "1", sys.executable, str(WORKER)]
        + [str(config), str(tmp_path), str(PULLS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_output(result.stdout, ports, [f"SLURM_PROCID={r} (Slurm srun)" for r in range(2)])


def test_a_rank_past_the_last_node_stops_the_process_with_the_fix(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, 2)
    code = "import sys, dpwa_core; dpwa_core.Node(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", code, str(config)],
        env=clean_env(RANK="2", WORLD_SIZE="3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "WORLD_SIZE=3 (torchrun) but the config has 2 nodes" in result.stderr
    assert "RANK=2 but the config has 2 nodes (w1, w2)" in result.stderr
    assert "torchrun --nproc-per-node 2" in result.stderr


@pytest.mark.parametrize(
    ("count", "hosts", "nproc"), [(4, ["a", "b"], 2), (6, ["n1", "n2", "n3"], 2), (3, ["x"], 3)]
)
def test_config_init_hosts_follow_the_launchers_rank_order(
    count: int, hosts: list[str], nproc: int
) -> None:
    """rank = node_rank * nproc_per_node + local_rank (torchrun; Slurm's block distribution)."""
    config = load_config(yaml.safe_load(render_config(count, ",".join(hosts), 46000)))
    for node_rank, host in enumerate(hosts):
        for local_rank in range(nproc):
            rank = node_rank * nproc + local_rank
            choice = config.choose_node(None, {"RANK": str(rank)})
            assert config.node(choice.name) == dpwa_core.NodeSpec(
                f"w{rank + 1}", host, 46000 + local_rank
            )


def test_config_init_with_uneven_hosts_fills_blocks_in_order() -> None:
    config = load_config(yaml.safe_load(render_config(5, ["a", "b"])))
    assert [(n.name, n.host, n.port) for n in config.nodes] == [
        ("w1", "a", 45000),
        ("w2", "a", 45001),
        ("w3", "a", 45002),
        ("w4", "b", 45000),
        ("w5", "b", 45001),
    ]
    assert render_config(5, "a,b") == render_config(5, ["a", "b"])
    assert "# dpwa cluster config: 5 nodes on 2 hosts (a, b), up to 3 per host" in render_config(
        5, "a,b"
    )


@pytest.mark.parametrize(
    ("nodes", "host", "message"),
    [
        (5, "a,b,c,d", "none on d. Use a multiple of the number of hosts, e.g. --nodes 8"),
        (2, "a,b,c", "none on c"),
        (2, "a,,b", "has an empty entry"),
        (2, "a,b,", "has an empty entry"),
        (2, "a,A", "lists 'A' twice"),
        (2, "a,bad host", "'bad host' is neither an IP address nor a valid host name"),
        (4, "a,b", "past 65535"),
    ],
)
def test_config_init_rejects_bad_host_lists(nodes: int, host: str, message: str) -> None:
    base = 65535 if message == "past 65535" else 45000
    with pytest.raises(ConfigError, match=re.escape(message)):
        render_config(nodes, host, base)


def deploy_configs() -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every dpwa config in docs/DEPLOY.md's yaml blocks, the ConfigMap's embedded one too."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    for number, block in enumerate(re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)):
        for document in yaml.safe_load_all(block):
            if isinstance(document, dict) and "nodes" in document:
                yield f"block {number}", document
            elif isinstance(document, dict) and document.get("kind") == "ConfigMap":
                for key, value in document.get("data", {}).items():
                    embedded = yaml.safe_load(value)
                    if isinstance(embedded, dict) and "nodes" in embedded:
                        yield f"block {number}, ConfigMap key {key}", embedded


def test_every_config_in_deploy_md_loads() -> None:
    found = list(deploy_configs())
    where = [w for w, _ in found]
    assert len(found) >= 3 and any("ConfigMap" in w for w in where), where
    for where_, mapping in found:
        try:
            load_config(mapping)
        except ConfigError as exc:
            pytest.fail(f"docs/DEPLOY.md {where_}: {exc}")


def deploy_train_script() -> str:
    text = (ROOT / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    scripts = [
        block
        for block in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
        if "dpwa_core.connect(model, config)" in block
    ]
    assert len(scripts) == 1, "docs/DEPLOY.md should hold one train.py"
    return scripts[0]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch")
def test_deploy_md_train_script_runs_as_two_ranks(tmp_path: Path) -> None:
    """The recipes' train.py, as two processes with the environment torchrun gives them."""
    (tmp_path / "train.py").write_text(deploy_train_script())
    _, ports = write_config(tmp_path, 2)
    procs = [
        subprocess.Popen(
            [sys.executable, "train.py"],
            cwd=tmp_path,
            env=clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out
            name = f"w{rank + 1}"
            assert (
                f"{name} listening on 127.0.0.1:{ports[rank]} (no auth: trusted networks only); "
                f"node name from RANK={rank} (torchrun)"
            ) in out
            last = re.search(rf"^{name} step 500 loss (\S+) pulls ok (\d+)$", out, re.M)
            assert last is not None, out
            assert float(last.group(1)) < 1.0 and int(last.group(2)) > 0, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_deploy_md_kubernetes_manifest_matches_its_config() -> None:
    """One pod per node, pod i named so that it is nodes[i]'s host, DNS from the Service."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    documents = [
        document
        for block in re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
        for document in yaml.safe_load_all(block)
        if isinstance(document, dict) and "kind" in document
    ]
    by_kind = {document["kind"]: document for document in documents}
    assert set(by_kind) == {"Service", "ConfigMap", "Job"}
    service, job = by_kind["Service"], by_kind["Job"]
    config = load_config(yaml.safe_load(by_kind["ConfigMap"]["data"]["cluster.yaml"]))
    job_name, service_name = job["metadata"]["name"], service["metadata"]["name"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == len(config.nodes)
    assert pod["subdomain"] == service_name and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job_name}
    for index, node in enumerate(config.nodes):
        assert node.host == f"{job_name}-{index}.{service_name}"
    volume = pod["volumes"][0]["configMap"]["name"]
    assert volume == by_kind["ConfigMap"]["metadata"]["name"]
    container = pod["containers"][0]
    assert container["workingDir"] == container["volumeMounts"][0]["mountPath"]


@pytest.mark.parametrize("count", [4, 8])
def test_deploy_md_multi_host_configs_are_what_config_init_writes(count: int) -> None:
    text = (ROOT / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    blocks = [
        document
        for block in re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
        for document in yaml.safe_load_all(block)
    ]
    shown = [
        b["nodes"]
        for b in blocks
        if isinstance(b, dict) and len(b.get("nodes", [])) == count
        if {n["host"] for n in b["nodes"]} == {"10.0.0.1", "10.0.0.2"}
    ]
    written = yaml.safe_load(render_config(count, "10.0.0.1,10.0.0.2"))
    assert shown == [written["nodes"]]
    assert f"dpwa config init --nodes {count} --host 10.0.0.1,10.0.0.2" in text
