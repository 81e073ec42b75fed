"""``edgediff export DEPTH_SRC OUT``: a transformers depth-estimation folder (DPT, Depth Anything)
in, a depth-model folder out: one graph validated against torch, and a manifest (``"kind":
"depth"``) with the image processor's constants the runtime needs (runtime/depth.py).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from torch import nn

from edgediff.runtime.depth import (DEPTH_KIND, GRAPH, PROCESSOR_DEFAULTS, DepthManifest,
                                    write_depth_manifest)
from edgediff.runtime.errors import EdgediffError

from .graphs import FLOAT, TOLERANCE, GraphSpec, _t

ARCHITECTURES = ("DPTForDepthEstimation", "DepthAnythingForDepthEstimation")
PROCESSORS = ("DPTImageProcessor", "DPTImageProcessorFast", "DPTImageProcessorPil")


class DepthEstimator(nn.Module):
    """Normalised pixels in, the model's predicted depth (relative inverse depth) out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        head = getattr(model, "head", None)
        if type(head).__name__ == "DepthAnythingDepthEstimationHead":
            head.forward = types.MethodType(_depth_anything_head, head)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


def _depth_anything_head(head, hidden_states, patch_height, patch_width):
    """transformers' ``DepthAnythingDepthEstimationHead.forward``, its output size kept symbolic:
    there ``int()`` casts it, which a trace records as the example's size."""
    from transformers.utils import torch_int

    x = head.conv1(hidden_states[head.head_in_index])
    x = nn.functional.interpolate(x, (torch_int(patch_height * head.patch_size), torch_int(patch_width * head.patch_size)),
                                  mode="bilinear", align_corners=True)
    x = head.conv3(head.activation1(head.conv2(x)))
    return (head.activation2(x) * head.max_depth).squeeze(dim=1)


DEPTH = GraphSpec(
    GRAPH,
    lambda pipe, names: DepthEstimator(pipe.depth),
    inputs=(_t("pixel_values", FLOAT, "batch", "rgb", "height", "width"),),
    # At the input's size for DPT and Depth Anything; named apart only by its axes' labels.
    outputs=(_t("predicted_depth", FLOAT, "batch", "height", "width"),),
    optimizer_type="vit",
    tolerance=TOLERANCE,
)


def _config_json(source) -> dict | None:
    path = Path(str(source)) / "config.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_depth_model(source) -> bool:
    """A transformers depth-estimation folder, told by its config.json's ``architectures``."""
    data = _config_json(source)
    names = [str(name) for name in (data or {}).get("architectures") or ()]
    other = [name for name in names if name.endswith("ForDepthEstimation") and name not in ARCHITECTURES]
    if other and not set(names) & set(ARCHITECTURES):
        raise EdgediffError(f"{source} holds a {other[0]}; edgediff exports the depth models "
                            f"{' and '.join(ARCHITECTURES)}")
    return bool(set(names) & set(ARCHITECTURES))


def processor_constants(folder: Path) -> dict:
    """The image processor's settings the runtime replays (runtime/depth.py ``pixel_values``)."""
    path = folder / "preprocessor_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise EdgediffError(f"{folder} has no readable preprocessor_config.json (the image processor's "
                            "settings the depth model was trained with)") from None
    kind = data.get("image_processor_type", "DPTImageProcessor")
    if kind not in PROCESSORS:
        raise EdgediffError(f"{folder}: its image processor is {kind}; edgediff replays {', '.join(PROCESSORS[:1])}")
    constants = {key: data.get(key, default) for key, default in PROCESSOR_DEFAULTS.items()}
    if isinstance(constants["size"], dict) and not {"height", "width"} <= set(constants["size"]):
        raise EdgediffError(f"{folder}: preprocessor_config.json's size {constants['size']} has no height and width")
    return constants


def patch_size(config) -> int:
    """Pixels per token of the backbone: example sizes must be whole tokens."""
    backbone = getattr(config, "backbone_config", None)
    return int(getattr(backbone, "patch_size", None) or getattr(config, "patch_size", None) or 16)


def depth_sizes(config, batch: int, latent_units: int) -> dict:
    """Example sizes, other at validation than at tracing: the graph must take any size. Square:
    DPT's ViT takes square token grids only (its processors resize to a square)."""
    side = 2 * patch_size(config) * latent_units
    return {"batch": batch, "height": side, "width": side}


def _load(folder: Path, architecture: str):
    """(config, loader): the transformers class named in config.json, weights read when traced."""
    import transformers

    from .components import _guard, _load_module

    cls = getattr(transformers, architecture)
    config = _guard(folder, lambda: cls.config_class.from_pretrained(folder))
    return config, lambda name: _guard(folder, lambda: _load_module(cls, folder).eval())


def export_depth(source, out, *, precision: str, target: str, overwrite: bool = False,
                 log: Callable[[str], None] | None = None, **_) -> DepthManifest:
    """Export one depth estimator; staging, resume and the atomic finish work as for a model."""
    from . import export as ex
    from .components import Components
    from .memory import GIB, check_memory, folder_weight_bytes, peak_rss_bytes

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    folder, out = Path(str(source)), Path(out)
    ex._check_output(out, overwrite)
    architecture = next(a for a in _config_json(folder)["architectures"] if a in ARCHITECTURES)
    processor = processor_constants(folder)
    log(f"loading {source} ({architecture})")
    ex._quiet_libraries()
    config, load = _load(folder, architecture)
    components = Components(SimpleNamespace(depth=SimpleNamespace(config=config)), load,
                            {"depth": folder_weight_bytes(folder)})
    check_memory([components.weight_bytes["depth"]], str(source))
    staging = ex._prepare_folders(out, overwrite)
    origin = {"kind": "transformers-depth", "path": str(folder.resolve()), "architecture": architecture}
    ex._reset_if_stale(staging, {"precision": precision, "optimize_for": target, "opset": ex.OPSET, "source": origin})
    done = staging / GRAPH / "done.json"
    if done.is_file():
        entry = ex.GraphEntry.from_dict(json.loads(done.read_text()))
        log(f"[1/1] {GRAPH}: already exported, skipping")
    else:
        entry = ex._export_graph(components, DEPTH, staging, precision, target, f"[1/1] {GRAPH}", log,
                                 dims_of=lambda meta: {"rgb": 3},
                                 sizes_of=lambda meta, **kw: depth_sizes(config, **kw))
        done.write_text(json.dumps(entry.to_dict(), indent=2))
    manifest = _manifest(architecture, processor, entry, precision, target, origin)
    if out.exists():
        shutil.rmtree(out)  # empty, or complete and --overwrite given (checked in _check_output)
    done.unlink()
    (staging / "settings.json").unlink()
    staging.rename(out)
    write_depth_manifest(out, manifest)
    log(f"done: {out} ({ex._folder_mb(out):.1f} MB) in {time.perf_counter() - started:.0f} s, "
        f"peak RAM {peak_rss_bytes() / GIB:.1f} GiB")
    return manifest


def _manifest(architecture, processor, entry, precision, target, origin) -> DepthManifest:
    import onnxruntime
    import torch
    import transformers

    from . import export as ex

    return DepthManifest(
        architecture=architecture, processor=processor, graphs={GRAPH: entry}, precision=precision,
        optimized_for=target, kind=DEPTH_KIND,
        source={**origin, "opset": ex.OPSET, "exporter": "torch.onnx (TorchScript)",
                "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "onnxruntime": onnxruntime.__version__}})
