"""Config: every bad value is its own clear error naming file and key; sources are tracked."""

from __future__ import annotations

from pathlib import Path

import pytest

from lastmile.appliance.server.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lastmile.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[server]\nsocket = 'relative/x.sock'\n", "server.socket", "absolute path"),
        ("[server]\ntcp_port = 70000\n", "server.tcp_port", "65535"),
        ("[server]\ntcp_port = 8080\n", "server.token_file", "bearer token"),
        ("[server]\nmax_body_mb = 0\n", "server.max_body_mb", "greater than 0"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level", "debug, info"),
        ("[server]\ntls_cert = '/x.pem'\n", "server.tls_key", "together"),
        ("[server]\nsockett = '/x'\n", "server.sockett", "unknown key"),
        ("[serverr]\n", "serverr", "unknown section"),
        ("[memory]\nhigh_watermark = 1.5\n", "memory.high_watermark", "(0, 1]"),
        ("[memory]\nlow_watermark = 0.95\nhigh_watermark = 0.9\n", "memory.low_watermark", "below"),
        ("[memory]\nhost_limit_mb = -1\n", "memory.host_limit_mb", "size in MB"),
        ("[store]\nbuild_demo = 'yes'\n", "store.build_demo", "true or false"),
        ("[auth]\noperator_uids = ['root']\n", "auth.operator_uids", "numeric user ids"),
        ("[defaults]\ndtype = 'int4'\n", "defaults.dtype", "fp32, fp16, bf16"),
        ("[defaults]\ngraph_fusion = 3\n", "defaults.graph_fusion", "off, basic, extended, all"),
        ("[defaults]\nmax_batch_size = 0\n", "defaults.max_batch_size", "from 1 to"),
        ("[defaults]\ndevice = 'gpu'\n", "defaults.device", "cuda:N"),
        ("[defaults]\nbatch = 4\n", "defaults.batch", "unknown setting"),
        ("[defaults]\nbackend = 'tensorrt'\n", "defaults.backend", "deepspeed, onnxruntime"),
        ("server = 3\n", "server", "must be a table"),
        ("[server\n", "(syntax)", "not valid TOML"),
    ],
)
def test_each_bad_value_names_file_and_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message
    assert info.value.key == key


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_values_and_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LASTMILE_SOCKET", raising=False)
    path = write(tmp_path, "[server]\nsocket = '/tmp/x/l.sock'\n[defaults]\nmax_batch_size = 16\n[memory]\nhost_limit_mb = 2048\n")
    config = load_config(path, system_mode=False)
    assert config.socket_path == Path("/tmp/x/l.sock")
    assert config.defaults.max_batch_size == 16
    assert config.memory["host_limit_mb"] == 2048
    assert config.sources["server.socket"] == f"file {path}"
    assert config.sources["defaults.max_batch_size"] == f"file {path}"
    assert config.sources["server.tcp_port"] == "default (user mode)"
    monkeypatch.setenv("LASTMILE_SOCKET", "/tmp/y.sock")
    config = load_config(path, system_mode=False)
    assert config.socket_path == Path("/tmp/y.sock")
    assert config.sources["server.socket"] == "environment LASTMILE_SOCKET"


def test_user_and_system_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LASTMILE_SOCKET", raising=False)
    monkeypatch.delenv("LASTMILE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    user = load_config(system_mode=False)
    assert user.socket_path == Path("/run/user/1234/lastmile/lastmile.sock")
    assert user.store["models_dir"] == tmp_path / ".local/share/lastmile/models"
    assert user.file is None
    system = load_config(system_mode=True) if not Path("/etc/lastmile/lastmile.toml").exists() else None
    if system is not None:
        assert system.socket_path == Path("/run/lastmile/lastmile.sock")
        assert system.store["state_file"] == Path("/var/lib/lastmile/state.json")


def test_shipped_system_config_template_is_valid() -> None:
    """install-system.sh copies this file to /etc/lastmile; it must load as is."""
    template = Path(__file__).resolve().parents[2] / "appliance" / "server" / "lastmile.system.toml"
    assert load_config(template, system_mode=True).file == template


def test_graph_fusion_accepts_the_boolean_other_servers_use(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[defaults]\ngraph_fusion = true\n")).defaults.graph_fusion == "all"
    assert load_config(write(tmp_path, "[defaults]\ngraph_fusion = false\n")).defaults.graph_fusion == "off"
