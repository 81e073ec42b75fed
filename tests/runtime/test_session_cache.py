"""The optimized-graph cache: hits, and rebuilds (never crashes, never stale graphs) on any change or damage."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgediff.runtime import session_cache, sessions
from edgediff.runtime.manifest import GraphEntry, TensorSpec, sha256_file


def write_graph(model_dir, scale: float) -> GraphEntry:
    """A Conv + MatMul graph (the Conv takes ONNX Runtime's NCHWc layout path at ENABLE_ALL),
    with weights large enough to go to the cached graph's external-data file on any CPU (8 output
    channels fit AVX2's NCHWc block unpadded, 864 bytes: inline on a CPU without AVX-512)."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((32, 3, 3, 3)) * scale).astype(np.float32)
    proj = (rng.standard_normal((32, 8)) * scale).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "p"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, 8, 8])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(proj, "p")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = model_dir / "unet" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return GraphEntry(path="unet/model.onnx", sha256=sha256_file(path), precision="fp32",
                      inputs=[TensorSpec("x", "float32", ("b", 3, 8, 8))],
                      outputs=[TensorSpec("y", "float32", ("b", 8, 8, 8))])


X = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)


def open_session(model_dir, entry):
    session = sessions.GraphSession("unet", model_dir, entry, "cpu", "cpu", print)
    return session.cache_state, session.run(x=X)[0]


def reference(model_dir, entry):
    plain = onnxruntime.InferenceSession(str(model_dir / entry.path), providers=["CPUExecutionProvider"])
    return plain.run(None, {"x": X})[0]


def entries(model_dir):
    return sorted(p.name for p in (model_dir / "session_cache").iterdir() if not p.name.startswith("."))


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.delenv(session_cache.ENV, raising=False)
    return tmp_path, write_graph(tmp_path, 1.0)


def test_first_session_saves_the_optimized_graph_and_the_next_loads_it(model):
    model_dir, entry = model
    state, first = open_session(model_dir, entry)
    assert state == "built"
    (folder,) = entries(model_dir)
    files = {p.name for p in (model_dir / "session_cache" / folder).iterdir()}
    assert files == {"model.onnx", "model.onnx.data", "meta.json"}
    state, second = open_session(model_dir, entry)
    assert state == "hit"
    np.testing.assert_allclose(first, reference(model_dir, entry), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, first, rtol=1e-6, atol=1e-6)


def test_changed_graph_is_rebuilt_not_served_stale(model):
    model_dir, entry = model
    open_session(model_dir, entry)
    changed = write_graph(model_dir, 3.0)
    state, out = open_session(model_dir, changed)
    assert state == "built"
    np.testing.assert_allclose(out, reference(model_dir, changed), rtol=1e-5, atol=1e-4)
    assert len(entries(model_dir)) == 1  # the old graph's entry is pruned


def test_graph_edited_in_place_with_a_stale_manifest_is_rebuilt(model):
    model_dir, entry = model
    open_session(model_dir, entry)
    changed = write_graph(model_dir, 3.0)
    stale = GraphEntry(**{**changed.__dict__, "sha256": entry.sha256})
    state, out = open_session(model_dir, stale)
    assert state == "built"
    np.testing.assert_allclose(out, reference(model_dir, changed), rtol=1e-5, atol=1e-4)


def test_changed_onnxruntime_version_is_rebuilt(model, monkeypatch):
    model_dir, entry = model
    open_session(model_dir, entry)
    monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".post9")
    assert open_session(model_dir, entry)[0] == "built"
    assert open_session(model_dir, entry)[0] == "hit"


@pytest.mark.parametrize("damage", ["graph garbage", "data truncated", "data rewritten", "meta corrupt",
                                    "meta missing", "garbage that matches its meta"])
