"""A real BERT client (issue 21, item 4): a Hugging Face tokenizer returns ``input_ids``,
``attention_mask`` and ``token_type_ids``; a bare BERT sentence-transformers folder takes all
three over V2 (listed in its metadata, the segment ids reaching the model: the answer equals
transformers' with the same ids), while a DistilBERT folder, whose architecture has no segment
ids, lists and takes only the first two (400 naming the input otherwise)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import httpx2 as httpx
import numpy as np
import pytest

from lastmile.models.hf import describe_hf_folder, token_id_inputs
from tests.conftest import DaemonProc, start_daemon

TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello"]


def build_distilbert_folder(folder: Path) -> Path:
    """A tiny DistilBertModel folder with the same tokenizer as the BERT demo folders."""
    import torch
    import transformers

    from lastmile.models.demo_text import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config = transformers.DistilBertConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=128, pad_token_id=tok.token_to_id("[PAD]"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.DistilBertModel(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                         sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
                                         model_input_names=["input_ids", "attention_mask"]).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def distil_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_distilbert_folder(tmp_path_factory.mktemp("hf") / "distil")


@pytest.fixture(scope="module")
def served(encoder_folder: Path, distil_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    store = tmp_path_factory.mktemp("ttstore")
    shutil.copytree(encoder_folder, store / "bert")
    shutil.copytree(distil_folder, store / "distil")
    daemon = start_daemon(tmp_path_factory.mktemp("ttd"), store)
    try:
        with _client(daemon) as http:
            for name in ("bert", "distil"):
                r = http.post(f"/v2/repository/models/{name}/load", json={"parameters": {}}, timeout=120)
                assert r.status_code == 200, r.text
        yield daemon
    finally:
        daemon.stop()


def _client(daemon: DaemonProc) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://lastmile", timeout=60)


def _tokenized(folder: Path, pair: bool = False) -> dict[str, np.ndarray]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    types = "token_type_ids" in tok.model_input_names or folder.name != "distil"  # what a BERT client sends
    if pair:
        return dict(tok(TEXTS, ["a second segment", "and another"], padding=True, return_tensors="np", return_token_type_ids=types))
    return dict(tok(TEXTS, padding=True, return_tensors="np", return_token_type_ids=types))


def _v2(batch: dict[str, np.ndarray]) -> dict:
    return {"inputs": [{"name": k, "datatype": "INT64", "shape": list(v.shape), "data": v.astype(np.int64).ravel().tolist()}
                       for k, v in batch.items()]}


def _reference(folder: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}).last_hidden_state
    mask = torch.from_numpy(batch["attention_mask"].astype(np.float32)).unsqueeze(-1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def test_inputs_follow_the_architecture(encoder_folder: Path, distil_folder: Path) -> None:
    assert [s.name for s in token_id_inputs(describe_hf_folder(encoder_folder))] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [s.name for s in token_id_inputs(describe_hf_folder(distil_folder))] == ["input_ids", "attention_mask"]


def test_bert_takes_what_its_tokenizer_returns(served: DaemonProc, encoder_folder: Path) -> None:
    with _client(served) as http:
        meta = http.get("/v2/models/bert").json()
        names = [t["name"] for t in meta["inputs"]]
        assert names == ["text", "input_ids", "attention_mask", "token_type_ids"], meta
        for pair in (False, True):
            batch = _tokenized(encoder_folder, pair=pair)
            assert "token_type_ids" in batch and (batch["token_type_ids"].any() == pair)
            r = http.post("/v2/models/bert/infer", json=_v2(batch))
            assert r.status_code == 200, r.text
            out = next(o for o in r.json()["outputs"] if o["name"] == "embeddings")
            got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
            np.testing.assert_allclose(got, _reference(encoder_folder, batch), rtol=1e-4, atol=1e-5)
        bad = _tokenized(encoder_folder)
        bad["token_type_ids"] = np.full_like(bad["token_type_ids"], 7)
        r = http.post("/v2/models/bert/infer", json=_v2(bad))
        assert r.status_code == 400 and "token_type_ids" in r.text, r.text


def test_distilbert_lists_and_takes_no_segment_ids(served: DaemonProc, distil_folder: Path) -> None:
    with _client(served) as http:
        meta = http.get("/v2/models/distil").json()
        assert [t["name"] for t in meta["inputs"]] == ["text", "input_ids", "attention_mask"], meta
        batch = _tokenized(distil_folder)
        assert "token_type_ids" not in batch
        r = http.post("/v2/models/distil/infer", json=_v2(batch))
        assert r.status_code == 200, r.text
        batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        r = http.post("/v2/models/distil/infer", json=_v2(batch))
        assert r.status_code == 400 and "token_type_ids" in r.text, r.text
