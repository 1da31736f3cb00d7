"""``lastmile serve``: the listening sockets, start-up order, and a graceful stop.

Start-up: sockets first (so clients and systemd see us early), then demo build and state
restore, then READY=1. Stop (SIGTERM/SIGINT): stop accepting, let in-flight requests finish
within ``shutdown_grace_s``, stop the runners, exit 0.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import signal
import socket
import ssl
import stat
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from lastmile.appliance.server import activation, sdnotify
from lastmile.appliance.server.auth import AuthPolicy, TokenFailures, TokenFileError, auth_middleware, load_token
from lastmile.appliance.server.config import Config
from lastmile.appliance.server.daemon import Daemon
from lastmile.appliance.server.dataplane import DataPlane
from lastmile.appliance.server.http import body_deadline, concurrency_limit, error_middleware
from lastmile.appliance.logs import log
from lastmile.appliance.server.metrics import setup_metrics
from lastmile.appliance.server.routes_memory import routes as memory_routes
from lastmile.appliance.server.routes_monitor import routes as monitor_routes
from lastmile.appliance.server.routes_control import routes as v1_routes
from lastmile.appliance.server.routes_generate import setup_generation
from lastmile.appliance.server.routes_stats import routes as stats_routes
from lastmile.appliance.server.routes_openai import routes as openai_routes
from lastmile.appliance.server.routes_v2 import routes as v2_routes
from lastmile.runtime.forkserver import warm_up
from lastmile.runtime.shm import cleanup_stale

logger = logging.getLogger("lastmile.server")


class StartupError(RuntimeError):
    """The daemon cannot start; the message is the one line the operator sees."""


class _QuietBadRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a header line over its limit, too many headers,
    a 100 KB URL) as "Error handling request" with a traceback at level error, although it
    answers 400 and nothing is wrong with the daemon: such records become one warning line
    naming the peer and the parser's message, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, HttpProcessingError) and record.levelno >= logging.ERROR:
            remote = (record.args[0] if isinstance(record.args, tuple) and record.args else "") or "the Unix socket"
            record.msg, record.args = "bad HTTP request from %s: %s", (remote, f"{type(exc).__name__}: {exc.message}"[:300])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_bad_requests() -> None:
    """Install :class:`_QuietBadRequests` on aiohttp's server logger (once)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _QuietBadRequests) for f in server_log.filters):
        server_log.addFilter(_QuietBadRequests())


def build_app(daemon: Daemon) -> web.Application:
    config = daemon.config
    quiet_bad_requests()
    try:
        token = load_token(config.server["token_file"]) if config.server["token_file"] else None
    except TokenFileError as exc:
        raise StartupError(f"server.token_file: {exc}") from None
    policy = AuthPolicy(operator_groups=config.auth["operator_groups"], operator_uids=config.auth["operator_uids"], token=token)
    # Order: who is asking (headers only), then the whole body within its deadline, and only
    # then a concurrency slot: slow or unauthenticated peers never hold a slot.
    app = web.Application(
        middlewares=[
            error_middleware,
            auth_middleware(policy, failures=TokenFailures()),
            body_deadline(config.server["body_timeout_s"], config.server["max_body_mb"] * 1024 * 1024),
            concurrency_limit(config.server["max_concurrent_requests"]),
        ],
        client_max_size=config.server["max_body_mb"] * 1024 * 1024,
    )
    app["daemon"] = daemon
    app["dataplane"] = DataPlane(daemon)
    app["config"] = config
    app.add_routes(stats_routes)  # before v2: /v2/models/stats is not a model named 'stats'
    app.add_routes(v2_routes)
    app.add_routes(v1_routes)
    app.add_routes(monitor_routes)
    app.add_routes(memory_routes)
    app.add_routes(openai_routes)
    setup_metrics(app, daemon)
    setup_generation(app)  # OpenAI / Triton generate routes; joins the metrics registry
    return app


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening socket at ``path`` with mode 0660 in a 0750 directory.

    A socket file left by a dead daemon is removed; a live daemon on it (it accepts a
    connection) or a path that is not a socket stops us rather than being clobbered.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; refusing to remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: nobody listens
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise StartupError(f"cannot check {path}: {exc}") from None
            path.unlink(missing_ok=True)
        else:
            raise StartupError(f"another daemon is already serving on {path}; stop it first (or set server.socket)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # born 0660: no window in which others may connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    sock.listen(256)
    sock.setblocking(False)
    return sock


def bind_tcp_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartupError(f"server.tcp_host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(256)
    sock.setblocking(False)
    return sock


def _is_loopback(sock: socket.socket) -> bool:
    try:
        host = sock.getsockname()[0]
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except (OSError, ValueError, IndexError):
        return False


def check_plain_tcp(sock: socket.socket, config: Config) -> None:
    """Plain HTTP on an address other hosts can reach sends the bearer token in clear: refused
    unless ``server.allow_insecure_tcp = true`` (then a warning at every start)."""
    if config.server["tls_cert"] or _is_loopback(sock):
        return
    try:
        where = "%s:%s" % sock.getsockname()[:2]
    except OSError:
        where = "the TCP socket"
    if not config.server["allow_insecure_tcp"]:
        raise StartupError(
            f"server.tcp_host: plain HTTP on {where} (not loopback) would send the bearer token in clear; "
            "set server.tls_cert and server.tls_key, or listen on 127.0.0.1, or set server.allow_insecure_tcp = true "
            "if the network is trusted"
        )
    log(logger, logging.WARNING, "plain HTTP on a non-loopback address: the bearer token crosses the network in clear "
        "(server.allow_insecure_tcp = true)", socket=where)


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.server["tls_cert"]:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.server["tls_cert"], config.server["tls_key"])
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"server.tls_cert/tls_key: cannot load: {exc}") from None
    return context


