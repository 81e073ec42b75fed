"""Pictures, sizes and other awkward arguments shared by the fuzz tests (built once per session)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 64  # every good picture is 64x64: a valid size for the default model (multiples of 32)


def _rgb() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))


def write_pictures(folder: Path) -> dict[str, Path]:
    """{kind: path}; ``valid`` kinds open as pictures, the others must give one-line errors."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _rgb()
    pictures = {
        "rgb.png": rgb,
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "grey16.png": Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)),
        "palette.png": rgb.convert("P"),
        "one_pixel.png": rgb.resize((1, 1)),
        "odd_size.png": rgb.resize((33, 47)),
    }
    paths = {}
    for name, picture in pictures.items():
        paths[name] = folder / name
        picture.save(paths[name])
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    paths["truncated.png"] = folder / "truncated.png"
    paths["truncated.png"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    paths["text.png"] = folder / "text.png"
    paths["text.png"].write_text("not a picture\n")
    paths["empty.png"] = folder / "empty.png"
    paths["empty.png"].write_bytes(b"")
    paths["missing.png"] = folder / "missing.png"
    paths["folder.png"] = folder / "folder.png"
    paths["folder.png"].mkdir(exist_ok=True)
    return paths


# Pictures that convert to a usable SIDE x SIDE RGB start image.
USABLE = {"rgb.png", "rgba.png", "cmyk.jpg", "grey16.png", "palette.png"}
