"""The runtime's own ONNX reader (no onnx package) sees the graphs as the onnx package does."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgediff.runtime.graph_info import read_graph


@pytest.mark.parametrize("key", [("sd1", "fp32"), ("sd2", "fp16")])
@pytest.mark.parametrize("graph", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_reader_matches_onnx(tiny_exports, key, graph):
    path = tiny_exports[key] / graph / "model.onnx"
    ours, theirs = read_graph(path), onnx.load(str(path))
    assert [(n.op_type, n.inputs, n.outputs) for n in ours.nodes] == [
        (n.op_type, list(n.input), list(n.output)) for n in theirs.graph.node]
    assert ours.shapes == {t.name: tuple(t.dims) for t in theirs.graph.initializer}
    assert ours.weight_bytes == sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                                    for t in theirs.graph.initializer)
    for mine, node in zip(ours.nodes, theirs.graph.node):
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.INTS:
                assert mine.ints[attribute.name] == list(attribute.ints)
            elif attribute.type == onnx.AttributeProto.INT:
                assert mine.ints[attribute.name] == [attribute.i]