def test_damaged_entry_is_rebuilt(model, damage):
    model_dir, entry = model
    open_session(model_dir, entry)
    (folder,) = entries(model_dir)
    folder = model_dir / "session_cache" / folder
    graph, data, meta = folder / "model.onnx", folder / "model.onnx.data", folder / "meta.json"
    if damage == "graph garbage":
        graph.write_bytes(b"\0" * graph.stat().st_size)
    elif damage == "data truncated":
        data.write_bytes(data.read_bytes()[:-16])
    elif damage == "data rewritten":
        data.write_bytes(bytes(255 - b for b in data.read_bytes()))
    elif damage == "meta corrupt":
        meta.write_text("{not json")
    elif damage == "meta missing":
        meta.unlink()
    else:  # a file whose recorded hash matches but that ONNX Runtime cannot load
        graph.write_bytes(b"not a protobuf at all")
        recorded = json.loads(meta.read_text())
        recorded["files"]["model.onnx"] = {"size": graph.stat().st_size, "sha256": sha256_file(graph)}
        meta.write_text(json.dumps(recorded))
    state, out = open_session(model_dir, entry)
    assert state == "built"
    np.testing.assert_allclose(out, reference(model_dir, entry), rtol=1e-5, atol=1e-5)
    assert open_session(model_dir, entry)[0] == "hit"


def test_read_only_model_folder_caches_in_the_user_cache(model, monkeypatch, tmp_path):
    model_dir, entry = model
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    monkeypatch.setattr(session_cache.os, "access", lambda path, mode: False)
    root = session_cache.cache_root(model_dir)
    assert root.parent == tmp_path / "user" / "edgediff" / "session_cache"
    assert open_session(model_dir, entry)[0] == "built"
    assert any(root.iterdir())


def test_cache_can_be_moved_or_switched_off(model, monkeypatch, tmp_path):
    model_dir, entry = model
    monkeypatch.setenv(session_cache.ENV, "off")
    assert open_session(model_dir, entry)[0] == "off"
    assert not (model_dir / "session_cache").exists()
    monkeypatch.setenv(session_cache.ENV, str(tmp_path / "elsewhere"))
    assert open_session(model_dir, entry)[0] == "built"
    assert open_session(model_dir, entry)[0] == "hit"
    assert not (model_dir / "session_cache").exists()


def test_key_covers_provider_options_runtime_and_cpu(monkeypatch, tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"graph")
    base = dict(graph_sha256="ab", source=source, provider="cuda",
                provider_options=[("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})],
                runtime={"onnxruntime": "1.32.0", "device": "GPU"}, level="ORT_ENABLE_ALL")
    key = session_cache.cache_key(**base)
    assert session_cache.cache_key(**base) == key
    for change in ({"graph_sha256": "cd"}, {"provider": "cpu"}, {"level": "ORT_ENABLE_EXTENDED"},
                   {"provider_options": [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "DEFAULT"})]},
                   {"runtime": {"onnxruntime": "1.33.0", "device": "GPU"}}):
        assert session_cache.cache_key(**{**base, **change}) != key, change
    monkeypatch.setattr(session_cache, "cpu_fingerprint", lambda: "another processor|avx2")
    assert session_cache.cache_key(**base) != key


def open_openvino(model_dir, entry):
    session = sessions.GraphSession("unet", model_dir, entry, "openvino", "none", print, threads=1)
    return session.cache_state, session.run(x=X)[0]


@pytest.mark.parametrize("damage", [None, "truncated", "overwritten", "changed graph"])
def test_openvino_compiled_cache_hits_and_rebuilds(model, monkeypatch, damage):
    """OpenVINO's runtime (the openvino package; CI installs it with the test extra) at fp32: a hit
    gives the same outputs; a damaged blob is recompiled and a changed graph gets a new folder."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("EDGEDIFF_OPENVINO_PRECISION", "FP32")
    model_dir, entry = model
    state, first = open_openvino(model_dir, entry)
    assert state == "built"
    np.testing.assert_allclose(first, reference(model_dir, entry), rtol=1e-4, atol=1e-4)
    (folder,) = (model_dir / "session_cache" / "openvino").iterdir()
    (blob,) = folder.glob("*.blob")
    if damage == "truncated":
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    elif damage == "overwritten":
        blob.chmod(0o644)
        blob.write_bytes(bytes(255 - b for b in blob.read_bytes()))
    elif damage == "changed graph":
        entry = write_graph(model_dir, 3.0)
    state, out = open_openvino(model_dir, entry)
    assert state == ("built" if damage == "changed graph" else "hit")  # OpenVINO recompiles bad blobs itself
    np.testing.assert_allclose(out, reference(model_dir, entry), rtol=1e-4, atol=1e-3)
    assert len(list((model_dir / "session_cache" / "openvino").iterdir())) == 1
