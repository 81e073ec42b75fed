"""Pixel upscalers without torch: an ESRGAN-family network (RRDBNet: Wang et al. 2018, "ESRGAN";
Wang et al. 2021, "Real-ESRGAN") exported to one ONNX graph (exporter/esrgan.py), run in tiles.

A folder holds ``upscaler/model.onnx`` and a manifest with ``"kind": "pixel_upscaler"``, the scale
and the input multiple (Real-ESRGAN's x2 and x1 models pixel-unshuffle their input first). The
picture is cut into tiles of ``tile`` input pixels, each run with ``overlap`` pixels of context on
every side that is then cropped away, so memory stays that of one tile on any picture size
(Real-ESRGAN's ``RealESRGANer.tile_process`` does the same). The hires fix (runtime/hires.py)
takes such a folder as its upscaler; the server lists those found in ``--upscaler-dir``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .errors import InputError, ModelFolderError
from .manifest import MANIFEST_NAME, FolderManifest, GraphEntry, write_manifest

PIXEL_UPSCALER_KIND = "pixel_upscaler"
SCHEMA_VERSION = 1
GRAPH = "upscaler"
TILE, OVERLAP = 128, 16  # input pixels; a 128 tile of a 64-feature RRDBNet x4 holds ~0.5 GB of activations


@dataclass
class PixelUpscalerManifest(FolderManifest):
    """What a pixel-upscaler folder holds: one graph, pictures (1, in_channels, h, w) in [0, 1] to
    (1, out_channels, h * scale, w * scale)."""

    name: str  # the source file's stem: the upscaler's name in infotexts and /sdapi/v1/upscalers
    architecture: str  # "RRDBNet"
    scale: int
    in_channels: int
    out_channels: int
    multiple: int  # the input's height and width must be multiples of it (pixel unshuffle)
    hyperparameters: dict[str, Any]
    graphs: dict[str, GraphEntry]
    precision: str = "fp32"
    source: dict[str, Any] = field(default_factory=dict)
    kind: str = PIXEL_UPSCALER_KIND
    schema_version: int = SCHEMA_VERSION


def write_upscaler_manifest(folder: str | os.PathLike, manifest: PixelUpscalerManifest) -> Path:
    return write_manifest(folder, manifest)


def is_upscaler_folder(folder) -> bool:
    try:
        return json.loads((Path(folder) / MANIFEST_NAME).read_text()).get("kind") == PIXEL_UPSCALER_KIND
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def read_upscaler_manifest(folder: str | os.PathLike) -> PixelUpscalerManifest:
    """One ModelFolderError line for a folder that is not a complete pixel-upscaler export."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not an exported upscaler (no {MANIFEST_NAME}): export one with "
                               f"`edgediff export ESRGAN.safetensors {folder}`")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("kind") != PIXEL_UPSCALER_KIND:
            raise ModelFolderError(f"{folder} holds a model, not a pixel upscaler: give an exported ESRGAN folder")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ModelFolderError(f"{folder}: upscaler manifest schema {data.get('schema_version')!r} is not "
                                   f"supported (this edgediff reads {SCHEMA_VERSION}); re-export it")
        manifest = PixelUpscalerManifest.from_dict(data)
        if GRAPH not in manifest.graphs or int(manifest.scale) < 1 or int(manifest.multiple) < 1:
            raise ValueError("no upscaler graph, or a scale or multiple below 1")
    except ModelFolderError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise ModelFolderError(f"{path} is damaged ({str(error)[:120]}); re-export the upscaler") from None
    if not (folder / manifest.graphs[GRAPH].path).is_file():
        raise ModelFolderError(f"{folder}: {manifest.graphs[GRAPH].path} is missing; re-export the upscaler")
    return manifest


