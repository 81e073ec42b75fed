"""Provider choice, fallback messages and provider options, without a GPU (onnxruntime mocked)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import onnxruntime
import pytest

from edgediff.runtime import sessions
from edgediff.runtime.errors import ModelFolderError, ProviderError
from edgediff.runtime.manifest import GraphEntry, TensorSpec

ENTRY = GraphEntry(path="unet/model.onnx", sha256="", precision="fp16",
                   inputs=[TensorSpec("x", "float16", ("batch", 4))], outputs=[TensorSpec("y", "float16", ("batch", 4))])


@pytest.fixture
def offered(monkeypatch):
    def offer(*names):
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(names))
    return offer


def test_auto_prefers_cuda_then_dml_then_cpu(offered):
    offered("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert sessions.resolve_provider("auto") == "cuda"  # never TensorRT unasked: engine builds take minutes
    offered("DmlExecutionProvider", "CPUExecutionProvider")
    assert sessions.resolve_provider("auto") == "dml"
    offered("CPUExecutionProvider")
    assert sessions.resolve_provider("auto") == "cpu"


def test_forced_provider_missing_names_the_extra(offered):
    offered("CPUExecutionProvider")
    with pytest.raises(ProviderError, match=r"provider 'cuda' is not available .* install edgediff\[cuda\]"):
        sessions.resolve_provider("cuda")
    with pytest.raises(ProviderError, match="unknown provider 'rocm'"):
        sessions.resolve_provider("rocm")


class FakeSession:
    """Stands in for InferenceSession: records its providers, reports ``active`` as running."""
    active = "CPUExecutionProvider"
    created: list = []

    def __init__(self, path, options, providers):
        FakeSession.created.append(providers)

    def get_providers(self):
        return [FakeSession.active]

    # What ENTRY declares, as ONNX Runtime's NodeArg reports it.
    def get_inputs(self):
        return [SimpleNamespace(name="x", type="tensor(float16)", shape=["batch", 4])]

    def get_outputs(self):
        return [SimpleNamespace(name="y", type="tensor(float16)", shape=["batch", 4])]


def test_cuda_fallback_is_reported_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    warnings = []
    session = sessions.GraphSession("unet", tmp_path, ENTRY, "cuda", "cuda", warnings.append)
    assert session.provider == "CPUExecutionProvider"
    assert len(warnings) == 1 and "CUDAExecutionProvider could not start" in warnings[0]
    assert "runs on CPUExecutionProvider" in warnings[0]


def test_tensorrt_options_cache_under_the_model(monkeypatch, tmp_path):
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    monkeypatch.setattr(FakeSession, "active", "TensorrtExecutionProvider")
    FakeSession.created.clear()
    sessions.GraphSession("unet", tmp_path, ENTRY, "tensorrt", "cuda", print)
    (name, options), (fallback, _), cpu = FakeSession.created[0]
    assert name == "TensorrtExecutionProvider" and fallback == "CUDAExecutionProvider"
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    assert Path(options["trt_engine_cache_path"]) == tmp_path / "tensorrt_cache"
    assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]


def test_read_only_model_folder_caches_engines_in_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sessions.os, "access", lambda path, mode: False)
    cache = sessions.tensorrt_cache_dir(tmp_path / "model")
    assert cache == tmp_path / "cache" / "edgediff" / "tensorrt" / "model"


def test_cuda_optimized_graph_on_cpu_says_re_export(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise RuntimeError("Could not find an implementation for GroupNorm(1) node with name 'GroupNorm_0'")

    monkeypatch.setattr(onnxruntime, "InferenceSession", fail)
    with pytest.raises(ModelFolderError, match="optimized for CUDA .* re-export with --optimize-for cpu"):
        sessions.GraphSession("unet", tmp_path, ENTRY, "cpu", "cuda", print)


def test_directml_session_options(monkeypatch, tmp_path):
    seen = {}

    def capture(path, options, providers):
        seen.update(mem=options.enable_mem_pattern, mode=options.execution_mode, providers=providers)
        return FakeSession(path, options, providers)

    monkeypatch.setattr(onnxruntime, "InferenceSession", capture)
    monkeypatch.setattr(FakeSession, "active", "DmlExecutionProvider")
    sessions.GraphSession("unet", tmp_path, ENTRY, "dml", "dml", print)
    assert seen["mem"] is False and seen["mode"] == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert seen["providers"][0] == "DmlExecutionProvider"
