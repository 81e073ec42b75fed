"""Provider choice, fallback messages and provider options, without a GPU (onnxruntime mocked)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest

from edgediff.runtime import sessions
from edgediff.runtime.errors import ModelFolderError, ProviderError
from edgediff.runtime.manifest import GraphEntry, TensorSpec

ENTRY = GraphEntry(path="unet/model.onnx", sha256="", precision="fp16",
                   inputs=[TensorSpec("x", "float16", ("batch", 4))], outputs=[TensorSpec("y", "float16", ("batch", 4))])


@pytest.fixture
def offered(monkeypatch):
    """ONNX Runtime offers ``names``; "OpenVINO" among them stands for an installed openvino package."""
    def offer(*names):
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [n for n in names if n != "OpenVINO"])
        monkeypatch.setattr(sessions.openvino_session, "available", lambda: "OpenVINO" in names)
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


def test_auto_takes_openvino_only_after_gpus(offered):
    offered("OpenVINO", "CPUExecutionProvider")
    assert sessions.resolve_provider("openvino") == "openvino"
    offered("CUDAExecutionProvider", "OpenVINO", "CPUExecutionProvider")
    assert sessions.resolve_provider("auto") == "cuda"
    offered("CPUExecutionProvider")
    with pytest.raises(ProviderError, match=r"install edgediff\[openvino\]"):
        sessions.resolve_provider("openvino")


class SavingSession(FakeSession):
    """Writes the optimized graph where ONNX Runtime would (options.optimized_model_filepath)."""
    seen: list = []

    def __init__(self, path, options, providers):
        super().__init__(path, options, providers)
        SavingSession.seen.append((path, options.graph_optimization_level, options.optimized_model_filepath))
        if options.optimized_model_filepath:
            Path(options.optimized_model_filepath).write_bytes(b"optimized " + Path(path).name.encode())


@pytest.fixture
def saving(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEDIFF_SESSION_CACHE", raising=False)
    monkeypatch.setattr(onnxruntime, "InferenceSession", SavingSession)
    SavingSession.seen.clear()
    FakeSession.created.clear()
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.onnx").write_bytes(b"graph")
    return tmp_path


def test_cuda_sessions_share_the_optimized_graph_cache(saving, monkeypatch):
    monkeypatch.setattr(FakeSession, "active", "CUDAExecutionProvider")
    first = sessions.GraphSession("unet", saving, ENTRY, "cuda", "cuda", print)
    second = sessions.GraphSession("unet", saving, ENTRY, "cuda", "cuda", print)
    assert (first.cache_state, second.cache_state) == ("built", "hit")
    (built_from, built_level, target), (loaded_from, loaded_level, _) = SavingSession.seen
    assert built_from.endswith("unet/model.onnx") and target
    assert built_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert loaded_level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert Path(loaded_from).parent.parent == saving / "session_cache"
    assert FakeSession.created[0][0] == ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested",
                                                                   "cudnn_conv_algo_search": "HEURISTIC"})


def test_cudnn_search_choice_is_an_option_and_part_of_the_key(saving, monkeypatch):
    monkeypatch.setattr(FakeSession, "active", "CUDAExecutionProvider")
    sessions.GraphSession("unet", saving, ENTRY, "cuda", "cuda", print)
    monkeypatch.setenv("EDGEDIFF_CUDNN_CONV_ALGO_SEARCH", "default")
    session = sessions.GraphSession("unet", saving, ENTRY, "cuda", "cuda", print)
    assert session.cache_state == "built"
    assert FakeSession.created[-1][0][1]["cudnn_conv_algo_search"] == "DEFAULT"


def test_cuda_falling_back_to_cpu_caches_nothing(saving, monkeypatch):
    monkeypatch.setattr(FakeSession, "active", "CPUExecutionProvider")
    warnings = []
    session = sessions.GraphSession("unet", saving, ENTRY, "cuda", "cuda", warnings.append)
    assert session.cache_state == "off" and len(warnings) == 1
    assert not [p for p in (saving / "session_cache").iterdir()]


class FakeOpenVINO:
    """Stands in for openvino_session.OpenVINOSession: records how it was compiled, writes a blob."""
    created: list = []

    def __init__(self, path, device, config, cache_dir, names):
        FakeOpenVINO.created.append((path, device, config, cache_dir))
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            (cache_dir / "1234.blob").write_bytes(b"compiled")

    get_inputs, get_outputs = FakeSession.get_inputs, FakeSession.get_outputs


@pytest.fixture
def openvino(saving, monkeypatch):
    monkeypatch.setattr(sessions.openvino_session, "OpenVINOSession", FakeOpenVINO)
    monkeypatch.setattr(sessions.openvino_session, "version", lambda: "2025.4.1")
    FakeOpenVINO.created.clear()
    return saving


def test_openvino_compiles_once_into_a_keyed_cache_folder(openvino, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_OPENVINO_PRECISION", "bf16")
    first = sessions.GraphSession("unet", openvino, ENTRY, "openvino", "none", print, threads=3)
    second = sessions.GraphSession("unet", openvino, ENTRY, "openvino", "none", print, threads=3)
    assert (first.cache_state, second.cache_state) == ("built", "hit") and first.provider == "OpenVINO"
    assert not SavingSession.seen  # ONNX Runtime is not involved
    path, device, config, folder = FakeOpenVINO.created[0]
    assert path == openvino / "unet" / "model.onnx" and device == "CPU"
    assert config == {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 3}
    assert folder.parent == openvino / "session_cache" / "openvino" and folder.name.startswith("unet-")
    assert FakeOpenVINO.created[1][3] == folder

    monkeypatch.setenv("EDGEDIFF_OPENVINO_PRECISION", "fp32")  # other properties: another folder, the old one pruned
    third = sessions.GraphSession("unet", openvino, ENTRY, "openvino", "none", print, threads=3)
    assert third.cache_state == "built" and FakeOpenVINO.created[2][2]["INFERENCE_PRECISION_HINT"] == "f32"
    assert [p.name for p in folder.parent.iterdir()] == [FakeOpenVINO.created[2][3].name]
    monkeypatch.setattr(sessions.openvino_session, "version", lambda: "2026.0")  # an upgrade recompiles
    assert sessions.GraphSession("unet", openvino, ENTRY, "openvino", "none", print).cache_state == "built"
    (openvino / "unet" / "model.onnx").write_bytes(b"re-exported graph")  # so does a changed graph
    assert sessions.GraphSession("unet", openvino, ENTRY, "openvino", "none", print).cache_state == "built"

    monkeypatch.setenv("EDGEDIFF_OPENVINO_PRECISION", "fp64")
    with pytest.raises(ProviderError, match="EDGEDIFF_OPENVINO_PRECISION"):
        sessions.GraphSession("unet", openvino, ENTRY, "openvino", "none", print)


def test_openvino_failure_is_one_model_folder_error(openvino, monkeypatch):
    def fail(*args):
        raise RuntimeError("Exception from src/frontends/onnx: unexpected end of file\nmore")

    monkeypatch.setattr(sessions.openvino_session, "OpenVINOSession", fail)
    with pytest.raises(ModelFolderError, match="cannot be loaded by OpenVINO .*unexpected end of file$"):
        sessions.GraphSession("unet", openvino, ENTRY, "openvino", "none", print)


def test_openvino_with_patched_weights_runs_on_the_cpu_provider(openvino):
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.ones(2, np.float32), "w")])
    save(helper.make_model(graph), openvino / "unet" / "model.onnx")
    warnings = []
    session = sessions.GraphSession("unet", openvino, ENTRY, "openvino", "none", warnings.append,
                                    initializers={"w": np.zeros(2, np.float32)})
    assert session.provider == "CPUExecutionProvider" and not FakeOpenVINO.created
    assert len(warnings) == 1 and "runs on CPUExecutionProvider" in warnings[0]


def test_threads_default_to_physical_cores(monkeypatch):
    monkeypatch.setenv("EDGEDIFF_THREADS", "3")
    assert sessions.default_threads() == 3
    monkeypatch.delenv("EDGEDIFF_THREADS")
    monkeypatch.setattr(sessions.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(sessions.Path, "read_text", lambda self: "0" if self.name == "physical_package_id"
                        else str(int(self.parent.parent.name[3:]) // 2))  # two hyper-threads per core
    assert sessions.default_threads() == 2


def test_openvino_takes_bf16_where_the_cpu_has_it(monkeypatch):
    monkeypatch.delenv("EDGEDIFF_OPENVINO_PRECISION", raising=False)
    monkeypatch.setattr(sessions.session_cache, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert sessions.openvino_options() == ("CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    monkeypatch.setattr(sessions.session_cache, "cpu_flags", lambda: {"avx2", "fma"})
    assert sessions.openvino_options() == ("CPU", {})
    monkeypatch.setenv("EDGEDIFF_OPENVINO_PRECISION", "accuracy")
    assert sessions.openvino_options() == ("CPU", {"EXECUTION_MODE_HINT": "ACCURACY"})


def test_openvino_only_for_graphs_it_can_read(offered, monkeypatch):
    offered("OpenVINO", "CPUExecutionProvider")
    monkeypatch.setattr(sessions.session_cache, "cpu_flags", lambda: {"amx_bf16"})
    assert sessions.resolve_provider("auto", "cpu") == "cpu"  # fused CPU graphs: ONNX Runtime's own CPU provider
    assert sessions.resolve_provider("openvino", "none") == "openvino"
    with pytest.raises(ProviderError, match="export it with --optimize-for none"):
        sessions.resolve_provider("openvino", "cpu")

def test_auto_takes_openvino_only_on_cpus_with_native_bf16(offered, monkeypatch):
    offered("OpenVINO", "CPUExecutionProvider")
    monkeypatch.setattr(sessions.session_cache, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert sessions.resolve_provider("auto") == "openvino"
    assert sessions.resolve_provider("auto", "none") == "openvino"
    monkeypatch.setattr(sessions.session_cache, "cpu_flags", lambda: {"avx2", "fma"})
    assert sessions.resolve_provider("auto") == "cpu"  # fp32 only: measured even with the CPU provider


def test_openvino_alone_needs_no_onnxruntime(monkeypatch):
    def missing():
        raise ProviderError("onnxruntime is not installed")

    monkeypatch.setattr(sessions, "_ort", missing)
    monkeypatch.setattr(sessions.openvino_session, "available", lambda: True)
    assert sessions.available_providers() == ["openvino"]
    monkeypatch.setattr(sessions.openvino_session, "available", lambda: False)
    with pytest.raises(ProviderError, match="onnxruntime is not installed"):
        sessions.available_providers()
