"""The unit files, checked by systemd's own tools (systemd-analyze verify / security)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
EXPOSURE_TARGET = 2.0

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _system_units_dir() -> Path | None:
    for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (d / "sysinit.target").exists():
            return d
    return None


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A --root tree where the units are installed and ExecStart resolves.

    ``verify --root`` resolves every unit inside the root, so the distribution's
    targets (sysinit.target, sockets.target...) are copied in as well.
    """
    system = _system_units_dir()
    if system is None:
        pytest.skip("no systemd unit directory with sysinit.target on this machine")
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ("lastmile.service", "lastmile.socket"):
        shutil.copy(SYSTEMD_DIR / name, units / name)
    exe = root / "opt/lastmile/bin/lastmile"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", f"--root={root}", "lastmile.socket", "lastmile.service"],
        capture_output=True, text=True, timeout=60,
    )


def exposure(unit: str, root: Path | None = None) -> float:
    args = [ANALYZE, "security", "--offline=true", "--no-pager"]
    if root is not None:
        args.append(f"--root={root}")
    result = subprocess.run([*args, unit], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?)", result.stdout + result.stderr)
    assert match, f"no exposure in systemd-analyze output:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


def test_units_verify_clean(unit_root: Path) -> None:
    result = _verify(unit_root)
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt directives are only warnings with rc 0: fail on any.
    assert result.stderr.strip() == "", result.stderr


def test_verify_catches_a_missing_binary_and_a_typo(unit_root: Path) -> None:
    """The check above can fail: it sees what an operator's typo would break."""
    service = unit_root / "etc/systemd/system/lastmile.service"
    service.write_text(service.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    assert "Unknown key 'ProtectSytem'" in _verify(unit_root).stderr
    (unit_root / "opt/lastmile/bin/lastmile").unlink()
    result = _verify(unit_root)
    assert result.returncode != 0 and "/opt/lastmile/bin/lastmile" in result.stderr


@pytest.mark.parametrize("gpu", [None, "nvidia", "amd"])
def test_exposure_at_or_under_target(unit_root: Path, gpu: str | None) -> None:
    """Also with the GPU drop-ins, which must open /dev for the accelerators."""
    if gpu is not None:
        dropins = unit_root / "etc/systemd/system/lastmile.service.d"
        dropins.mkdir()
        shutil.copy(SYSTEMD_DIR / "gpu" / f"{gpu}.conf", dropins / "gpu.conf")
        assert _verify(unit_root).stderr.strip() == ""
    score = exposure("lastmile.service", unit_root)
    assert score <= EXPOSURE_TARGET, f"exposure {score} > {EXPOSURE_TARGET} with gpu={gpu}"


def test_exposure_measure_can_fail(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(str(bare)) > 9.0


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=dict, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_service_contract() -> None:
    """What the daemon and the docs rely on; a change here must be deliberate."""
    text = (SYSTEMD_DIR / "lastmile.service").read_text()
    for line in [
        "Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure", "RestartSec=2",
        "TimeoutStartSec=300", "ExecStart=/opt/lastmile/bin/lastmile serve --config /etc/lastmile/lastmile.toml",
        "User=lastmile", "Group=lastmile", "StateDirectory=lastmile", "CacheDirectory=lastmile",
        "ConfigurationDirectory=lastmile", "RuntimeDirectory=lastmile", "RuntimeDirectoryPreserve=yes",
        "Environment=LASTMILE_SYSTEM=1", "OOMPolicy=continue", "Requires=lastmile.socket",
    ]:
        assert re.search(rf"^{re.escape(line)}$", text, re.M), f"lastmile.service lacks {line}"
    # These break torch / psutil / OpenMP / peer credentials (docs/systemd.md): never on.
    for forbidden in [r"MemoryDenyWriteExecute=(yes|true)", r"ProcSubset=pid", r"SystemCallFilter=~.*@resources",
                      r"PrivateUsers=(yes|true)", r"PrivateNetwork=(yes|true)"]:
        assert not re.search(rf"^{forbidden}", text, re.M), f"lastmile.service sets {forbidden}"


def test_socket_contract() -> None:
    sock = _ini(SYSTEMD_DIR / "lastmile.socket")["Socket"]
    assert sock["ListenStream"] == "/run/lastmile/lastmile.sock"
    assert (sock["SocketMode"], sock["SocketUser"], sock["SocketGroup"]) == ("0660", "root", "lastmile")
    assert sock["Accept"] == "no" and sock["Service"] == "lastmile.service"


def test_docs_explain_every_directive() -> None:
    """docs/systemd.md has a line for each directive the units set."""
    docs = (SYSTEMD_DIR.parent / "docs" / "systemd.md").read_text()
    keys: set[str] = set()
    for unit in ["lastmile.service", "lastmile.socket", "gpu/nvidia.conf", "gpu/amd.conf"]:
        for line in (SYSTEMD_DIR / unit).read_text().splitlines():
            m = re.match(r"^([A-Za-z]+)=", line)
            if m:
                keys.add(m.group(1))
    missing = sorted(k for k in keys if f"`{k}" not in docs)
    assert not missing, f"docs/systemd.md does not explain: {missing}"


def _expand(group: str, seen: set[str] | None = None) -> set[str]:
    """The syscalls in a filter group, following nested groups."""
    seen = seen if seen is not None else set()
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run([ANALYZE, "syscall-filter", group], capture_output=True, text=True, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= _expand(item, seen) if item.startswith("@") else {item}
    return calls


# What torch/oneDNN/OpenMP, ONNX Runtime, psutil, DeepSpeed's async I/O, the forkserver,
# the runners (RLIMIT_AS, PR_SET_PDEATHSIG) and the daemon's sockets call.
NEEDED_SYSCALLS = {
    "sched_setaffinity", "sched_getaffinity", "setrlimit", "prlimit64", "mbind", "set_mempolicy",
    "get_mempolicy", "prctl", "memfd_create", "mmap", "mprotect", "madvise", "clone", "clone3",
    "execve", "futex", "socket", "bind", "listen", "accept4", "sendmsg", "recvmsg", "getsockopt",
    "epoll_wait", "io_submit", "io_setup", "eventfd2", "pipe2", "statx", "getrandom", "ioctl",
    "sched_yield", "kill", "openat", "ftruncate", "fallocate",
}


def test_syscall_filter_keeps_what_torch_and_the_runners_need() -> None:
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in (SYSTEMD_DIR / "lastmile.service").read_text().splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        spec = line.split("=", 1)[1]
        target = denied if spec.startswith("~") else allowed
        for item in spec.lstrip("~").split():
            target |= _expand(item) if item.startswith("@") else {item}
    effective = allowed - denied
    assert allowed, "no SystemCallFilter allow list"
    missing = sorted(NEEDED_SYSCALLS - effective)
    assert not missing, f"SystemCallFilter blocks {missing}"
    assert {"ptrace", "mount", "reboot", "init_module", "perf_event_open"} <= denied