def tile_starts(size: int, tile: int, multiple: int) -> list[int]:
    """Where the tiles of one axis start: every tile ``tile`` long (the last one moved back so it
    ends at the edge), so all tiles but those of a smaller picture have one shape."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile)) + [size - tile]
    return [s // multiple * multiple for s in starts]


def upscale_tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, scale: int, *, tile: int = TILE,
                  overlap: int = OVERLAP, multiple: int = 1) -> np.ndarray:
    """``run`` (1, C, h, w) -> (1, C', h * scale, w * scale) over a picture ``x`` (1, C, H, W) whose
    sides are multiples of ``multiple``: each tile is run with ``overlap`` pixels of context on each
    side (shifted inward at the picture's edges), and only its own region of the output is kept. ``tile=0``:
    the whole picture in one run."""
    _, _, height, width = x.shape
    if not tile or (height <= tile and width <= tile):
        return run(x)
    tile = max(multiple, tile // multiple * multiple)
    overlap = -(-overlap // multiple) * multiple
    out = None
    span_y, span_x = min(tile + 2 * overlap, height), min(tile + 2 * overlap, width)
    for y0 in tile_starts(height, tile, multiple):
        for x0 in tile_starts(width, tile, multiple):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            # The context window slides inward at the picture's edges: every run has one shape.
            cy0, cx0 = min(max(y0 - overlap, 0), height - span_y), min(max(x0 - overlap, 0), width - span_x)
            part = run(np.ascontiguousarray(x[:, :, cy0:cy0 + span_y, cx0:cx0 + span_x]))
            if out is None:
                out = np.empty((1, part.shape[1], height * scale, width * scale), np.float32)
            oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                part[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    return out


class PixelUpscaler:
    """An exported pixel upscaler: ``PixelUpscaler.load(folder)(image) -> image`` (PIL, RGB)."""

    def __init__(self, folder: Path, manifest: PixelUpscalerManifest, session):
        self.folder, self.manifest, self.session = folder, manifest, session

    @classmethod
    def load(cls, folder, provider: str = "auto", threads: int | None = None,
             warn: Callable[[str], None] | None = None) -> "PixelUpscaler":
        from .sessions import GraphSession, resolve_provider

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"upscaler folder not found: {folder}")
        manifest = read_upscaler_manifest(folder)
        provider = resolve_provider(provider, "none")
        session = GraphSession(GRAPH, folder, manifest.graphs[GRAPH], provider, "none",
                               warn or (lambda line: None), threads=threads)
        return cls(folder, manifest, session)

    @property
    def name(self) -> str:
        return self.manifest.name

    def upscale_pixels(self, pixels: np.ndarray, *, tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1] -> (H * scale, W * scale, 3), clipped to [0, 1]. Sides that are
        not multiples of the input multiple are padded by reflection and cropped back (Real-ESRGAN)."""
        m, s = self.manifest, self.manifest.scale
        height, width = pixels.shape[:2]
        pad_h, pad_w = -height % m.multiple, -width % m.multiple
        x = np.pad(pixels, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect") if pad_h or pad_w else pixels
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
        name = self.manifest.graphs[GRAPH].inputs[0].name
        y = upscale_tiled(lambda part: self.session.run(**{name: part})[0], x, s, tile=tile, overlap=overlap,
                          multiple=m.multiple)
        return np.clip(y[0, :, :height * s, :width * s].transpose(1, 2, 0), 0.0, 1.0)

    def __call__(self, image: Image.Image, *, tile: int = TILE, overlap: int = OVERLAP) -> Image.Image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        out = self.upscale_pixels(pixels, tile=tile, overlap=overlap)
        return Image.fromarray((out * 255.0).round().astype(np.uint8))

    def resize(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """To exactly (width, height) as A1111's ``Upscaler.upscale``: the network as many times as
        the size needs (at most 3), then Lanczos to the exact size."""
        for _ in range(3):
            if image.width >= width and image.height >= height:
                break
            image = self(image)
        return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def list_upscalers(folder) -> dict[str, Path]:
    """The exported pixel upscalers directly under ``folder``, by folder name."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {child.name: child for child in sorted(folder.iterdir()) if child.is_dir() and is_upscaler_folder(child)}
