"""sd-webui-controlnet's API on ``edgediff serve``: ``alwayson_scripts.controlnet.args`` on txt2img and
img2img, ``GET /controlnet/model_list`` and ``GET /controlnet/module_list``.

Translation only: each enabled unit, as webuiapi's ``ControlNetUnit.to_dict()`` sends it, becomes a
runtime ControlNet unit (runtime/controlnet.py); the GenerationRequest checks its values (scale,
start/end, the ControlNet's fit with the model) like any other request's. What is mapped:

- ``model``: a ControlNet folder under ``--controlnet-dir``, by its listed title ``name [sha256[:8]]``
  or by its folder name; ``module``: ``none``, ``canny``, any ``depth*`` (the exported depth model of
  ``--control-depth-model``); ``weight`` -> scale; ``guidance_start``/``guidance_end`` -> start/end;
  ``control_mode`` "Balanced" (0) or "ControlNet is more important" (2, formerly guess mode) ->
  guess_mode; ``image`` (or ``input_image``; empty on img2img: the init image, as sd-webui-controlnet
  does); ``threshold_a``/``threshold_b`` -> canny's low/high thresholds (-1: its defaults 100/200);
  ``resize_mode`` "Just Resize", "Crop and Resize" (centre crop to the output's aspect ratio), "Resize
  and Fill" (centre, padded with black to it); ``enabled``: false units are skipped.
- Refused with one line: "My prompt is more important" (1: sd-webui-controlnet's own residual
  weighting, which diffusers has no equivalent of), unit masks, unknown models and modules.
- Ignored: ``processor_res`` and ``pixel_perfect`` (preprocessors run at the picture's own size),
  ``low_vram``, ``hr_option``.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from PIL import Image

from edgediff.runtime.controlnet import CONTROLNET_KIND, GRAPH, read_controlnet_manifest
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.manifest import MANIFEST_NAME
from edgediff.runtime.preprocess import CANNY_HIGH, CANNY_LOW, canny

from .errors import bad
from .images import decode_image

CONTROL_MODES = {0: False, "Balanced": False, 2: True, "ControlNet is more important": True}
PROMPT_MODE = (1, "My prompt is more important")
RESIZE_MODES = {0: "just", "Just Resize": "just", 1: "crop", "Crop and Resize": "crop",
                "Scale to Fit (Inner Fit)": "crop", 2: "fill", "Resize and Fill": "fill",
                "Envelope (Outer Fit)": "fill"}
DEPTH_MODULES = ("depth", "depth_midas", "depth_anything", "depth_anything_v2", "depth_zoe", "depth_leres",
                 "depth_leres++", "depth_hand_refiner")


class ControlNetApi:
    """The ControlNets under ``folder`` (None: none), the depth model for ``depth*`` modules, and the
    routes that list them; ``units(req, init_image)`` translates a request's units."""

    def __init__(self, folder: str | Path | None, depth_model: str | Path | None, default_size: int,
                 max_input_pixels: int):
        self.folder = None if folder is None else Path(folder)
        self.depth_model = None if depth_model is None else Path(depth_model)
        self.default_size, self.max_input_pixels = default_size, max_input_pixels
        self.router = APIRouter(prefix="/controlnet", tags=["controlnet"])
        self.router.add_api_route("/model_list", self.model_list, methods=["GET"])
        self.router.add_api_route("/module_list", self.module_list, methods=["GET"])

    def models(self) -> dict[str, Path]:
        """{title: folder} of the exported ControlNets in the folder, read afresh (exports may land
        while the server runs); folders that are not complete ControlNet exports are left out."""
        found = {}
        for path in sorted(self.folder.iterdir()) if self.folder is not None and self.folder.is_dir() else ():
            try:
                if json.loads((path / MANIFEST_NAME).read_text()).get("kind") != CONTROLNET_KIND:
                    continue
                sha256 = read_controlnet_manifest(path).graphs[GRAPH].sha256
            except (OSError, ValueError, AttributeError, EdgediffError):
                continue
            found[f"{path.name} [{sha256[:8]}]"] = path
        return found

    async def model_list(self) -> dict[str, list[str]]:
        return {"model_list": list(self.models())}

    async def module_list(self) -> dict[str, list[str]]:
        modules = ["none"] + (["canny"] if importlib.util.find_spec("cv2") else [])
        return {"module_list": modules + (list(DEPTH_MODULES) if self.depth_model is not None else [])}

    def units(self, req, init_image: Image.Image | None) -> list[dict]:
        """The request's enabled units as runtime unit dicts (empty: no ControlNet)."""
        args = _script_args(getattr(req, "model_extra", None) or {})
        if not args:
            return []
        models = self.models()
        width = req.width or (init_image.width if init_image is not None else self.default_size)
        height = req.height or (init_image.height if init_image is not None else self.default_size)
        return [self._unit(index, unit, models, init_image, width, height)
                for index, unit in enumerate(args) if unit.get("enabled", True) is not False]

    def _unit(self, index: int, unit: dict, models: dict[str, Path], init_image, width: int, height: int) -> dict:
        label = f"controlnet unit {index}"
        folder = _model(label, unit.get("model"), models)
        module = str(unit.get("module") or "none").lower()
        if module not in ("none", "canny") and not module.startswith("depth"):
            bad(f"{label}: unknown module {module[:100]!r}; this server runs none, canny and depth "
                "(see /controlnet/module_list)")
        if unit.get("mask"):
            bad(f"{label}: unit masks are not supported; send the picture without a mask")
        mode = unit.get("control_mode", 0)
        if mode in PROMPT_MODE:
            bad(f"{label}: control_mode 'My prompt is more important' is not supported; use 'Balanced' or "
                "'ControlNet is more important'")
        if mode not in CONTROL_MODES:
            bad(f"{label}: unknown control_mode {str(mode)[:100]!r}; use 'Balanced' or 'ControlNet is more important'")
        resize = RESIZE_MODES.get(unit.get("resize_mode", "Just Resize"))
        if resize is None:
            bad(f"{label}: unknown resize_mode {str(unit.get('resize_mode'))[:100]!r}; use Just Resize, "
                "Crop and Resize or Resize and Fill")
        image = fit(self._image(label, unit, init_image), width, height, resize)
        preprocess = "depth" if module.startswith("depth") else module
        if module == "canny":
            low, high = _thresholds(label, unit)
            if (low, high) != (CANNY_LOW, CANNY_HIGH):  # the runtime's canny runs with its defaults
                image, preprocess = canny(image, low, high), "none"
        extra = {"preprocess_model": str(self.depth_model)} if preprocess == "depth" and self.depth_model else {}
        return dict(model=str(folder), image=image, scale=unit.get("weight", 1.0),
                    start=unit.get("guidance_start", 0.0), end=unit.get("guidance_end", 1.0),
                    guess_mode=CONTROL_MODES[mode], preprocess=preprocess, **extra)

    def _image(self, label: str, unit: dict, init_image) -> Image.Image:
        data = unit.get("image", unit.get("input_image"))
        if isinstance(data, dict):  # sd-webui-controlnet also takes {"image": ..., "mask": ...}
            if data.get("mask"):
                bad(f"{label}: unit masks are not supported; send the picture without a mask")
            data = data.get("image")
        if not data:
            if init_image is None:
                bad(f"{label} has no image (image is empty); send the control picture as base64")
            return init_image
        if not isinstance(data, str):
            bad(f"{label}: image must be a base64 string, not {type(data).__name__}")
        return decode_image(data, f"{label} image", self.max_input_pixels)


