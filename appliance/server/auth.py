"""Who may do what: peer credentials on the Unix socket, a bearer token on TCP.

The Unix socket's mode (0660 root:lastmile, in a 0750 directory) is the first
boundary: only root and group ``lastmile`` can connect at all, so everyone
who reaches the daemon through it is at least a *viewer* (health, metadata,
metrics, monitoring, infer). *Operator* rights (load, unload, tune, memory,
config) come from the peer's kernel-verified credentials (``SO_PEERCRED``
and ``SO_PEERGROUPS``): root, the uids in ``operator_uids`` and members of
``operator_groups`` (default ``lastmile-admin``). Nothing a client sends can
claim a role on the Unix socket.

TCP (off by default, loopback by default) has no peer credentials, so every
request but ``/v2/health/*`` needs ``Authorization: Bearer <token>``; the
token lives in a file only its owner can read and is compared in constant
time. A valid token is an operator.

Every state-changing request is logged on ``lastmile.audit`` with the
caller's uid/pid (or TCP peer address), and so is every refusal.
"""

from __future__ import annotations

import errno
import grp
import hmac
import logging
import math
import os
import re
import socket
import stat
import struct
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from lastmile.appliance.server.http import openai_error_payload

__all__ = [
    "SO_PEERGROUPS",
    "Role",
    "PeerCredentials",
    "Caller",
    "AuthPolicy",
    "TokenFailures",
    "TokenFileError",
    "load_token",
    "peer_credentials",
    "requires_role",
    "default_operator_required",
    "default_state_changing",
    "auth_middleware",
    "CALLER",
    "caller_of",
]

