"""``lastmile models import NAME --to onnx``: a Hugging Face text folder exported to ONNX, so the
operator can serve it with ONNX Runtime instead of DeepSpeed/torch.

The new folder (``NAME-onnx`` in the same store) holds ``model.onnx`` plus the source folder's
JSON files (config, tokenizer, sentence-transformers pooling/Normalize), so it is described by
:mod:`lastmile.models.hf` exactly like its source and takes text the same way: same tokenizer,
same pooling, same labels. The graph takes ``input_ids`` and ``attention_mask`` (INT64,
dynamic batch and sequence) and returns the model's own output (``last_hidden_state`` for an
encoder, ``logits`` for a classifier); pooling stays in the runner, where it is shared by both
backends.

Export with the TorchScript-based exporter of ``torch.onnx`` and eager attention (so ONNX
Runtime's transformer optimizer can fuse it), then, when it applies, ONNX Runtime's
``optimize_model`` for BERT-like graphs. Written into a dot-folder and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lastmile.models.hf import describe_hf_folder

__all__ = ["ExportReport", "export_hf_to_onnx", "COPIED_FILES"]

ONNX_OPSET = 17
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
# ORT's transformer optimizer knows these model types' attention patterns.
_ORT_OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
                        "camembert": "bert", "electra": "bert", "mpnet": "bert"}


@dataclass(frozen=True)
class ExportReport:
    """What the export did and what it cost."""

    source: str
    target: str
    task: str
    output: str
    export_s: float
    optimize_s: float
    optimized: bool
    onnx_bytes: int
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_hf_to_onnx(source: Path | str, target: Path | str, *, optimize: bool = True, force: bool = False) -> ExportReport:
    """Export the Hugging Face text folder ``source`` into a new ONNX model folder ``target``."""
    import torch
    import transformers

    source, target = Path(source), Path(target)
    desc = describe_hf_folder(source)  # refuses pickles, remote code, unknown tasks, with the reason
    if desc.task == "generate":
        raise ValueError(f"{source.name} is a causal LM ({desc.architecture}); its ONNX form is built by the "
                         "generation engine's builder (onnxruntime_genai), not by this export")
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    cls = getattr(transformers, desc.architecture, None)
    if cls is None:
        raise ValueError(f"architecture {desc.architecture!r} is not known to transformers {transformers.__version__}")
    output = "last_hidden_state" if desc.task == "feature-extraction" else "logits"
    staging = target.parent / f".{target.name}.export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    notes: list[str] = []
    try:
        model = cls.from_pretrained(str(source), local_files_only=True, trust_remote_code=False,
                                    attn_implementation="eager").eval()
        ids = torch.ones((2, 8), dtype=torch.int64)
        mask = torch.ones((2, 8), dtype=torch.int64)

        class Wrapped(torch.nn.Module):
            """input_ids, attention_mask -> the one output the runner pools or scores."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]

        axes = {0: "batch", 1: "sequence"}
        started = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Wrapped(model), (ids, mask), str(staging / "model.onnx"), input_names=["input_ids", "attention_mask"],
                output_names=[output], dynamic_axes={"input_ids": axes, "attention_mask": axes, output: axes},
                opset_version=ONNX_OPSET, dynamo=False,
            )
        export_s = time.perf_counter() - started
        optimize_s, optimized = 0.0, False
        kind = _ORT_OPTIMIZER_TYPES.get(desc.model_type)
        if optimize and kind and desc.hidden_size:
            started = time.perf_counter()
            try:
                from onnxruntime.transformers.optimizer import optimize_model

                heads = int(json.loads((source / "config.json").read_text()).get("num_attention_heads", 0))
                opt = optimize_model(str(staging / "model.onnx"), model_type=kind, num_heads=heads,
                                     hidden_size=desc.hidden_size, opt_level=1)
                opt.save_model_to_file(str(staging / "model.onnx"))
                optimized = True
                fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
                notes.append(f"onnxruntime transformer optimizer ({kind}): fused {fused}")
            except Exception as exc:  # noqa: BLE001 - the unoptimized graph is still correct
                notes.append(f"onnxruntime transformer optimizer skipped: {type(exc).__name__}: {exc}")
            optimize_s = time.perf_counter() - started
        for rel in COPIED_FILES:
            if (source / rel).is_file():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / rel, staging / rel)
        if (source / "2_Normalize").is_dir():
            (staging / "2_Normalize").mkdir(exist_ok=True)
        (staging / "model.toml").write_text(
            'format = "onnx"\nartifact = "model.onnx"\nbackend = "onnxruntime"\n'
            f'description = "ONNX export of {source.name} ({desc.architecture}, {desc.task})"\n'
        )
        size = (staging / "model.onnx").stat().st_size
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(str(source), str(target), desc.task, output, round(export_s, 3), round(optimize_s, 3),
                        optimized, size, tuple(notes))
