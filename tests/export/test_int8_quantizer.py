"""Dynamic int8 quantization of a stripped graph keeps its weights on disk, Gemm weights included."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgediff.exporter import optimize as opt
from edgediff.exporter.weights import spill


def _gemm_graph(rng) -> onnx.ModelProto:
    """y = x W^T + b, as torch exports ``nn.Linear`` on 2-D input (SD3's adaLN modulations)."""
    weight = numpy_helper.from_array(rng.standard_normal((96, 64)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "bias")
    gemm = helper.make_node("Gemm", ["x", "weight", "bias"], ["y"], name="linear", transB=1)
    graph = helper.make_graph([gemm], "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 96])], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_gemm_weights_never_join_the_graph_during_int8_quantization(tmp_path, monkeypatch):
    """ONNX Runtime's quantizer transposed each Gemm weight into the graph, then serialized the graph for
    shape inference: past 2 GB of such weights (SD 3.5 Medium's transformer) that failed with "Failed
    to serialize proto". Every graph shape inference sees must stay stripped (weights on disk)."""
    rng = np.random.default_rng(0)
    model = _gemm_graph(rng)
    spill(model, tmp_path, "weights.bin")
    stripped = model.ByteSize()
    seen = []
    infer_shapes = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes",
                        lambda m, *args, **kwargs: seen.append(m.ByteSize()) or infer_shapes(m, *args, **kwargs))

    quantized = opt.quantize_int8(model, tmp_path)

    assert seen and max(seen) < stripped + 2048, (stripped, seen)  # the weight is 24 KB of fp32
    assert [n.op_type for n in quantized.graph.node if n.op_type in ("Gemm", "MatMulInteger")] == ["MatMulInteger"]
