"""models/hf.py: a bare Hugging Face folder described from its JSON files (no torch), and the
manifest built from it. The JSON-only cases write config files by hand; one case reads a real
folder written by ``save_pretrained`` (tests/text/conftest.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lastmile.models.errors import ManifestError
from lastmile.models.hf import describe_hf_folder, manifest_parts, task_of_architecture
from lastmile.models.manifest import load_manifest


def _folder(tmp_path: Path, config: dict, *, weights: str = "model.safetensors", files: dict | None = None) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / weights).write_bytes(b"\0" * 8)
    for rel, value in (files or {}).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value if isinstance(value, str) else json.dumps(value))
    return folder


TOKENIZER = {"added_tokens": [{"id": 3, "content": "[PAD]"}], "model": {"vocab": {"[PAD]": 3, "a": 4}}}


@pytest.mark.parametrize("arch, task", [
    ("BertModel", "feature-extraction"),
    ("RobertaForSequenceClassification", "text-classification"),
    ("DistilBertForTokenClassification", "token-classification"),
    ("LlamaForCausalLM", "generate"),
    ("GPT2LMHeadModel", "generate"),
    ("BertForQuestionAnswering", None),
    ("Model", None),
])
def test_task_from_architecture_name(arch: str, task: str | None) -> None:
    assert task_of_architecture(arch) == task


def test_classifier_labels_and_tokenizer_from_their_files(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {
        "architectures": ["BertForSequenceClassification"], "model_type": "bert", "hidden_size": 8,
        "max_position_embeddings": 512, "id2label": {"1": "spam", "0": "ham"}, "vocab_size": 5,
    }, files={"tokenizer.json": TOKENIZER,
              "tokenizer_config.json": {"model_max_length": 128, "padding_side": "left", "pad_token": "[PAD]"}})
    desc = describe_hf_folder(folder)
    assert desc.task == "text-classification" and desc.labels == ("ham", "spam")
    assert desc.max_length == 128 and desc.derived["max_length"][1] == "tokenizer_config.json model_max_length"
    assert desc.tokenizer.padding_side == "left" and desc.tokenizer.pad_id == 3
    assert desc.derived["labels"] == (["ham", "spam"], "config.json id2label")
    _, inputs, outputs, _ = manifest_parts(folder)
    assert [s.name for s in inputs] == ["text_utf8", "text_len"]
    assert [(s.name, s.shape) for s in outputs][:2] == [("logits", (-1, 2)), ("scores", (-1, 2))]


def test_sentence_transformers_pooling_and_normalize(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta", "hidden_size": 16,
                                "max_position_embeddings": 514}, files={
        "tokenizer.json": TOKENIZER,
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "1_Pooling/config.json": {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True},
    })
    desc = describe_hf_folder(folder)
    assert desc.pooling.modes == ("cls", "mean") and desc.normalize and desc.sentence_transformers
    assert desc.embedding_dim == 32
    assert desc.max_length == 512  # roberta-style position ids start at 2
    assert desc.derived["pooling"][1] == "1_Pooling/config.json"


def test_plain_model_folder_is_mean_pooled_not_normalized(tmp_path: Path) -> None:
    desc = describe_hf_folder(_folder(tmp_path, {"architectures": ["BertModel"], "hidden_size": 4}))
    assert desc.pooling.modes == ("mean",) and not desc.normalize and desc.tokenizer is None
    _, inputs, _, notes = manifest_parts(desc.path)
    assert [s.name for s in inputs] == ["input_ids", "attention_mask"] and "tokenizer.json" in notes[0]


def test_causal_lm_is_left_to_the_generation_engine(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048})
    desc, inputs, outputs, notes = manifest_parts(folder)
    assert desc.task == "generate" and desc.max_length == 2048 and inputs == () and "generation" in notes[0]


@pytest.mark.parametrize("config, key, words", [
    ({"architectures": ["BertForQuestionAnswering"]}, "architectures", "BertForQuestionAnswering"),
    ({"architectures": []}, "architectures", "architectures"),
    ({"architectures": ["MyModel"], "auto_map": {"AutoModel": "modeling_my.MyModel"}}, "auto_map", "trust_remote_code"),
])
def test_refusals_name_the_reason(tmp_path: Path, config: dict, key: str, words: str) -> None:
    with pytest.raises(ManifestError) as err:
        describe_hf_folder(_folder(tmp_path, config))
    assert err.value.key == key and words in str(err.value)


def test_pickle_weights_need_trust_pickle(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"architectures": ["BertModel"]}, weights="pytorch_model.bin")
    with pytest.raises(ManifestError, match="pickle"):
        load_manifest(folder, "m")  # not even recognised without model.toml naming it
    (folder / "model.toml").write_text('format = "hf"\nartifact = "."\n')
    with pytest.raises(ManifestError) as err:
        load_manifest(folder, "m")
    assert err.value.key == "trust_pickle"
    (folder / "model.toml").write_text('format = "hf"\nartifact = "."\ntrust_pickle = true\n')
    manifest = load_manifest(folder, "m")
    assert manifest.format == "hf" and manifest.hf.weights_format == "pickle"


def test_manifest_text_table_overrides_and_says_so(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"architectures": ["BertModel"], "hidden_size": 4, "max_position_embeddings": 512},
                     files={"tokenizer.json": TOKENIZER})
    (folder / "model.toml").write_text('[text]\npooling = "cls"\nnormalize = true\nmax_length = 32\n')
    manifest = load_manifest(folder, "m")
    assert manifest.hf.pooling.modes == ("cls",) and manifest.hf.normalize and manifest.hf.max_length == 32
    assert manifest.hf.derived["pooling"][1] == "model.toml [text]"
    (folder / "model.toml").write_text('[text]\npooling = "median"\n')
    with pytest.raises(ManifestError) as err:
        load_manifest(folder, "m")
    assert err.value.key == "text.pooling"


def test_describing_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess

    folder = _folder(tmp_path, {"architectures": ["BertModel"], "hidden_size": 4})
    code = ("import sys; from lastmile.models.manifest import load_manifest; "
            f"m = load_manifest({str(folder)!r}, 'm'); assert m.hf.task == 'feature-extraction'; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_real_save_pretrained_folder(encoder_folder: Path) -> None:
    manifest = load_manifest(encoder_folder, "enc")
    assert manifest.format == "hf" and not manifest.missing
    hf = manifest.hf
    assert (hf.task, hf.architecture, hf.max_length, hf.normalize) == ("feature-extraction", "BertModel", 64, True)
    assert "tokenizer.json" in hf.files and "1_Pooling/config.json" in hf.files


def test_no_architectures_is_a_note_not_an_error(tmp_path: Path) -> None:
    manifest = load_manifest(_folder(tmp_path, {"model_type": "bert"}), "m")
    assert manifest.hf is None and manifest.inputs == () and "[text]" in manifest.missing[0]
    (manifest.path / "model.toml").write_text('[text]\ntask = "feature-extraction"\n')
    assert load_manifest(manifest.path, "m").hf.task == "feature-extraction"
