"""Config fuzzing: random TOML documents and random values for every known key of
``lastmile.toml`` always give either a valid :class:`Config` or a clean :class:`ConfigError`
that names the file and a key of the document (never a traceback of another kind, which is
what an operator would see on start-up or SIGHUP)."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import strategies as st

from lastmile.appliance.server.config import SCHEMA, Config, ConfigError, load_config
from lastmile.models.settings import VALIDATORS, ModelSettings, SettingError, validate_settings
from tests.fuzz._util import LONG, examples, run_property

pytestmark = pytest.mark.fuzz
# keys the cross-field checks name even when the document does not set them
CROSS_KEYS = {"memory.low_watermark", "server.tls_key", "server.token_file"}
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


# --- a small TOML writer (tomllib only reads) --------------------------------------------


def toml_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_float(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)


# (type, writer), first match wins: bool before int, since a bool is an int too
TOML_WRITERS: list[tuple[type | tuple[type, ...], Callable[[Any], str]]] = [
    (bool, lambda v: "true" if v else "false"),
    (int, str),
    (float, toml_float),
    (str, toml_string),
    ((dt.datetime, dt.date, dt.time), lambda v: v.isoformat()),
    (list, lambda v: "[" + ", ".join(toml_value(x) for x in v) + "]"),
    (dict, lambda v: "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"),
]


def toml_value(v: Any) -> str:
    """``v`` as a TOML value; a type TOML cannot hold is a TypeError (a bug in the strategies)."""
    write = next((write for kind, write in TOML_WRITERS if isinstance(v, kind)), None)
    if write is None:
        raise TypeError(type(v))
    return write(v)


def to_toml(doc: dict[str, Any]) -> str:
    top = [f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [f"[{toml_string(k)}]\n" + "".join(f"{toml_string(key)} = {toml_value(x)}\n" for key, x in v.items()) for k, v in doc.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables)


# --- values -------------------------------------------------------------------------------

SCALAR = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.integers(-3, 70_000), st.floats(), TEXT,
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)).map(lambda d: d.replace(microsecond=0)),
    st.dates(), st.sampled_from(["", "auto", "cpu", "cuda:1", "fp16", "refuse", "info", "~", "~/x", "~nosuchuser/x", "/tmp/x", "rel/x", "a\0b"]),
)
ANY = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)
PATHS = st.sampled_from(["/tmp/lastmile-fuzz/x.sock", "/var/lib/x", "~/models", "~nosuchuser/m", "~root/m", "/a b/c", "relative/path", ""])
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "socket": PATHS, "state_file": PATHS, "models_dir": PATHS, "token_file": PATHS, "tls_cert": PATHS, "tls_key": PATHS,
    "tcp_host": st.sampled_from(["127.0.0.1", "::1", "localhost", "", "a b"]),
    "tcp_port": st.sampled_from([0, 1, 8080, 0, 65535, 65536, -1]),
    "log_level": st.sampled_from(["debug", "info", "warning", "error", "trace", "INFO"]),
    "operator_groups": st.lists(st.sampled_from(["lastmile-admin", "wheel", ""]), max_size=3),
    "operator_uids": st.lists(st.integers(-1, 70_000), max_size=3),
    "plan": st.sampled_from(["refuse", "auto", "maybe"]),
    "backend": st.sampled_from(["auto", "deepspeed", "onnxruntime", "tensorrt"]),
    "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:x", "npu:1", "cuda:\u0663", "tpu"]),
    "dtype": st.sampled_from(["fp32", "fp16", "bf16", "int8"]),
    "graph_fusion": st.sampled_from(["off", "basic", "extended", "all", "max"]),
    "offload": st.sampled_from(["none", "cpu", "nvme"]),
}
FRACTION = st.one_of(st.floats(0.05, 1.0), st.sampled_from([0.5, 0.8, 0.9, 1]))
NUMBERS: dict[str, st.SearchStrategy[Any]] = {
    key: FRACTION for key in ("host_limit_fraction", "device_limit_fraction", "high_watermark", "low_watermark")
}
NUMBER = st.one_of(st.integers(0, 5000), st.floats(0.001, 100))
WRONG_NUMBER = st.one_of(st.integers(-2, 2), st.floats(-1, 2), st.floats(), st.booleans(), st.integers(2**40, 2**62))


def rare(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in ``one_in`` draws (Hypothesis favours the ends of a range, so the
    rare branch is a middle value)."""
    return draw(st.integers(0, one_in - 1)) == one_in // 2


def value_for(draw: st.DrawFn, key: str) -> Any:
    """Mostly a plausible value (right type, often allowed); sometimes a wrong number or anything."""
    if rare(draw, 8):
        return draw(ANY)
    if key in ("build_demo", "evict_idle"):
        return draw(st.booleans())
    if key in PLAUSIBLE:
        return draw(PLAUSIBLE[key])
    if rare(draw, 6):
        return draw(WRONG_NUMBER)
    return draw(NUMBERS.get(key, NUMBER))


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    known = {**{s: list(keys) for s, keys in SCHEMA.items()}, "defaults": list(VALIDATORS)}
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(list(known)), max_size=5, unique=True)):
        if rare(draw, 25):
            doc[section] = draw(SCALAR)  # a section that is not a table
            continue
        chosen = draw(st.lists(st.sampled_from(known[section]), max_size=5, unique=True))
        table = {key: value_for(draw, key) for key in chosen}
        if rare(draw, 25):
            table[draw(TEXT.filter(bool))] = draw(SCALAR)  # an unknown key
        doc[section] = table
    if rare(draw, 25):
        doc[draw(st.sampled_from(["extra", "Server", "default"]))] = {}
    return doc