Role = Literal["operator", "viewer", "anonymous"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SO_PEERGROUPS: int = getattr(socket, "SO_PEERGROUPS", 59)
_PEERCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_GROUPS_BUF = 1024  # CPython's getsockopt buflen cap: 256 groups; more -> /proc fallback
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_VIEWER_POSTS = (
    re.compile(r"^/v2/models/[^/]+/infer$"),
    re.compile(r"^/v2/models/[^/]+/versions/[^/]+/infer$"),
    re.compile(r"^/v2/repository/index$"),
    # OpenAI-, Triton- and Ollama-style inference changes nothing, like V2 infer
    re.compile(r"^/v1/embeddings$"),
    re.compile(r"^/v1/(chat/)?completions$"),
    re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/generate(_stream)?$"),
    re.compile(r"^/api/(chat|generate|show)$"),
)
_ROLE_ATTR = "__lastmile_role__"

audit_log = logging.getLogger("lastmile.audit")
log = logging.getLogger("lastmile.auth")


# --- peer credentials -------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCredentials:
    """The connecting process as the kernel saw it at ``connect()`` time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def in_any(self, gids: Iterable[int]) -> bool:
        mine = {self.gid, *self.groups}
        return any(g in mine for g in gids)


def _groups_from_proc(pid: int) -> tuple[int, ...] | None:
    """Supplementary groups from /proc/<pid>/status (fallback; racy on pid reuse)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except OSError:
        return None
    return None


def peer_credentials(sock: Any) -> PeerCredentials:
    """pid/uid/gid (``SO_PEERCRED``) and supplementary groups of a Unix socket's peer.

    ``sock`` is a socket or asyncio's ``TransportSocket`` (what
    ``transport.get_extra_info("socket")`` returns). Groups come from
    ``SO_PEERGROUPS`` (Linux >= 4.13, the groups at connect time); when that
    is missing or the peer has more than 256 groups, from the peer's
    ``/proc/<pid>/status`` (current groups; hidden under ProtectProc=invisible
    for other users, in which case only the primary gid counts).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    groups: tuple[int, ...] | None
    try:
        buf = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUF)
        groups = struct.unpack(f"{len(buf) // 4}I", buf[: len(buf) // 4 * 4])
    except OSError as exc:
        if exc.errno not in (errno.ERANGE, errno.ENOPROTOOPT, errno.EINVAL):
            raise
        groups = _groups_from_proc(pid)
        if groups is None:
            log.warning("cannot read supplementary groups of pid %d; using its primary gid only", pid)
            groups = ()
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=tuple(groups))


# --- the caller -------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who sent a request, stored as ``request["caller"]`` by the middleware."""

    role: Role
    transport: Literal["unix", "tcp"]
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    remote: str | None = None  # TCP peer address

    def describe(self) -> str:
        if self.transport == "unix":
            return f"uid={self.uid} pid={self.pid}"
        return f"tcp={self.remote}"


#: Typed request key (aiohttp >= 3.12 warns on plain string keys). The middleware stores
#: the caller under this key and, for code written against the string, under "caller".
CALLER: Any = web.RequestKey("caller", Caller) if hasattr(web, "RequestKey") else "caller"
_NotAppKeyWarning: type[Warning] | None = getattr(web, "NotAppKeyWarning", None)


def caller_of(request: web.Request) -> Caller | None:
    """The :class:`Caller` the auth middleware identified (None before it ran)."""
    return request.get(CALLER)


_string_key_used = False


def _store_caller(request: web.Request, caller: Caller) -> None:
    global _string_key_used
    request[CALLER] = caller
    if CALLER == "caller":
        return
    if _string_key_used:  # aiohttp warns about a string key once per process, so only then
        request["caller"] = caller  # is the warning filter (costly per request) needed
        return
    with warnings.catch_warnings():
        if _NotAppKeyWarning is not None:
            warnings.simplefilter("ignore", _NotAppKeyWarning)
        request["caller"] = caller
    _string_key_used = True


# --- tokens -----------------------------------------------------------------------------


class TokenFileError(ValueError):
    """The bearer-token file cannot be used; the message says how to fix it."""


_TOKEN_MIN = 16
_TOKEN_OK = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: survives any HTTP header


def load_token(path: str | os.PathLike[str]) -> str:
    """Read the TCP bearer token from ``path``, refusing a file others could read.

    The file must be a regular file with no group/other permission bits
    (``chmod 600``), owned by the daemon's user or root, holding one token
    of at least 16 visible ASCII characters (``openssl rand -hex 32``).
    A systemd credential (``LoadCredential=``, a private 0400 copy owned by the
    service user) qualifies: point ``server.token_file`` at it.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TokenFileError(f"token file {p} does not exist (create it: openssl rand -hex 32 > {p}; chmod 600 {p})") from None
    except PermissionError:
        raise TokenFileError(f"token file {p} is not readable by uid {os.geteuid()} (chown it to the daemon's user)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(f"token file {p} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise TokenFileError(
                f"token file {p} has mode {mode:04o}: group/others may read the TCP token; "
                f"run chmod 600 {p}"
            )
        if st.st_uid not in (os.geteuid(), 0):
            raise TokenFileError(
                f"token file {p} is owned by uid {st.st_uid}; it must belong to the daemon's "
                f"user (uid {os.geteuid()}) or root"
            )
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    if len(data) > 4096:
        raise TokenFileError(f"token file {p} is larger than 4096 bytes; it should hold one token")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"token file {p} is not ASCII text") from None
    if not token:
        raise TokenFileError(f"token file {p} is empty (openssl rand -hex 32 > {p})")
    if not _TOKEN_OK.match(token):
        raise TokenFileError(f"token file {p} must hold a single token without spaces or control characters")
    if len(token) < _TOKEN_MIN:
        raise TokenFileError(
            f"token in {p} is {len(token)} characters; use at least {_TOKEN_MIN} (openssl rand -hex 32)"
        )
    return token


# --- the policy -------------------------------------------------------------------------


def _as_str_list(name: str, value: Any) -> list[str | int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"auth.{name}: expected a list of group names, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
            raise ValueError(f"auth.{name}: {v!r} is not a group name or gid")
    return list(value)


@dataclass
class AuthPolicy:
    """Roles from config. Build one per app; it is read-only while serving.

    * ``operator_uids`` (default ``[0]``) and ``operator_groups`` (names or
      gids, default ``["lastmile-admin"]``) make a Unix-socket peer an
      operator; root is always an operator, and so is the daemon's own uid
      (in a user-mode run that is the person who started it).
    * Everyone else who could connect is a viewer: the socket's 0660 mode
      (group ``lastmile``) is that boundary, and a user-mode socket belongs
      to its user.
    * ``token``: the TCP bearer token (from :func:`load_token`); None means
      TCP admits only the health routes.

    Group names are resolved to gids lazily and re-resolved after
    ``group_cache_s``, so a group created after start-up (by sysusers) counts;
    a name that does not exist is skipped with one warning.
    """

    operator_groups: list[str | int] = field(default_factory=lambda: ["lastmile-admin"])
    operator_uids: list[int] = field(default_factory=lambda: [0])
    token: str | None = None
    daemon_uid_is_operator: bool = True
    group_cache_s: float = 60.0
    _gid_cache: dict[str, tuple[float, frozenset[int]]] = field(default_factory=dict, init=False, repr=False)
    _warned: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.operator_groups = _as_str_list("operator_groups", self.operator_groups)
        if isinstance(self.operator_uids, (str, bytes)) or not isinstance(self.operator_uids, (list, tuple)):
            raise ValueError(f"auth.operator_uids: expected a list of numeric uids, got {self.operator_uids!r}")
        for uid in self.operator_uids:
            if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
                raise ValueError(f"auth.operator_uids: {uid!r} is not a numeric uid")
        self.operator_uids = list(self.operator_uids)
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < _TOKEN_MIN):
            raise ValueError(f"auth token must be a string of at least {_TOKEN_MIN} characters (use load_token)")

    # group resolution ------------------------------------------------------------------

    def _gids(self, key: str, entries: list[str | int]) -> frozenset[int]:
        now = time.monotonic()
        cached = self._gid_cache.get(key)
        if cached is not None and now - cached[0] < self.group_cache_s:
            return cached[1]
        gids: set[int] = set()
        for entry in entries:
            if isinstance(entry, int) or (isinstance(entry, str) and entry.isdigit()):
                gids.add(int(entry))
                continue
            try:
                gids.add(grp.getgrnam(entry).gr_gid)
            except KeyError:
                if entry not in self._warned:
                    self._warned.add(entry)
                    log.warning("auth.%s: group %r does not exist on this machine; ignoring it", key, entry)
        result = frozenset(gids)
        self._gid_cache[key] = (now, result)
        return result

    def operator_gids(self) -> frozenset[int]:
        return self._gids("operator_groups", self.operator_groups)

    # decisions -------------------------------------------------------------------------

    def role_for_unix(self, creds: PeerCredentials) -> Literal["operator", "viewer"]:
        """operator / viewer for a Unix-socket peer (one that could connect at all)."""
        if creds.uid == 0 or creds.uid in self.operator_uids:
            return "operator"
        if self.daemon_uid_is_operator and creds.uid == os.geteuid():
            return "operator"
        if creds.in_any(self.operator_gids()):
            return "operator"
        return "viewer"

    def token_matches(self, presented: str) -> bool:
        """Constant-time comparison with the configured token (False without one)."""
        if self.token is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self.token.encode())


# --- which routes need what ---------------------------------------------------------------


def requires_role(role: Literal["operator", "viewer"]) -> Callable[[Handler], Handler]:
    """Mark a route handler's required role, overriding the method-based default.

    ``@requires_role("operator")`` on ``GET /lm/v1/config`` makes reading the
    config operator-only; ``@requires_role("viewer")`` on a POST that
    changes nothing lets viewers call it. Works above or below ``@routes.get``.
    """
    if role not in ("operator", "viewer"):
        raise ValueError(f"requires_role: role must be 'operator' or 'viewer', got {role!r}")

    def mark(handler: Handler) -> Handler:
        setattr(handler, _ROLE_ATTR, role)
        return handler

    return mark


def _marked_role(request: web.Request) -> str | None:
    handler = getattr(request.match_info, "handler", None)
    return getattr(handler, _ROLE_ATTR, None)


def _viewer_post(request: web.Request) -> bool:
    return request.method == "POST" and any(p.match(request.path) for p in _VIEWER_POSTS)


def default_state_changing(request: web.Request) -> bool:
    """Changes something: any method but GET/HEAD, except infer and repository index."""
    return request.method not in _SAFE_METHODS and not _viewer_post(request)


def default_operator_required(request: web.Request) -> bool:
    """A ``requires_role`` mark wins; otherwise every state-changing request.

    Fails closed: an unknown path with a non-GET method needs an operator,
    so a viewer gets 403 before routing can say 404.
    """
    marked = _marked_role(request)
    if marked is not None:
        return marked == "operator"
    return default_state_changing(request)


def _is_health(path: str) -> bool:
    return path == "/v2/health" or path.startswith("/v2/health/")


# --- repeated token failures ---------------------------------------------------------------


class TokenFailures:
    """Failed bearer-token attempts per TCP peer address: slows the failures and keeps the log short.

    The first ``free`` failures of a peer are answered as usual (401); each further one locks
    the peer's *failures* out for ``base_s`` doubling up to ``max_s``: while locked out, a
    request of that peer whose token is wrong gets 429 + ``Retry-After`` and costs one counter,
    not a log line. A **correct token always passes**, locked out or not: the peer address is
    shared by everyone on 127.0.0.1 and behind a reverse proxy, so locking the address locked
    the real clients out with the guesser (a wrong token every 0.1 s gave the right token
    24 of 25 x 429). What protects the token from guessing is its size (at least 16 visible
    ASCII characters, over 2^100 values: ``load_token``), not the rate; what the lock-out
    bounds is the log and the work a guesser causes. A correct token does not clear the
    peer's record either (else a guesser sharing the address would get ``free`` new tries
    after every real request); the record is forgotten ``forget_s`` after its last failure.
    The first failure of a peer is logged; later ones are counted and logged as one line per
    peer per ``log_every_s``. At most ``max_peers`` addresses are remembered (the oldest are
    forgotten first), so a spray of addresses cannot grow the table without bound.
    """

    def __init__(self, *, free: int = 5, base_s: float = 1.0, max_s: float = 60.0, forget_s: float = 600.0,
                 log_every_s: float = 60.0, max_peers: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base_s, self.max_s, self.forget_s = free, base_s, max_s, forget_s
        self.log_every_s, self.max_peers, self.clock = log_every_s, max_peers, clock
        # peer -> [failures, locked_until, last_failure, unlogged, last_logged]
        self._peers: dict[str, list[float]] = {}

    def _entry(self, peer: str) -> list[float] | None:
        entry = self._peers.get(peer)
        if entry is not None and self.clock() - entry[2] > self.forget_s:
            self._flush(peer, entry)
            del self._peers[peer]
            return None
        return entry

    def retry_after(self, peer: str) -> float:
        """Seconds this peer is still locked out for (0: it may try)."""
        entry = self._entry(peer)
        return max(0.0, entry[1] - self.clock()) if entry is not None else 0.0

    def failed(self, peer: str, reason: str) -> None:
        now = self.clock()
        entry = self._entry(peer)
        if entry is None:
            if len(self._peers) >= self.max_peers:
                oldest = next(iter(self._peers))
                self._flush(oldest, self._peers.pop(oldest))
            entry = self._peers[peer] = [0, 0.0, now, 0, now]
            audit_log.warning("denied tcp=%s: %s (further failures from this address are summarised every %gs)",
                              peer, reason, self.log_every_s)
        else:
            entry[3] += 1
            if now - entry[4] >= self.log_every_s:
                self._flush(peer, entry)
        entry[0] += 1
        entry[2] = now
        if entry[0] > self.free:
            entry[1] = now + min(self.max_s, self.base_s * 2 ** (entry[0] - self.free - 1))

    def locked_out(self, peer: str) -> None:
        """A request refused because its peer is locked out: counted, not logged one by one."""
        entry = self._entry(peer)
        if entry is not None:
            entry[3] += 1
            if self.clock() - entry[4] >= self.log_every_s:
                self._flush(peer, entry)

    def succeeded(self, peer: str) -> None:
        """A correct token from ``peer``: nothing is cleared (see the class doc); only an
        overdue summary line is written."""
        entry = self._entry(peer)
        if entry is not None and entry[3] and self.clock() - entry[4] >= self.log_every_s:
            self._flush(peer, entry)

    def _flush(self, peer: str, entry: list[float]) -> None:
        if entry[3]:
            audit_log.warning("denied tcp=%s: %d more failed or locked-out bearer-token attempts in the last %.0fs "
                              "(%d failures in a row)", peer, entry[3], self.clock() - entry[4], entry[0])
        entry[3], entry[4] = 0, self.clock()


# --- the middleware -------------------------------------------------------------------------


class _Denied(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, *, logged: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.logged = logged  # already accounted for by TokenFailures: no line of its own


_BEARER_CHALLENGE = 'Bearer realm="lastmile"'


#: Peer credentials per connection. SO_PEERCRED and SO_PEERGROUPS are fixed when the peer
#: connects, so reading them once per connection instead of once per request is exact, and it
#: takes two syscalls (and a /proc read on the fallback) off every keep-alive request.
_CREDS: "weakref.WeakKeyDictionary[Any, PeerCredentials]" = weakref.WeakKeyDictionary()


def _connection_creds(transport: Any, sock: Any) -> PeerCredentials:
    try:
        return _CREDS[transport]
    except (KeyError, TypeError):
        pass
    try:
        creds = peer_credentials(sock)
    except OSError as exc:  # the peer went away between accept and now
        raise _Denied(400, f"cannot read the peer's credentials: {exc.strerror or exc}") from None
    try:
        _CREDS[transport] = creds
    except TypeError:  # a transport that cannot be weakly referenced: no cache, still correct
        pass
    return creds


def _identify(policy: AuthPolicy, request: web.Request, failures: TokenFailures | None = None) -> Caller:
    transport = request.transport
    if transport is None:
        raise _Denied(400, "connection already closed")
    sock = transport.get_extra_info("socket")
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX:
        creds = _connection_creds(transport, sock)
        return Caller(role=policy.role_for_unix(creds), transport="unix", uid=creds.uid, gid=creds.gid, pid=creds.pid)
    if family in (socket.AF_INET, socket.AF_INET6):
        peer = transport.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        header = request.headers.get("Authorization")
        if header is None:
            if _is_health(request.path):
                return Caller(role="anonymous", transport="tcp", remote=remote)
            raise _Denied(
                401,
                "this endpoint needs a bearer token over TCP: send 'Authorization: Bearer <token>' "
                "(the token is in the daemon's server.token_file)",
                {"WWW-Authenticate": _BEARER_CHALLENGE},
            )
        scheme, _, presented = header.strip().partition(" ")
        well_formed = scheme.lower() == "bearer" and bool(presented.strip())
        if well_formed and policy.token_matches(presented.strip()):  # the right token always passes
            if failures is not None:
                failures.succeeded(address)
            return Caller(role="operator", transport="tcp", remote=remote)
        wait = failures.retry_after(address) if failures is not None else 0.0
        if wait > 0:  # only a failure waits: it is refused without a 401 or a log line of its own
            assert failures is not None
            failures.locked_out(address)
            raise _Denied(
                429,
                f"too many failed bearer-token attempts from {address}; try again in {math.ceil(wait)} s",
                {"Retry-After": str(math.ceil(wait))},
                logged=True,
            )
        if not well_formed:
            raise _Denied(
                401,
                "Authorization header must be 'Bearer <token>'",
                {"WWW-Authenticate": f'{_BEARER_CHALLENGE}, error="invalid_request"'},
            )
        message = "invalid bearer token" if policy.token is not None else "TCP access has no token configured"
        if failures is not None:
            failures.failed(address, f"{request.method} {request.path}: {message}")
        raise _Denied(401, message, {"WWW-Authenticate": f'{_BEARER_CHALLENGE}, error="invalid_token"'},
                      logged=failures is not None)
    raise _Denied(403, f"unsupported transport (socket family {family!r})")


def _json_error(status: int, message: str, headers: Mapping[str, str] | None = None, *, path: str = "",
                **extra: Any) -> web.Response:
    """Lastmile's ``{"error": "..."}``; on OpenAI's ``/v1/`` routes OpenAI's shape
    ``{"error": {"message", "type", "param", "code"}}``, which its clients parse."""
    if path.startswith("/v1/"):
        return web.json_response(openai_error_payload(status, message, **extra), status=status, headers=dict(headers or {}))
    return web.json_response({"error": message, **extra}, status=status, headers=dict(headers or {}))


def _who(request: web.Request, caller: Caller | None) -> str:
    if caller is not None:
        return f"{caller.describe()} role={caller.role}"
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and getattr(sock, "family", None) == socket.AF_UNIX:
        try:
            creds = peer_credentials(sock)
            return f"uid={creds.uid} pid={creds.pid}"
        except OSError:
            pass
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"tcp={peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "unknown"


def auth_middleware(
    policy: AuthPolicy,
    operator_required: Callable[[web.Request], bool] = default_operator_required,
    *,
    state_changing: Callable[[web.Request], bool] = default_state_changing,
    failures: TokenFailures | None = None,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """aiohttp middleware: identify the caller, enforce the role, audit.

    Stores the :class:`Caller` as ``request["caller"]`` (and under the typed
    key :data:`CALLER`; read it with :func:`caller_of`). Refusals are JSON
    ``{"error": ...}``: 401 (+ ``WWW-Authenticate: Bearer``) for a missing
    or wrong TCP token, 403 naming the required role for a viewer on an
    operator route. Every request for which ``state_changing`` is true is
    logged at INFO on ``lastmile.audit`` with uid/pid (or TCP peer), method,
    path and outcome; every refusal is logged at WARNING, except wrong TCP
    tokens, which ``failures`` (a :class:`TokenFailures`, one per app) slows
    down and summarises per peer.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            caller = _identify(policy, request, failures)
        except _Denied as denied:
            if not denied.logged:
                audit_log.warning(
                    "denied %s %s %s: %s", _who(request, None), request.method, request.path, denied.message
                )
            return _json_error(denied.status, denied.message, denied.headers, path=request.path)
        _store_caller(request, caller)
        if caller.role != "operator" and operator_required(request):
            message = (
                f"{request.method} {request.path} needs the operator role; "
                f"{caller.describe()} is {caller.role}"
            )
            audit_log.warning("denied %s role=%s %s %s: operator required", caller.describe(), caller.role,
                              request.method, request.path)
            return _json_error(403, message, path=request.path, required_role="operator")
        if not state_changing(request):
            return await handler(request)
        audit_log.info("%s role=%s %s %s", caller.describe(), caller.role, request.method, request.path)
        started = time.monotonic()
        outcome = "error"
        try:
            response = await handler(request)
            outcome = str(response.status)
            return response
        except web.HTTPException as exc:
            outcome = str(exc.status)
            raise
        except BaseException as exc:  # noqa: BLE001 - logged, then re-raised
            outcome = "cancelled" if type(exc).__name__ == "CancelledError" else f"error {type(exc).__name__}"
            raise
        finally:
            audit_log.info(
                "%s %s %s -> %s in %.3fs", caller.describe(), request.method, request.path,
                outcome, time.monotonic() - started,
            )

    return middleware
