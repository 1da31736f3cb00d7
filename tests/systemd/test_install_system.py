"""install-system.sh into a temporary root (LASTMILE_ROOT), with the real
systemd-sysusers / systemd-tmpfiles working on that root.

No systemd runs here (PID 1 is not systemd), and with LASTMILE_ROOT the
script never calls systemctl, so what is tested is the file layout,
ownership, idempotence and what uninstall/purge keep or remove. The venv is
a stand-in (a ``bin/lastmile`` script): building torch into a temp root
would take minutes and is install.sh's business.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "systemd" / "install-system.sh"
sys.path.insert(0, str(REPO / "systemd"))
import dropins  # noqa: E402  (systemd/ is not a package)

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles not installed",
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    venv = root / "opt/lastmile"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    exe = venv / "bin/lastmile"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return root


def run(root: Path, *args: str, gpu: str = "none", check: bool = True) -> subprocess.CompletedProcess[str]:
    # The venv's python3 first: a pyenv shim costs a bash start per call.
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LASTMILE_ROOT": str(root), "LASTMILE_GPU": gpu}
    result = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def passwd(root: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}


def groups(root: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        content = p.read_bytes() if p.is_file() and not p.is_symlink() else None
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content)
    return out


def test_install_lays_out_the_system(root: Path) -> None:
    result = run(root, "--venv", "/opt/lastmile")
    assert "installed into" in result.stdout
    assert "lastmile serve --config /etc/lastmile/lastmile.toml" in result.stdout  # foreground hint

    users, grps = passwd(root), groups(root)
    assert users["lastmile"][5] == "/var/lib/lastmile" and users["lastmile"][6] == "/usr/sbin/nologin"
    assert {"lastmile", "lastmile-admin"} <= set(grps)
    uid, gid = int(users["lastmile"][2]), int(grps["lastmile"][2])

    units = root / "etc/systemd/system"
    assert (units / "lastmile.service").read_text() == (REPO / "systemd/lastmile.service").read_text()
    assert (units / "lastmile.socket").read_text() == (REPO / "systemd/lastmile.socket").read_text()
    assert (root / "usr/lib/sysusers.d/lastmile.conf").exists()
    assert (root / "usr/lib/tmpfiles.d/lastmile.conf").exists()
    assert not (units / "lastmile.service.d").exists()  # no limit, no TCP, no GPU: no drop-ins
    # the unit's Documentation= points here
    assert (root / "opt/lastmile/share/doc/lastmile/systemd.md").read_text() == (REPO / "docs/systemd.md").read_text()

    for d in ("run/lastmile", "var/lib/lastmile", "var/lib/lastmile/models", "var/cache/lastmile"):
        st = (root / d).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, uid, gid), d
    conf = (root / "etc/lastmile/lastmile.toml").stat()
    assert (stat.S_IMODE(conf.st_mode), conf.st_uid, conf.st_gid) == (0o640, 0, gid)


def test_install_twice_is_safe_and_keeps_an_edited_config(root: Path) -> None:
    run(root, "--venv", "/opt/lastmile")
    config = root / "etc/lastmile/lastmile.toml"
    config.write_text("[memory]\nhost_limit_mb = 4096\n")
    first_ids = passwd(root)["lastmile"][2:4]

    result = run(root, "--venv", "/opt/lastmile")
    assert "keeping the existing /etc/lastmile/lastmile.toml" in result.stdout
    assert config.read_text() == "[memory]\nhost_limit_mb = 4096\n"
    assert passwd(root)["lastmile"][2:4] == first_ids
    memory = (root / "etc/systemd/system/lastmile.service.d/memory.conf").read_text()
    assert "MemoryMax=5120M" in memory and "MemoryHigh=4608M" in memory and "MemorySwapMax=0" in memory

    before = snapshot(root)
    run(root, "--venv", "/opt/lastmile")
    assert snapshot(root) == before, "a third run changed something"

    config.write_text("[memory]\nhost_limit_mb = 0\n")  # limit removed -> generated drop-in goes
    run(root, "--venv", "/opt/lastmile")
    assert not (root / "etc/systemd/system/lastmile.service.d").exists()


def test_operator_drop_ins_are_never_touched(root: Path) -> None:
    dropin_dir = root / "etc/systemd/system/lastmile.service.d"
    dropin_dir.mkdir(parents=True)
    (dropin_dir / "memory.conf").write_text("[Service]\nMemoryMax=1G\n")
    (dropin_dir / "override.conf").write_text("[Service]\nNice=5\n")
    run(root, "--venv", "/opt/lastmile")
    (root / "etc/lastmile/lastmile.toml").write_text("[memory]\nhost_limit_mb = 2048\n")
    result = run(root, "--venv", "/opt/lastmile")
    assert "keeping your own" in result.stdout
    assert (dropin_dir / "memory.conf").read_text() == "[Service]\nMemoryMax=1G\n"
    run(root, "--uninstall")
    assert sorted(p.name for p in dropin_dir.iterdir()) == ["memory.conf", "override.conf"]


def test_gpu_and_network_dropins(root: Path) -> None:
    run(root, "--venv", "/opt/lastmile")
    (root / "etc/lastmile/lastmile.toml").write_text('[server]\ntcp_port = 8443\ntcp_host = "0.0.0.0"\n')
    run(root, "--venv", "/opt/lastmile", gpu="nvidia")
    dropins_dir = root / "etc/systemd/system/lastmile.service.d"
    assert "DeviceAllow=char-nvidia* rw" in (dropins_dir / "gpu.conf").read_text()
    assert "IPAddressAllow=any" in (dropins_dir / "network.conf").read_text()
    run(root, "--venv", "/opt/lastmile", gpu="none")
    assert not (dropins_dir / "gpu.conf").exists()
    bad = run(root, "--venv", "/opt/lastmile", gpu="tpu", check=False)
    assert bad.returncode != 0 and "LASTMILE_GPU='tpu'" in bad.stderr


def test_uninstall_keeps_data_and_purge_removes_it(root: Path) -> None:
    run(root, "--venv", "/opt/lastmile")
    model = root / "var/lib/lastmile/models/mlp/model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    (root / "var/lib/lastmile/state.json").write_text("{}")

    result = run(root, "--uninstall")
    assert "kept:" in result.stdout
    assert not (root / "etc/systemd/system/lastmile.service").exists()
    assert not (root / "etc/systemd/system/lastmile.socket").exists()
    assert not (root / "usr/lib/sysusers.d/lastmile.conf").exists()
    assert not (root / "opt/lastmile").exists()
    assert not (root / "run/lastmile").exists()
    assert model.read_bytes() == b"weights" and (root / "var/lib/lastmile/state.json").exists()
    assert (root / "etc/lastmile/lastmile.toml").exists() and "lastmile" in passwd(root)
    run(root, "--uninstall")  # twice: still fine

    run(root, "--uninstall", "--purge")
    for gone in ("var/lib/lastmile", "var/cache/lastmile", "etc/lastmile"):
        assert not (root / gone).exists(), gone
    assert "lastmile" not in passwd(root)
    assert not {"lastmile", "lastmile-admin"} & set(groups(root))


def test_purge_keeps_accounts_it_did_not_create(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc/group").write_text("root:x:0:\nlastmile-admin:x:3000:alice\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    run(root, "--venv", "/opt/lastmile")
    run(root, "--purge")
    assert groups(root)["lastmile-admin"] == ["lastmile-admin", "x", "3000", "alice"]
    assert "lastmile" not in passwd(root)


def test_bad_arguments_and_missing_venv(root: Path) -> None:
    result = run(root, "--frobnicate", check=False)
    assert result.returncode != 0 and "unknown option '--frobnicate'" in result.stderr
    result = run(root, "--venv", "/opt/elsewhere", check=False)
    assert result.returncode != 0 and "--venv /opt/elsewhere has no bin/lastmile" in result.stderr


def test_custom_venv_gets_an_execstart_dropin(root: Path) -> None:
    (root / "srv").mkdir()
    shutil.move(root / "opt/lastmile", root / "srv/lm")
    run(root, "--venv", "/srv/lm")
    exec_conf = (root / "etc/systemd/system/lastmile.service.d/exec.conf").read_text()
    assert "ExecStart=\nExecStart=/srv/lm/bin/lastmile serve --config /etc/lastmile/lastmile.toml" in exec_conf
    run(root, "--uninstall")
    assert not (root / "srv/lm").exists(), "uninstall must find the venv through exec.conf"


# --- dropins.py (the derivations themselves) ----------------------------------------------


def _memory_dropin(tmp_path: Path, toml: str) -> subprocess.CompletedProcess:
    """``systemd/dropins.py memory`` on a config holding ``toml``, as install.sh runs it."""
    config = tmp_path / "c.toml"
    config.write_text(toml)
    return subprocess.run([sys.executable, str(REPO / "systemd/dropins.py"), "memory", str(config)], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("toml", "code", "expected"),
    [
        ("", 0, ""),
        ("[memory]\nhost_limit_mb = 0\n", 0, ""),
        ("[memory]\nhost_limit_mb = 8192\n", 0, "MemoryHigh=8704M\nMemoryMax=9216M\n"),
        ("[memory]\nhost_limit_mb = -1\n", 2, "memory.host_limit_mb = -1"),
        ("[memory]\nhost_limit_mb = '8G'\n", 2, "memory.host_limit_mb = '8G'"),
        ("memory = 3\n", 2, "[memory] must be a table"),
        ("[memory\n", 2, "not valid TOML"),
    ],
)
def test_memory_dropin_derivation(tmp_path: Path, toml: str, code: int, expected: str) -> None:
    """The drop-in from a config, or exit 2 with the bad key on stderr (install.sh stops there)."""
    result = _memory_dropin(tmp_path, toml)
    assert result.returncode == code, result.stderr
    out = result.stdout if code == 0 else result.stderr
    assert (expected in out) if expected else out == ""


def test_install_refuses_a_config_it_cannot_read(root: Path) -> None:
    run(root, "--venv", "/opt/lastmile")
    (root / "etc/lastmile/lastmile.toml").write_text("[memory]\nhost_limit_mb = 'lots'\n")
    result = run(root, "--venv", "/opt/lastmile", check=False)
    assert result.returncode != 0 and "memory.host_limit_mb = 'lots'" in result.stderr


@pytest.mark.parametrize(
    ("server", "opens"),
    [
        ({}, False),
        ({"tcp_port": 8000}, False),  # default host 127.0.0.1
        ({"tcp_port": 8000, "tcp_host": "::1"}, False),
        ({"tcp_port": 8000, "tcp_host": "localhost"}, False),
        ({"tcp_port": 0, "tcp_host": "0.0.0.0"}, False),  # TCP off
        ({"tcp_port": 8000, "tcp_host": "0.0.0.0"}, True),
        ({"tcp_port": 8000, "tcp_host": "edge-box.lan"}, True),
    ],
)
def test_network_dropin_derivation(server: dict, opens: bool) -> None:
    out = dropins.render_network({"server": server})
    assert ("IPAddressAllow=any" in out) is opens
