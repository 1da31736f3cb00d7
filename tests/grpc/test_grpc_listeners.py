"""The gRPC listeners' configuration: the two keys, the container's environment variables,
TLS on the TCP listener (HTTP's certificate), and the bearer-token lock-out shared with HTTP's rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from lastmile.appliance.server.config import ConfigError, load_config
from tests.conftest import free_port, start_tcp_daemon

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "listener-token-0123456789abcdef"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("LASTMILE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return monkeypatch


def test_grpc_keys_and_defaults(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    from lastmile.appliance.server.grpc_service import grpc_socket_path

    config = load_config(system_mode=False)
    assert config.server["grpc_port"] == 0 and config.server["grpc_socket"] is None
    assert grpc_socket_path(config) == config.socket_path.with_name("lastmile-grpc.sock")
    file = tmp_path / "l.toml"
    file.write_text(f'[server]\ngrpc_socket = "{tmp_path}/g.sock"\n')
    assert grpc_socket_path(load_config(file)) == tmp_path / "g.sock"
    file.write_text("[server]\ngrpc_port = 9001\n")
    with pytest.raises(ConfigError, match="token_file"):
        load_config(file)  # gRPC on TCP needs the token, as HTTP's TCP does
    file.write_text("[server]\ngrpc_port = 70000\n")
    with pytest.raises(ConfigError, match="server.grpc_port"):
        load_config(file)


def test_environment_overrides(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    for name, value in {"LASTMILE_STORE": f"{tmp_path}/store", "LASTMILE_STATE_FILE": f"{tmp_path}/s.json",
                        "LASTMILE_BUILD_DEMO": "0", "LASTMILE_HTTP_HOST": "0.0.0.0", "LASTMILE_HTTP_PORT": "8080",
                        "LASTMILE_GRPC_PORT": "8081", "LASTMILE_TOKEN_FILE": str(token),
                        "LASTMILE_ALLOW_INSECURE_TCP": "true"}.items():
        clean_env.setenv(name, value)
    config = load_config(system_mode=False)
    assert config.store["models_dir"] == tmp_path / "store" and config.store["build_demo"] is False
    assert config.server["tcp_port"] == 8080 and config.server["grpc_port"] == 8081 and config.server["tcp_host"] == "0.0.0.0"
    assert config.server["allow_insecure_tcp"] is True and config.server["token_file"] == token
    assert config.sources["server.grpc_port"] == "environment LASTMILE_GRPC_PORT"
    for name, value in (("LASTMILE_HTTP_PORT", "eighty"), ("LASTMILE_GRPC_PORT", "-1"), ("LASTMILE_BUILD_DEMO", "maybe"),
                        ("LASTMILE_STORE", "relative/path")):
        clean_env.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            load_config(system_mode=False)
        clean_env.delenv(name)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_and_the_lock_out(demo_store: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    key.chmod(0o600)
    port = free_port()
    d, _ = start_tcp_daemon(tmp_path / "home", demo_store, TOKEN,
                            server_extra=f'grpc_port = {port}\ntls_cert = "{cert}"\ntls_key = "{key}"')
    try:
        # plain text to a TLS listener gets nowhere
        plain = grpcclient.InferenceServerClient(url=f"localhost:{port}")
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
        client = grpcclient.InferenceServerClient(url=f"localhost:{port}", ssl=True, root_certificates=str(cert))
        assert client.is_server_live() and client.is_server_ready()
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert client.get_server_metadata(headers=auth).name == "lastmile"
        codes = []
        for _ in range(7):  # HTTP's rule: after 5 wrong tokens the address's failures are slowed
            with pytest.raises(InferenceServerException) as caught:
                client.get_server_metadata(headers={"authorization": "Bearer wrong-token-wrong-token"})
            codes.append(str(caught.value.status()))
        assert all("UNAUTHENTICATED" in c for c in codes[:5]) and "RESOURCE_EXHAUSTED" in codes[-1], codes
        assert client.get_server_metadata(headers=auth).name == "lastmile"  # the right token always passes
    finally:
        d.stop()
    assert not d.socket.with_name("lastmile-grpc.sock").exists()  # removed at stop


def test_status_code_table_is_total() -> None:
    from lastmile.appliance.server.grpc_service import STATUS

    assert STATUS[400] == grpc.StatusCode.INVALID_ARGUMENT and STATUS[404] == grpc.StatusCode.NOT_FOUND
    assert STATUS[503] == grpc.StatusCode.UNAVAILABLE and STATUS[507] == STATUS[429] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert STATUS[401] == grpc.StatusCode.UNAUTHENTICATED and STATUS[403] == grpc.StatusCode.PERMISSION_DENIED
    assert STATUS[504] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_an_unbindable_default_grpc_socket_leaves_http_serving(demo_store: Path, tmp_path: Path) -> None:
    """The HTTP socket's path fits (under 108 bytes) but lastmile-grpc.sock beside it does not:
    HTTP serves, a warning says why gRPC does not. A grpc_socket set by name is fatal instead."""
    from tests.conftest import start_daemon

    deep = tmp_path / ("d" * max(1, 107 - len(str(tmp_path)) - len("/run/lastmile.sock") - 1))
    assert len(str(deep / "run" / "lastmile.sock")) <= 107 < len(str(deep / "run" / "lastmile-grpc.sock"))
    d = start_daemon(deep, demo_store)
    try:
        assert "gRPC Unix socket not bound" in d.log_text()
    finally:
        d.stop()
