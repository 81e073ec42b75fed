"""The ``depth`` preprocessor without torch: an exported depth estimator (DPT, Ranftl et al. 2021;
Depth Anything, Yang et al. 2024) run by ONNX Runtime.

Its folder holds one graph and a manifest (``"kind": "depth"``) with the image processor's
constants, so the picture is resized and normalised as transformers' ``DPTImageProcessorPil``
does it, and the predicted depth becomes the hint as transformers' ``depth-estimation`` pipeline
makes it for diffusers' ControlNet depth examples (and sd-webui-controlnet): resized back to the
picture's size with bicubic interpolation (torch's ``interpolate``, a = -0.75), scaled min to max
onto 0..255, the same value in three channels.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ModelFolderError
from .manifest import MANIFEST_NAME, FolderManifest, GraphEntry, write_manifest

DEPTH_KIND = "depth"
SCHEMA_VERSION = 1
GRAPH = "depth"
# transformers' DPTImageProcessor defaults, for keys a preprocessor_config.json leaves out.
PROCESSOR_DEFAULTS = {"do_resize": True, "size": {"height": 384, "width": 384}, "keep_aspect_ratio": False,
                      "ensure_multiple_of": 1, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                      "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                      "do_pad": False, "size_divisor": None}


@dataclass
class DepthManifest(FolderManifest):
    architecture: str  # the transformers class it was exported from
    processor: dict[str, Any]  # PROCESSOR_DEFAULTS' keys, from the model's preprocessor_config.json
    graphs: dict[str, GraphEntry]
    precision: str = "fp32"
    optimized_for: str = "none"
    source: dict[str, Any] = field(default_factory=dict)
    kind: str = DEPTH_KIND
    schema_version: int = SCHEMA_VERSION


def write_depth_manifest(folder: str | os.PathLike, manifest: DepthManifest) -> Path:
    return write_manifest(folder, manifest)


def read_depth_manifest(folder: str | os.PathLike) -> DepthManifest:
    """One ModelFolderError line for a folder that is not a complete depth-model export."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    export = f"export one with `edgediff export DEPTH_SRC {folder}` (a transformers DPT or Depth Anything folder)"
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not an exported depth model (no {MANIFEST_NAME}): {export}")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("kind") != DEPTH_KIND:
            kind = data.get("kind", "model") if isinstance(data, dict) else "something else"
            raise ModelFolderError(f"{folder} holds a {kind}, not a depth model: {export}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ModelFolderError(f"{folder}: depth manifest version {data.get('schema_version')!r} is not "
                                   f"supported (this edgediff reads {SCHEMA_VERSION}); re-export it")
        manifest = DepthManifest.from_dict(data)
        processor = {**PROCESSOR_DEFAULTS, **manifest.processor}
    except ModelFolderError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        raise ModelFolderError(f"{path} is not a valid depth manifest ({str(error)[:100]}); re-export it") from None
    if GRAPH not in manifest.graphs or not (folder / manifest.graphs[GRAPH].path).is_file():
        raise ModelFolderError(f"{folder}: the depth graph is missing; re-export it")
    manifest.processor = processor
    return manifest


def resized_size(height: int, width: int, processor: dict) -> tuple[int, int]:
    """transformers' DPT ``get_resize_output_image_size``: scale as little as possible when the
    aspect ratio is kept, then round to the multiple (Python's round, ties to even, as there)."""
    if not processor["do_resize"]:
        return height, width
    size, multiple = processor["size"], processor["ensure_multiple_of"] or 1
    target = (size, size) if isinstance(size, int) else (size["height"], size["width"])
    scale_h, scale_w = target[0] / height, target[1] / width
    if processor["keep_aspect_ratio"]:
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h

    def constrain(value: float) -> int:
        x = round(value / multiple) * multiple
        return x if x >= 0 else math.ceil(value / multiple) * multiple

    return constrain(scale_h * height), constrain(scale_w * width)


def pixel_values(image: Image.Image, processor: dict) -> np.ndarray:
    """(1, 3, h, w) float32: ``DPTImageProcessorPil`` (PIL resize of the uint8 picture, rescale,
    normalise, optional centred padding to a multiple)."""
    height, width = resized_size(image.height, image.width, processor)
    if (height, width) != (image.height, image.width) and processor["do_resize"]:
        image = image.resize((width, height), resample=int(processor["resample"]))
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    x = x.astype(np.float64) * processor["rescale_factor"] if processor["do_rescale"] else x.astype(np.float64)
    x = x.astype(np.float32)
    if processor["do_normalize"]:
        mean = np.asarray(processor["image_mean"], dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(processor["image_std"], dtype=np.float32).reshape(-1, 1, 1)
        x = (x - mean) / std
    divisor = processor["size_divisor"]
    if processor["do_pad"] and divisor:
        pads = [(0, 0)] + [((math.ceil(n / divisor) * divisor - n) // 2,
                            math.ceil(n / divisor) * divisor - n - (math.ceil(n / divisor) * divisor - n) // 2)
                           for n in x.shape[1:]]
        x = np.pad(x, pads)
    return np.ascontiguousarray(x[None], dtype=np.float32)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of torch's ``interpolate(mode="bicubic", align_corners=False)``
    along one axis: Keys' cubic convolution with a = -0.75, source indices clamped at the borders."""
    a = -0.75
    x = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(x)
    t = x - base
    weights = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
               ((a + 2) * t - (a + 3)) * t * t + 1,
               ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
               ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
    matrix = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    for offset, weight in zip((-1, 0, 1, 2), weights):
        np.add.at(matrix, (rows, np.clip(base.astype(int) + offset, 0, size_in - 1)), weight)
    return matrix


def depth_map(predicted: np.ndarray, height: int, width: int) -> np.ndarray:
    """The model's (h, w) depth at the picture's size: transformers' ``post_process_depth_estimation``."""
    predicted = predicted.astype(np.float64)
    return (bicubic_matrix(predicted.shape[0], height) @ predicted @ bicubic_matrix(predicted.shape[1], width).T
            ).astype(np.float32)


def depth_hint(depth: np.ndarray) -> Image.Image:
    """Min to max onto 0..255, truncated to 8 bits, in three channels (transformers'
    ``DepthEstimationPipeline.postprocess``; diffusers' ControlNet depth example stacks it)."""
    span = depth.max() - depth.min()
    scaled = (depth - depth.min()) / (span if span > 0 else np.float32(1.0))
    gray = (scaled * np.float32(255)).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


class DepthEstimator:
    """An exported depth model and its open session (``GraphSession`` from runtime/sessions.py)."""

    def __init__(self, manifest: DepthManifest, session):
        self.manifest, self.session = manifest, session

    def depth(self, image: Image.Image) -> np.ndarray:
        """The float depth map of an RGB picture, at its size."""
        predicted = self.session.run(pixel_values=pixel_values(image, self.manifest.processor))[0]
        return depth_map(predicted[0], image.height, image.width)

    def __call__(self, image: Image.Image) -> Image.Image:
        return depth_hint(self.depth(image))

    def close(self) -> None:
        self.session.close()
