"""The installed package is one name, ``lastmile``: the repository's folders are mapped to
``lastmile.appliance``, ``lastmile.runtime``, ... (pyproject's package-dir), so nothing generic
such as ``models`` lands in a user's site-packages, and product code never reaches for the
bench harness."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomli

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("appliance", "runtime", "models", "tui")


def test_generic_top_level_names_do_not_import_outside_the_checkout(tmp_path: Path) -> None:
    probe = ("import importlib.util, sys\n"
             "found = [n for n in ('models', 'runtime', 'appliance', 'tui', 'bench') if importlib.util.find_spec(n)]\n"
             "import lastmile.runtime.manager, lastmile.appliance.client.api\n"
             "print(','.join(found) or 'none')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


def test_every_package_folder_is_installed() -> None:
    listed = set(tomli.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"lastmile." + ".".join(init.parent.relative_to(ROOT).parts)
               for room in ROOMS for init in (ROOT / room).rglob("__init__.py")}
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_product_code_never_imports_bench_or_the_old_names() -> None:
    offenders = []
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                              if n.split(".")[0] in ("bench", *ROOMS)]
    assert offenders == []
