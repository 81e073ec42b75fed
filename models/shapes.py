"""Procedural "coloured shapes" data set, caption grammar and a deterministic evaluator.

This is the data the shipped default model is trained on (training/train_vae.py,
training/train_default_v2.py) and the yardstick its generations are judged by. NumPy and Pillow
only: no torch, so the torch-free runtime tests can use it.

An image is 128x128 RGB: one flat-coloured shape (circle, square or upward triangle) of one of
six colours, small or large, at one of five positions, on a plain background of one of four
colours. Captions are plain English with some variation; size, position and (rarely) background
may be left out of a caption, in which case they are still sampled at random for the image.

    rng = np.random.default_rng(0)
    image, caption, attrs = sample(rng)
    evaluate(image)  # -> {"color": "red", "shape": "circle", "background": "white", ...}

The evaluator reads an image with simple statistics:
  background = nearest background colour to the median of a border strip;
  shape mask = pixels far from the background colour (threshold relative to the farthest ones);
  colour     = nearest shape colour to the median of the mask's core pixels;
  bounding box from robust (percentile) extents of the mask;
  shape      = the ideal circle / square / triangle drawn in that box that best matches the mask
               (intersection over union; fill ratios are 0.785 / 1.0 / 0.5);
  position   = from the box centre's offset from the image centre; size = from the box's side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128

# Shape colours: far apart in RGB and far from every background colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 225),
    "yellow": (245, 215, 30),
    "purple": (150, 40, 190),
    "orange": (250, 130, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "cyan": (0, 210, 210),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")

# Box centre (x, y) for each position, and nominal box side for each size, in pixels at 128x128.
POSITION_CENTERS = {
    "left": (36, 64),
    "right": (92, 64),
    "top": (64, 36),
    "bottom": (64, 92),
    "center": (64, 64),
}
SIZE_SIDES = {"small": 30, "large": 54}
POSITION_JITTER = 3  # +- pixels
SIZE_JITTER = 3  # +- pixels

_SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side", "left"),
    "right": ("on the right", "at the right", "on the right side", "right"),
    "top": ("at the top", "on the top", "near the top", "top"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom", "bottom"),
    "center": ("in the center", "in the centre", "in the middle", "center"),
}


# ----------------------------------------------------------------------------- sampling


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """Uniformly random attributes; the background never equals the shape colour."""
    return {
        "color": str(rng.choice(list(COLORS))),
        "shape": str(rng.choice(SHAPES)),
        "background": str(rng.choice(list(BACKGROUNDS))),
        "position": str(rng.choice(POSITIONS)),
        "size": str(rng.choice(SIZES)),
    }


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def caption(attrs: dict[str, str], rng: np.random.Generator, *, p_omit_size: float = 0.3,
            p_omit_position: float = 0.25, p_omit_background: float = 0.05) -> tuple[str, dict[str, bool]]:
    """A plain-English caption for ``attrs`` and which attributes it mentions.

    Returns (caption, mentioned) where mentioned maps attribute name -> bool.
    """
    color, shape, bg = attrs["color"], attrs["shape"], attrs["background"]
    say_size = rng.random() >= p_omit_size
    say_pos = rng.random() >= p_omit_position
    say_bg = rng.random() >= p_omit_background
    size = _pick(rng, _SIZE_WORDS[attrs["size"]]) if say_size else ""
    pos_phrase = _pick(rng, _POSITION_PHRASES[attrs["position"]]) if say_pos else ""
    # the one-word forms ("left") only read well in the terse template
    terse = rng.random() < 0.2
    if terse:
        parts = [" ".join(w for w in (size, color, shape) if w)]
        if say_pos:
            parts.append(attrs["position"] if rng.random() < 0.7 else pos_phrase)
        if say_bg:
            parts.append(f"{bg} background")
        text = ", ".join(parts)
    else:
        if pos_phrase in ("left", "right", "top", "bottom", "center"):
            pos_phrase = _POSITION_PHRASES[attrs["position"]][0]
        article = "an" if (size or color)[0] in "aeiou" else "a"
        noun = " ".join(w for w in (article, size, color, shape) if w)
        bg_phrase = ""
        if say_bg:
            bg_phrase = _pick(rng, (f"on a {bg} background", f"on a {bg} background",
                                    f"against a {bg} background", f"on {bg}"))
        if say_pos and rng.random() < 0.3 and say_bg:
            text = f"{noun} {bg_phrase} {pos_phrase}"
        else:
            text = " ".join(w for w in (noun, pos_phrase, bg_phrase) if w)
    return text, {"size": say_size, "position": say_pos, "background": say_bg}


def render(attrs: dict[str, str], rng: np.random.Generator | None = None, *,
           size: int = IMAGE_SIZE, supersample: int = 4) -> Image.Image:
    """Draw ``attrs`` (anti-aliased). ``rng`` jitters position and size; None draws them exactly."""
    cx, cy = POSITION_CENTERS[attrs["position"]]
    side = SIZE_SIDES[attrs["size"]]
    if rng is not None:
        cx += float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
        cy += float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
        side += float(rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    k = supersample * size / IMAGE_SIZE
    big = Image.new("RGB", (round(size * supersample),) * 2, BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(big)
    x0, y0, x1, y1 = (cx - side / 2) * k, (cy - side / 2) * k, (cx + side / 2) * k, (cy + side / 2) * k
    fill = COLORS[attrs["color"]]
    if attrs["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif attrs["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif attrs["shape"] == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {attrs['shape']!r}")
    return big.resize((size, size), Image.Resampling.BOX)


def sample(rng: np.random.Generator, **caption_kw) -> tuple[Image.Image, str, dict[str, str]]:
    """One (image, caption, attributes) triple, fully determined by ``rng``."""
    attrs = sample_attributes(rng)
    text, _ = caption(attrs, rng, **caption_kw)
    return render(attrs, rng), text, attrs


def make_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """``n`` samples as a uint8 array (n, 128, 128, 3), captions and attributes."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions, attributes = [], []
    for i in range(n):
        im, text, attrs = sample(rng)
        images[i] = np.asarray(im)
        captions.append(text)
        attributes.append(attrs)
    return images, captions, attributes


