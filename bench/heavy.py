"""``bench-mlp-heavy``: a compute-heavy bare ONNX MLP (1024 -> 4096 -> 4096 -> 1024, ReLU, fp32,
~100 MB) for the benchmark, built deterministically (fixed seed) into the bench's store on first
use. The demo models cost a few microseconds per row, so a served figure on them measures the
server; this one costs ~0.3-0.4 ms per row on one core, so it shows how close serving comes to
the backend when the model is the work (docs/performance.md measured the request path on it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HEAVY_MODEL = "bench-mlp-heavy"
WIDTHS = (1024, 4096, 4096, 1024)


def build_heavy(store: str | Path, name: str = HEAVY_MODEL, seed: int = 0) -> Path:
    """Write ``store/name/model.onnx`` (input ``x`` FP32 [-1, 1024], output ``y``) atomically;
    no manifest: the store reads the signature from the graph, as for any bare ONNX file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, last = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [last, f"w{i}", f"b{i}"], [f"h{i}"]))
        last = f"h{i}"
        if i < len(WIDTHS) - 2:
            nodes.append(helper.make_node("Relu", [last], [f"r{i}"]))
            last = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTHS[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTHS[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lastmile-bench")
    folder = Path(store) / name
    tmp = Path(store) / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(tmp / "model.onnx"))
    tmp.rename(folder)
    return folder
