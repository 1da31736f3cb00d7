"""``./install.sh --system`` under a real systemd, and the installer's interpreter guard.

The end-to-end test boots this machine's root in a systemd-nspawn container
(``run_e2e.sh``: an overlay, the host is not written to) and checks the
installed service for real: socket activation, READY/watchdog, restart after
``kill -9`` with the models restored, the sandbox, the roles, uninstall. It
needs root and systemd-nspawn and takes a few minutes, so it is marked
``slow`` (``pytest -m slow tests/systemd/e2e``) and skips when the container
cannot boot here (the script exits 77 and says why).

The guard test is fast and in the default run: a venv whose python lives
under a home directory cannot work under ``ProtectHome=yes`` (found by the
end-to-end run: a pyenv python under /root), and the installer must say so
instead of installing a service that crash-loops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SCRIPT = HERE / "run_e2e.sh"
CANNOT_RUN = 77


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_install_system_under_systemd() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to boot a systemd-nspawn container")
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn not installed (apt install systemd-container)")
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1100)
    output = result.stdout + result.stderr
    if result.returncode == CANNOT_RUN:
        reason = [line for line in output.splitlines() if "CANNOT RUN" in line]
        pytest.skip(reason[-1] if reason else output[-500:])
    assert result.returncode == 0, output[-6000:]
    assert "all checks passed" in output


def _stand_in_venv(root: Path, home: str) -> None:
    venv = root / "opt/lastmile"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {home}\nversion = 3.11.7\n")
    exe = venv / "bin/lastmile"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)


def _install(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LASTMILE_ROOT": str(root), "LASTMILE_GPU": "none"}
    return subprocess.run(
        ["bash", str(REPO / "systemd/install-system.sh"), "--venv", "/opt/lastmile", "--no-start"],
        capture_output=True, text=True, env=env, timeout=120,
    )


@pytest.mark.parametrize("home", ["/root/.pyenv/versions/3.11.7/bin", "/home/alice/miniconda3/bin"])
def test_venv_on_a_home_python_is_refused(tmp_path: Path, home: str) -> None:
    _stand_in_venv(tmp_path, home)
    result = _install(tmp_path)
    assert result.returncode != 0
    assert f"runs the python in {home}, under a home directory" in result.stderr
    assert "PYTHON=/usr/bin/python3" in result.stderr
    assert not (tmp_path / "etc/systemd/system/lastmile.service").exists(), "nothing installed after the refusal"


def test_venv_on_a_system_python_is_accepted(tmp_path: Path) -> None:
    _stand_in_venv(tmp_path, "/usr/bin")
    result = _install(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "etc/systemd/system/lastmile.service").exists()
