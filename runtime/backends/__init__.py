"""Picking and building the backend for a model.

The backend modules import heavy libraries (onnxruntime; torch + DeepSpeed), so they are
imported only by :func:`create_backend`, inside the runner process that needs them.
"""

from __future__ import annotations

import importlib

from lastmile.models.manifest import BACKEND_FORMATS
from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.backends.base import Backend, BackendError

__all__ = ["Backend", "BackendError", "resolve_backend", "create_backend", "BACKEND_FORMATS"]

_MODULES = {
    "onnxruntime": ("lastmile.runtime.backends.onnx_backend", "OnnxBackend"),
    "deepspeed": ("lastmile.runtime.backends.deepspeed_backend", "DeepSpeedBackend"),
}


def resolve_backend(manifest: Manifest, settings: ModelSettings) -> str:
    """The backend that will load ``manifest``: ``settings.backend`` when set (checked against
    the format), else the manifest's ``backend``, else the one that loads the format."""
    requested = settings.backend if settings.backend != "auto" else (manifest.backend or "auto")
    fmt = manifest.format
    owners = [b for b, formats in BACKEND_FORMATS.items() if fmt in formats]
    if not owners:
        raise BackendError(f"model {manifest.name!r}: format {fmt!r} has no backend; known formats: "
                           + ", ".join(f for fs in BACKEND_FORMATS.values() for f in fs))
    if requested == "auto":
        return owners[0]
    if requested not in BACKEND_FORMATS:
        raise BackendError(f"model {manifest.name!r}: backend {requested!r} unknown; allowed: auto, "
                           + ", ".join(BACKEND_FORMATS))
    if requested not in owners:
        raise BackendError(
            f"model {manifest.name!r}: backend {requested!r} cannot load format {fmt!r}; "
            f"format {fmt!r} is loaded by backend {' or '.join(repr(o) for o in owners)} "
            "(set backend = \"auto\" or that one)"
        )
    return requested


def create_backend(manifest: Manifest, settings: ModelSettings) -> Backend:
    """Load ``manifest`` with the backend :func:`resolve_backend` picks. Every failure is a
    :class:`BackendError` whose message can be shown to the operator as is."""
    name = resolve_backend(manifest, settings)
    from lastmile.runtime.backends.text import is_text_manifest

    if is_text_manifest(manifest):  # a Hugging Face text model: tokenizer + pooling around the backend
        from lastmile.runtime.backends.text import TextBackend

        return TextBackend(manifest, settings, name)
    module_name, class_name = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not usable on this install: {exc}") from exc
    cls = getattr(module, class_name)
    return cls(manifest, settings)
