"""``lastmile.toml``: read, validated key by key, with the origin of every value kept.

An operator who edits a file on an edge box has no debugger: every error names the file, the
key and what is allowed, and ``lastmile config show`` tells where each effective value came
from (built-in default for user or system mode, the file, or the environment).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lastmile.models.settings import ModelSettings, SettingError, validate_settings
from lastmile.runtime.memory import DEFAULTS as MEMORY_DEFAULTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SYSTEM_CONFIG = Path("/etc/lastmile/lastmile.toml")


class ConfigError(ValueError):
    """A config value is wrong; the message names file, key and what is allowed."""

    def __init__(self, file: Path | str | None, key: str, message: str) -> None:
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: {message}")
        self.file = str(file) if file else None
        self.key = key


# --- value checks -------------------------------------------------------------------------


def _path(key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        raise SettingError(key, f"got {value!r}; allowed: a non-empty path string")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user of an unknown user (or no home directory to expand ~ to)
        raise SettingError(key, f"got {value!r}; its ~ cannot be expanded (no such user or no home directory)") from None
    if not path.is_absolute():
        raise SettingError(key, f"got {value!r}; allowed: an absolute path (or one starting with ~)")
    return path


def _optional_path(key: str, value: Any) -> Path | None:
    return None if value == "" else _path(key, value)


def _port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise SettingError(key, f"got {value!r}; allowed: 0 (TCP off) or a port from 1 to 65535")
    return value


def _host(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise SettingError(key, f"got {value!r}; allowed: a host name or IP address such as 127.0.0.1")
    return value


def _positive(kind: type, high: float) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        ok_types = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types) or not 0 < value <= high:
            noun = "an integer" if kind is int else "a number"
            raise SettingError(key, f"got {value!r}; allowed: {noun} greater than 0 and at most {high}")
        return kind(value)

    return check


def _limit_mb(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SettingError(key, f"got {value!r}; allowed: 0 (use the fraction) or a size in MB")
    return value


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise SettingError(key, f"got {value!r}; allowed: a number in (0, 1]")
    return float(value)


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in allowed:
            raise SettingError(key, f"got {value!r}; allowed: {', '.join(allowed)}")
        return value

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingError(key, f"got {value!r}; allowed: true or false")
    return value


def _names(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SettingError(key, f"got {value!r}; allowed: a list of group names")
    return list(value)


def _uids(key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise SettingError(key, f"got {value!r}; allowed: a list of numeric user ids")
    return list(value)


# --- the schema: section -> key -> check ---------------------------------------------------

SCHEMA: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "server": {
        "socket": _path,
        "tcp_host": _host,
        "tcp_port": _port,
        "grpc_socket": _optional_path,
        "grpc_port": _port,
        "token_file": _optional_path,
        "tls_cert": _optional_path,
        "tls_key": _optional_path,
        "max_body_mb": _positive(int, 4096),
        "max_response_mb": _positive(int, 65536),
        "header_timeout_s": _positive(float, 3600),
        "body_timeout_s": _positive(float, 3600),
        "allow_insecure_tcp": _bool,
        "max_concurrent_requests": _positive(int, 1_000_000),
        "shutdown_grace_s": _positive(float, 600),
        "log_level": _choice("debug", "info", "warning", "error"),
    },
    "auth": {
        "operator_groups": _names,
        "operator_uids": _uids,
    },
    "store": {
        "models_dir": _path,
        "state_file": _path,
        "build_demo": _bool,
    },
    "memory": {
        "host_limit_mb": _limit_mb,
        "host_limit_fraction": _fraction,
        "device_limit_mb": _limit_mb,
        "device_limit_fraction": _fraction,
        "high_watermark": _fraction,
        "low_watermark": _fraction,
        "plan": _choice("refuse", "auto"),
        "evict_idle": _bool,
        "sample_interval_s": _positive(float, 60),
        "pool_idle_s": _positive(float, 86400),
    },
}


#: What a container sets instead of a config file (deploy/README.md): variable -> (section, key, check).
#: They win over the file, as LASTMILE_SOCKET does.
ENVIRONMENT: dict[str, tuple[str, str, Callable[[str, Any], Any]]] = {
    "LASTMILE_STORE": ("store", "models_dir", _path),
    "LASTMILE_STATE_FILE": ("store", "state_file", _path),
    "LASTMILE_BUILD_DEMO": ("store", "build_demo", _bool),
    "LASTMILE_HTTP_HOST": ("server", "tcp_host", _host),
    "LASTMILE_HTTP_PORT": ("server", "tcp_port", _port),
    "LASTMILE_GRPC_SOCKET": ("server", "grpc_socket", _optional_path),
    "LASTMILE_GRPC_PORT": ("server", "grpc_port", _port),
    "LASTMILE_TOKEN_FILE": ("server", "token_file", _optional_path),
    "LASTMILE_ALLOW_INSECURE_TCP": ("server", "allow_insecure_tcp", _bool),
}


def _env_value(check: Callable[[str, Any], Any], text: str) -> Any:
    """An environment string as the type its check takes (ports are integers, flags booleans)."""
    if check is _port:
        return int(text) if text.strip().isdigit() else text
    if check is _bool:
        return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.strip().lower(), text)
    return text


@dataclass
class Config:
    """The effective configuration. ``sources`` maps ``section.key`` to where its value came from."""

    server: dict[str, Any]
    auth: dict[str, Any]
    store: dict[str, Any]
    memory: dict[str, Any]
    defaults: ModelSettings
    file: Path | None
    system_mode: bool
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def socket_path(self) -> Path:
        return self.server["socket"]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values for ``config show --json`` and ``GET /lm/v1/config``."""

        def plain(v: Any) -> Any:
            return str(v) if isinstance(v, Path) else v

        out = {s: {k: plain(v) for k, v in getattr(self, s).items()} for s in SCHEMA}
        out["defaults"] = self.defaults.as_dict()
        return out


