"""Large fp16 graphs validated on the CPU part by part (exporter.graph_parts): the same outputs as one
session, a fraction of its memory, and nothing left beside the graph."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgediff.exporter.graph_parts import run_in_parts, split  # noqa: E402

CPU = ["CPUExecutionProvider"]


def _chain(folder, width, layers, unsorted=False):
    """``layers`` fp16 MatMuls, each with a residual from the graph input (read by every part) and an
    early output (made by the first part, asked for at the end), weights in one external-data file.
    ``unsorted``: the Relus listed last, as the fp16 conversion lists the Casts of its fp32 islands."""
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float16), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
                  helper.make_node("Add", [f"r{i}", "x"], [f"h{i}"])]
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", ["h0"], ["early"]))
    if unsorted:
        nodes = [n for n in nodes if n.op_type != "Relu"] + [n for n in nodes if n.op_type == "Relu"]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT16, [2, width])  # noqa: E731
    graph = helper.make_graph(nodes, "chain", [value("x")], [value(x), value("early")], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return folder / "model.onnx", [x, "early"]


@pytest.mark.parametrize("unsorted", [False, True], ids=["sorted", "unsorted"])
def test_parts_give_the_outputs_of_one_session(tmp_path, unsorted):
    path, outputs = _chain(tmp_path, 256, 6, unsorted)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 256)).astype(np.float16)}
    whole = ort.InferenceSession(str(path), providers=CPU).run(outputs, feed)
    parts = split(onnx.load(str(path), load_external_data=False), 256 * 256 * 2, outputs)
    assert len(parts) == 6  # one weight per part
    got = run_in_parts(path, feed, outputs, CPU, budget=256 * 256 * 2)
    for expected, actual in zip(whole, got):
        np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_each_part_holds_at_most_its_budget(tmp_path):
    path, outputs = _chain(tmp_path, 128, 7)
    model = onnx.load(str(path), load_external_data=False)
    parts = split(model, 3 * 128 * 128 * 2, outputs)
    assert [len(p.graph.initializer) for p in parts] == [3, 3, 1]
    assert {i.name for p in parts for i in p.graph.initializer} == {t.name for t in model.graph.initializer}
    assert all(i.data_location == TensorProto.EXTERNAL for p in parts for i in p.graph.initializer)  # no copies


_PEAK = """
import json, sys
import numpy as np, torch
from edgediff.exporter import validate
from edgediff.runtime.manifest import TensorSpec
validate.PARTS_FP16_BYTES = int(sys.argv[2])
validate.PART_BYTES = 32 * 1024**2
hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
before = hwm()
x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 4096)).astype(np.float32))
outs = json.loads(sys.argv[3])
specs = [TensorSpec("x", "float16", (2, 4096))], [TensorSpec(n, "float16", (2, 4096)) for n in outs]
report = validate.validate([np.zeros((2, 4096))] * 2, sys.argv[1], (x,), *specs, ["CPUExecutionProvider"])
print(json.dumps({"growth": hwm() - before, "finite": all(r["finite"] for r in report.values())}))
"""


def test_validation_in_parts_holds_a_fraction_of_the_fp32_copies(tmp_path):
    """8 x 32 MB of fp16 weights: one CPU session also makes 512 MB of fp32 copies; parts of 32 MB
    hold one weight's copy at a time (plus ONNX Runtime's own first-use memory, which both pay)."""
    path, outputs = _chain(tmp_path, 4096, 8)

    def growth(threshold):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(threshold), json.dumps(outputs)],
                             capture_output=True, text=True, check=True).stdout
        result = json.loads(out.splitlines()[-1])
        assert result["finite"]
        return result["growth"]

    whole, in_parts = growth(2**40), growth(0)
    assert whole > 512 * 1024**2  # the fp32 copies of every weight
    assert in_parts < whole / 2, (in_parts, whole)
