"""A bare Hugging Face folder (written by ``save_pretrained`` in the test session, no
model.toml) served by a real daemon: text over V2 (JSON and binary BYTES, tritonclient too) and
over ``/v1/embeddings`` with the ``openai`` package as the client (Unix socket and TCP with the
token as api_key); answers compared with transformers + the pooling formula computed here;
bad inputs are 400s naming the field; the derived spec survives a daemon restart."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path
from typing import Iterator

import httpx2 as httpx  # the HTTP client the openai package is built on (httpx2 = httpx 2.x)
import numpy as np
import pytest

from tests.conftest import DaemonProc, start_daemon, start_tcp_daemon

openai = pytest.importorskip("openai")
TOKEN = "text-tests-token"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello", "Memory limits must hold, and unload must free memory."]


@pytest.fixture(scope="module")
def text_store(encoder_folder: Path, classifier_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("textstore")
    shutil.copytree(encoder_folder, store / "enc")
    shutil.copytree(classifier_folder, store / "clf")
    from lastmile.appliance.client.cli import main

    # the operator's way to an ONNX Runtime copy: lastmile models import enc --to onnx
    assert main(["models", "import", "enc", "--to", "onnx", "--store", str(store)]) == 0
    return store


@pytest.fixture(scope="module")
def served(text_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, int]]:
    daemon, port = start_tcp_daemon(tmp_path_factory.mktemp("textd"), text_store, TOKEN)
    with _client(daemon) as http:
        for name in ("enc", "clf", "enc-onnx"):
            r = http.post(f"/v2/repository/models/{name}/load", json={"parameters": {"max_batch_size": 8}}, timeout=120)
            assert r.status_code == 200, r.text
    yield daemon, port
    daemon.stop()


def _client(daemon: DaemonProc) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://lastmile", timeout=60)


def reference(folder: Path, texts: list[str], *, classify: bool = False) -> np.ndarray:
    """transformers' own tokenizer and model; mean pooling over the mask, L2 normalized (the
    sentence-transformers formula, written out here)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        if classify:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
            return torch.softmax(model(**batch).logits, -1).numpy()
        model = transformers.AutoModel.from_pretrained(str(folder)).eval()
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def test_bare_folder_loads_with_derived_metadata(served: tuple[DaemonProc, int]) -> None:
    daemon, _ = served
    with _client(daemon) as http:
        meta = http.get("/v2/models/enc").json()
        assert meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
        assert {"name": "embeddings", "datatype": "FP32", "shape": [-1, 32]} in meta["outputs"]
        row = next(m for m in http.get("/lm/v1/models").json()["store"] if m["name"] == "enc")
        assert row["text"]["derived"]["normalize"]["from"].startswith("modules.json")
        assert row["text"]["derived"]["pooling"]["from"] == "1_Pooling/config.json"
        clf = http.get("/v2/models/clf").json()
        assert {"name": "label", "datatype": "BYTES", "shape": [-1]} in clf["outputs"]


def test_v2_text_equals_transformers(served: tuple[DaemonProc, int], encoder_folder: Path) -> None:
    daemon, _ = served
    expected = reference(encoder_folder, TEXTS)
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    with _client(daemon) as http:
        r = http.post("/v2/models/enc/infer", json=body)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        got = np.asarray(out["embeddings"]["data"], dtype=np.float32).reshape(out["embeddings"]["shape"])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(encoder_folder))
        assert out["token_count"]["data"] == [len(ids) for ids in tok(TEXTS)["input_ids"]]
        # the binary BYTES layout (4-byte little-endian length + bytes), binary output back
        raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
        header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)],
                                         "parameters": {"binary_data_size": len(raw)}}],
                             "outputs": [{"name": "embeddings", "parameters": {"binary_data": True}}]}).encode()
        r = http.post("/v2/models/enc/infer", content=header + raw,
                      headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 200, r.text
        split = int(r.headers["Inference-Header-Content-Length"])
        got = np.frombuffer(r.content[split:], dtype=np.float32).reshape(len(TEXTS), 32)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_token_ids_and_hidden_states(served: tuple[DaemonProc, int], encoder_folder: Path) -> None:
    import transformers

    daemon, _ = served
    tok = transformers.AutoTokenizer.from_pretrained(str(encoder_folder))
    ids = tok(TEXTS[:1])["input_ids"]
    with _client(daemon) as http:
        r = http.post("/v1/embeddings", json={"model": "enc", "input": ids})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], reference(encoder_folder, TEXTS[:1])[0], atol=1e-4)
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]}],
                "outputs": [{"name": "last_hidden_state"}, {"name": "token_count"}]}
        out = {o["name"]: o for o in http.post("/v2/models/enc/infer", json=body).json()["outputs"]}
        assert out["last_hidden_state"]["shape"] == [2, len(ids[0]), 32]


