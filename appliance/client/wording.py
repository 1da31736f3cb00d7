"""Small rewrites of the daemon's words for display, shared by the CLI and the TUI."""

from __future__ import annotations


def without_model_prefix(name: str, message: str) -> str:
    """``demo-lm: model 'demo-lm': ONNX Runtime failed`` -> ``ONNX Runtime failed`` when the
    model's name is already shown beside the message (the runtime prefixes its errors with the
    model at each layer, which reads as ``mynet: mynet: model 'mynet': ...`` in a list)."""
    prefixes = (f"{name}: ", f"model {name!r}: ", f'model "{name}": ', f"model {name}: ")
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if message.startswith(prefix):
                message = message[len(prefix):]
                changed = True
    return message


def flag_of(key: str) -> str:
    """The ``lastmile load`` flag of a setting: ``memory_limit_mb`` -> ``--memory-limit``,
    ``max_batch_size`` -> ``--max-batch-size``."""
    return "--memory-limit" if key == "memory_limit_mb" else "--" + key.replace("_", "-")


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_text(settings: dict) -> str:
    """Settings the way an operator reads them: ``max_batch_size 8, max_delay_ms 1``."""
    return ", ".join(f"{k} {_value(v)}" for k, v in settings.items())


def load_command(name: str, settings: dict) -> str:
    """A ready ``lastmile load NAME --flag value ...`` line for ``settings``."""
    return " ".join(["lastmile load", name, *(f"{flag_of(k)} {_value(v)}" for k, v in settings.items())])


def memory_set_command(memory: dict) -> str:
    """A ready ``lastmile memory set --host-limit-mb N`` line."""
    return " ".join(["lastmile memory set", *(f"--{k.replace('_', '-')} {_value(v)}" for k, v in memory.items())])


def option_commands(name: str, options: list) -> list[str]:
    """What each option of a 507 (``memory.options``) means for the operator, as the command
    that takes it: ``lastmile load NAME --memory-limit 47``, ``lastmile memory set ...``."""
    lines = []
    for option in options or []:
        if not isinstance(option, dict):
            continue
        if option.get("memory"):
            lines.append(memory_set_command(option["memory"]))
        elif option.get("settings"):
            lines.append(load_command(name, option["settings"]))
        elif option.get("evict"):
            lines.append("; ".join(f"lastmile unload {v}" for v in option["evict"]) + f"; lastmile load {name}")
    return lines
