"""``--provider openvino``: graphs compiled and run by OpenVINO's own runtime (the ``openvino`` package).

Why not ONNX Runtime's OpenVINO execution provider: on every session it reads the whole ONNX graph
and its weights before OpenVINO imports the compiled model from its cache (5.6-7.4 s and 6 GB peak
for the SD 1.5 U-Net, RESULTS.md), and onnxruntime-openvino 1.24.1 cannot load back the EPContext
models it writes. ``openvino.Core.compile_model(path)`` with a cache folder skips reading the ONNX
graph on a cache hit and maps the compiled blob instead. OpenVINO checks its blobs and recompiles a
truncated or damaged one; the folder is keyed like the session cache (session_cache.py), so a
changed graph or another OpenVINO version gets a folder of its own, and older ones are pruned.

``OpenVINOSession`` offers the part of ``onnxruntime.InferenceSession`` that ``GraphSession`` uses.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .mapped_weights import Releasing

NAME = "OpenVINO"  # what get_providers() reports, where ONNX Runtime would name its provider
# OpenVINO element types as ONNX Runtime spells tensor types (check_graph_matches compares those).
ONNX_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i32": "tensor(int32)", "i64": "tensor(int64)",
              "bf16": "tensor(bfloat16)", "u8": "tensor(uint8)", "i8": "tensor(int8)", "boolean": "tensor(bool)"}


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def version() -> str:
    import openvino

    return openvino.__version__


def _ports(ports, known: set[str]) -> list:
    """Ports as NodeArg-like records: dynamic axes become None (OpenVINO keeps no axis names). A port
    can carry several tensor names (the ONNX input and the Cast fused into it): the one in ``known``
    (the manifest's names) is the graph's own."""
    described = []
    for port in ports:
        name = next((n for n in sorted(port.get_names()) if n in known), port.get_any_name())
        shape = [dim.get_length() if dim.is_static else None for dim in port.get_partial_shape()]
        kind = port.get_element_type().get_type_name()
        described.append(SimpleNamespace(name=name, names=port.get_names(), shape=shape,
                                         type=ONNX_TYPES.get(kind, f"tensor({kind})")))
    return described


class OpenVINOSession:
    """A compiled model with one infer request (run calls are serialized, like a session's are safe)."""

    def __init__(self, path: Path, device: str, config: dict, cache_dir: Path | None, names: set[str] = frozenset()):
        import openvino

        core = openvino.Core()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            config = {**config, "CACHE_DIR": str(cache_dir)}
        # the compiled blob or the graph's weights, which OpenVINO maps, then copies (mapped_weights.py)
        self._mapped = (Path(path).parent,) + ((cache_dir,) if cache_dir is not None else ())
        with Releasing(self._mapped):
            self._compiled = core.compile_model(str(path), device, config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()
        self._shapes_run: set[tuple] = set()  # a new shape has its weights laid out again on its first run
        self._inputs, self._outputs = _ports(self._compiled.inputs, names), _ports(self._compiled.outputs, names)

    def get_providers(self) -> list[str]:
        return [NAME]

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        ports = range(len(self._outputs)) if output_names is None else [
            next(i for i, out in enumerate(self._outputs) if name in out.names) for name in output_names]
        shapes = tuple(sorted((name, np.shape(value)) for name, value in feed.items()))
        with self._lock:
            if shapes in self._shapes_run:
                results = self._request.infer(feed)  # copies the outputs out of the request's buffers
            else:
                with Releasing(self._mapped):
                    results = self._request.infer(feed)
                self._shapes_run.add(shapes)
        values = list(results.values())
        return [np.asarray(values[i]) for i in ports]