def test_classification_labels_match(served: tuple[DaemonProc, int], classifier_folder: Path) -> None:
    daemon, _ = served
    expected = reference(classifier_folder, TEXTS, classify=True)
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    with _client(daemon) as http:
        r = http.post("/v2/models/clf/infer", json=body)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
    labels = ["negative", "positive"]
    assert out["label"]["data"] == [labels[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose(np.asarray(out["scores"]["data"]).reshape(expected.shape), expected, atol=1e-4)


def test_openai_client_over_unix_socket_and_tcp(served: tuple[DaemonProc, int], encoder_folder: Path) -> None:
    daemon, port = served
    expected = reference(encoder_folder, TEXTS)
    uds = openai.OpenAI(base_url="http://lastmile/v1", api_key="unused-on-the-socket",
                        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket))))
    tcp = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN)
    for client in (uds, tcp):
        assert "enc" in [m.id for m in client.models.list().data]
        result = client.embeddings.create(model="enc", input=TEXTS)  # base64 on the wire (the client's default)
        np.testing.assert_allclose(np.array([d.embedding for d in result.data]), expected, atol=1e-4)
        assert result.usage.prompt_tokens > len(TEXTS) * 2
        single = client.embeddings.create(model="enc", input=TEXTS[1], encoding_format="float")
        np.testing.assert_allclose(single.data[0].embedding, expected[1], atol=1e-4)
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="enc", input="x")


@pytest.mark.parametrize("body, field", [
    ({"model": "enc", "input": 5}, "input"),
    ({"model": "enc", "input": []}, "input"),
    ({"model": "enc", "input": ["ok", 3]}, "input[1]"),
    ({"model": "enc", "input": "word " * 200}, "input"),
    ({"model": "enc", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "clf", "input": "x"}, "model"),
    ({"model": "nope", "input": "x"}, "model"),
])
def test_openai_bad_inputs_are_4xx_naming_the_param(served: tuple[DaemonProc, int], body: dict, field: str) -> None:
    daemon, _ = served
    with _client(daemon) as http:
        r = http.post("/v1/embeddings", json=body)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] and error["message"]


def test_too_long_says_token_count_unless_truncated(served: tuple[DaemonProc, int], encoder_folder: Path) -> None:
    import transformers

    daemon, _ = served
    long_text = "the quick brown fox " * 30
    tok = transformers.AutoTokenizer.from_pretrained(str(encoder_folder))
    short, full = (len(ids) for ids in tok(["short", long_text])["input_ids"])
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["short", long_text]}]}
    with _client(daemon) as http:
        r = http.post("/v2/models/enc/infer", json=v2)
        assert r.status_code == 400 and r.json()["field"] == "inputs[0].data[1]"
        assert f"{full} tokens" in r.json()["error"] and "at most 64" in r.json()["error"]
        r = http.post("/v2/models/enc/infer", json={**v2, "parameters": {"truncate": True}})
        assert r.status_code == 200
        counts = {o["name"]: o for o in r.json()["outputs"]}["token_count"]["data"]
        assert counts == [short, 64]
        r = http.post("/v1/embeddings", json={"model": "enc", "input": long_text, "truncate": True})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 64


