"""The settings vocabulary (``models/vocabulary.py``) and its three readers: the daemon
(``models/settings.py``, the manager's batcher keys, the data plane's live/reload split), the
CLI (``lastmile load`` flags, ``config show``) and the TUI's forms. Each reader is asked the
same questions at the edges of every bound, so a reader that keeps its own copy of a number
or a list fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lastmile.appliance.client import autotune, cli
from lastmile.models import settings as daemon_settings
from lastmile.models import vocabulary
from lastmile.models.settings import SettingError
from lastmile.models.spec import NUMPY_TO_V2, V2_TO_NUMPY
from lastmile.runtime import manager
from lastmile.tui import forms
from tests.conftest import ROOT


def _daemon_accepts(key: str, value: object) -> bool:
    try:
        daemon_settings.VALIDATORS[key](key, value)
    except SettingError:
        return False
    return True


def _tui_accepts(key: str, value: object) -> bool:
    try:
        forms.parse_setting(key, str(value))
    except forms.FormError:
        return False
    return True


def _edges(setting: vocabulary.Setting) -> list[int | float]:
    low, high = setting.low or 0, setting.high or 0
    step = 1 if setting.kind == "int" else 0.001
    return [low - step, low, (low + high) / 2 if setting.kind == "float" else (int(low) + int(high)) // 2, high, high + step]


def test_vocabulary_imports_only_the_standard_library() -> None:
    """The TUI and the CLI read it without NumPy, torch or anything of the runtime."""
    tree = ast.parse((ROOT / "models" / "vocabulary.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    code = ("import sys, lastmile.models.vocabulary; heavy = {'numpy', 'torch', 'aiohttp', 'textual', 'lastmile.runtime'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_daemon_reads_every_name_default_and_bound() -> None:
    from lastmile.runtime import accelerators

    assert set(accelerators._DEVICE_WORDS) == set(vocabulary.DEVICE_KINDS)  # the devices resolve_device knows
    assert list(daemon_settings.VALIDATORS) == [s.name for s in vocabulary.SETTINGS]
    assert daemon_settings.ModelSettings().as_dict() == {s.name: s.default for s in vocabulary.SETTINGS}
    for setting in vocabulary.SETTINGS:
        if setting.kind == "choice":
            for choice in setting.choices:
                assert _daemon_accepts(setting.name, choice)
            assert not _daemon_accepts(setting.name, "nonsense")
        elif setting.kind in ("int", "float"):
            verdicts = [_daemon_accepts(setting.name, v) for v in _edges(setting)]
            assert verdicts == [False, True, True, True, False], (setting.name, _edges(setting), verdicts)
        assert _daemon_accepts(setting.name, None) == setting.optional, setting.name


def test_one_answer_to_which_keys_reload() -> None:
    """The daemon's batcher keys, the TUI's confirm-before-reload keys, the tuner's stages and
    the CLI's help all say the same."""
    assert set(vocabulary.LIVE_KEYS) | set(vocabulary.RELOAD_KEYS) == set(vocabulary.BY_NAME)
    assert not set(vocabulary.LIVE_KEYS) & set(vocabulary.RELOAD_KEYS)
    # every live key but keep_alive_s (the manager's idle unloader reads it) is a batcher knob
    assert manager.BATCHER_KEYS + ("keep_alive_s",) == vocabulary.LIVE_KEYS
    assert set(forms.RELOADING_KEYS) == set(vocabulary.RELOAD_KEYS)
    assert set(autotune.LIVE_KEYS) <= set(vocabulary.LIVE_KEYS)
    assert set(autotune.RELOAD_KEYS) <= set(vocabulary.RELOAD_KEYS)
    assert forms.reload_note() == "max batch size and max delay apply at once; graph fusion and memory limit reload the model."
    load = _load_parser()
    for action in load._actions:
        if action.dest in vocabulary.BY_NAME:
            live = vocabulary.BY_NAME[action.dest].live
            assert ("without a reload" in (action.help or "")) == live, action.dest


def _load_parser():  # type: ignore[no-untyped-def]
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["load"]  # type: ignore[union-attr]


