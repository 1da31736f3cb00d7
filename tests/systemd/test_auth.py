"""Who may do what, on real sockets: peer credentials of real processes, tokens over TCP.

The non-root callers are real: a forked child drops to ``nobody`` (uid 65534)
with chosen supplementary groups before connecting, so SO_PEERCRED and
SO_PEERGROUPS report what the kernel knows, not what a test says.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))
from sdhelpers import ADMIN_GID, NOBODY, SOCKET_GID, request_as  # noqa: E402

from lastmile.appliance.server.auth import (
    AuthPolicy,
    PeerCredentials,
    TokenFailures,
    TokenFileError,
    auth_middleware,
    caller_of,
    load_token,
    peer_credentials,
    requires_role,
)

TOKEN = "s3cret-token-0123456789abcdef"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")


# --- a small app with the daemon's kinds of routes ---------------------------------------


async def _whoami(request: web.Request) -> web.Response:
    caller = caller_of(request)
    assert caller is not None and caller is request["caller"]
    return web.json_response({"role": caller.role, "uid": caller.uid, "transport": caller.transport})


@requires_role("operator")
async def _config(request: web.Request) -> web.Response:
    return await _whoami(request)


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


def make_app(policy: AuthPolicy, failures: TokenFailures | None = None) -> web.Application:
    app = web.Application(middlewares=[auth_middleware(policy, failures=failures)])
    app.router.add_get("/v2/health/ready", _health)
    app.router.add_get("/v2/models/{name}", _whoami)
    app.router.add_post("/v2/models/{name}/infer", _whoami)
    app.router.add_post("/v2/models/{name}/versions/{v}/infer", _whoami)
    app.router.add_post("/v2/repository/index", _whoami)
    app.router.add_post("/v1/embeddings", _whoami)  # OpenAI-compatible inference
    app.router.add_post("/v2/repository/models/{name}/load", _whoami)
    app.router.add_post("/v2/repository/models/{name}/unload", _whoami)
    app.router.add_patch("/lm/v1/models/{name}", _whoami)  # tune
    app.router.add_get("/lm/v1/config", _config)
    return app


Serve = Callable[[AuthPolicy], Awaitable[Path]]


@pytest.fixture
async def serve_unix(short_tmp: Path) -> AsyncIterator[Serve]:
    """Start the app on a Unix socket laid out like /run/lastmile: 0660 root:SOCKET_GID."""
    runners: list[web.AppRunner] = []

    async def start(policy: AuthPolicy) -> Path:
        path = short_tmp / f"api{len(runners)}.sock"
        runner = web.AppRunner(make_app(policy))
        await runner.setup()
        await web.UnixSite(runner, str(path)).start()
        runners.append(runner)
        if os.geteuid() == 0:
            os.chown(path, 0, SOCKET_GID)
        os.chmod(path, 0o660)
        return path

    yield start
    for runner in runners:
        await runner.cleanup()


async def as_user(uid: int, groups: list[int], path: Path, method: str, target: str) -> dict:
    return await asyncio.to_thread(request_as, uid, uid, groups, path, method, target)


async def as_root(path: Path, method: str, target: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
        async with session.request(method, f"http://lastmile{target}", json={} if method != "GET" else None) as resp:
            return resp.status, (await resp.json() if resp.content_length else {})


OPERATOR_ROUTES = [
    ("POST", "/v2/repository/models/m/load"),
    ("POST", "/v2/repository/models/m/unload"),
    ("PATCH", "/lm/v1/models/m"),
    ("GET", "/lm/v1/config"),  # marked with requires_role("operator")
]
VIEWER_ROUTES = [
    ("GET", "/v2/models/m"),
    ("POST", "/v2/models/m/infer"),
    ("POST", "/v2/models/m/versions/1/infer"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v1/embeddings"),
]


# --- Unix socket -------------------------------------------------------------------------


async def test_root_peer_is_operator(serve_unix: Serve) -> None:
    path = await serve_unix(AuthPolicy(operator_groups=[], operator_uids=[]))  # root needs no listing
    for method, target in OPERATOR_ROUTES + VIEWER_ROUTES:
        status, body = await as_root(path, method, target)
        assert status == 200, (method, target, body)
        assert body == {"role": "operator", "uid": 0, "transport": "unix"}


@root_only
async def test_socket_mode_is_the_first_boundary(serve_unix: Serve) -> None:
    path = await serve_unix(AuthPolicy())
    result = await as_user(NOBODY, [], path, "GET", "/v2/models/m")
    assert result == {"errno": 13}, result  # EACCES: not in the socket's group


@root_only
async def test_viewer_peer_gets_403_on_operator_routes(serve_unix: Serve, caplog: pytest.LogCaptureFixture) -> None:
    path = await serve_unix(AuthPolicy(operator_groups=[str(ADMIN_GID)]))
    caplog.set_level(logging.INFO, logger="lastmile.audit")
    for method, target in VIEWER_ROUTES:
        result = await as_user(NOBODY, [SOCKET_GID], path, method, target)
        assert result["status"] == 200, (method, target, result)
        assert result["body"]["role"] == "viewer" and result["body"]["uid"] == NOBODY
    for method, target in OPERATOR_ROUTES:
        result = await as_user(NOBODY, [SOCKET_GID], path, method, target)
        assert result["status"] == 403, (method, target, result)
        assert result["body"]["required_role"] == "operator"
        assert "needs the operator role" in result["body"]["error"]
        assert f"uid={NOBODY}" in result["body"]["error"]
    denied = [r for r in caplog.records if r.name == "lastmile.audit" and r.levelno == logging.WARNING]
    assert len(denied) == len(OPERATOR_ROUTES)
    assert f"uid={NOBODY}" in denied[0].getMessage() and "POST /v2/repository/models/m/load" in denied[0].getMessage()


@root_only
async def test_supplementary_group_makes_an_operator(serve_unix: Serve) -> None:
    """SO_PEERGROUPS: the operator group is a supplementary group, not the primary one."""
    path = await serve_unix(AuthPolicy(operator_groups=[ADMIN_GID]))
    result = await as_user(NOBODY, [SOCKET_GID, ADMIN_GID], path, "POST", "/v2/repository/models/m/load")
    assert result["status"] == 200 and result["body"]["role"] == "operator", result


@root_only
async def test_operator_group_by_name(serve_unix: Serve) -> None:
    group = next(g for g in grp.getgrall() if g.gr_gid not in (0, NOBODY, SOCKET_GID))
    path = await serve_unix(AuthPolicy(operator_groups=["no-such-group-here", group.gr_name]))
    ok = await as_user(NOBODY, [SOCKET_GID, group.gr_gid], path, "PATCH", "/lm/v1/models/m")
    assert ok["status"] == 200 and ok["body"]["role"] == "operator", ok
    no = await as_user(NOBODY, [SOCKET_GID], path, "PATCH", "/lm/v1/models/m")
    assert no["status"] == 403, no


@root_only
async def test_operator_uid(serve_unix: Serve) -> None:
    path = await serve_unix(AuthPolicy(operator_uids=[NOBODY]))
    result = await as_user(NOBODY, [SOCKET_GID], path, "POST", "/v2/repository/models/m/unload")
    assert result["status"] == 200 and result["body"]["role"] == "operator", result


async def test_audit_log_names_uid_pid_method_path(serve_unix: Serve, caplog: pytest.LogCaptureFixture) -> None:
    path = await serve_unix(AuthPolicy())
    caplog.set_level(logging.INFO, logger="lastmile.audit")
    await as_root(path, "POST", "/v2/repository/models/m/load")
    await as_root(path, "GET", "/v2/models/m")  # reads are not audited
    await as_root(path, "POST", "/v2/models/m/infer")  # neither is inference
    lines = [r.getMessage() for r in caplog.records if r.name == "lastmile.audit"]
    assert len(lines) == 2, lines  # the request, then its outcome
    assert lines[0] == f"uid=0 pid={os.getpid()} role=operator POST /v2/repository/models/m/load"
    assert lines[1].startswith(f"uid=0 pid={os.getpid()} POST /v2/repository/models/m/load -> 200 in ")


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        creds = peer_credentials(a)
    assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(creds.groups) == set(os.getgroups())


def test_role_rules() -> None:
    me = os.geteuid()
    policy = AuthPolicy(operator_groups=[ADMIN_GID], operator_uids=[1234])
    assert policy.role_for_unix(PeerCredentials(1, 0, 0)) == "operator"  # root, always
    assert policy.role_for_unix(PeerCredentials(1, 1234, 100)) == "operator"
    assert policy.role_for_unix(PeerCredentials(1, 5000, ADMIN_GID)) == "operator"  # primary gid counts
    assert policy.role_for_unix(PeerCredentials(1, 5000, 100, (ADMIN_GID,))) == "operator"
    assert policy.role_for_unix(PeerCredentials(1, 5000, 100, (SOCKET_GID,))) == "viewer"
    assert policy.role_for_unix(PeerCredentials(1, 5000, 100)) == "viewer"  # could connect -> viewer
    if me != 0:
        assert policy.role_for_unix(PeerCredentials(1, me, 100)) == "operator"  # the daemon's own uid


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"operator_groups": "lastmile-admin"}, "auth.operator_groups: expected a list"),
        ({"operator_groups": [1.5]}, "auth.operator_groups: 1.5"),
        ({"operator_uids": ["root"]}, "auth.operator_uids: 'root'"),
        ({"operator_uids": [-1]}, "auth.operator_uids: -1"),
        ({"token": "short"}, "at least 16"),
    ],
)
def test_policy_rejects_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        AuthPolicy(**kwargs)


# --- TCP ---------------------------------------------------------------------------------


@pytest.fixture
async def tcp_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(policy: AuthPolicy, ssl_context: ssl.SSLContext | None = None,
                    failures: TokenFailures | None = None) -> str:
        runner = web.AppRunner(make_app(policy, failures))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"{'https' if ssl_context else 'http'}://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET", **kw) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers or {}, **kw) as resp:
            body = await resp.json() if resp.content_type == "application/json" else {}
            return resp.status, body, dict(resp.headers)


async def test_tcp_token_rules(tcp_server) -> None:
    base = await tcp_server(AuthPolicy(token=TOKEN))
    status, _, _ = await _get(f"{base}/v2/health/ready")
    assert status == 200  # health is open
    status, body, headers = await _get(f"{base}/v2/models/m")
    assert status == 401 and "bearer token" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, body, headers = await _get(f"{base}/v2/models/m", {"Authorization": "Bearer " + TOKEN[:-1] + "X"})
    assert status == 401 and body["error"] == "invalid bearer token"
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    status, body, _ = await _get(f"{base}/v2/models/m", {"Authorization": f"Basic {TOKEN}"})
    assert status == 401 and "Bearer <token>" in body["error"]
    status, body, _ = await _get(f"{base}/v2/models/m", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body == {"role": "operator", "uid": None, "transport": "tcp"}
    status, body, _ = await _get(f"{base}/v2/repository/models/m/load", {"Authorization": f"bearer {TOKEN}"},
                                 method="POST")
    assert status == 200 and body["role"] == "operator"


async def test_tcp_without_configured_token_admits_only_health(tcp_server) -> None:
    base = await tcp_server(AuthPolicy(token=None))
    assert (await _get(f"{base}/v2/health/ready"))[0] == 200
    status, body, _ = await _get(f"{base}/v2/models/m", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 401 and "no token configured" in body["error"]


async def test_oversized_and_malformed_auth_headers_do_no_harm(tcp_server) -> None:
    base = await tcp_server(AuthPolicy(token=TOKEN))
    status, _, _ = await _get(f"{base}/v2/models/m", {"Authorization": "Bearer " + "A" * 20000})
    assert status in (400, 431)  # aiohttp's header size limit, before our code
    for bad in ("Bearer", "Bearer ", "Bearer \u00e9\u00e9\u00e9", "Bearer a b c"):
        status, _, _ = await _get(f"{base}/v2/models/m", {"Authorization": bad.encode("utf-8").decode("latin-1")})
        assert status == 401, bad
    status, body, _ = await _get(f"{base}/v2/models/m", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, "server hurt by the bad requests"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
async def test_tls_listener_with_token(tcp_server, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    base = await tcp_server(AuthPolicy(token=TOKEN), server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    status, body, _ = await _get(f"{base}/v2/models/m", {"Authorization": f"Bearer {TOKEN}"}, ssl=client_ctx)
    assert status == 200 and body["transport"] == "tcp"
    status, _, _ = await _get(f"{base}/v2/models/m", ssl=client_ctx)
    assert status == 401


# --- the token file ----------------------------------------------------------------------


def _token_file(tmp_path: Path, content: str, mode: int) -> Path:
    p = tmp_path / "tcp-token"
    p.write_text(content)
    os.chmod(p, mode)
    return p


def test_load_token_accepts_0600_and_strips_newline(tmp_path: Path) -> None:
    assert load_token(_token_file(tmp_path, TOKEN + "\n", 0o600)) == TOKEN
    assert load_token(_token_file(tmp_path, TOKEN, 0o400)) == TOKEN


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (TOKEN, 0o644, r"has mode 0644: group/others may read the TCP token; run chmod 600"),
        (TOKEN, 0o640, r"has mode 0640"),
        (TOKEN, 0o604, r"has mode 0604"),
        ("", 0o600, r"is empty"),
        ("abc", 0o600, r"is 3 characters; use at least 16"),
        ("two words here and more", 0o600, r"single token without spaces"),
    ],
)
def test_load_token_refuses(tmp_path: Path, content: str, mode: int, message: str) -> None:
    with pytest.raises(TokenFileError, match=message):
        load_token(_token_file(tmp_path, content, mode))


def test_load_token_missing_and_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="does not exist"):
        load_token(tmp_path / "nope")
    os.chmod(tmp_path, 0o700)
    with pytest.raises(TokenFileError, match="not a regular file"):
        load_token(tmp_path)


@root_only
def test_load_token_refuses_a_file_owned_by_someone_else(tmp_path: Path) -> None:
    p = _token_file(tmp_path, TOKEN, 0o600)
    os.chown(p, NOBODY, NOBODY)
    with pytest.raises(TokenFileError, match=f"owned by uid {NOBODY}"):
        load_token(p)


@root_only
async def test_peer_with_more_groups_than_so_peergroups_returns(serve_unix: Serve) -> None:
    """More than 256 groups: SO_PEERGROUPS says ERANGE, /proc/<pid>/status is read instead."""
    path = await serve_unix(AuthPolicy(operator_groups=[ADMIN_GID]))
    many = [SOCKET_GID, *range(20000, 20300), ADMIN_GID]
    result = await as_user(NOBODY, many, path, "POST", "/v2/repository/models/m/load")
    assert result["status"] == 200 and result["body"]["role"] == "operator", result




async def test_locked_out_failures_never_lock_out_the_right_token(tcp_server) -> None:
    """After the free failures the peer's *wrong* tokens get 429; the right token from the same
    address passes every time and does not reset the guesser's count (issue 23.4)."""
    now = [0.0]
    failures = TokenFailures(free=2, base_s=10.0, clock=lambda: now[0])
    base = await tcp_server(AuthPolicy(token=TOKEN), failures=failures)
    wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "X"}
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert [(await _get(f"{base}/v2/models/m", wrong))[0] for _ in range(3)] == [401, 401, 401]
    status, body, headers = await _get(f"{base}/v2/models/m", wrong)
    assert status == 429 and headers["Retry-After"] == "10", body
    for _ in range(3):
        assert (await _get(f"{base}/v2/models/m", right))[0] == 200
        assert (await _get(f"{base}/v2/models/m", wrong))[0] == 429  # not reset by the right token
    status, body, _ = await _get(f"{base}/v1/embeddings", wrong, method="POST")
    assert status == 429 and body["error"]["type"] == "rate_limit_error", body  # OpenAI's shape on /v1
    now[0] += 11.0
    assert (await _get(f"{base}/v2/models/m", wrong))[0] == 401  # the lock-out ran out: one more failure...
    assert (await _get(f"{base}/v2/models/m", wrong))[0] == 429  # ...locks it out again, for longer
    status, _, headers = await _get(f"{base}/v2/models/m", wrong)
    assert int(headers["Retry-After"]) == 20


async def test_a_401_on_openai_routes_has_openais_shape(tcp_server) -> None:
    base = await tcp_server(AuthPolicy(token=TOKEN))
    status, body, headers = await _get(f"{base}/v1/embeddings", method="POST")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key", body
    assert "bearer token" in body["error"]["message"] and body["error"]["param"] is None
    status, body, _ = await _get(f"{base}/v2/models/m")
    assert status == 401 and isinstance(body["error"], str)  # Lastmile's own shape elsewhere