def builtin_defaults(system_mode: bool) -> dict[str, dict[str, Any]]:
    """Paths for a system run (FHS, systemd's directories) or a user run (XDG)."""
    if system_mode:
        socket = Path("/run/lastmile/lastmile.sock")
        data = Path("/var/lib/lastmile")
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/lastmile-{os.getuid()}"
        socket = Path(runtime) / "lastmile" / "lastmile.sock"
        data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "lastmile"
    return {
        "server": {
            "socket": socket,
            "tcp_host": "127.0.0.1",
            "tcp_port": 0,
            "grpc_socket": None,  # None: lastmile-grpc.sock beside server.socket
            "grpc_port": 0,
            "token_file": None,
            "tls_cert": None,
            "tls_key": None,
            "max_body_mb": 64,
            "max_response_mb": 64,
            "header_timeout_s": 15.0,
            "body_timeout_s": 60.0,
            "allow_insecure_tcp": False,
            "max_concurrent_requests": 1024,
            "shutdown_grace_s": 10.0,
            "log_level": "info",
        },
        "auth": {"operator_groups": ["lastmile-admin"], "operator_uids": [0]},
        "store": {"models_dir": data / "models", "state_file": data / "state.json", "build_demo": True},
        "memory": dict(MEMORY_DEFAULTS),
    }


def is_system_mode() -> bool:
    """System mode when systemd's unit says so (``LASTMILE_SYSTEM=1``)."""
    return os.environ.get("LASTMILE_SYSTEM", "") == "1"


def default_config_file(system_mode: bool) -> Path:
    if system_mode:
        return SYSTEM_CONFIG
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "lastmile" / "lastmile.toml"


