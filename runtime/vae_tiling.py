"""Tiled VAE decoding and encoding: overlapping tiles, seams blended with linear ramps.

The algorithm of diffusers' ``AutoencoderKL.tiled_decode`` / ``_tiled_encode`` (diffusers 0.42,
``models/autoencoders/autoencoder_kl.py``), so that ``vae.enable_tiling()`` and these functions
agree: tiles of ``tile`` input pixels start every ``tile * (1 - overlap)`` pixels (edge tiles are
cut short), each is run on its own, then each output tile is blended in place with the one above
(``blend_v``) and the one to its left (``blend_h``) over ``out_tile * overlap`` pixels, and the
top-left ``out_tile - blend`` square of each is kept. Only the previous row of tiles is held, so the
VAE's activations are those of one tile whatever the image size.

``run`` maps one NCHW tile to its NCHW output (the caller owns the session); arrays are float32.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Run = Callable[[np.ndarray], np.ndarray]


def needs_tiling(height: int, width: int, tile: int, above_pixels: int | None) -> bool:
    """Whether an input of ``height`` x ``width`` (in the tiled run's input units) is worth tiling:
    it must not fit one tile, and its area must exceed ``above_pixels`` (None: any size over a tile)."""
    return (height > tile or width > tile) and (above_pixels is None or height * width > above_pixels)


def blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """Blend the bottom of ``a`` into the top of ``b`` (in place on ``b``), as diffusers' blend_v."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, y - extent, :] * np.float32(1 - y / extent) + b[:, :, y, :] * np.float32(y / extent)
    return b


def blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """Blend the right of ``a`` into the left of ``b`` (in place on ``b``), as diffusers' blend_h."""
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, x - extent] * np.float32(1 - x / extent) + b[:, :, :, x] * np.float32(x / extent)
    return b


def tiled(run: Run, x: np.ndarray, tile_in: int, tile_out: int, overlap: float = 0.25) -> np.ndarray:
    """Run ``run`` over overlapping ``tile_in`` tiles of ``x`` (N, C, H, W) whose outputs are
    ``tile_out`` pixels per ``tile_in``: the decoder (latent -> pixels) or the encoder (pixels ->
    moments) alike."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    if stride < 1 or keep < 1:
        raise ValueError(f"tile of {tile_in} with overlap {overlap} leaves no stride")
    rows, above = [], None
    for i in range(0, x.shape[2], stride):
        row: list[np.ndarray] = []
        for j in range(0, x.shape[3], stride):
            out = np.array(run(np.ascontiguousarray(x[:, :, i:i + tile_in, j:j + tile_in])), dtype=np.float32)
            if above is not None:
                out = blend_v(above[len(row)], out, extent)
            if row:
                out = blend_h(row[-1], out, extent)
            row.append(out)
        rows.append(np.concatenate([out[:, :, :keep, :keep] for out in row], axis=3))
        above = row
    return np.concatenate(rows, axis=2)


def tiled_decode(decode: Run, z: np.ndarray, tile_latent: int, tile_pixels: int, overlap: float = 0.25) -> np.ndarray:
    """Latents (N, C, h, w) -> pixels (N, 3, H, W), decoded ``tile_latent`` latent pixels at a time."""
    return tiled(decode, z, tile_latent, tile_pixels, overlap)


def tiled_encode(encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], pixels: np.ndarray,
                 tile_pixels: int, tile_latent: int, overlap: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 3, H, W) -> the latent Gaussian's (mean, std), encoded ``tile_pixels`` at a time.

    diffusers blends the encoder's moments (mean and log-variance) before making the Gaussian, so
    the tiles' std is blended as ``log(std**2)`` and turned back."""
    def moments(tile: np.ndarray) -> np.ndarray:
        mean, std = encode(tile)
        return np.concatenate([mean, 2.0 * np.log(np.maximum(std, np.float32(1e-30)))], axis=1)

    mean, logvar = np.split(tiled(moments, pixels, tile_pixels, tile_latent, overlap), 2, axis=1)
    # As diffusers' DiagonalGaussianDistribution, which clamps the blended log-variance.
    return mean, np.exp(0.5 * np.clip(logvar, -30.0, 20.0)).astype(np.float32)