def test_cli_has_one_flag_per_setting_with_its_type() -> None:
    load = _load_parser()
    flags = {a.dest: a for a in load._actions if a.dest in vocabulary.BY_NAME}
    assert set(flags) == set(vocabulary.BY_NAME)
    for name, action in flags.items():
        assert action.type is vocabulary.BY_NAME[name].python_type, name
        assert vocabulary.BY_NAME[name].allowed() in action.help, name
    args = cli.build_parser().parse_args(["load", "m", "--max-batch-size", "4", "--max-delay-ms", "0.5", "--memory-limit", "64", "--timeout-s", "2"])
    assert (args.max_batch_size, args.max_delay_ms, args.memory_limit_mb, args.timeout_s) == (4, 0.5, 64, 2.0)


def test_tui_forms_accept_exactly_what_the_daemon_accepts() -> None:
    assert forms.BACKENDS == vocabulary.BACKENDS and forms.DTYPES == vocabulary.DTYPES
    assert forms.GRAPH_FUSION == vocabulary.GRAPH_FUSION_LEVELS
    for key in (*forms.LOAD_FORM_NUMBERS, "max_delay_ms"):
        setting = vocabulary.BY_NAME[key]
        for value in _edges(setting):
            assert _tui_accepts(key, value) == _daemon_accepts(key, int(value) if setting.kind == "int" else float(value)), (key, value)
    params = forms.load_parameters({"dtype": "bf16", "max_batch_size": "4096", "max_delay_ms": "0", "memory_limit_mb": ""})
    assert daemon_settings.validate_settings(params) == {"dtype": "bf16", "max_batch_size": 4096, "max_delay_ms": 0.0}
    with pytest.raises(forms.FormError, match="max_queue"):
        forms.load_parameters({"max_queue": "0"})


def test_one_v2_datatype_table() -> None:
    assert set(V2_TO_NUMPY) == set(vocabulary.V2_DATATYPES)
    for name, numpy_name in vocabulary.V2_DATATYPES.items():
        assert V2_TO_NUMPY[name] == np.dtype(numpy_name)
        spec = [{"name": "t", "datatype": name, "shape": [-1]}]
        if name not in vocabulary.RAW_V2_DATATYPES:
            assert NUMPY_TO_V2[np.dtype(numpy_name)] == name
            assert forms.random_inputs(spec)[0]["t"].dtype == V2_TO_NUMPY[name]  # the playground's generated input
        else:  # raw words: the playground takes them from a file only
            with pytest.raises(forms.FormError, match=name):
                forms.random_inputs(spec)


def test_config_show_names_bounds_and_reload(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[defaults]\nmax_batch_size = 12\ngraph_fusion = 'off'\n")
    result = subprocess.run([sys.executable, "-m", "lastmile.appliance.client.cli", "--config", str(config), "config", "show"],
                            capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True)
    lines = {line.split(" = ")[0]: line for line in result.stdout.splitlines() if " = " in line}
    assert lines["max_batch_size"].endswith(f"# file {config}; an integer from 1 to 4096; tunable on a loaded model without a reload")
    assert lines["graph_fusion"].endswith(f"# file {config}; off, basic, extended, all; a change needs a reload")


def test_openapi_settings_schema_is_the_vocabulary() -> None:
    """The API document's Settings schema (what clients generate code from) says the same."""
    import yaml

    schema = yaml.safe_load((ROOT / "appliance" / "server" / "openapi.yaml").read_text())["components"]["schemas"]["Settings"]
    assert list(schema["properties"]) == [s.name for s in vocabulary.SETTINGS]
    assert set(schema["required"]) == {s.name for s in vocabulary.SETTINGS if not s.optional}
    for setting in vocabulary.SETTINGS:
        prop = schema["properties"][setting.name]
        if setting.kind == "choice":
            assert tuple(prop["enum"]) == setting.choices, setting.name
        elif setting.kind in ("int", "float"):
            assert prop["type"] == ("integer" if setting.kind == "int" else "number"), setting.name
            assert (prop["minimum"], prop["maximum"]) == (setting.low, setting.high), setting.name
            assert prop.get("nullable", False) == setting.optional, setting.name
    live = ", ".join(vocabulary.LIVE_KEYS[:-1]) + " and " + vocabulary.LIVE_KEYS[-1]
    assert f"{live} change live" in yaml.safe_load((ROOT / "appliance" / "server" / "openapi.yaml").read_text())[
        "components"]["schemas"]["SettingsChange"]["description"]
