"""The CLI's text commands, kept out of cli.py (which only wires them in):

- ``lastmile infer NAME --text "..." [--text ...] [--truncate]``: texts in, and out either the
  embeddings' shape with a preview, or each text's label and scores;
- ``lastmile models import NAME --to onnx``: export a Hugging Face text folder of the store to
  an ONNX model folder ``NAME-onnx`` beside it (runs here, not in the daemon: it needs torch).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["infer_text", "format_text_result", "cmd_models_import"]


async def infer_text(client: Any, name: str, texts: list[str], *, truncate: bool = False) -> dict[str, Any]:
    """One V2 infer request with a ``text`` BYTES tensor; the response body as JSON."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
            "parameters": {"truncate": truncate}}
    return await client.request("POST", f"/v2/models/{name}/infer", body)


def format_text_result(texts: list[str], response: dict[str, Any]) -> str:
    """Embeddings: shape and the first values of each; labels: each text's label and scores."""
    outputs = {o["name"]: o for o in response.get("outputs", [])}
    lines = []
    if "embeddings" in outputs:
        emb = np.asarray(outputs["embeddings"]["data"], dtype=np.float32).reshape(outputs["embeddings"]["shape"])
        lines.append(f"embeddings: shape {list(emb.shape)} FP32")
        for text, row in zip(texts, emb):
            preview = ", ".join(f"{v:+.4f}" for v in row[:6])
            lines.append(f"  {text[:40]!r:<44} [{preview}{', ...' if row.size > 6 else ''}]  |v| = {np.linalg.norm(row):.4f}")
    elif "label" in outputs:
        scores = np.asarray(outputs["scores"]["data"], dtype=np.float32).reshape(outputs["scores"]["shape"])
        labels = outputs["label"]["data"]
        for i, text in enumerate(texts):
            if scores.ndim == 2:
                ranked = ", ".join(f"{s:.4f}" for s in scores[i])
                lines.append(f"  {text[:40]!r:<44} {labels[i]}  (scores {ranked})")
            else:
                lines.append(f"  {text[:40]!r:<44} token labels: {labels[i * scores.shape[1]:(i + 1) * scores.shape[1]]}")
    if "token_count" in outputs:
        lines.append(f"tokens: {outputs['token_count']['data']}")
    params = response.get("parameters") or {}
    if params:
        lines.append(f"server {params.get('total_ms')} ms (batch {params.get('batch_id')} of size {params.get('batch_size')})")
    return "\n".join(lines)


def cmd_models_import(args: argparse.Namespace, store: Path) -> int:
    """``lastmile models import NAME --to onnx``."""
    from lastmile.models.hf_onnx import export_hf_to_onnx
    from lastmile.models.store import check_name

    from lastmile.appliance.client.api import ClientError

    started = time.monotonic()
    try:
        if args.to != "onnx":
            raise ValueError(f"--to {args.to!r}: only onnx is supported")
        source = store / check_name(args.name)
        target = store / check_name(args.target or f"{args.name}-onnx")
        if not source.is_dir():
            raise ValueError(f"no model {args.name!r} in the store {store}")
        report = export_hf_to_onnx(source, target, optimize=not args.no_optimize, force=args.force)
    except (ValueError, OSError) as exc:  # bad name, not an HF text folder, target exists: one line
        raise ClientError(f"models import {args.name}: {exc}") from None
    if getattr(args, "json", False):
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print(f"exported {source.name} ({report.task}) to {target} in {time.monotonic() - started:.1f} s: "
          f"export {report.export_s:.2f} s, optimize {report.optimize_s:.2f} s, model.onnx {report.onnx_bytes / 1e6:.2f} MB")
    for note in report.notes:
        print(f"  {note}")
    print(f"load it with: lastmile load {target.name}")
    return 0


def format_derived(store: list[dict[str, Any]]) -> str:
    """For ``lastmile models``: what was derived for each Hugging Face model, and from which file."""
    lines = []
    for entry in store:
        text = entry.get("text")
        if not text:
            continue
        lines.append(f"{entry['name']}: {text['architecture'] or '?'} -> {text['task']}")
        for key, item in text.get("derived", {}).items():
            value = item["value"]
            shown = ", ".join(map(str, value)) if isinstance(value, list) else json.dumps(value) if isinstance(value, dict) else value
            lines.append(f"  {key:<12} {shown}  (from {item['from']})")
    return "\n".join(lines)
