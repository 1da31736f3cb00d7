"""The import rules of docs/ARCHITECTURE.md, read from the source (every ``import`` statement,
lazy ones inside functions included): arrows point downward, the TUI reaches the daemon only
through the client room (plus the standard-library-only settings vocabulary). That nothing of
the product imports ``bench`` is tests/test_packaging.py's."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

VOCABULARY = "lastmile.models.vocabulary"


def _imports(folder: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import under ``folder`` of the repository."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names if node.module == "lastmile.models"]
            found += [(str(path.relative_to(ROOT)), name) for name in names]
    return found


def _breaking(folder: str, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """Imports of our own packages under ``folder`` outside ``allowed``."""
    ours = [(f, m) for f, m in _imports(folder) if m.startswith("lastmile") and m != "lastmile.models"]
    return [(f, m) for f, m in ours if not any(m == a or m.startswith(a + ".") for a in allowed)]


@pytest.mark.parametrize(
    ("folder", "allowed"),
    [
        ("models", ("lastmile.models",)),
        ("runtime", ("lastmile.runtime", "lastmile.models")),
        ("appliance/server", ("lastmile.appliance", "lastmile.runtime", "lastmile.models")),
        ("tui", ("lastmile.tui", "lastmile.appliance.client", VOCABULARY)),
    ],
)
def test_arrows_point_downward(folder: str, allowed: tuple[str, ...]) -> None:
    assert _breaking(folder, allowed) == []


#: the client room: its own modules, the V2 wire format, what a model is
CLIENT = ("lastmile.appliance.client", "lastmile.appliance.v2codec", "lastmile.models")
#: the commands (``lastmile ...``) alone also reach these: the config and the daemon for
#: ``lastmile serve`` and ``config show``, the log format, the GGUF import that ``lastmile
#: models import`` and the demo run in the client's own process, and the TUI for ``lastmile tui``
COMMANDS = ("appliance/client/cli.py", "appliance/client/quickstart.py")
COMMANDS_ALSO = ("lastmile.appliance.server.config", "lastmile.appliance.server.server", "lastmile.appliance.logs",
                 "lastmile.runtime.generation.gguf_import", "lastmile.tui.app")


def _client_breaking(commands: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for f, m in _imports("appliance/client"):
        if not m.startswith("lastmile") or m == "lastmile.appliance":  # the package itself: __version__
            continue
        allowed = CLIENT + (COMMANDS_ALSO if f in commands else ())
        if not any(m == a or m.startswith(a + ".") for a in allowed):
            out.append((f, m))
    return out


def test_the_client_room_reaches_the_server_runtime_and_tui_only_from_its_commands() -> None:
    assert _client_breaking(COMMANDS) == []
    assert _client_breaking(()), "cli.py starts the daemon: without the commands' exception the rule must complain"


def test_the_server_never_imports_its_clients() -> None:
    assert [(f, m) for f, m in _imports("appliance/server") if m.startswith(("lastmile.appliance.client", "lastmile.tui"))] == []


def test_the_tui_reads_the_vocabulary_and_the_rule_catches_a_break() -> None:
    tui = _imports("tui")
    assert ("tui/forms.py", VOCABULARY) in tui
    assert not any(m.startswith("lastmile.models.") and m != VOCABULARY for _, m in tui)
    # the checker itself: a made-up import outside the rule is reported
    assert _breaking("tui", ("lastmile.tui",))  # tui imports the client room, so this must complain
