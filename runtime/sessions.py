"""ONNX Runtime sessions: provider choice and fallback, input checks, memory policy.

This is the only module that imports onnxruntime (openvino_session.py wraps OpenVINO's runtime).
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import openvino_session, session_cache
from .errors import EdgediffError, GraphInputError, InputError, ModelFolderError, OutOfMemoryError, ProviderError
from .manifest import GraphEntry, Manifest, TensorSpec
from .onnx_weights import initializer_index

PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": openvino_session.NAME,  # OpenVINO's own runtime, not an ONNX Runtime provider
    "cpu": "CPUExecutionProvider",
}
EXTRA_FOR = {"cuda": "edgediff[cuda]", "tensorrt": "edgediff[cuda] and TensorRT", "dml": "edgediff[directml]",
             "openvino": "edgediff[openvino]", "cpu": "edgediff[cpu]"}
# TensorRT builds engines for minutes on first use, so "auto" never picks it: ask for it by name.
# OpenVINO comes before the CPU provider only on CPUs with native bf16 (AMX-BF16 / AVX512-BF16), where
# its bf16 kernels were measured 3.9x faster per U-Net step than ONNX Runtime's fp32 (RESULTS.md);
# in fp32 the two were even. It runs on OpenVINO's own runtime (openvino_session.py says why).
AUTO_ORDER = ("cuda", "dml", "openvino", "cpu")
MEMORY_MODES = ("low", "high")
# OpenVINO's ONNX reader does not know ONNX Runtime's fused contrib ops (SkipLayerNormalization, ...).
OPENVINO_READS = ("none",)
# Providers whose optimized graph ONNX Runtime can save and reload (session_cache.py). Compiling
# providers (TensorRT, OpenVINO, DirectML's fused partitions) keep caches of their own instead
# (OpenVINO's in a keyed folder of the session cache).
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


def _missing_kernel(message: str) -> bool:
    """ONNX Runtime's words for an op with no kernel in the providers given."""
    return "implementation" in message or "Failed to find kernel" in message


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build (and an installed openvino) offer, best first."""
    try:
        offered = set(_ort().get_available_providers())
    except ProviderError:
        if not openvino_session.available():
            raise
        offered = set()
    if openvino_session.available():
        offered.add(openvino_session.NAME)
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
                 optimized_for: str, warn: Callable[[str], None], initializers: dict | None = None,
                 threads: int | None = None, cache: bool = True, arena: bool = True):
        self.name = name
        self.entry = entry
        self.arena = arena  # ONNX Runtime's CPU arena (memory.ARENA_SCRATCH_LIMIT says when not)
        path = model_dir / entry.path
        if initializers and provider == "openvino":
            # Patching OpenVINO's compiled constants is not built: such a graph runs on ONNX Runtime's CPU provider.
            warn(f"patched weights (LoRA, embedding): {name} runs on CPUExecutionProvider, not OpenVINO")
            provider = "cpu"
        if provider == "openvino":
            self._pinned = []
            self.session, self.cache_state = self._open_openvino(name, model_dir, entry, path, threads, cache)
            self.provider = openvino_session.NAME
            check_graph_matches(name, entry, self.session)
            return
        ort = _ort()
        providers = _provider_list(provider, model_dir, entry)
        if initializers:  # patched weights (LoRAs, embeddings) make another graph than the cached one
            options = _session_options(ort, provider, threads, arena)
            model, self._pinned = _patch(ort, options, path, initializers)

            def opener():
                return ort.InferenceSession(model, options, providers=providers), "off"
        else:
            self._pinned = []
            cached = _cache_entry(ort, name, model_dir, entry, provider, providers) if cache else None

            def opener():
                return _open(ort, path, lambda: _session_options(ort, provider, threads, arena), providers, cached,
                             PROVIDERS[provider])
        try:
            self.session, self.cache_state = opener()
        except Exception as error:
            message = _first_line(error)
            if _is_out_of_memory(message):
                raise OutOfMemoryError(f"not enough memory to load the {name} graph on '{provider}' ({message[:120]}); "
                                       "close other programs or use --memory low") from None
            if optimized_for == "cuda" and provider not in ("cuda", "tensorrt") and _missing_kernel(message):
                # Not corrupt: its CUDA-only fused ops (NhwcConv, GroupNorm, ...) have no kernel here.
                raise ModelFolderError(
                    f"{name} graph was optimized for CUDA (exported with --optimize-for cuda) and cannot run on "
                    f"'{provider}': re-export with --optimize-for cpu, or without --precision/--optimize-for "
                    "for this machine") from None
            raise ModelFolderError(f"{name} graph {path} cannot be loaded (corrupt or incomplete?): "
                                   f"{message[:200]}") from None
        active = self.session.get_providers()[0]
        if active != PROVIDERS[provider]:
            warn(f"{PROVIDERS[provider]} could not start (onnxruntime-gpu needs CUDA 13 and cuDNN 9); "
                 f"{name} runs on {active} instead")
        self.provider = active
        check_graph_matches(name, entry, self.session)

    @staticmethod
    def _open_openvino(name: str, model_dir: Path, entry: GraphEntry, path: Path, threads: int | None,
                       cache: bool) -> tuple:
        """(session, "hit" | "built" | "off"): OpenVINO compiles the graph, or maps it from its cache."""
        device, config = openvino_options()
        config["INFERENCE_NUM_THREADS"] = threads or default_threads()
        root = session_cache.cache_root(model_dir) if cache else None
        marker = None
        if root is not None:
            key = session_cache.cache_key(entry.sha256, path, "openvino", [device, config],
                                          {"openvino": openvino_session.version()}, "compiled")
            marker = session_cache.Entry(root / "openvino", name, key, "openvino")
        hit = marker is not None and marker.compiled_blobs()
        try:
            session = openvino_session.OpenVINOSession(path, device, config, marker and marker.folder,
                                                       {spec.name for spec in entry.inputs + entry.outputs})
        except Exception as error:
            message = _first_line(error)
            if _is_out_of_memory(message):
                raise OutOfMemoryError(f"not enough memory to compile the {name} graph with OpenVINO "
                                       f"({message[:120]}); close other programs or use --memory low") from None
            raise ModelFolderError(f"{name} graph {path} cannot be loaded by OpenVINO (corrupt or incomplete?): "
                                   f"{message[:200]}") from None
        if marker is None:
            return session, "off"
        marker.mark()
        return session, "hit" if hit else "built"

    def close(self) -> None:
        """Drop the ONNX Runtime session, freeing its weights and arena (also on the GPU)."""
        self.session = None
        self._pinned = []

    def run(self, **feed: np.ndarray) -> list[np.ndarray]:
        if self.session is None:
            raise RuntimeError(f"{self.name} session was released")
        checked = check_inputs(self.name, self.entry.inputs, feed, self.entry.optional_inputs)
        try:
            outputs = self.session.run([spec.name for spec in self.entry.outputs], checked)
        except Exception as error:  # ONNX Runtime raises its own exception types, all unrelated to Python's
            message = _first_line(error)
            if _is_out_of_memory(message):
                shape = "x".join(map(str, next(iter(checked.values())).shape))
                raise OutOfMemoryError(f"{self.name} ran out of memory on {self.provider} (input {shape}: "
                                       f"{message[:160]}); try a smaller size or --memory low") from None
            raise EdgediffError(f"{self.name} graph failed to run ({message[:200]}); if the model folder "
                                "was edited or damaged, re-export it") from None
        return [out.astype(np.float32, copy=False) if out.dtype == np.float16 else out for out in outputs]


def _patch(ort, options, path: Path, arrays: dict[str, np.ndarray]) -> tuple[str | bytes, list]:
    """Give the session patched weights (LoRAs, embeddings) in place of the graph's initializers.

    ``add_initializer`` alone is not enough: ONNX Runtime's NCHWc layout transformer reads Conv
    weights from the graph itself and ignores it (measured, ORT 1.32). So weights stored in the
    ``.onnx`` are patched into a copy of its bytes, and weights in external data are replaced with
    ``add_external_initializers``, which happens before graph optimization. ``add_initializer`` is
    left for tensors that change shape (the grown token-embedding table, read by a Gather).
    ONNX Runtime uses the OrtValues' memory, so they must live as long as the session.
    """
    if not arrays:
        return str(path), []
    index = initializer_index(path)
    same = {n: a for n, a in arrays.items() if n in index and index[n].shape == a.shape}
    inline = {n: a for n, a in same.items() if index[n].file == path}
    external = {n: a for n, a in same.items() if index[n].file != path}
    has_external = any(loc.file != path for loc in index.values())
    model: str | bytes = str(path)
    if inline and not has_external:  # a model from bytes cannot find external data beside it
        data = bytearray(path.read_bytes())
        for name, array in inline.items():
            offset = index[name].offset
            data[offset:offset + array.nbytes] = np.ascontiguousarray(array, dtype=index[name].dtype).tobytes()
        model = bytes(data)
        del data
    pinned = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()
              if n not in inline or has_external}
    if external:
        options.add_external_initializers(list(external), [pinned[n] for n in external])
    for name, value in pinned.items():
        if name not in external:
            options.add_initializer(name, value)
    return model, list(pinned.values())


def check_inputs(graph: str, specs: list[TensorSpec], feed: dict[str, np.ndarray],
                 optional: list[TensorSpec] = ()) -> dict[str, np.ndarray]:
    """Check names, ranks and fixed/shared axes; cast to the graph's dtypes. Name what is wrong.
    ``optional`` inputs (zeros in the graph when not fed) are checked where fed."""
    missing = [spec.name for spec in specs if spec.name not in feed]
    specs = [*specs, *(spec for spec in optional if spec.name in feed)]
    extra = sorted(set(feed) - {spec.name for spec in specs})
    if missing or extra:
        raise GraphInputError(f"{graph}: missing inputs {missing}, unexpected inputs {extra}")
    axes: dict[str, tuple[int, str]] = {}
    checked = {}
    for spec in specs:
        value = np.asarray(feed[spec.name])
        expected = "(" + ", ".join(map(str, spec.shape)) + ")"
        if value.ndim != len(spec.shape):
            raise GraphInputError(f"{graph} input '{spec.name}': expected shape {expected}, got {value.shape}")
        for size, axis in zip(value.shape, spec.shape):
            if isinstance(axis, int) and size != axis:
                raise GraphInputError(f"{graph} input '{spec.name}': expected shape {expected}, got {value.shape}")
            if isinstance(axis, str):
                seen = axes.setdefault(axis, (size, spec.name))
                if seen[0] != size:
                    raise GraphInputError(f"{graph} input '{spec.name}': axis '{axis}' is {size} but "
                                     f"'{seen[1]}' has {seen[0]}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise GraphInputError(f"{graph} input '{spec.name}' contains NaN or infinity")
        checked[spec.name] = np.ascontiguousarray(value, dtype=spec.dtype)
    return checked


ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64"}
# How ONNX Runtime (CPU arena, CUDA, cuDNN, cuBLAS) words an allocation failure.
OUT_OF_MEMORY = ("failed to allocate memory", "out of memory", "bad_alloc", "alloc_failed", "cannot allocate")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_out_of_memory(message: str) -> bool:
    return any(fragment in message.lower() for fragment in OUT_OF_MEMORY)


def check_graph_matches(graph: str, entry: GraphEntry, session) -> None:
    """The manifest's inputs and outputs must be the graph's own (names, dtypes, ranks, fixed sizes)."""
    for kind, specs, actual in (("input", entry.inputs, session.get_inputs()),
                                ("output", entry.outputs, session.get_outputs())):
        declared = {spec.name: spec for spec in specs}
        found = {arg.name: arg for arg in actual}
        if kind == "input" and set(declared) != set(found) or not set(declared) <= set(found):
            raise ModelFolderError(f"manifest graphs.{graph}.{kind}s lists {sorted(declared)} but the graph has "
                                   f"{sorted(found)}; re-export the model")
        for name, spec in declared.items():
            arg = found[name]
            shape = list(arg.shape)
            fixed_differs = any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(spec.shape, shape))
            if ORT_DTYPES.get(arg.type, arg.type) != spec.dtype or len(shape) != len(spec.shape) or fixed_differs:
                raise ModelFolderError(
                    f"manifest graphs.{graph}.{kind}s '{name}' says {spec.dtype} {list(spec.shape)} but the graph "
                    f"takes {ORT_DTYPES.get(arg.type, arg.type)} {shape}; re-export the model")


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


# glibc serves allocations under its mmap threshold (which it raises up to 32 MiB as memory is freed)
# from heaps that fragment and keep what they grew to. Without ONNX Runtime's arena every activation
# comes from malloc: SD 3.5 Medium's transformer at 1024x1024 (27 MB activations) peaked at 6.86 GiB
# that way and at 5.75 GiB with allocations of 4 MiB and up mapped and unmapped one by one (RESULTS.md).
NO_ARENA_MMAP_BYTES = 4 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_heap_tuned = False


def _tune_heap_for_no_arena() -> None:
    """Once per process, where the C library is glibc: big blocks mapped, freed heap returned early."""
    global _heap_tuned
    if _heap_tuned or not sys.platform.startswith("linux"):
        return
    _heap_tuned = True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, NO_ARENA_MMAP_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, NO_ARENA_MMAP_BYTES)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


def _session_options(ort, provider: str, threads: int | None = None, arena: bool = True):
    options = ort.SessionOptions()
    options.log_severity_level = 4  # provider load failures are reported by GraphSession, in one line
    if provider == "dml":  # DirectML requires both (ONNX Runtime's DirectML documentation)
        options.enable_mem_pattern = False
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if provider == "cpu":  # the memory pattern is a second copy of the activations in the arena from the
        options.enable_mem_pattern = False  # second run on (VAE decoder: 2.6 vs 1.5 GB), at no measured cost
        options.enable_cpu_mem_arena = arena
        if not arena:
            _tune_heap_for_no_arena()
    if threads:  # several workers on one machine (batch actors) each get their share of the cores
        options.intra_op_num_threads = threads
    elif provider == "cpu":
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
    return [PROVIDERS[provider], "CPUExecutionProvider"]


# EDGEDIFF_OPENVINO_PRECISION -> OpenVINO properties. bf16/f16 are inference-precision hints on the
# fp32 graphs; ACCURACY keeps every op in the graph's own precision.
OPENVINO_PRECISIONS = {"FP32": {"INFERENCE_PRECISION_HINT": "f32"}, "BF16": {"INFERENCE_PRECISION_HINT": "bf16"},
                       "FP16": {"INFERENCE_PRECISION_HINT": "f16"}, "ACCURACY": {"EXECUTION_MODE_HINT": "ACCURACY"}}


def openvino_options() -> tuple[str, dict]:
    """(device, properties) for OpenVINO's compile_model."""
    device = os.environ.get("EDGEDIFF_OPENVINO_DEVICE", "CPU").upper()
    precision = os.environ.get("EDGEDIFF_OPENVINO_PRECISION", "").upper()
    if not precision and device == "CPU" and session_cache.cpu_flags() & {"amx_bf16", "avx512_bf16"}:
        precision = "BF16"  # native bf16 (AMX or AVX512-BF16): where diffusers' bf16 autocast wins too
    if precision and precision not in OPENVINO_PRECISIONS:
        raise ProviderError(f"EDGEDIFF_OPENVINO_PRECISION must be one of {', '.join(OPENVINO_PRECISIONS)}, "
                            f"not {precision!r}")
    return device, dict(OPENVINO_PRECISIONS.get(precision, {}))


