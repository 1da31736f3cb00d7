"""A tiny socket-activated daemon for the tests (run by systemd-socket-activate).

It does what ``lastmile serve`` does with systemd, with nothing else around
it: take the passed socket (LISTEN_FDS), serve it with aiohttp's SockSite
behind the auth middleware, send STATUS/READY/WATCHDOG/STOPPING, stop on
SIGTERM. GET /probe reports what the process saw, including whether a child
process inherited the listening socket or the LISTEN_* variables.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from aiohttp import web

from lastmile.appliance.server import activation, sdnotify
from lastmile.appliance.server.auth import AuthPolicy, auth_middleware

CHILD = r"""
import json, os
links = []
for fd in os.listdir('/proc/self/fd'):
    try:
        links.append(os.readlink('/proc/self/fd/' + fd))
    except OSError:
        pass
print(json.dumps({'env': {k: v for k, v in os.environ.items() if k.startswith('LISTEN_')}, 'links': links}))
"""


async def main() -> None:
    named = activation.listen_sockets_with_names()
    socks = [a.sock for a in named]
    inodes = [os.fstat(s.fileno()).st_ino for s in socks]
    sdnotify.notify(STATUS=f"got {len(socks)} socket(s) from systemd")

    async def probe(request: web.Request) -> web.Response:
        child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                               close_fds=False, check=True)
        seen = json.loads(child.stdout)
        return web.json_response({
            "fds": len(socks),
            "names": [a.name for a in named],
            "env_after": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},
            "child_env": seen["env"],
            "child_has_socket": any(f"socket:[{ino}]" in seen["links"] for ino in inodes),
            "caller": request["caller"].role,
            "uid": request["caller"].uid,
        })

    app = web.Application(middlewares=[auth_middleware(AuthPolicy())])
    app.router.add_get("/probe", probe)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    for s in socks:
        await web.SockSite(runner, s).start()

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    dog = sdnotify.Watchdog.start(lambda: True)
    sdnotify.ready(f"serving on {len(socks)} activated socket(s)")
    await stop.wait()
    sdnotify.stopping("stopping")
    await dog.stop()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