# --- the property -------------------------------------------------------------------------


def document_keys(doc: dict[str, Any]) -> set[str]:
    keys = set(doc)
    for section, table in doc.items():
        if isinstance(table, dict):
            keys |= {f"{section}.{k}" for k in table}
    return keys


def check_outcome(path: Path, doc: dict[str, Any] | None) -> None:
    """Valid Config whose values all pass their checks, or ConfigError naming file and key."""
    try:
        config = load_config(path, system_mode=False)
    except ConfigError as exc:
        assert str(path) in str(exc), f"error does not name the file: {exc}"
        assert exc.key, exc
        if doc is not None:
            assert exc.key == "(syntax)" or exc.key in document_keys(doc) | CROSS_KEYS, f"{exc.key!r} not in the document: {exc}"
        return
    assert isinstance(config, Config)
    for section, checks in SCHEMA.items():
        for key, check in checks.items():
            value = getattr(config, section)[key]
            if value is not None:
                check(f"{section}.{key}", str(value) if isinstance(value, Path) else value)
    assert config.memory["low_watermark"] < config.memory["high_watermark"]
    assert not config.server["tcp_port"] or config.server["token_file"] is not None
    validate_settings({k: v for k, v in config.defaults.as_dict().items() if v is not None})
    if doc is not None:  # what the file says is what is in force
        for section, table in doc.items():
            for key, raw in table.items():
                got = getattr(config.defaults, key) if section == "defaults" else getattr(config, section)[key]
                assert config.sources[f"{section}.{key}"] == f"file {path}"
                if isinstance(got, Path):
                    assert got == Path(raw).expanduser()
                elif raw != "" or got is not None:
                    assert got == raw or (isinstance(raw, (int, float)) and got == float(raw)), (section, key, raw, got)


def prop_document(doc: dict[str, Any], tmp: Path) -> None:
    path = tmp / "lastmile.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    check_outcome(path, doc)


def prop_text(text: str, tmp: Path) -> None:
    path = tmp / "lastmile.toml"
    path.write_text(text, encoding="utf-8")
    check_outcome(path, None)


SIZES = [pytest.param(1, id="ci"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("LASTMILE_SOCKET", "LASTMILE_CONFIG", "LASTMILE_SYSTEM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("scale", SIZES)
def test_random_documents_give_config_or_config_error(clean_env: Path, scale: int) -> None:
    run_property(lambda doc: prop_document(doc, clean_env), documents(), examples(250, scale))


@pytest.mark.parametrize("scale", SIZES)
def test_random_text_gives_config_or_config_error(clean_env: Path, scale: int) -> None:
    lines = st.lists(
        st.one_of(
            st.sampled_from(["[server]", "[memory]", "[defaults]", "[store]", "[[server]]", "x = 1", "tcp_port = 9", "plan = 'auto'", "= 3", "[", "a.b = 2"]),
            TEXT,
        ),
        max_size=8,
    ).map("\n".join)
    run_property(lambda text: prop_text(text, clean_env), lines, examples(150, scale))


def test_every_known_key_gets_a_wrong_value(clean_env: Path) -> None:
    """Each key in turn with a value of the wrong type: an error naming exactly that key."""
    path = clean_env / "lastmile.toml"
    sections = {**SCHEMA, "defaults": VALIDATORS}
    for section, keys in sections.items():
        for key in keys:
            for wrong in ({"a": 1}, [[1], "x"], dt.date(2020, 1, 1)):
                path.write_text(to_toml({section: {key: wrong}}))
                with pytest.raises(ConfigError) as info:
                    load_config(path, system_mode=False)
                assert info.value.key == f"{section}.{key}", (section, key, str(info.value))


def test_unknown_home_in_a_path_is_a_config_error(clean_env: Path) -> None:
    """Found by this suite: ``~nosuchuser/...`` made Path.expanduser raise RuntimeError."""
    path = clean_env / "lastmile.toml"
    path.write_text('[store]\nmodels_dir = "~nosuchuser/models"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, system_mode=False)
    assert info.value.key == "store.models_dir"


def test_settings_validators_never_raise_other_errors() -> None:
    """The per-model settings vocabulary (config [defaults], manifests, load parameters)."""

    def prop(args: tuple[str, Any]) -> None:
        key, value = args
        try:
            ModelSettings().overlay({key: value})
        except SettingError as exc:
            assert exc.key == key

    run_property(prop, st.tuples(st.sampled_from(sorted(VALIDATORS)), ANY), examples(300))


@pytest.mark.parametrize("device", ["cuda:\u0663", "npu:\u00b2", "cuda:1:2"])
def test_device_index_is_ascii_digits(device: str) -> None:
    """Found by this suite: str.isdigit() accepts Unicode digits ('cuda:٣'), which torch then
    refuses at load time with a far less clear error."""
    with pytest.raises(SettingError):
        ModelSettings().overlay({"device": device})