def tensorrt_cache_dir(model_dir: Path) -> Path:
    """Engines persist under the model folder; a read-only install caches in the user's cache."""
    cache = session_cache.writable_cache_dir(model_dir, "tensorrt_cache", f"tensorrt/{model_dir.name}")
    cache.mkdir(parents=True, exist_ok=True)
    return cache


class Sessions:
    """The graphs of one model under a memory policy.

    ``high`` keeps each session resident once created; ``low`` creates a session when a stage needs
    it and releases it when the stage ends, so only one graph's weights are in memory at a time.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, provider: str, memory: str,
                 warn: Callable[[str], None] | None = None, threads: int | None = None):
        if memory not in MEMORY_MODES:
            raise InputError(f"memory must be 'low' or 'high', not {memory!r}")
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.provider = resolve_provider(provider, manifest.optimized_for)
        self.memory = memory
        self.threads = threads
        self.load_seconds: dict[str, float] = {}
        self.cache_states: dict[str, str] = {}  # per graph: "hit", "built" or "off" (session_cache.py)
        self._resident: dict[str, GraphSession] = {}
        # graphs whose sessions run without ONNX Runtime's CPU arena: the memory check's plan, per generation
        self._initializers: dict[str, tuple[object, dict]] = {}  # graph -> (key, {initializer: array})
        self._warned: set[str] = set()
        self._warn = warn or (lambda line: print(f"edgediff: {line}", file=sys.stderr))

    def _warn_once(self, line: str) -> None:
        if line.split(";")[0] not in self._warned:
            self._warned.add(line.split(";")[0])
            self._warn(line)

    @contextmanager
    def use(self, name: str, *, arena: bool = True) -> Iterator[GraphSession]:
        """The session of graph ``name``; ``arena=False`` (the memory plan's choice, runtime/memory.py)
        runs it without ONNX Runtime's CPU arena."""
        if name not in self.manifest.graphs:
            raise ModelFolderError(f"this model has no {name} graph")
        session = self._resident.get(name)
        if session is not None and self.provider == "cpu" and session.arena != arena:
            self._resident.pop(name).close()  # its arena would hold a second score matrix
            session = None
        if session is None:
            started = time.perf_counter()
            session = GraphSession(name, self.model_dir, self.manifest.graphs[name], self.provider,
                                   self.manifest.optimized_for, self._warn_once,
                                   self._initializers.get(name, (None, {}))[1], threads=self.threads, arena=arena)
            self.load_seconds[name] = self.load_seconds.get(name, 0.0) + time.perf_counter() - started
            self.cache_states[name] = session.cache_state
            if self.memory == "high":
                self._resident[name] = session
        try:
            yield session
        finally:
            if self.memory == "low":
                session.close()

    @property
    def resident(self) -> set[str]:
        """Graphs whose sessions are loaded now."""
        return set(self._resident)

    def set_initializers(self, name: str, key: object, arrays: dict) -> None:
        """Patched weights for graph ``name``; a resident session is re-created only when ``key`` changes."""
        if self._initializers.get(name, ((), {}))[0] == key:
            return
        self._initializers[name] = (key, arrays)
        stale = self._resident.pop(name, None)
        if stale is not None:
            stale.close()

    def release(self) -> None:
        self._resident.clear()
