"""ONNX Runtime sessions: provider choice and fallback, input checks, memory policy.

This is the only module that imports onnxruntime.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import session_cache
from .errors import ModelFolderError, ProviderError
from .manifest import GraphEntry, Manifest, TensorSpec

PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
EXTRA_FOR = {"cuda": "edgediff[cuda]", "tensorrt": "edgediff[cuda] and TensorRT", "dml": "edgediff[directml]",
             "openvino": "edgediff[openvino]", "cpu": "edgediff[cpu]"}
# TensorRT builds engines for minutes on first use, so "auto" never picks it: ask for it by name.
# OpenVINO comes before the CPU provider only on CPUs with native bf16 (AMX-BF16 / AVX512-BF16), where
# its bf16 kernels were measured 3.9x faster per U-Net step than ONNX Runtime's fp32 (RESULTS.md);
# in fp32 the two were even.
AUTO_ORDER = ("cuda", "dml", "openvino", "cpu")
MEMORY_MODES = ("low", "high")
# OpenVINO's ONNX reader does not know ONNX Runtime's fused contrib ops (SkipLayerNormalization, ...).
OPENVINO_READS = ("none",)
# Providers whose optimized graph ONNX Runtime can save and reload (session_cache.py). Compiling
# providers (TensorRT, OpenVINO, DirectML's fused partitions) keep caches of their own instead.
CACHED_PROVIDERS = ("cpu", "cuda")
# The cached graph is saved after this level of optimization and loaded at CACHED_LEVEL.
SAVED_LEVEL = "ORT_ENABLE_ALL"
CACHED_LEVEL = "ORT_DISABLE_ALL"
# Provider settings a user may change without an API (and the benchmarks compare):
# EDGEDIFF_OPENVINO_PRECISION (FP32, BF16 hint, ACCURACY), EDGEDIFF_OPENVINO_DEVICE (CPU, GPU, NPU),
# EDGEDIFF_CUDNN_CONV_ALGO_SEARCH (HEURISTIC: cheap first run; DEFAULT; EXHAUSTIVE), EDGEDIFF_THREADS.


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ProviderError("onnxruntime is not installed: pip install 'edgediff[cpu]' "
                            "(or edgediff[cuda] / edgediff[directml])") from None
    return onnxruntime


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers, best first."""
    offered = set(_ort().get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in offered]


def resolve_provider(name: str, optimized_for: str | None = None) -> str:
    """"auto" picks the best available; a named provider that is not installed is an error.
    With the model's ``optimized_for``, OpenVINO is only taken for graphs it can read."""
    available = available_providers()
    if optimized_for is not None and optimized_for not in OPENVINO_READS and "openvino" in available:
        if name == "openvino":
            raise ProviderError(f"this model's graphs carry ONNX Runtime's fused {optimized_for} ops, which "
                                "OpenVINO cannot read: export it with --optimize-for none for --provider openvino")
        available.remove("openvino")
    if name == "auto":
        if "openvino" in available and not (session_cache.cpu_flags() & {"amx_bf16", "avx512_bf16"}):
            available.remove("openvino")
        return next(short for short in AUTO_ORDER if short in available)
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {name!r}; choose auto, {', '.join(PROVIDERS)}")
    if name not in available:
        raise ProviderError(f"provider '{name}' is not available in this onnxruntime "
                            f"(it offers: {', '.join(available)}); install {EXTRA_FOR[name]}")
    return name


class GraphSession:
    """One graph: inputs are checked against the manifest where they enter, then cast to its dtypes."""

    def __init__(self, name: str, model_dir: Path, entry: GraphEntry, provider: str,
                 optimized_for: str, warn: Callable[[str], None], cache: bool = True):
        ort = _ort()
        self.name = name
        self.entry = entry
        path = model_dir / entry.path
        providers = _provider_list(provider, model_dir, entry)
        cached = _cache_entry(ort, name, model_dir, entry, provider, providers) if cache else None
        try:
            self.session, self.cache_state = _open(ort, path, lambda: _session_options(ort, provider), providers,
                                                   cached, PROVIDERS[provider])
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if "implementation" in message and optimized_for == "cuda" and provider != "cuda":
                raise ModelFolderError(
                    f"{name} graph was optimized for CUDA and cannot run on '{provider}'; "
                    "re-export with --optimize-for cpu (or dml)") from None
            raise ModelFolderError(f"{name} graph {path} cannot be loaded (corrupt or incomplete?): "
                                   f"{message[:200]}") from None
        active = self.session.get_providers()[0]
        if active != PROVIDERS[provider]:
            warn(f"{PROVIDERS[provider]} could not start (onnxruntime-gpu needs CUDA 13 and cuDNN 9); "
                 f"{name} runs on {active} instead")
        self.provider = active
        self._inputs = {spec.name: spec for spec in entry.inputs}

    def close(self) -> None:
        """Drop the ONNX Runtime session, freeing its weights and arena (also on the GPU)."""
        self.session = None

    def run(self, **feed: np.ndarray) -> list[np.ndarray]:
        if self.session is None:
            raise RuntimeError(f"{self.name} session was released")
        checked = check_inputs(self.name, self.entry.inputs, feed)
        outputs = self.session.run([spec.name for spec in self.entry.outputs], checked)
        return [out.astype(np.float32, copy=False) if out.dtype == np.float16 else out for out in outputs]