async def serve(config: Config) -> None:
    daemon = Daemon(config)
    app = build_app(daemon)
    # keepalive_timeout is also the header deadline: aiohttp closes a connection whose next
    # request's headers are not complete this long after it opened (or after its last response).
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.server["shutdown_grace_s"], handler_cancellation=True, access_log=None,
        keepalive_timeout=config.server["header_timeout_s"],
    )
    await runner.setup()

    inherited = activation.listen_sockets()
    unix_socks = [s for s in inherited if s.family == socket.AF_UNIX] or [bind_unix_socket(config.socket_path)]
    owned_path = None if inherited else config.socket_path
    sites: list[web.BaseSite] = [web.SockSite(runner, s) for s in unix_socks]
    if config.server["tcp_port"]:
        tcp = [s for s in inherited if s.family != socket.AF_UNIX] or [bind_tcp_socket(config.server["tcp_host"], config.server["tcp_port"])]
        for s in tcp:
            try:
                check_plain_tcp(s, config)
            except StartupError:
                await runner.cleanup()
                for other in [*tcp, *unix_socks]:
                    other.close()
                if owned_path is not None:
                    owned_path.unlink(missing_ok=True)
                raise
        sites += [web.SockSite(runner, s, ssl_context=_tls_context(config)) for s in tcp]
    for site in sites:
        await site.start()
    try:
        await daemon.start_grpc(app)  # KServe V2 gRPC beside the HTTP sites (grpc_service.py)
    except Exception:
        await runner.cleanup()
        if owned_path is not None:
            owned_path.unlink(missing_ok=True)
        raise
    log(logger, logging.INFO, "listening", sockets=",".join(s.name for s in sites), activated=bool(inherited))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_config)

    cleanup_stale()
    watchdog = sdnotify.Watchdog.start(daemon.manager.governor.supervise(sdnotify.Heartbeat(max_age_s=20.0)))  # stuck runner supervision: no pings
    startup = asyncio.create_task(_start_serving(daemon))
    startup.add_done_callback(lambda task: task.cancelled() or task.exception() is None or stop.set())
    try:
        await stop.wait()
    finally:
        if not startup.done():
            startup.cancel()
            await asyncio.gather(startup, return_exceptions=True)
        daemon.ready, daemon.status = False, "stopping"
        sdnotify.notify(STOPPING=1, STATUS="stopping")
        log(logger, logging.INFO, "stopping: draining in-flight requests", grace_s=config.server["shutdown_grace_s"])
        await watchdog.stop()
        await daemon.stop_grpc()
        await runner.cleanup()  # stops accepting, waits for in-flight handlers within the grace
        await daemon.manager.close()
        if owned_path is not None:
            owned_path.unlink(missing_ok=True)
        log(logger, logging.INFO, "stopped")
    if startup.done() and not startup.cancelled() and startup.exception() is not None:
        raise StartupError(f"start-up failed: {startup.exception()}")


async def _start_serving(daemon: Daemon) -> None:
    """Runner server, demo models on a first start, restored state; then READY=1."""
    loop = asyncio.get_running_loop()
    sdnotify.notify(STATUS="preparing the runner server")
    await loop.run_in_executor(None, warm_up)
    built = await loop.run_in_executor(None, daemon.build_demo_if_empty)
    if built:
        log(logger, logging.INFO, "built demo models", models=",".join(built))
    sdnotify.notify(STATUS="reading model signatures", EXTEND_TIMEOUT_USEC=str(300_000_000))
    await loop.run_in_executor(None, daemon.read_store)  # listings never wait for a signature after READY
    await daemon.restore(lambda text: sdnotify.notify(STATUS=text, EXTEND_TIMEOUT_USEC=str(300_000_000)))
    daemon.ready, daemon.status = True, "serving"
    sdnotify.notify(READY=1, STATUS=f"serving {len(daemon.manager.models)} model(s)")
    log(logger, logging.INFO, "ready", models=len(daemon.manager.models))
