"""Socket activation: take listening sockets passed by systemd (sd_listen_fds(3)).

With ``lastmile.socket`` systemd binds ``/run/lastmile/lastmile.sock`` itself
(root:lastmile 0660, before the daemon exists) and hands the listening fd to
the service as fd 3 with ``LISTEN_FDS=1`` and ``LISTEN_PID=<our pid>``.
Why: clients can connect while the daemon starts or restarts (connections
queue in the kernel), and the daemon, running as ``lastmile``, never needs
the right to create or chmod the socket.

The daemon serves each socket with ``aiohttp.web.SockSite(runner, sock)``.
Without activation :func:`listen_sockets` returns ``[]`` and the daemon binds
its own socket, so it runs the same in the foreground.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

__all__ = ["SD_LISTEN_FDS_START", "ActivationError", "ActivatedSocket", "listen_sockets",
           "listen_sockets_with_names"]

SD_LISTEN_FDS_START = 3
_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(RuntimeError):
    """The LISTEN_* environment is present but unusable; the message says why."""


@dataclass(frozen=True)
class ActivatedSocket:
    """One passed socket and its name (``FileDescriptorName=``, default "unknown")."""

    name: str
    sock: socket.socket


def _unset() -> None:
    for name in _ENV:
        os.environ.pop(name, None)


def listen_sockets_with_names(unset_environment: bool = True) -> list[ActivatedSocket]:
    """Like :func:`listen_sockets`, with each socket's LISTEN_FDNAMES name."""
    pid_raw = os.environ.get("LISTEN_PID")
    fds_raw = os.environ.get("LISTEN_FDS")
    names_raw = os.environ.get("LISTEN_FDNAMES")
    try:
        if not pid_raw or not fds_raw:
            return []
        try:
            pid = int(pid_raw)
        except ValueError:
            raise ActivationError(f"LISTEN_PID={pid_raw!r} is not a process id") from None
        if pid != os.getpid():
            # Meant for another process (we are a child that inherited it).
            return []
        try:
            count = int(fds_raw)
        except ValueError:
            raise ActivationError(f"LISTEN_FDS={fds_raw!r} is not a number") from None
        if count < 0:
            raise ActivationError(f"LISTEN_FDS={fds_raw!r} must be >= 0")
        names = names_raw.split(":") if names_raw else []
        if names and len(names) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES has {len(names)} names but LISTEN_FDS={count}"
            )
        result: list[ActivatedSocket] = []
        for i in range(count):
            fd = SD_LISTEN_FDS_START + i
            try:
                os.set_inheritable(fd, False)  # FD_CLOEXEC: runners must not hold it
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise ActivationError(
                    f"passed fd {fd} (LISTEN_FDS={count}) is not a usable socket: {exc}"
                ) from exc
            if sock.type != socket.SOCK_STREAM:
                raise ActivationError(
                    f"passed fd {fd} is not a stream socket (ListenStream= expected)"
                )
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ActivationError(
                    f"passed fd {fd} is not listening: the .socket unit needs Accept=no"
                )
            result.append(ActivatedSocket(names[i] if names else "unknown", sock))
        return result
    finally:
        if unset_environment:
            _unset()


def listen_sockets(unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets systemd passed to this process (fds 3..), or ``[]``.

    Only when ``LISTEN_PID`` is this process. Each fd gets CLOEXEC so runner
    processes don't inherit it, and the ``LISTEN_*`` variables are removed
    from ``os.environ`` (unless ``unset_environment=False``) so children
    don't mistake them for their own. Raises :class:`ActivationError` when
    the variables are malformed or an fd is not a listening stream socket.
    """
    return [a.sock for a in listen_sockets_with_names(unset_environment)]