def check_inputs(graph: str, specs: list[TensorSpec], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check names, ranks and fixed/shared axes; cast to the graph's dtypes. Name what is wrong."""
    missing = [spec.name for spec in specs if spec.name not in feed]
    extra = sorted(set(feed) - {spec.name for spec in specs})
    if missing or extra:
        raise ValueError(f"{graph}: missing inputs {missing}, unexpected inputs {extra}")
    axes: dict[str, tuple[int, str]] = {}
    checked = {}
    for spec in specs:
        value = np.asarray(feed[spec.name])
        expected = "(" + ", ".join(map(str, spec.shape)) + ")"
        if value.ndim != len(spec.shape):
            raise ValueError(f"{graph} input '{spec.name}': expected shape {expected}, got {value.shape}")
        for size, axis in zip(value.shape, spec.shape):
            if isinstance(axis, int) and size != axis:
                raise ValueError(f"{graph} input '{spec.name}': expected shape {expected}, got {value.shape}")
            if isinstance(axis, str):
                seen = axes.setdefault(axis, (size, spec.name))
                if seen[0] != size:
                    raise ValueError(f"{graph} input '{spec.name}': axis '{axis}' is {size} but "
                                     f"'{seen[1]}' has {seen[0]}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"{graph} input '{spec.name}' contains NaN or infinity")
        checked[spec.name] = np.ascontiguousarray(value, dtype=spec.dtype)
    return checked


def default_threads() -> int:
    """ONNX Runtime's intra-op pool: one thread per physical core this process may run on
    (EDGEDIFF_THREADS overrides). Hyper-threads share a core's vector units and only add contention."""
    if os.environ.get("EDGEDIFF_THREADS", "").strip().isdigit() and int(os.environ["EDGEDIFF_THREADS"]) > 0:
        return int(os.environ["EDGEDIFF_THREADS"])
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _session_options(ort, provider: str):
    options = ort.SessionOptions()
    options.log_severity_level = 4  # provider load failures are reported by GraphSession, in one line
    if provider == "dml":  # DirectML requires both (ONNX Runtime's DirectML documentation)
        options.enable_mem_pattern = False
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if provider in ("cpu", "openvino"):
        options.intra_op_num_threads = default_threads()
    return options


def _cache_entry(ort, name: str, model_dir: Path, entry: GraphEntry, provider: str,
                 providers: list) -> "session_cache.Entry | None":
    if provider not in CACHED_PROVIDERS:
        return None
    root = session_cache.cache_root(model_dir)
    if root is None:
        return None
    runtime = {"onnxruntime": ort.__version__, "device": ort.get_device()}
    key = session_cache.cache_key(entry.sha256, model_dir / entry.path, provider, providers, runtime, SAVED_LEVEL)
    return session_cache.Entry(root, name, key, provider)


def _open(ort, path: Path, make_options: Callable, providers: list, cached, wanted: str):
    """(session, "hit" | "built" | "off"): a verified cached graph loads with optimizations off;
    otherwise the graph is optimized and the result saved for next time. A cached graph that ONNX
    Runtime refuses is deleted and rebuilt; a cache that cannot be written never stops the session."""
    level = ort.GraphOptimizationLevel
    if cached is not None and cached.valid():
        options = make_options()
        options.graph_optimization_level = getattr(level, CACHED_LEVEL)
        try:
            return ort.InferenceSession(str(cached.model_path), options, providers=providers), "hit"
        except Exception:
            cached.discard()
    if cached is not None:
        options = make_options()
        options.graph_optimization_level = getattr(level, SAVED_LEVEL)
        try:
            options.optimized_model_filepath = str(cached.begin())
            for key, value in session_cache.session_config().items():
                options.add_session_config_entry(key, value)
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception:
            cached.abort()  # a broken source graph fails again below and is reported there
        else:
            # A provider that fell back to the CPU optimized for the CPU: not what the key says.
            if session.get_providers()[0] == wanted and cached.commit():
                return session, "built"
            cached.abort()
            return session, "off"
    return ort.InferenceSession(str(path), make_options(), providers=providers), "off"


def _provider_list(provider: str, model_dir: Path, entry: GraphEntry) -> list:
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        search = os.environ.get("EDGEDIFF_CUDNN_CONV_ALGO_SEARCH", "HEURISTIC").upper()
        return [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested",
                                           "cudnn_conv_algo_search": search}),
                "CPUExecutionProvider"]
    if provider == "tensorrt":
        cache = str(tensorrt_cache_dir(model_dir))
        return [("TensorrtExecutionProvider", {
                    "trt_fp16_enable": entry.precision == "fp16",
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}),
                ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}),
                "CPUExecutionProvider"]
    if provider == "openvino":
        return [("OpenVINOExecutionProvider", openvino_options(model_dir, entry)), "CPUExecutionProvider"]
    return [PROVIDERS[provider], "CPUExecutionProvider"]


