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
