"""runtime/backends/text.py in-process: pooling formulas against sentence-transformers'
definitions written out with torch here, the classifier against transformers, token ids in,
truncation counts; and DeepSpeed kernel injection on CUDA (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lastmile.models.manifest import load_manifest
from lastmile.models.settings import ModelSettings
from lastmile.runtime.backends import create_backend
from lastmile.runtime.backends.text import pool

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def wire(texts: list[str], width: int) -> dict[str, np.ndarray]:
    data = np.zeros((len(texts), width), dtype=np.uint8)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for i, text in enumerate(texts):
        raw = text.encode()
        data[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        lengths[i] = len(raw)
    return {"text_utf8": data, "text_len": lengths}


def st_pooling(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' Pooling.forward, one mode, written with torch."""
    m = mask.unsqueeze(-1).expand(hidden.size()).float()
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return torch.max(hidden.masked_fill(m == 0, -1e9), 1)[0]
    if mode in ("mean", "mean_sqrt_len"):
        summed, count = (hidden * m).sum(1), torch.clamp(m.sum(1), min=1e-9)
        return summed / (count if mode == "mean" else torch.sqrt(count))
    if mode == "weightedmean":
        w = torch.arange(1, hidden.shape[1] + 1).unsqueeze(0).unsqueeze(-1).expand(hidden.size()).float() * m
        return (hidden * w).sum(1) / torch.clamp(w.sum(1), min=1e-9)
    if mode == "lasttoken":
        last = mask.shape[1] - torch.argmax(mask.flip(1), dim=1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken"])
def test_pooling_equals_sentence_transformers_formula(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 5, generator=gen)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1, 1] + [0] * 5])
    got = pool(hidden.numpy(), mask.numpy(), (mode,))
    np.testing.assert_allclose(got, st_pooling(hidden, mask, mode).numpy(), atol=1e-6)
    both = pool(hidden.numpy(), mask.numpy(), ("cls", "mean"))
    assert both.shape == (3, 10)


def test_classifier_scores_and_truncation_counts(classifier_folder) -> None:
    import transformers

    manifest = load_manifest(classifier_folder, "clf")
    backend = create_backend(manifest, ModelSettings())
    try:
        texts = ["I love this product", "terrible device " * 40]
        out = backend.run(wire(texts, manifest.inputs[0].shape[1]))
        tok = transformers.AutoTokenizer.from_pretrained(str(classifier_folder))
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(classifier_folder)).eval()
        batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            expected = torch.softmax(model(**batch).logits, -1).numpy()
        np.testing.assert_allclose(out["scores"], expected, atol=1e-5)
        full = [len(ids) for ids in tok(texts)["input_ids"]]
        assert out["token_count"].tolist() == full and full[1] > 64  # counted before truncation
        ids = backend.run({"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})
        np.testing.assert_allclose(ids["scores"], expected, atol=1e-5)
    finally:
        backend.close()


@pytest.mark.gpu
@gpu
def test_gpu_kernel_inject_on_an_encoder(encoder_folder) -> None:
    """DeepSpeed kernel injection replaces BERT layers on CUDA; embeddings stay close to fp32."""
    manifest = load_manifest(encoder_folder, "enc")
    texts = ["The quick brown fox jumps over the lazy dog.", "hello"]
    cpu = create_backend(manifest, ModelSettings())
    try:
        expected = cpu.run(wire(texts, manifest.inputs[0].shape[1]))["embeddings"]
    finally:
        cpu.close()
    backend = create_backend(manifest, ModelSettings(device="cuda", dtype="fp16", graph_fusion="all"))
    try:
        info = backend.info()
        assert "deepspeed_kernel_inject" in info["fusion_applied"]
        got = backend.run(wire(texts, manifest.inputs[0].shape[1]))["embeddings"]
        np.testing.assert_allclose(got, expected, atol=2e-2)
    finally:
        backend.close()


def test_unknown_architecture_is_named_at_load(encoder_folder, tmp_path) -> None:
    """The name says feature extraction, but transformers has no such class: the load error
    names it (the folder's own code is never looked for)."""
    import json
    import shutil

    from lastmile.runtime.backends.base import BackendError

    folder = tmp_path / "odd"
    shutil.copytree(encoder_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FrobnicatorModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match="FrobnicatorModel"):
        create_backend(load_manifest(folder, "odd"), ModelSettings())


def test_models_import_refusals_are_one_line(tmp_path, capsys) -> None:
    import json

    from lastmile.appliance.client.cli import main

    assert main(["models", "import", "nope", "--to", "onnx", "--store", str(tmp_path)]) == 1
    assert "no model 'nope'" in capsys.readouterr().err
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "lm" / "model.safetensors").write_bytes(b"\0" * 8)
    assert main(["models", "import", "lm", "--to", "onnx", "--store", str(tmp_path)]) == 1
    assert "causal LM" in capsys.readouterr().err


def test_token_classifier_labels_per_token(tmp_path) -> None:
    """A *ForTokenClassification folder: per-token scores equal transformers', and the daemon's
    answer shaping (textio.api_results) gives one label per token, cut to the request's length."""
    import transformers

    from lastmile.appliance.server.textio import TextBatch, api_results
    from lastmile.models.demo_text import build_encoder_folder

    folder = build_encoder_folder(tmp_path / "ner", task="token-classification", labels=("O", "PLACE", "THING"))
    manifest = load_manifest(folder, "ner")
    assert manifest.hf.task == "token-classification" and manifest.hf.labels == ("O", "PLACE", "THING")
    backend = create_backend(manifest, ModelSettings())
    try:
        texts = ["the pump on line four", "hello"]
        out = backend.run(wire(texts, manifest.inputs[0].shape[1]))
    finally:
        backend.close()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForTokenClassification.from_pretrained(str(folder)).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model(**batch).logits, -1).numpy()
    mask = batch["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(out["scores"][mask], expected[mask], atol=1e-5)
    shaped = api_results(manifest.hf, TextBatch({}, ["a", "b"], False), out)
    assert shaped["label"].shape == (2, int(mask.sum(1).max()))
    assert set(shaped["label"].reshape(-1)) <= {"O", "PLACE", "THING"}