OPENVINO_PRECISIONS = ("FP32", "BF16", "FP16", "ACCURACY")


def openvino_options(model_dir: Path, entry: GraphEntry) -> dict:
    """OpenVINO compiles the graph itself; its compiled-model cache lives beside our session cache."""
    device = os.environ.get("EDGEDIFF_OPENVINO_DEVICE", "CPU").upper()
    precision = os.environ.get("EDGEDIFF_OPENVINO_PRECISION", "").upper()
    if not precision and device == "CPU" and session_cache.cpu_flags() & {"amx_bf16", "avx512_bf16"}:
        precision = "BF16"  # native bf16 (AMX or AVX512-BF16): where diffusers' bf16 autocast wins too
    options = {"device_type": device}
    if precision == "BF16":  # not an EP precision: OpenVINO's CPU plugin takes it as an inference hint
        options["load_config"] = json.dumps({device: {"INFERENCE_PRECISION_HINT": "bf16"}})
    elif precision:
        if precision not in OPENVINO_PRECISIONS:
            raise ProviderError(f"EDGEDIFF_OPENVINO_PRECISION must be one of {', '.join(OPENVINO_PRECISIONS)}, "
                                f"not {precision!r}")
        options["precision"] = precision
    root = session_cache.cache_root(model_dir)
    if root is not None:
        options["cache_dir"] = str(root / "openvino")
    return options


def tensorrt_cache_dir(model_dir: Path) -> Path:
    """Engines persist under the model folder; a read-only install caches in the user's cache."""
    cache = model_dir / "tensorrt_cache"
    try:
        cache.mkdir(exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgediff" / "tensorrt" / model_dir.name
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


class Sessions:
    """The graphs of one model under a memory policy.

    ``high`` keeps each session resident once created; ``low`` creates a session when a stage needs
    it and releases it when the stage ends, so only one graph's weights are in memory at a time.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, provider: str, memory: str,
                 warn: Callable[[str], None] | None = None):
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be 'low' or 'high', not {memory!r}")
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.provider = resolve_provider(provider, manifest.optimized_for)
        self.memory = memory
        self.load_seconds: dict[str, float] = {}
        self.cache_states: dict[str, str] = {}  # per graph: "hit", "built" or "off" (session_cache.py)
        self._resident: dict[str, GraphSession] = {}
        self._warned: set[str] = set()
        self._warn = warn or (lambda line: print(f"edgediff: {line}", file=sys.stderr))

    def _warn_once(self, line: str) -> None:
        if line.split(";")[0] not in self._warned:
            self._warned.add(line.split(";")[0])
            self._warn(line)

    @contextmanager
    def use(self, name: str) -> Iterator[GraphSession]:
        if name not in self.manifest.graphs:
            raise ModelFolderError(f"this model has no {name} graph")
        session = self._resident.get(name)
        if session is None:
            started = time.perf_counter()
            session = GraphSession(name, self.model_dir, self.manifest.graphs[name], self.provider,
                                   self.manifest.optimized_for, self._warn_once)
            self.load_seconds[name] = self.load_seconds.get(name, 0.0) + time.perf_counter() - started
            self.cache_states[name] = session.cache_state
            if self.memory == "high":
                self._resident[name] = session
        try:
            yield session
        finally:
            if self.memory == "low":
                session.close()

    def release(self) -> None:
        self._resident.clear()
