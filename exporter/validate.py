"""Check an exported graph against the outputs of the torch module it came from, output by output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .graph_parts import run_in_parts
from .memory import release_freed

NUMPY = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


def runnable_providers(target: str) -> list[str] | None:
    """The providers this machine can validate a graph with, or None where it cannot.

    Graphs optimized for CUDA contain CUDA-only fused ops that the CPU provider cannot load.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if target == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else None
    if target == "dml" and "DmlExecutionProvider" in available:
        return ["DmlExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def reference_outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """torch's float32 outputs, taken before the module is freed: validation then needs only the file."""
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return [tensor.numpy().astype(np.float64) for tensor in expected]


# fp16 weights above this are run on the CPU part by part (graph_parts): the CPU provider gives every
# fp16 weight an fp32 copy as a session loads, 19 GB for T5-XXL in fp16.
PARTS_FP16_BYTES = 2 * 1024**3
PART_BYTES = 512 * 1024**2  # of fp16 weights per part: about two T5-XXL blocks, 1 GB in fp32


def _in_parts(graph_path: Path, providers: list[str]) -> bool:
    weights = sum(f.stat().st_size for f in Path(graph_path).parent.glob(Path(graph_path).name + "*"))
    on_cpu = providers[0] == "CPUExecutionProvider"
    return on_cpu and weights > PARTS_FP16_BYTES and _has_fp16_weights(graph_path)


def _has_fp16_weights(graph_path: Path) -> bool:
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def _run(graph_path: Path, feed: dict[str, np.ndarray], output_names: list[str], providers: list[str]):
    import onnxruntime as ort

    if _in_parts(graph_path, providers):
        return run_in_parts(graph_path, feed, output_names, providers, PART_BYTES)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph_path), options, providers=providers)
    actual = session.run(output_names, feed)
    del session  # its copy of the weights goes before the next stage (the LoRA weight map reloads torch's)
    release_freed()
    return actual


def validate(expected: list[np.ndarray], graph_path: Path, inputs: tuple[torch.Tensor, ...], input_specs,
             output_specs, providers: list[str]) -> dict[str, dict]:
    """Run ONNX Runtime on the inputs torch saw; report each output's max abs diff from ``expected``.

    The difference is also given relative to the reference's peak magnitude, the number the
    tolerance applies to, since outputs of untrained and trained models differ in scale.
    """
    feed = {spec.name: tensor.numpy().astype(NUMPY[spec.dtype]) for spec, tensor in zip(input_specs, inputs)}
    actual = _run(graph_path, feed, [spec.name for spec in output_specs], providers)
    report = {}
    for spec, ref, got in zip(output_specs, expected, actual):
        got = got.astype(np.float64)
        finite = bool(np.isfinite(got).all())
        diff = float(np.abs(ref - got).max()) if finite else float("inf")
        scale = max(1.0, float(np.abs(ref).max()))
        report[spec.name] = {"max_abs_diff": diff, "relative": diff / scale, "finite": finite}
    return report
