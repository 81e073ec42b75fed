"""The hires fix, as AUTOMATIC1111 does it (``modules/processing.py``: ``sample_hr_pass``).

A first pass at the requested size, an upscale, then an img2img second pass at the upscaled size
with its own steps and denoising strength. Both passes are ordinary generations of the same
pipeline: the first is the request without ``hires``; the second starts from the upscaled latent
(``modes.LatentImg2Img``, latent upscalers) or from the upscaled picture (``modes.Img2Img``, pixel
upscalers). The second pass draws its noise from the same seed, as A1111 seeds its hires noise.

Latent upscalers are A1111's ``latent_upscale_modes`` (``modules/shared_items.py``), each a
``torch.nn.functional.interpolate(samples, size, mode, antialias)`` call: :func:`interpolate`
computes the same in NumPy. Pixel upscalers: Lanczos (PIL), A1111's ``Lanczos`` upscaler and the
documented fallback (no ESRGAN network is shipped), or an exported ESRGAN-family network given as
its folder (runtime/pixel_upscaler.py), run as A1111's ``Upscaler.upscale`` runs one.

With both ``width`` and ``height`` (A1111's hr_resize_x and hr_resize_y) the first pass is upscaled
to cover that size with its own aspect, then the centre is cropped (``calculate_target_resolution``'s
``truncate_x/y``), never stretched.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import arguments as args
from .errors import InputError
from .pixel_upscaler import PixelUpscaler, is_upscaler_folder

# Our names -> (A1111's label, interpolate mode, antialias); None: a pixel upscaler (PIL filter).
UPSCALERS = {
    "latent": ("Latent", "bilinear", False),
    "latent-antialiased": ("Latent (antialiased)", "bilinear", True),
    "latent-bicubic": ("Latent (bicubic)", "bicubic", False),
    "latent-bicubic-antialiased": ("Latent (bicubic antialiased)", "bicubic", True),
    "latent-nearest": ("Latent (nearest)", "nearest", False),
    "latent-nearest-exact": ("Latent (nearest-exact)", "nearest-exact", False),
    "lanczos": ("Lanczos", None, False),
    "nearest": ("Nearest", None, False),
}
PIXEL_FILTERS = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
MAX_SCALE = 8.0


def upscaler_name(name) -> str:
    """Our name for an upscaler given as ours or as A1111's label ("Latent (bicubic)"), or the
    folder of an exported pixel upscaler (runtime/pixel_upscaler.py)."""
    text = str(name).strip().lower().replace(" (", "-").replace(")", "").replace(" ", "-") \
        if isinstance(name, str) else ""
    if text in UPSCALERS:
        return text
    if isinstance(name, (str, Path)) and str(name).strip() and is_upscaler_folder(name):
        return str(name)
    raise InputError(f"unknown hires upscaler {args.short(name)}; expected one of {', '.join(UPSCALERS)}, "
                     "or an exported upscaler folder (edgediff export ESRGAN.safetensors FOLDER)")


@dataclass(frozen=True)
class HiresFix:
    """``hires=`` checked: scale (x the first pass's size, unless ``width``/``height`` are given,
    A1111's hr_resize_x/y), steps (0: the first pass's steps, as A1111), strength (the second
    pass's denoising strength), upscaler. ``target``: the second pass's size, set by check."""

    scale: float = 2.0
    steps: int = 0
    strength: float = 0.7
    upscaler: str = "latent"
    width: int = 0
    height: int = 0
    target: tuple[int, int] | None = None

    @property
    def latent(self) -> bool:
        return UPSCALERS.get(self.upscaler, (None, None))[1] is not None

    @property
    def network(self) -> bool:
        """An exported pixel-upscaler folder rather than one of UPSCALERS."""
        return self.upscaler not in UPSCALERS

    @property
    def label(self) -> str:  # a network: its folder's name, as A1111 records a model's name
        return Path(self.upscaler).name if self.network else UPSCALERS[self.upscaler][0]


def check_hires(hires) -> HiresFix:
    """A ``hires=`` value (a mapping or a HiresFix) with every value checked."""
    if isinstance(hires, HiresFix):
        hires = dataclasses.asdict(hires)
    if not isinstance(hires, dict):
        raise InputError(f"hires must be a dict of scale, steps, strength, upscaler, width, height, not {args.short(hires)}")
    names = {f.name for f in dataclasses.fields(HiresFix)}
    unknown = sorted(set(hires) - names)
    if unknown:
        raise InputError(f"unknown hires setting {unknown[0]!r}; expected {', '.join(sorted(names - {'target'}))}")
    h = HiresFix(**hires)
    if not args.is_real(h.scale) or not math.isfinite(h.scale) or not 1.0 <= h.scale <= MAX_SCALE:
        raise InputError(f"hires scale must be a number from 1 to {MAX_SCALE:g}, not {args.short(h.scale)}")
    if not args.is_whole(h.steps) or h.steps < 0:
        raise InputError(f"hires steps must be a whole number >= 0 (0: the first pass's), not {args.short(h.steps)}")
    if not args.is_real(h.strength) or not 0.0 < float(h.strength) <= 1.0:
        raise InputError(f"hires strength must be a number in (0, 1], not {args.short(h.strength)}")
    for label, side in (("width", h.width), ("height", h.height)):
        if not args.is_whole(side) or side < 0:
            raise InputError(f"hires {label} must be a whole number of pixels >= 0 (0: from the scale), "
                             f"not {args.short(side)}")
    return dataclasses.replace(h, scale=float(h.scale), steps=int(h.steps), strength=float(h.strength),
                               upscaler=upscaler_name(h.upscaler), width=int(h.width), height=int(h.height))


def target_size(h: HiresFix, width: int, height: int, multiple: int) -> tuple[int, int]:
    """The second pass's size as A1111's ``init``: the scale, or hr_resize_x/y (one of them keeps
    the aspect); floored to the model's size multiple (A1111 floors the latent to // 8)."""
    if h.width or h.height:
        target_w = h.width or h.height * width // height
        target_h = h.height or h.width * height // width
    else:
        target_w, target_h = int(width * h.scale), int(height * h.scale)
    target_w, target_h = target_w // multiple * multiple, target_h // multiple * multiple
    for label, side in (("width", target_w), ("height", target_h)):
        args.check_side(f"hires {label}", side, multiple)
    return target_w, target_h


def generate(pipe, request):
    """Both passes of a checked request with ``hires``; the Result of the second, carrying the
    request (with ``hires``) and the first pass's seeds, so its infotext records both."""
    h = request.hires
    width, height = h.target
    if request.check_memory:  # the larger second pass is refused before the first pass runs
        pipe.check_memory(len(request.prompt), width, height, guided=request.guidance > 1.0, img2img=not h.latent,
                          vae_tiling=request.vae_tiling)
    first = pipe.generate(dataclasses.replace(request, hires=None))
    second = dataclasses.replace(
        request, hires=None, steps=h.steps or request.steps, strength=h.strength, width=width, height=height,
        latents=None, seed=first.seeds or first.seed, original_image=None, original_size=None, target_size=None)
    f = pipe.manifest.vae_scale_factor
    (up_w, up_h), (cut_x, cut_y) = cover(h, request.width, request.height, f)
    if h.latent:
        _, mode, antialias = UPSCALERS[h.upscaler]
        latent = interpolate(first.latents, (up_h // f, up_w // f), mode, antialias)
        latent = latent[:, :, cut_y // 2:latent.shape[2] - (cut_y + 1) // 2, cut_x // 2:latent.shape[3] - (cut_x + 1) // 2]
        second = dataclasses.replace(second, start_latent=np.ascontiguousarray(latent))
    else:
        if len(first.images) > 1:
            raise InputError("a pixel hires upscaler takes one prompt at a time; use a latent upscaler for batches")
        picture = upscale_picture(pipe, h, first.images[0], up_w, up_h)
        left, top = f * (cut_x // 2), f * (cut_y // 2)  # A1111 crops the encoded latent; the same offsets
        second = dataclasses.replace(second, image=picture.crop((left, top, left + width, top + height)))
    result = pipe.generate(second)
    timings = {**{f"first_{k}": v for k, v in first.timings.items()}, **result.timings}
    timings["total"] = first.timings["total"] + result.timings["total"]
    return dataclasses.replace(result, request=request, seed=first.seed, seeds=first.seeds, timings=timings)


def cover(h: HiresFix, width: int, height: int, f: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((upscale width, height), (latent columns, rows) to crop) as A1111's
    ``calculate_target_resolution``: with both hr_resize_x and hr_resize_y the first pass is
    upscaled to cover the target with its own aspect and ``truncate_x/y`` latent pixels are cut
    from the centre; otherwise the upscale is the target and nothing is cut."""
    target_w, target_h = h.target
    if not (h.width and h.height):
        return (target_w, target_h), (0, 0)
    if width / height < target_w / target_h:
        up_w, up_h = target_w, target_w * height // width
    else:
        up_w, up_h = target_h * width // height, target_h
    return (up_w, up_h), ((up_w - target_w) // f, (up_h - target_h) // f)


def upscale_picture(pipe, h: HiresFix, picture: Image.Image, width: int, height: int) -> Image.Image:
    """The first pass's picture at (width, height): PIL's filter, or an exported network."""
    if not h.network:
        return picture.resize((width, height), PIXEL_FILTERS[h.upscaler])
    upscaler = _pixel_upscaler(str(Path(h.upscaler).resolve()), pipe.provider, pipe.sessions.threads)
    result = upscaler.resize(picture, width, height)
    if pipe.sessions.memory == "low":  # one graph resident at a time: the next pass opens its own
        _pixel_upscaler.cache_clear()
    return result


@functools.lru_cache(maxsize=2)
def _pixel_upscaler(folder: str, provider: str, threads: int | None) -> PixelUpscaler:
    return PixelUpscaler.load(folder, provider=provider, threads=threads)


def interpolate(x: np.ndarray, size: tuple[int, int], mode: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """``torch.nn.functional.interpolate(x, size, mode=mode, antialias=antialias)`` for a
    (batch, channels, height, width) float32 array (align_corners False, as A1111 calls it):
    separable, one weight matrix per axis, weights as ATen's CPU kernels compute them."""
    rows = resample_weights(x.shape[-2], size[0], mode, antialias)
    cols = resample_weights(x.shape[-1], size[1], mode, antialias)
    return np.einsum("oh,nchw,pw->ncop", rows, x.astype(np.float64), cols).astype(np.float32)


def resample_weights(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    """(n_out, n_in) weights of one axis (ATen UpSample.h / UpSampleKernel.cpp)."""
    w = np.zeros((n_out, n_in))
    scale32 = np.float32(n_in) / np.float32(n_out)
    scale = float(scale32)
    for o in range(n_out):
        if mode == "nearest":  # floorf(o * scale) in float
            src = o if n_in == n_out else o >> 1 if n_out == 2 * n_in else int(np.floor(np.float32(o) * scale32))
            w[o, min(src, n_in - 1)] = 1.0
        elif mode == "nearest-exact":
            w[o, min(int(math.floor((o + 0.5) * scale)), n_in - 1)] = 1.0
        elif antialias:
            _antialias_row(w[o], o, n_in, scale, mode)
        elif mode == "bilinear":
            real = max(scale * (o + 0.5) - 0.5, 0.0)
            i0 = int(real)
            lam = real - i0
            w[o, i0] += 1.0 - lam
            w[o, i0 + (1 if i0 < n_in - 1 else 0)] += lam
        elif mode == "bicubic":
            real = scale * (o + 0.5) - 0.5
            i0 = math.floor(real)
            for k, c in enumerate(_cubic_coefficients(real - i0, -0.75)):
                w[o, min(max(i0 - 1 + k, 0), n_in - 1)] += c
        else:
            raise InputError(f"unknown interpolation mode {mode!r}")
    return w


def _cubic_coefficients(t: float, a: float) -> tuple[float, float, float, float]:
    """Keys' cubic convolution weights at distances t+1, t, 1-t, 2-t (ATen's A = -0.75)."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _antialias_row(row: np.ndarray, o: int, n_in: int, scale: float, mode: str) -> None:
    """ATen's ``_upsample_*_aa`` weights: the filter stretched by the scale when shrinking,
    normalised to sum 1 (bicubic with a = -0.5, as PIL)."""
    interp = 2 if mode == "bilinear" else 4
    support = interp / 2 * scale if scale >= 1.0 else interp / 2
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (o + 0.5)
    xmin = max(int(center - support + 0.5), 0)
    xsize = min(int(center + support + 0.5), n_in) - xmin
    weights = np.array([_aa_filter((j + xmin - center + 0.5) * invscale, mode) for j in range(xsize)])
    total = weights.sum()
    row[xmin:xmin + xsize] = weights / total if total != 0 else weights


def _aa_filter(x: float, mode: str) -> float:
    x = abs(x)
    if mode == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2.0 else 0.0
