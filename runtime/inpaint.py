"""Inpainting: the mask, and the two ways a U-Net repaints only what the mask covers.

Conventions are diffusers' (``StableDiffusionInpaintPipeline``): white repaints, black keeps; the
mask is resized to the image (Lanczos), binarized at 0.5 and taken to latent size by nearest
neighbour. A U-Net with ``2 * latent_channels + 1`` input channels (an inpainting model) sees the
latent, the mask and the latent of the masked picture; any other U-Net repaints everywhere and the
known region is put back after every step (:func:`keep_known`). ``blur`` (pixels) is A1111's
Gaussian mask blur; a blurred mask also blends the result back over the picture, as A1111's
overlay does, so that the seam is soft.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from .errors import EdgediffError


@dataclass
class Mask:
    pixels: np.ndarray  # (height, width) float32, 1 = repaint, binarized
    latent: np.ndarray  # (1, 1, height/f, width/f) float32
    overlay: np.ndarray | None  # (height, width, 1) alpha of the result over the picture (blur only)

    @property
    def empty(self) -> bool:
        return not self.pixels.any()


def prepare_mask(mask: Image.Image | np.ndarray, image_size: tuple[int, int], size: tuple[int, int],
                 factor: int, *, blur: float = 0.0, invert: bool = False) -> Mask:
    """``image_size``: the picture as given (the mask must have its aspect ratio); ``size``: the
    (width, height) generated; ``factor``: the VAE's downscaling; ``blur``: pixels, bounded by the
    request (runtime/request.py)."""
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.uint8 and mask.ndim == 2:  # float masks in [0, 1]
            mask = (np.clip(mask, 0.0, 1.0) * 255).round().astype(np.uint8)
        try:
            mask = Image.fromarray(mask)
        except TypeError:
            raise EdgediffError(f"a mask array must be uint8 (height, width[, channels]) or float in [0, 1], "
                                f"not {mask.dtype} {mask.shape}") from None
    (mw, mh), (iw, ih) = mask.size, image_size
    if abs(mw * ih - mh * iw) > 0.01 * mw * ih:
        raise EdgediffError(f"the mask is {mw}x{mh} but the image is {iw}x{ih}: give a mask with the image's "
                            "aspect ratio")
    mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = Image.fromarray(gaussian_blur(np.asarray(mask), blur))
    if mask.size != size:
        mask = mask.resize(size, Image.LANCZOS)
    soft = np.asarray(mask, dtype=np.float32) / 255.0
    pixels = (soft >= 0.5).astype(np.float32)
    width, height = size
    rows = _nearest(height, height // factor)
    cols = _nearest(width, width // factor)
    latent = pixels[np.ix_(rows, cols)][None, None]
    overlay = np.clip(soft * 2.0, 0.0, 1.0)[..., None] if blur > 0 else None  # A1111 doubles it
    return Mask(pixels=pixels, latent=latent, overlay=overlay)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A1111's mask blur: OpenCV's ``GaussianBlur`` with a kernel of 2 * int(2.5 sigma + 0.5) + 1
    taps, along x then y, borders reflected without repeating the edge (BORDER_REFLECT_101)."""
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2.0 * sigma**2))
    taps /= taps.sum()
    out = image.astype(np.float64)
    for axis in (1, 0):
        size = out.shape[axis]
        index = np.abs(np.arange(-radius, size + radius))
        index = np.where(index >= size, 2 * (size - 1) - index, index)  # reflect_101 (radius < size assumed)
        index = np.clip(index, 0, size - 1)
        padded = np.take(out, index, axis=axis)
        out = sum(w * np.take(padded, np.arange(i, i + size), axis=axis) for i, w in enumerate(taps))
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def _nearest(size: int, out: int) -> np.ndarray:
    """torch's ``interpolate(mode="nearest")`` source indices (floor(i * in / out))."""
    return np.minimum(np.floor(np.arange(out) * (size / out)).astype(np.int64), size - 1)


def masked_pixels(pixels: np.ndarray, mask: Mask) -> np.ndarray:
    """The picture (batch, 3, h, w) in [-1, 1] with the repainted region blanked to 0 (grey)."""
    return pixels * (mask.pixels < 0.5).astype(np.float32)


def keep_known(denoise: Callable[[np.ndarray, float], np.ndarray], mask: np.ndarray, x0: np.ndarray,
               noise: np.ndarray, sigma_start: float,
               noised: Callable[[np.ndarray, np.ndarray, float], np.ndarray] | None = None,
               ) -> Callable[[np.ndarray, float], np.ndarray]:
    """For U-Nets without mask inputs: before every model call after the first, the known region
    of the latent becomes the picture's latent noised to the current sigma,
    ``x = mask * x + (1 - mask) * noised(x0, noise, sigma)`` (``x0 + sigma * noise``; flow models pass
    their forward process, diffusers' ``scale_noise`` in ``StableDiffusion3InpaintPipeline``), with
    the same noise the run started from.

    This is the blend diffusers does after each scheduler step, moved to the model's input so that
    samplers stay pure: the model sees exactly diffusers' latent, and the samplers' updates are
    elementwise, so the repainted region follows diffusers' exactly. The known region of the
    sampler's own latent is then meaningless; the caller replaces it with ``x0`` at the end.
    """
    keep = np.float32(1.0) - mask

    def denoise_known(x: np.ndarray, sigma: float) -> np.ndarray:
        if sigma < sigma_start:  # the first call sees the start latent, as diffusers' first step
            known = x0 + np.float32(sigma) * noise if noised is None else noised(x0, noise, sigma)
            x = mask * x + keep * known
        return denoise(x, sigma)

    return denoise_known
