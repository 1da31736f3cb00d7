"""One input generator for tune, bench, the demo and the playground: inputs within each
input's valid range (a manifest's ``range``, a text model's vocabulary), or the operator's
``--input-data`` file checked against the spec, every refusal one line naming the input.
The embedding model is real (ONNX Gather over a 10-row table, served by a real daemon): an id
of 10 or more fails there, which is what random ids up to 63 did to every small vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lastmile.appliance.client.inputs import InputDataError, load_input_data, random_inputs
from tests.appliance.test_cli import lastmile
from tests.conftest import DaemonProc, start_daemon

VOCAB = 10
SPEC = [{"name": "ids", "datatype": "INT64", "shape": [-1, -1], "range": [0, VOCAB]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


def test_generated_inputs_respect_ranges_masks_and_shapes() -> None:
    arrays, types = random_inputs(SPEC, rows=64, seq=32, seed=1)
    assert arrays["ids"].shape == (64, 32) and 0 <= arrays["ids"].min() and arrays["ids"].max() == VOCAB - 1
    assert (arrays["attention_mask"] == 1).all() and arrays["x"].shape == (64, 4) and arrays["x"].dtype == np.float32
    assert types == {"ids": "INT64", "attention_mask": "INT64", "x": "FP32"}
    no_range = random_inputs([{"name": "category", "datatype": "INT32", "shape": [-1]}], rows=100)[0]["category"]
    assert set(no_range.tolist()) <= {0, 1}  # valid for any table when nothing says more
    with pytest.raises(InputDataError, match="'text'.*--input-data"):
        random_inputs([{"name": "text", "datatype": "BYTES", "shape": [-1]}])


def test_input_data_files_npz_and_json_and_one_line_refusals(tmp_path: Path) -> None:
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    np.savez(tmp_path / "ok.npz", ids=ids, attention_mask=np.ones_like(ids), x=np.zeros((2, 4), np.float64))
    arrays, types = load_input_data(tmp_path / "ok.npz", SPEC)
    assert arrays["x"].dtype == np.float32 and (arrays["ids"] == ids).all() and types["x"] == "FP32"
    (tmp_path / "v2.json").write_text(json.dumps({"inputs": [
        {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": ids.ravel().tolist()},
        {"name": "attention_mask", "shape": [2, 3], "datatype": "INT64", "data": [1] * 6},
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}))
    assert load_input_data(tmp_path / "v2.json", SPEC)[0]["x"].shape == (2, 4)
    cases = {
        "missing.json": ({"ids": [[1]], "x": [[0, 0, 0, 0]]}, "'attention_mask' is missing"),
        "unknown.json": ({"ids": [[1]], "attention_mask": [[1]], "x": [[0, 0, 0, 0]], "y": [1]}, "'y' is not an input"),
        "shape.json": ({"ids": [[1]], "attention_mask": [[1]], "x": [[0, 0, 0]]}, r"'x' has shape \[1, 3\]"),
        "rows.json": ({"ids": [[1], [2]], "attention_mask": [[1], [1]], "x": [[0, 0, 0, 0]]}, "'x' has 1 rows"),
        "dtype.json": ({"ids": [[1.5]], "attention_mask": [[1]], "x": [[0, 0, 0, 0]]}, "'ids'.*floats are not converted"),
    }
    for name, (body, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(body))
        with pytest.raises(InputDataError, match=message) as info:
            load_input_data(tmp_path / name, SPEC)
        assert "\n" not in str(info.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputDataError, match="cannot read it"):
        load_input_data(tmp_path / "bad.json", SPEC)


def _embedding_store(store: Path) -> None:
    """A bare ONNX embedding lookup over a 10-row table, with a manifest giving its range."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(VOCAB * 8, dtype=np.float32).reshape(VOCAB, 8), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0)], "embed",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", 8])], [table])
    folder = store / "embed"
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    (folder / "model.toml").write_text('format = "onnx"\nartifact = "model.onnx"\n\n[settings]\nmax_batch_size = 8\n\n'
                                       '[[inputs]]\nname = "ids"\ndatatype = "INT64"\nshape = [-1, -1]\nrange = [0, 10]\n\n'
                                       '[[outputs]]\nname = "emb"\ndatatype = "FP32"\nshape = [-1, -1, 8]\n')


@pytest.fixture(scope="module")
def embed_daemon(demo_store: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("embed")
    store = home / "store"
    shutil.copytree(demo_store / "demo-mlp", store / "demo-mlp")
    _embedding_store(store)
    proc = start_daemon(home, store)
    yield proc
    proc.stop()


def test_tune_on_a_small_vocabulary_and_a_bad_data_file(embed_daemon: DaemonProc, tmp_path: Path) -> None:
    """The tune's requests stay inside the 10-id table and succeed; a data file with an id of 12
    stops the tune at its first request, with one line, before any trial."""
    sock = ["--socket", str(embed_daemon.socket)]
    assert lastmile(*sock, "load", "embed").returncode == 0
    ok = lastmile(*sock, "tune", "embed", "--batch-sizes", "2", "--delays-ms", "0", "--clients", "2", "--duration-s", "0.3", "--json")
    assert ok.returncode == 0, ok.stderr
    trial = json.loads(ok.stdout)["trials"][0]
    assert trial["errors"] == 0 and trial["rows_per_s"] > 0
    np.savez(tmp_path / "bad.npz", ids=np.array([[1, 12]]))
    bad = lastmile(*sock, "tune", "embed", "--input-data", str(tmp_path / "bad.npz"), "--batch-sizes", "2", "--delays-ms", "0",
                   "--duration-s", "0.3")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "refuses the tune's request" in bad.stderr and "--input-data" in bad.stderr
    assert "E:onnxruntime" not in embed_daemon.log_text()  # the error went to the client, not as raw ORT lines to the log
    listing = json.loads(lastmile(*sock, "models", "--json").stdout)
    assert next(e for e in listing["store"] if e["name"] == "embed")["inputs"][0]["range"] == [0, VOCAB]
