"""Loading and checking configs: both YAML layouts, every error case, the Config API."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpwa_core.config import Config, NodeSpec, load_config
from dpwa_core.errors import ConfigError
from dpwa_core.launchers import LAUNCHERS

DATA = Path(__file__).parent / "data"
SEED = DATA / "seed_config.yaml"

W = [NodeSpec(f"w{i + 1}", "localhost", 45000 + i) for i in range(4)]

# The seed file, written in today's mapping layout.
NEW_STYLE: dict[str, Any] = {
    "nodes": [{"name": n.name, "host": n.host, "port": n.port} for n in W],
    "pull_probability": 1,
    "timeout_ms": 2500,
    "interpolation": "constant",
    "divergence_threshold": 0.2,
    "constant": {"value": 0.5},
    "clock": None,
    "loss": {},
}

NEW_STYLE_YAML = """\
nodes:
  - {name: w1, host: localhost, port: 45000}
  - {name: w2, host: localhost, port: 45001}
  - {name: w3, host: localhost, port: 45002}
  - {name: w4, host: localhost, port: 45003}
pull_probability: 1.0
timeout_ms: 2500
interpolation: constant
divergence_threshold: 0.2
constant: {value: 0.5}
clock: 0
loss: 0
"""


def minimal(**extra: Any) -> dict[str, Any]:
    """A valid two-node mapping with ``extra`` keys on top."""
    return {"nodes": copy.deepcopy(NEW_STYLE["nodes"][:2]), **extra}


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_for(source: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source)
    return str(info.value)


# The two layouts.


def test_the_seed_file_loads_unchanged_and_means_what_it_says() -> None:
    config = load_config(SEED)
    assert config.nodes == tuple(W)
    assert config.pull_probability == 1.0  # from the seed's fetch_probability
    assert config.timeout_ms == 2500.0
    assert config.timeout == 2.5
    assert config.interpolation == "constant"
    assert config.divergence_threshold == 0.2
    assert config.methods == {"constant": {"value": 0.5}, "clock": {}, "loss": {}}
    assert config.source == str(SEED)
    assert config.make_strategy()(10, 20, 1.0, 2.0) == 0.5


def test_seed_layout_and_mapping_layout_give_the_same_config(tmp_path: Path) -> None:
    seed = load_config(SEED)
    assert load_config(NEW_STYLE) == seed
    assert load_config(write(tmp_path, NEW_STYLE_YAML)) == seed
    assert hash(load_config(NEW_STYLE)) == hash(seed)
    assert load_config(tmp_path / "cluster.yaml") == seed  # a PathLike works too


def test_defaults_and_the_fetch_probability_alias() -> None:
    config = load_config(minimal())
    assert (config.pull_probability, config.timeout_ms) == (1.0, 2500.0)
    assert (config.interpolation, config.divergence_threshold) == ("constant", 0.0)
    assert config.methods == {}
    assert load_config(minimal(fetch_probability=0.25)).pull_probability == 0.25


def test_a_config_passes_through_and_direct_construction_is_checked() -> None:
    config = load_config(SEED)
    assert load_config(config) is config
    direct = Config(nodes=tuple(W), pull_probability=1, methods={"constant": {"value": 0.5}})
    assert direct.pull_probability == 1.0 and type(direct.pull_probability) is float
    with pytest.raises(ConfigError, match="'timeout_ms' must be"):
        Config(nodes=tuple(W), timeout_ms=0)
    with pytest.raises(ConfigError, match="'nodes' must be a non-empty list"):
        Config(nodes=())


# The Config API.


def test_node_lookup_and_peers() -> None:
    config = load_config(SEED)
    assert config.node("w3") == W[2]
    assert config.node("w3").address == ("localhost", 45002)
    assert config.peers_of("w2") == (W[0], W[2], W[3])
    message = str(pytest.raises(ConfigError, config.node, "w9").value)
    assert str(SEED) in message and "'w9'" in message and "w1, w2, w3, w4" in message
    with pytest.raises(ConfigError, match="no node named 'w9'"):
        config.peers_of("w9")


def test_resolve_name_prefers_the_argument_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = load_config(SEED)
    for var in ["DPWA_NODE", *(launcher.rank_var for launcher in LAUNCHERS)]:
        monkeypatch.delenv(var, raising=False)
    message = str(pytest.raises(ConfigError, config.resolve_name, None).value)
    assert "name=" in message and "DPWA_NODE" in message and str(SEED) in message
    assert "RANK (torchrun)" in message and "SLURM_PROCID (Slurm srun)" in message
    monkeypatch.setenv("RANK", "1")
    assert config.resolve_name(None) == "w2"  # the launcher's rank picks nodes[1] ...
    monkeypatch.setenv("DPWA_NODE", "w4")
    assert config.resolve_name(None) == "w4"  # ... unless DPWA_NODE names one
    assert config.resolve_name("w1") == "w1"
    monkeypatch.setenv("DPWA_NODE", "w7")
    with pytest.raises(ConfigError, match="no node named 'w7'"):
        config.resolve_name(None)


def test_with_nodes_copies_and_checks() -> None:
    config = load_config(SEED)
    two = config.with_nodes(W[:2])
    assert two.nodes == tuple(W[:2]) and two.methods == config.methods
    assert config.nodes == tuple(W)  # the original is untouched
    with pytest.raises(ConfigError, match="repeats the name 'w1'"):
        config.with_nodes([W[0], NodeSpec("w1", "otherhost", 1)])


def test_make_strategy_uses_the_section_of_the_chosen_interpolation() -> None:
    config = load_config(minimal(interpolation="constant", constant={"value": 0.2}))
    assert config.make_strategy()(0, 0, 0, 0) == 0.2
    clock = load_config(minimal(interpolation="clock", clock=0))
    assert clock.make_strategy()(100, 300, 0, 0) == 0.75


# Errors: each names the source, the key and the fix.


def test_file_not_found(tmp_path: Path) -> None:
    message = error_for(tmp_path / "missing.yaml")
    assert "missing.yaml" in message and "not found" in message and "Check the path" in message


def test_not_yaml(tmp_path: Path) -> None:
    message = error_for(write(tmp_path, "nodes: [\n  {name: w1\n"))
    assert "cluster.yaml is not valid YAML at line" in message


@pytest.mark.parametrize("text", ["", "just a string\n", "42\n", "- 1\n- 2\n"])
def test_top_level_must_be_a_mapping_or_the_list_layout(tmp_path: Path, text: str) -> None:
    message = error_for(write(tmp_path, text))
    assert "cluster.yaml" in message
    assert "mapping" in message and ("top level" in message or "top-level list" in message)


def test_a_key_given_twice_in_the_list_layout(tmp_path: Path) -> None:
    text = SEED.read_text() + "\n- timeout_ms: 100\n"
    message = error_for(write(tmp_path, text))
    assert "cluster.yaml" in message and "'timeout_ms' is given twice" in message


def test_old_and_new_name_together() -> None:
    message = error_for(minimal(fetch_probability=1, pull_probability=1))
    assert "'fetch_probability' is the old name of 'pull_probability'" in message


def test_unknown_keys_list_the_valid_ones() -> None:
    message = error_for(minimal(timout_ms=10))
    assert "<mapping>: unknown key 'timout_ms'" in message
    assert "Did you mean 'timeout_ms'?" in message
    assert "nodes, pull_probability, timeout_ms, interpolation, divergence_threshold" in message
    assert "clock, constant, loss" in message


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (None, "'nodes' is missing"),
        ([], "'nodes' must be a non-empty list"),
        ("w1:45000", "'nodes' must be a non-empty list"),
        ([["w1", "localhost", 1]], "'nodes[0]' must be a mapping"),
        ([{"name": "w1", "host": "h"}], "'nodes[0]' misses 'port'"),
        ([{"host": "h", "port": 1}], "'nodes[0]' misses 'name'"),
        ([{"name": "w1", "host": "h", "port": 1, "gpu": 0}], "'nodes[0]' has unknown 'gpu'"),
        ([{"name": "w1", "host": "h", "port": "45000"}], "'nodes[0].port' must be an integer"),
        ([{"name": "w1", "host": "h", "port": 0}], "'nodes[0].port' must be an integer 1..65535"),
        ([{"name": "w1", "host": "h", "port": 65536}], "'nodes[0].port' must be an integer"),
        ([{"name": "w1", "host": "h", "port": True}], "'nodes[0].port' must be an integer"),
        ([{"name": "w1", "host": "h", "port": 1.5}], "'nodes[0].port' must be an integer"),
        ([{"name": "", "host": "h", "port": 1}], "'nodes[0].name' must be a non-empty string"),
        ([{"name": 7, "host": "h", "port": 1}], "'nodes[0].name' must be a non-empty string"),
        ([{"name": "w1", "host": None, "port": 1}], "'nodes[0].host' must be a non-empty"),
        (
            [{"name": "w1", "host": "a", "port": 1}, {"name": "w1", "host": "b", "port": 2}],
            "'nodes[1].name' repeats the name 'w1' of nodes[0]",
        ),
        (
            [{"name": "w1", "host": "a", "port": 1}, {"name": "w2", "host": "A", "port": 1}],
            "'nodes[1].port' repeats the address A:1 of nodes[0]",
        ),
    ],
)
def test_bad_nodes(tmp_path: Path, nodes: Any, expected: str) -> None:
    document = {} if nodes is None else {"nodes": nodes}
    message = error_for(write(tmp_path, yaml.safe_dump(document)))
    assert message.startswith(str(tmp_path / "cluster.yaml"))
    assert expected in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("pull_probability", 1.5, "between 0 and 1"),
        ("pull_probability", -0.1, "between 0 and 1"),
        ("pull_probability", "often", "between 0 and 1"),
        ("pull_probability", True, "between 0 and 1"),
        ("pull_probability", float("nan"), "between 0 and 1"),
        ("fetch_probability", 2, "between 0 and 1"),
        ("timeout_ms", 0, "greater than 0"),
        ("timeout_ms", -5, "greater than 0"),
        ("timeout_ms", "2500", "greater than 0"),
        ("divergence_threshold", -0.1, ">= 0"),
        ("divergence_threshold", None, ">= 0"),
    ],
)
def test_bad_numbers(key: str, value: Any, expected: str) -> None:
    message = error_for(minimal(**{key: value}))
    shown = "pull_probability" if key == "fetch_probability" else key
    assert f"key {shown!r} must be" in message and expected in message
    assert repr(value) in message


def test_interpolation_must_be_a_string() -> None:
    message = error_for(minimal(interpolation=["constant"]))
    assert "key 'interpolation' must be a strategy name" in message


def test_unknown_interpolation_reads_like_opentelemetry(tmp_path: Path) -> None:
    message = error_for(write(tmp_path, NEW_STYLE_YAML.replace("constant\n", "foo\n", 1)))
    assert message.startswith(f"{tmp_path / 'cluster.yaml'}: key 'interpolation' is invalid: ")
    assert (
        "Interpolation 'foo' not found. It is either misspelled or not installed. "
        "Installed: clock, constant, loss" in message
    )


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"value": 2}, "value must be in [0, 1], got 2"),
        ({"valu": 0.5}, "unexpected keyword argument 'valu'"),
        ("half", "must be a mapping of options"),
        ([0.5], "must be a mapping of options"),
        (False, "must be a mapping of options"),
    ],
)
def test_a_section_the_strategy_rejects_names_the_section(section: Any, expected: str) -> None:
    message = error_for(minimal(interpolation="constant", constant=section))
    assert "<mapping>: key 'constant'" in message and expected in message


def test_every_section_is_checked_not_only_the_chosen_one() -> None:
    message = error_for(minimal(interpolation="clock", constant={"value": 2}))
    assert "key 'constant' has invalid options" in message
    assert "Fix the 'constant' section" in message


def test_security_keys_default_off_and_load_in_both_layouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(NEW_STYLE)
    assert (config.reject_nonfinite, config.auth, config.tls) == (True, None, None)
    monkeypatch.setenv("DPWA_CONFIG_TEST_SECRET", "abc")
    seed = yaml.safe_load(SEED.read_text())
    seed += [{"auth": {"secret_env": "DPWA_CONFIG_TEST_SECRET"}}, {"reject_nonfinite": False}]
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(seed))
    loaded = load_config(path)
    assert loaded.auth is not None and loaded.auth.secret == b"abc"
    assert "DPWA_CONFIG_TEST_SECRET" in loaded.auth.source
    assert loaded.reject_nonfinite is False


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("reject_nonfinite", "yes", "'reject_nonfinite' must be true or false"),
        ("reject_nonfinite", 1, "'reject_nonfinite' must be true or false"),
        ("auth", "secret", "'auth' must be a mapping"),
        ("auth", {}, "exactly one of secret_env"),
        ("auth", {"secret_env": ""}, "must name an environment variable"),
        ("tls", ["a"], "'tls' must be a mapping"),
        ("tls", {"cert": "a", "key": "b", "ca": "c", "verify": True}, "unknown 'verify'"),
        ("tls", {"cert": 3, "key": "b", "ca": "c"}, "'tls.cert' must be a file path"),
    ],
)
def test_bad_security_keys(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config({**NEW_STYLE, key: value})


def test_a_world_readable_secret_file_is_refused_unless_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("abc\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=re.escape(f"chmod 600 {secret}")) as refused:
        load_config({**NEW_STYLE, "auth": {"secret_file": str(secret)}})
    assert "abc" not in str(refused.value)
    allowed = {"secret_file": str(secret), "allow_readable_secret_file": True}
    config = load_config({**NEW_STYLE, "auth": allowed})
    assert config.auth is not None and config.auth.secret == b"abc"
    assert "may be read by other users" in caplog.text
    assert "abc" not in caplog.text


def test_peer_choice_defaults_to_the_draw_and_is_checked() -> None:
    assert load_config(minimal()).peer_choice == "random"
    assert load_config(minimal(peer_choice="exponential")).peer_choice == "exponential"
    assert "'peer_choice' must be one of exponential, random" in error_for(
        minimal(peer_choice="ring")
    )
