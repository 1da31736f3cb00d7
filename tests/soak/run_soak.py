"""``.venv/bin/python tests/soak/run_soak.py [--requests N | --seconds S] [--concurrency C]
[--store DIR] [--json FILE]``: the soak run as a command; prints the report and exits 1 when
any request failed without a designed reason, an answer was wrong, or fds/shm leaked.

Builds the demo models into a temporary store unless ``--store`` names one."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.soak.soak import SoakSettings, run, save, start  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=0.0, help="run for this long instead of a request count")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--store", type=Path)
    parser.add_argument("--json", help="write the full report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lastmile-soak-") as tmp:
        store = args.store
        if store is None:
            from lastmile.models.demo import build_demo

            store = Path(tmp) / "store"
            build_demo(store)
        daemon = start(Path(tmp) / "home", store)
        try:
            report = asyncio.run(run(daemon, SoakSettings(requests=args.requests, seconds=args.seconds, concurrency=args.concurrency)))
        finally:
            daemon.stop()
    save(report, args.json)
    print(report.summary())
    leaked = report.daemon_fds["unloaded"] != report.daemon_fds["idle"] or report.shm_segments["unloaded"] != report.shm_segments["idle"]
    return 1 if report.errors or report.wrong_answers or leaked or not report.daemon_alive else 0


if __name__ == "__main__":
    sys.exit(main())