@pytest.mark.parametrize("tensor, field", [
    ({"name": "text", "datatype": "BYTES", "shape": [1], "data": [7]}, "inputs[0].data[0]"),
    ({"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}, "inputs[0].datatype"),
    ({"name": "text", "datatype": "BYTES", "shape": [0], "data": []}, "inputs[0].shape"),
    ({"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["x"]}, "inputs[0].name"),
])
def test_v2_bad_inputs_are_400_naming_the_field(served: tuple[DaemonProc, int], tensor: dict, field: str) -> None:
    daemon, _ = served
    with _client(daemon) as http:
        r = http.post("/v2/models/enc/infer", json={"inputs": [tensor]})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field


def test_non_utf8_bytes_are_400(served: tuple[DaemonProc, int]) -> None:
    daemon, _ = served
    lone = b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}'  # a lone surrogate
    with _client(daemon) as http:
        r = http.post("/v2/models/enc/infer", content=lone, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["field"] == "inputs[0].data[0]", r.text
        r = http.post("/v1/embeddings", content=b'{"model":"enc","input":["\\ud800"]}', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[0]", r.text
    raw = struct.pack("<I", 3) + b"a\xffb"
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    with _client(daemon) as http:
        r = http.post("/v2/models/enc/infer", content=header + raw, headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and r.json()["field"] == "inputs[0].data[0]" and "UTF-8" in r.json()["error"]


def test_tritonclient_sends_text(served: tuple[DaemonProc, int], encoder_folder: Path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    _, port = served
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    tensor = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object), binary_data=True)
    result = client.infer("enc", [tensor], outputs=[httpclient.InferRequestedOutput("embeddings", binary_data=True)],
                          headers={"Authorization": f"Bearer {TOKEN}"})
    np.testing.assert_allclose(result.as_numpy("embeddings"), reference(encoder_folder, TEXTS), atol=1e-4)


def test_derived_spec_survives_a_restart(served: tuple[DaemonProc, int], text_store: Path, tmp_path: Path) -> None:
    daemon, _ = served
    with _client(daemon) as http:
        before = http.get("/v2/models/enc").json()
    state = tmp_path / "state.json"  # what the running daemon saved: enc and clf loaded
    shutil.copy(daemon.home / "state.json", state)
    again = start_daemon(tmp_path / "again", text_store, state_file=state)
    try:
        with _client(again) as http:
            for _ in range(240):
                r = http.get("/v2/models/enc/ready")
                if r.status_code == 200:
                    break
                time.sleep(0.5)
            assert http.get("/v2/models/enc").json() == before
            r = http.post("/v2/models/enc/infer", json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]})
            assert r.status_code == 200
    finally:
        again.stop()


def test_onnx_export_serves_the_same_embeddings(served: tuple[DaemonProc, int], encoder_folder: Path) -> None:
    daemon, _ = served
    expected = reference(encoder_folder, TEXTS)
    with _client(daemon) as http:
        meta = http.get("/v2/models/enc-onnx").json()
        assert meta["platform"] == "onnxruntime_onnx" and meta["inputs"][0]["datatype"] == "BYTES"
        r = http.post("/v1/embeddings", json={"model": "enc-onnx", "input": TEXTS, "encoding_format": "float"})
        assert r.status_code == 200, r.text
    np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], expected, atol=1e-4)


def test_cli_infer_text_and_models_derivation(served: tuple[DaemonProc, int], capsys: pytest.CaptureFixture) -> None:
    from lastmile.appliance.client.cli import main

    daemon, _ = served
    assert main(["infer", "enc", "--text", "hello", "--text", "the fox", "--socket", str(daemon.socket)]) == 0
    out = capsys.readouterr().out
    assert "embeddings: shape [2, 32] FP32" in out and "|v| = 1.0000" in out
    assert main(["infer", "clf", "--text", "I love this product", "--socket", str(daemon.socket)]) == 0
    out = capsys.readouterr().out
    assert ("positive" in out or "negative" in out) and "scores" in out
    assert main(["models", "--socket", str(daemon.socket)]) == 0
    out = capsys.readouterr().out
    assert "enc: BertModel -> feature-extraction" in out and "(from 1_Pooling/config.json)" in out


async def test_tui_playground_sends_text(served: tuple[DaemonProc, int]) -> None:
    from textual.widgets import Input, RichLog

    from lastmile.appliance.client.api import LastmileClient
    from lastmile.tui.app import LastmileApp
    from tests.tui.conftest import wait_until

    daemon, _ = served
    app = LastmileApp(LastmileClient(daemon.socket), rate_hz=10)
    async with app.run_test(size=(160, 48)) as pilot:
        step = lambda: pilot.pause(0.05)  # noqa: E731
        await pilot.press("p")
        screen = app.screen
        await wait_until(lambda: "enc" in getattr(screen, "_names", ()), step=step, what="enc in the model picker")
        screen.select_model("enc")
        screen.query_one("#p-text", Input).value = "hello || the quick brown fox"
        screen.action_send_text()
        log = screen.query_one("#p-output", RichLog)
        shown = lambda: "\n".join(line.text for line in log.lines)  # noqa: E731
        await wait_until(lambda: "embeddings: shape [2, 32]" in shown(), step=step, what="the embeddings in the log")
