"""The exporter's weight map and the runtime's initializer reader, checked against onnx and torch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgediff.runtime.lora import extract_lora_tags, param_shape
from edgediff.runtime.manifest import read_manifest
from edgediff.runtime.onnx_weights import initializer_index
from tiny_models import build_pipeline


@pytest.mark.parametrize("kind,precision", [("sd1", "fp32"), ("sd1", "fp16"), ("sd2", "fp32")])
def test_every_weight_is_mapped_to_its_values(tiny_exports, kind, precision):
    folder = tiny_exports[kind, precision]
    manifest = read_manifest(folder)
    pipe = build_pipeline(kind)
    for graph in ("unet", "text_encoder"):
        entry = manifest.graphs[graph]
        state = {k: v.numpy() for k, v in getattr(pipe, graph).state_dict().items()}
        wanted = {k for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)}
        assert set(entry.weights) == wanted
        index = initializer_index(folder / entry.path)
        packed = 0
        for key, where in entry.weights.items():
            stored = index[where["init"]].read().astype(np.float32)
            if "cols" in where:
                packed += 1
                stored = stored[:, np.concatenate([np.arange(a, b) for a, b in where["cols"]])]
            if "perm" in where:
                stored = stored.transpose(np.argsort(where["perm"]))
            assert stored.shape == state[key].shape == param_shape(where, index[where["init"]])
            np.testing.assert_allclose(stored, state[key], rtol=1e-3 if precision == "fp16" else 0, atol=1e-7)
        if graph == "unet":
            assert packed == 12  # self-attention q, k, v of 4 blocks sit in fused Attention weights


def test_initializer_reader_matches_onnx(tiny_exports):
    path = tiny_exports["sd1", "fp16"] / "unet" / "model.onnx"
    index = initializer_index(path)
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    floats = {name for name, value in tensors.items() if value.dtype.kind == "f" and value.ndim >= 1}
    assert floats <= set(index)
    for name in floats:
        np.testing.assert_array_equal(index[name].read(), tensors[name])


def test_extract_lora_tags():
    assert extract_lora_tags("a cat <lora:style:0.6>, sunny <lora:detail>") == (
        "a cat , sunny", [("style", 0.6), ("detail", 1.0)])
    assert extract_lora_tags("no tags here") == ("no tags here", [])
    with pytest.raises(Exception, match="bad weight"):
        extract_lora_tags("<lora:x:abc>")