def _script_args(extra: dict[str, Any]) -> list[dict]:
    """``alwayson_scripts.controlnet.args`` (the script's name in any case: webuiapi says "ControlNet")."""
    scripts = extra.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        bad("alwayson_scripts must be an object of {script name: {\"args\": [...]}}")
    found = next((value for name, value in scripts.items() if str(name).lower() == "controlnet"), None)
    if found is None:
        return []
    args = found.get("args") if isinstance(found, dict) else None
    if not isinstance(args, list) or not all(isinstance(unit, dict) for unit in args):
        bad("alwayson_scripts.controlnet.args must be a list of ControlNet units (objects)")
    return args


def _model(label: str, name, models: dict[str, Path]) -> Path:
    """A listed title (``name [hash]``) or a folder name."""
    if not isinstance(name, str) or name in ("", "None"):
        bad(f"{label} names no model; choose one of /controlnet/model_list")
    by_name = {path.name: path for path in models.values()}
    folder = models.get(name) or by_name.get(name) or by_name.get(name.rsplit(" [", 1)[0])
    if folder is None:
        have = ", ".join(models) or "none (start the server with --controlnet-dir DIR)"
        bad(f"{label}: unknown ControlNet model {name[:200]!r}; this server has: {have[:500]}")
    return folder


def _thresholds(label: str, unit: dict) -> tuple[int, int]:
    """Canny's (low, high) from threshold_a/b; -1 (or absent): sd-webui-controlnet's defaults."""
    values = []
    for key, default in (("threshold_a", CANNY_LOW), ("threshold_b", CANNY_HIGH)):
        value = unit.get(key, -1)
        if type(value) not in (int, float) or not math.isfinite(value) or not (value == -1 or 0 <= value <= 255):
            bad(f"{label}: {key} (canny's {'low' if key == 'threshold_a' else 'high'} threshold) must be a "
                f"number from 0 to 255, or -1 for the default, not {str(value)[:50]}")
        values.append(default if value == -1 else int(round(value)))
    return values[0], values[1]


def fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """The picture brought to the output's aspect ratio as sd-webui-controlnet's resize modes do
    before the hint is resized (runtime/preprocess.py): "crop" cuts its centre, "fill" pads it
    (black); "just" leaves it to be stretched."""
    w, h = image.size
    if mode == "just" or w * height == h * width:
        return image
    scale = (max if mode == "crop" else min)(width / w, height / h)
    side_w, side_h = round(width / scale), round(height / scale)
    if mode == "crop":
        left, top = (w - side_w) // 2, (h - side_h) // 2
        return image.crop((left, top, left + side_w, top + side_h))
    canvas = Image.new("RGB", (side_w, side_h))
    canvas.paste(image, ((side_w - w) // 2, (side_h - h) // 2))
    return canvas
