"""Which ONNX initializer holds each original torch weight, and in what layout.

The TorchScript exporter renames and transposes Linear weights (``onnx::MatMul_1638`` holds
``to_q.weight.T``), and ONNX Runtime's optimizer packs attention weights (the CPU ``Attention`` op
takes Q, K and V side by side in one ``(hidden, 3 * hidden)`` tensor; CUDA's packed QKV interleaves
them per head) and turns convolution kernels to NHWC. Names are lost on the way, so weights are
found by value, in the final saved graph: each Linear/Conv weight of the torch module is looked up
as it is, transposed, or NHWC, and otherwise as a set of columns of a packed tensor.

Each entry of the map: ``{"init": name, "perm": [axes] (optional), "cols": [[start, stop], ...]
(optional)}``: the initializer equals ``weight.transpose(perm)`` or holds it in those columns.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping

import numpy as np

from edgediff.runtime.onnx_weights import initializer_index

from .graphs import FAMILIES

PROBE = 8  # leading values used as a fingerprint before comparing whole tensors


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """As the exporter's fp16 conversion casts (it clamps tiny and huge values first)."""
    if dtype == np.float16:
        from onnxruntime.transformers.float16 import convert_np_to_float16

        return convert_np_to_float16(array)
    return array.astype(dtype)


def _layouts(weight: np.ndarray) -> list[tuple[list[int] | None, np.ndarray]]:
    if weight.ndim == 2:
        return [(None, weight), ([1, 0], weight.T)]
    return [(None, weight), ([0, 2, 3, 1], weight.transpose(0, 2, 3, 1))]  # NhwcConv on CUDA


def build_weight_map(state_dict: Mapping[str, np.ndarray], graph_path: str | Path) -> dict[str, dict]:
    """Map each 2-D/4-D ``*.weight`` of ``state_dict`` (float32 arrays) to where the graph holds it."""
    index = {name: loc for name, loc in initializer_index(graph_path).items()
             if loc.dtype.kind == "f" and len(loc.shape) >= 2}
    dtypes = {loc.dtype for loc in index.values()}
    by_probe: dict[tuple, list[str]] = defaultdict(list)
    for name, loc in index.items():
        by_probe[loc.shape, loc.dtype, loc.read(PROBE).tobytes()].append(name)

    weights = {key: np.asarray(value, dtype=np.float32) for key, value in state_dict.items()
               if key.endswith("weight") and np.ndim(value) in (2, 4)}
    found, claimed, unplaced = {}, set(), []
    for key, weight in weights.items():
        entry = _find_whole(key, weight, index, dtypes, by_probe, claimed)
        if entry is None:
            unplaced.append(key)
        else:
            found[key] = entry
            claimed.add(entry["init"])
    packed = {name: loc for name, loc in index.items() if name not in claimed and len(loc.shape) == 2}
    found.update(_find_packed({k: weights[k] for k in unplaced if weights[k].ndim == 2}, packed))
    return found


def _find_whole(key, weight, index, dtypes, by_probe, claimed) -> dict | None:
    for perm, view in _layouts(weight):
        for dtype in dtypes:
            cast = _cast(np.ascontiguousarray(view), dtype)
            names = by_probe.get((view.shape, dtype, cast.ravel()[:PROBE].tobytes()), [])
            # A weight stored twice, or two equal weights: prefer the initializer named after it.
            for name in sorted(names, key=lambda n: (not n.endswith(key), n in claimed)):
                if np.array_equal(index[name].read(), cast):
                    return {"init": name, **({"perm": perm} if perm else {})}
    return None


def _find_packed(weights: dict[str, np.ndarray], packed: dict) -> dict[str, dict]:
    """Linear weights whose transpose sits as columns of a wider (in, k) initializer."""
    if not weights or not packed:
        return {}
    rows, windows = {}, {}
    for name, loc in packed.items():
        row = loc.read(loc.shape[1])
        rows[name] = row
        for start in range(len(row) - PROBE + 1):
            windows.setdefault((loc.shape[0], loc.dtype, row[start:start + PROBE].tobytes()), (name, start))
    found, tensors = {}, {}
    for key, weight in weights.items():
        target = weight.T  # (in, out), as MatMul holds it
        for dtype in {loc.dtype for loc in packed.values()}:
            cast = _cast(np.ascontiguousarray(target), dtype)
            cols = _runs(cast[0], target.shape[0], dtype, windows, rows)
            if cols is None:
                continue
            name, spans = cols
            tensor = tensors.setdefault(name, packed[name].read())
            picked = np.concatenate([np.arange(a, b) for a, b in spans])
            if np.array_equal(tensor[:, picked], cast):
                found[key] = {"init": name, "perm": [1, 0], "cols": spans}
                break
    return found


def _runs(first_row, rows_count, dtype, windows, rows):
    """Follow the first row of a weight through one packed initializer's first row, run by run."""
    spans, done, name = [], 0, None
    while done < len(first_row):
        probe = first_row[done:done + PROBE]
        if len(probe) < PROBE:  # the tail is shorter than a probe: it must continue the last run
            return None
        hit = windows.get((rows_count, dtype, probe.tobytes()))
        if hit is None or (name is not None and hit[0] != name):
            return None
        name, start = hit
        row = rows[name]
        length = 0
        while done + length < len(first_row) and start + length < len(row) \
                and row[start + length] == first_row[done + length]:
            length += 1
        spans.append([start, start + length])
        done += length
    return name, spans


# The graphs LoRAs and embeddings patch, as their declarations say (``GraphSpec.lora_patched``: the
# U-Net and every CLIP text encoder, SDXL's second included); the others' maps would be dead weight.
# A name any family declares patched (the denoiser "unet" of every family, SD3's transformer included).
WEIGHT_MAPPED = tuple(dict.fromkeys(name for specs in FAMILIES.values() for name, spec in specs.items()
                                    if spec.lora_patched))
FLOAT_PRECISIONS = ("fp32", "fp16")


def module_weight_map(graph: str, module, graph_path: str | Path, precision: str = "fp32") -> dict[str, dict]:
    """The map for an exported boundary module (``UNet``, ``TextEncoder``): keys without its wrapper prefix.

    A weight the saved graph does not hold is one its outputs do not depend on (SDXL's first text
    encoder stops at the penultimate layer): it is recorded as ``{"init": None}``, so a LoRA layer on
    it is known to change nothing rather than reported as matching nothing. Quantized graphs get no
    map: their weights are not stored as they were, and the runtime refuses LoRAs on them.
    """
    if graph not in WEIGHT_MAPPED or precision not in FLOAT_PRECISIONS:
        return {}
    state = {key.split(".", 1)[1]: value.detach().float().numpy() for key, value in module.state_dict().items()}
    found = build_weight_map(state, graph_path)
    unused = {key: {"init": None} for key, value in state.items()
              if key.endswith("weight") and value.ndim in (2, 4) and key not in found}
    return {**found, **unused}
