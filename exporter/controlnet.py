"""``edgediff export CONTROLNET_SRC OUT``: a diffusers ``ControlNetModel`` folder in, a ControlNet
folder out (one validated graph and its own manifest, runtime/controlnet.py).

The base model's U-Net takes the residuals as inputs that default to zeros, so one base export runs
with any ControlNet that fits it and a plain generation feeds nothing new.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from edgediff.runtime.controlnet import CONTROLNET_KIND, ControlNetManifest, write_controlnet_manifest
from edgediff.runtime.errors import EdgediffError

from .graphs import CONTROLNET, controlnet_dims, controlnet_sizes, hint_scale_factor, residual_specs


def is_controlnet(source) -> bool:
    """A diffusers ControlNet folder: its config.json names the class."""
    config = Path(str(source)) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == "ControlNetModel"
    except (OSError, ValueError):
        return False


def add_zero_defaults(model: onnx.ModelProto, names: frozenset[str]) -> onnx.ModelProto:
    """Give each input in ``names`` a default: an initializer of the same name ("overridable
    initializer", ONNX IR >= 4), zeros of shape [1, C, 1, 1] that broadcast in the U-Net's Add.
    ONNX Runtime does not constant-fold an initializer that is also a graph input, so a fed value
    replaces it (tests/export/test_controlnet.py checks both ways)."""
    have = {tensor.name for tensor in model.graph.initializer}
    for graph_input in model.graph.input:
        if graph_input.name in names and graph_input.name not in have:
            tensor_type = graph_input.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            channels = tensor_type.shape.dim[1].dim_value
            model.graph.initializer.append(numpy_helper.from_array(np.zeros((1, channels, 1, 1), dtype),
                                                                   graph_input.name))
    return model


def controlnet_source(source, allow_pickle: bool = False) -> bool:
    """A ControlNet to export: a diffusers ControlNet folder, or one file in either layout
    (controlnet_file.py); a file neither a checkpoint nor a ControlNet is one line here."""
    from .controlnet_file import file_keys, layout

    path = Path(str(source))
    if path.is_dir() or not path.is_file():
        return is_controlnet(path)
    keys = file_keys(path, allow_pickle)
    if keys is None:
        return False
    if layout(keys) is None and not any("diffusion_model." in key for key in keys):
        raise EdgediffError(f"{path} is neither a Stable Diffusion checkpoint nor a ControlNet (none of its "
                            f"{len(keys)} weights has either's names); LoRAs and embeddings are applied when "
                            "generating (--lora, --embedding)")
    return layout(keys) is not None


def _open_source(source, allow_pickle: bool, config):
    """(config, loader, float32 bytes, origin) of a ControlNet folder or single file."""
    from diffusers import ControlNetModel

    from .components import _config, _guard, _load_module
    from .controlnet_file import load_controlnet
    from .memory import folder_weight_bytes, module_weight_bytes

    path = Path(str(source))
    if path.is_dir():
        settings = _guard(path, lambda: _config(ControlNetModel, path))
        return (settings, lambda name: _guard(path, lambda: _load_module(ControlNetModel, path).eval()),
                folder_weight_bytes(path), {"kind": "diffusers-controlnet", "path": str(path.resolve())})
    model, settings = load_controlnet(path, allow_pickle, Path(config) if config else None)
    holder = [model]  # handed out once: the export frees it after tracing

    return (settings, lambda name: holder.pop(), module_weight_bytes(model),
            {"kind": "single-file-controlnet", "path": str(path.resolve()),
             "config": str(Path(config).resolve()) if config else "inferred from its shapes"})


def export_controlnet(source, out, *, precision: str, target: str, overwrite: bool = False,
                      log: Callable[[str], None] | None = None, allow_pickle: bool = False,
                      config=None) -> ControlNetManifest:
    """Export one ControlNet; staging, resume and the atomic finish work as for a model."""
    from . import export as ex
    from .components import Components
    from .memory import GIB, check_memory, peak_rss_bytes

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    folder, out = Path(str(source)), Path(out)
    ex._check_output(out, overwrite)
    log(f"loading {source}")
    ex._quiet_libraries()
    config, load, weight_bytes, origin = _open_source(source, allow_pickle, config)
    if getattr(config, "global_pool_conditions", False):
        raise EdgediffError(f"{folder} pools its residuals (global_pool_conditions, a shuffle ControlNet); "
                            "edgediff does not export those yet")
    components = Components(SimpleNamespace(controlnet=SimpleNamespace(config=config)), load,
                            {"controlnet": weight_bytes})
    check_memory([components.weight_bytes["controlnet"]], str(source))
    staging = ex._prepare_folders(out, overwrite)
    ex._reset_if_stale(staging, {"precision": precision, "optimize_for": target, "opset": ex.OPSET, "source": origin})
    done = staging / CONTROLNET.name / "done.json"
    if done.is_file():
        entry = ex.GraphEntry.from_dict(json.loads(done.read_text()))
        log("[1/1] controlnet: already exported, skipping")
    else:
        dims = controlnet_dims(config)
        entry = ex._export_graph(components, CONTROLNET, staging, precision, target, "[1/1] controlnet", log,
                                 dims_of=lambda meta: dims,
                                 sizes_of=lambda meta, **kw: controlnet_sizes(config, **kw))
        done.write_text(json.dumps(entry.to_dict(), indent=2))
    manifest = _manifest(config, entry, precision, target, origin)
    if out.exists():
        shutil.rmtree(out)  # empty, or complete and --overwrite given (checked in _check_output)
    done.unlink()
    (staging / "settings.json").unlink()
    staging.rename(out)
    write_controlnet_manifest(out, manifest)
    log(f"done: {out} ({ex._folder_mb(out):.1f} MB) in {time.perf_counter() - started:.0f} s, "
        f"peak RAM {peak_rss_bytes() / GIB:.1f} GiB")
    return manifest


def _manifest(config, entry, precision: str, target: str, origin: dict) -> ControlNetManifest:
    import diffusers
    import onnxruntime
    import torch

    from . import export as ex

    addition = getattr(config, "addition_embed_type", None)
    return ControlNetManifest(
        kind=CONTROLNET_KIND,
        family="sdxl" if addition == "text_time" else "sd",
        cross_attention_dim=int(config.cross_attention_dim),
        addition_embed_type=addition,
        conditioning_channels=int(config.conditioning_channels),
        hint_scale_factor=hint_scale_factor(config),
        residuals=[{"name": spec.name, "channels": spec.shape[1]} for spec in residual_specs(controlnet_dims(config))],
        graphs={CONTROLNET.name: entry},
        precision=precision,
        optimized_for=target,
        source={**origin, "opset": ex.OPSET, "exporter": "torch.onnx (TorchScript)",
                "libraries": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                              "onnxruntime": onnxruntime.__version__}},
    )