# ----------------------------------------------------------------------------- evaluator


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255)
    return arr.astype(np.float32)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [float(np.sum((rgb - np.asarray(palette[n], np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(d))]


def _template(shape: str, h: int, w: int) -> np.ndarray:
    """Ideal shape filling an h x w box, as a float mask."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx + 0.5) / w  # 0..1
    v = (yy + 0.5) / h
    if shape == "square":
        return np.ones((h, w), np.float32)
    if shape == "circle":
        return (((u - 0.5) ** 2 + (v - 0.5) ** 2) <= 0.25).astype(np.float32)
    if shape == "triangle":
        return (np.abs(u - 0.5) <= v / 2).astype(np.float32)
    raise ValueError(shape)


def evaluate(image: Any) -> dict[str, Any]:
    """Attributes read from an image: color, shape, background, position, size (+ diagnostics).

    Deterministic; works at any square-ish resolution (positions and sizes are relative).
    When no shape can be found, color/shape/position/size are None.
    """
    arr = _as_array(image)
    h, w, _ = arr.shape
    b = max(2, round(min(h, w) * 0.03))
    border = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3),
                             arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    result: dict[str, Any] = {"background": _nearest(bg_rgb, BACKGROUNDS), "color": None,
                              "shape": None, "position": None, "size": None}
    dist = np.sqrt(np.sum((arr - bg_rgb) ** 2, axis=2))
    peak = float(np.percentile(dist, 99.5))
    result["contrast"] = peak
    if peak < 40.0:
        return result
    mask = dist > 0.5 * peak
    if mask.sum() < 0.001 * h * w:
        return result
    core = dist > 0.75 * peak
    result["color"] = _nearest(np.median(arr[core], axis=0), COLORS)

    ys, xs = np.nonzero(mask)
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    ix0, ix1, iy0, iy1 = int(round(x0)), int(round(x1)) + 1, int(round(y0)), int(round(y1)) + 1
    bw, bh = max(1, ix1 - ix0), max(1, iy1 - iy0)
    box = mask[iy0:iy1, ix0:ix1].astype(np.float32)
    fill = float(box.mean())
    ious = {}
    for shape in SHAPES:
        t = _template(shape, bh, bw)
        inter = float(np.sum(t * box))
        union = float(np.sum(np.maximum(t, box))) + float(mask.sum() - box.sum())
        ious[shape] = inter / max(union, 1.0)
    result["shape"] = max(ious, key=ious.get)
    result["fill"] = fill
    result["iou"] = ious

    cx = (x0 + x1 + 1) / 2 / w - 0.5  # relative offset from the centre, -0.5..0.5
    cy = (y0 + y1 + 1) / 2 / h - 0.5
    if max(abs(cx), abs(cy)) < 14 / IMAGE_SIZE:
        result["position"] = "center"
    elif abs(cx) >= abs(cy):
        result["position"] = "left" if cx < 0 else "right"
    else:
        result["position"] = "top" if cy < 0 else "bottom"
    side = max(bw / w, bh / h) * IMAGE_SIZE
    threshold = (SIZE_SIDES["small"] + SIZE_SIDES["large"]) / 2
    result["size"] = "large" if side >= threshold else "small"
    result["box"] = (ix0, iy0, ix1, iy1)
    return result


ATTRIBUTES = ("color", "shape", "background", "position", "size")


def score(predicted: dict[str, Any], expected: dict[str, str]) -> dict[str, bool]:
    """Per-attribute correctness for the attributes present in ``expected``."""
    return {k: predicted.get(k) == v for k, v in expected.items() if k in ATTRIBUTES}


# ----------------------------------------------------------------------------- evaluation grid


def evaluation_grid(seeds: tuple[int, ...] = (0, 1)) -> list[dict[str, Any]]:
    """The fixed evaluation grid: every colour x shape, twice each with varied position,
    background and size, and each prompt at every seed in ``seeds`` (2 -> 72 entries).

    Entries: {"prompt": str, "expected": {attr: value}, "seed": int}.
    """
    entries = []
    colors, bgs = list(COLORS), list(BACKGROUNDS)
    i = 0
    for ci, color in enumerate(colors):
        for si, shape in enumerate(SHAPES):
            for variant in range(2):
                position = POSITIONS[(ci + 2 * si + 3 * variant) % len(POSITIONS)]
                size = SIZES[(ci + si + variant) % 2]
                bg = bgs[(ci + si + 2 * variant) % len(bgs)]
                if variant == 0:
                    prompt = f"a {size} {color} {shape} {_POSITION_PHRASES[position][0]} on a {bg} background"
                else:
                    prompt = f"{size} {color} {shape}, {position}, {bg} background"
                expected = {"color": color, "shape": shape, "background": bg,
                            "position": position, "size": size}
                for seed in seeds:
                    entries.append({"prompt": prompt, "expected": dict(expected), "seed": int(seed)})
                i += 1
    return entries


def summarize(results: list[dict[str, bool]]) -> dict[str, float]:
    """Per-attribute accuracy over a list of ``score`` results."""
    out = {}
    for k in ATTRIBUTES:
        vals = [r[k] for r in results if k in r]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out
