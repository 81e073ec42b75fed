"""Control hints without torch: the preprocessors, and the hint tensor a ControlNet takes.

``none``: the picture is the hint already. ``canny``: OpenCV's Canny edges (Canny 1986) with
sd-webui-controlnet's default thresholds, white edges on black in three channels, as diffusers'
ControlNet examples build them. ``depth``: an exported depth model (runtime/depth.py: DPT or Depth
Anything, exported with ``edgediff export DEPTH_SRC DIR``) run by ONNX Runtime. The hint is then resized and scaled as diffusers' ControlNet image processor does
(``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``): RGB, Lanczos, values in [0, 1].
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from .errors import InputError
from .images import to_rgb

PREPROCESSORS = ("none", "canny", "depth")
CANNY_LOW, CANNY_HIGH = 100, 200  # sd-webui-controlnet's canny defaults (its "Canny Low/High Threshold")


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """Edges of the RGB picture, as sd-webui-controlnet's ``canny`` module computes them."""
    try:
        import cv2
    except ImportError:
        raise InputError("the canny preprocessor needs OpenCV: pip install opencv-python-headless "
                         "(or edgediff[controlnet])") from None
    edges = cv2.Canny(np.asarray(image, dtype=np.uint8), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


NO_DEPTH_MODEL = ("the depth preprocessor needs an exported depth model: export a transformers DPT or Depth "
                  "Anything folder with `edgediff export DEPTH_SRC DIR` and give DIR as the unit's preprocess_model "
                  "(CLI: --control-preprocess-model DIR), or give a ready depth map with preprocess='none'")


def preprocess(image, name: str, label: str = "control image",
               estimator: Callable[[Image.Image], Image.Image] | None = None) -> Image.Image:
    """The hint picture for ``image`` after preprocessor ``name``; unreadable input is one InputError.
    ``estimator``: the depth model (runtime/depth.py ``DepthEstimator``) for ``depth``."""
    if name not in PREPROCESSORS:
        raise InputError(f"unknown control preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}")
    if name == "depth" and estimator is None:
        raise InputError(NO_DEPTH_MODEL)
    image = to_rgb(image, label)
    return image if name == "none" else canny(image) if name == "canny" else estimator(image)


def hint_tensor(image: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [0, 1]: diffusers' ``prepare_image`` for a ControlNet."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return (np.asarray(image, dtype=np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None].copy()