def load_config(path: Path | str | None = None, *, system_mode: bool | None = None) -> Config:
    """Effective config: built-in defaults < the file < the environment (``LASTMILE_SOCKET``, ``ENVIRONMENT``).

    ``path`` None means ``$LASTMILE_CONFIG`` or the mode's default file, which may be absent;
    an explicitly named file must exist.
    """
    system = is_system_mode() if system_mode is None else system_mode
    explicit = path is not None or bool(os.environ.get("LASTMILE_CONFIG"))
    file = Path(path if path is not None else os.environ.get("LASTMILE_CONFIG") or default_config_file(system))
    mode = "system" if system else "user"
    values = builtin_defaults(system)
    sources = {f"{s}.{k}": f"default ({mode} mode)" for s, keys in values.items() for k in keys}

    raw: dict[str, Any] = {}
    if file.exists():
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(file, "(syntax)", f"not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(file, "(file)", f"cannot read: {exc}") from None
    elif explicit:
        raise ConfigError(file, "(file)", "no such file")
    else:
        file = None  # type: ignore[assignment]

    for section, table in raw.items():
        if section == "defaults":
            continue
        if section not in SCHEMA:
            raise ConfigError(file, section, f"unknown section; known: {', '.join([*SCHEMA, 'defaults'])}")
        if not isinstance(table, dict):
            raise ConfigError(file, section, "must be a table ([section])")
        for key, value in table.items():
            check = SCHEMA[section].get(key)
            if check is None:
                raise ConfigError(file, f"{section}.{key}", f"unknown key; known: {', '.join(SCHEMA[section])}")
            try:
                values[section][key] = check(f"{section}.{key}", value)
            except SettingError as exc:
                raise ConfigError(file, exc.key, exc.message) from None
            sources[f"{section}.{key}"] = f"file {file}"

    defaults = ModelSettings()
    for key in defaults.as_dict():
        sources[f"defaults.{key}"] = "default (built in)"
    table = raw.get("defaults", {})
    if not isinstance(table, dict):
        raise ConfigError(file, "defaults", "must be a table ([defaults])")
    try:
        defaults = defaults.overlay(validate_settings(table, prefix="defaults."))
    except SettingError as exc:
        raise ConfigError(file, exc.key, exc.message) from None
    sources.update({f"defaults.{key}": f"file {file}" for key in table})

    env_socket = os.environ.get("LASTMILE_SOCKET")
    if env_socket:
        try:
            values["server"]["socket"] = _path("LASTMILE_SOCKET", env_socket)
        except SettingError as exc:
            raise ConfigError("environment", exc.key, exc.message) from None
        sources["server.socket"] = "environment LASTMILE_SOCKET"

    for name, (section, key, check) in ENVIRONMENT.items():
        raw_env = os.environ.get(name)
        if raw_env is None or raw_env == "":
            continue
        try:
            values[section][key] = check(name, _env_value(check, raw_env))
        except SettingError as exc:
            raise ConfigError("environment", exc.key, exc.message) from None
        sources[f"{section}.{key}"] = f"environment {name}"

    memory = values["memory"]
    if memory["low_watermark"] >= memory["high_watermark"]:
        raise ConfigError(
            file,
            "memory.low_watermark",
            f"{memory['low_watermark']} must be below memory.high_watermark ({memory['high_watermark']})",
        )
    server = values["server"]
    if (server["tls_cert"] is None) != (server["tls_key"] is None):
        raise ConfigError(file, "server.tls_key", "tls_cert and tls_key must be set together")
    if (server["tcp_port"] or server["grpc_port"]) and server["token_file"] is None:
        raise ConfigError(
            file, "server.token_file", "the TCP listener needs a bearer token: set server.token_file (a file with mode 0600)"
        )

    return Config(
        server=values["server"],
        auth=values["auth"],
        store=values["store"],
        memory=values["memory"],
        defaults=defaults,
        file=file,
        system_mode=system,
        sources=sources,
    )


def client_socket(path: Path | str | None = None, *, warn: Any = None) -> Path:
    """The daemon socket a client command connects to. ``$LASTMILE_SOCKET`` wins without the
    config file being read; else the config's ``server.socket``. A config with a mistake in
    another key (a typo in ``memory.host_limit_mb``) must not keep ``lastmile status`` or
    ``stop`` from a healthy daemon: ``warn`` gets the error, and the socket comes from the
    file's own ``server.socket`` if that one is readable, else the built-in default."""
    env_socket = os.environ.get("LASTMILE_SOCKET")
    if env_socket:
        try:
            return _path("LASTMILE_SOCKET", env_socket)
        except SettingError as exc:
            raise ConfigError("environment", exc.key, exc.message) from None
    try:
        return load_config(path).socket_path
    except ConfigError as exc:
        if exc.key == "(file)" and path is not None:
            raise  # a named config file that does not exist: nothing to fall back on by surprise
        system = is_system_mode()
        socket = builtin_defaults(system)["server"]["socket"]
        source = "the built-in default"
        file = Path(exc.file) if exc.file else None
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8")) if file else {}
            server = raw.get("server") if isinstance(raw, dict) else None
            if isinstance(server, dict) and "socket" in server:
                socket, source = _path("server.socket", server["socket"]), f"server.socket of {file}"
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, SettingError):
            pass
        if warn is not None:
            warn(f"{exc} (ignored by this command; socket from {source}: {socket})")
        return socket
