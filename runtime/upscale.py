"""The x4 upscaler as a mode (Stability's ``stable-diffusion-x4-upscaler``; diffusers'
``StableDiffusionUpscalePipeline``): sampling starts from noise at the picture's own size in latent
pixels, and every U-Net call sees the low-resolution picture, noised once to ``noise_level`` by the
low-resolution schedule, concatenated after the latent, with the noise level as its class label.
The VAE then decodes 4x (its own scale factor, from the manifest).

Large pictures are denoised in overlapping latent tiles every step, each tile's ``denoised``
averaged where they overlap (MultiDiffusion: Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion
Paths for Controlled Image Generation", eq. 5 with uniform weights): the U-Net's activations are
those of one tile, and one tile covering the whole latent is exactly the untiled run.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import ModelFolderError
from .modes import Denoise, Feed, Txt2Img, to_model_pixels

DEFAULT_NOISE_LEVEL = 20  # diffusers' StableDiffusionUpscalePipeline default


def low_res_noised(picture: np.ndarray, noise: np.ndarray, noise_level: int, alphas_cumprod) -> np.ndarray:
    """The picture at ``noise_level`` of the low-resolution schedule (diffusers' DDPM ``add_noise``):
    sqrt(a) * picture + sqrt(1 - a) * noise, a = alphas_cumprod[noise_level]."""
    alpha = float(alphas_cumprod[noise_level])
    return (np.float32(alpha ** 0.5) * picture + np.float32((1.0 - alpha) ** 0.5) * noise).astype(np.float32)


def windows(size: int, tile: int, overlap: int) -> list[slice]:
    """Overlapping windows of ``tile`` covering ``size``, the last one flush with the end."""
    if size <= tile:
        return [slice(0, size)]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return [slice(start, start + tile) for start in starts]


class LowResPicture:
    """The U-Net's extra inputs: the noised picture (the current tile's window of it) as channels after
    the latent, and the noise level as ``class_labels``, one per row of the feed."""

    graphs: tuple[tuple[str, str], ...] = ()

    def __init__(self, noise_level: int):
        self.noise_level = noise_level
        self.picture: np.ndarray | None = None  # (batch, channels, h, w), set by Upscale.start
        self.window: tuple[slice, slice] = (slice(None), slice(None))

    def __call__(self, feed: Feed) -> Feed:
        sample = feed["sample"]
        picture = self.picture[..., self.window[0], self.window[1]]
        repeat = sample.shape[0] // picture.shape[0]  # the guidance halves, when they run as one batch
        return {**feed, "sample": np.concatenate([sample, np.concatenate([picture] * repeat)], axis=1),
                "class_labels": np.full(sample.shape[0], self.noise_level, dtype=np.int64)}


class Upscale(Txt2Img):
    """Start from noise at the picture's size; the picture and noise level reach every U-Net call
    through :class:`LowResPicture`; :meth:`steer` tiles the denoiser when the latent is larger than
    the manifest's tile. Random numbers are drawn in diffusers' order: the picture's noise, then the
    starting latent."""

    takes_strength = False

    def __init__(self, image: Image.Image, noise_level: int, upscale: dict, latent_multiple: int):
        try:
            self.alphas_cumprod = [float(a) for a in upscale["low_res_alphas_cumprod"]]
            tile, overlap = int(upscale["tile_latent"]), int(upscale["tile_overlap"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFolderError(f"manifest.json: upscale is damaged ({error}); re-export the model") from None
        self.image = image
        self.tile = max(latent_multiple, tile // latent_multiple * latent_multiple)  # the U-Net's size rule
        self.overlap = min(overlap, self.tile // 2)
        self.picture_input = LowResPicture(noise_level)
        self.providers = (self.picture_input,)

    @property
    def latent_tile(self) -> int:
        """The U-Net's largest input side (latent pixels) for the memory plan."""
        return self.tile

    def start(self, draw, sample_latent, plan) -> np.ndarray:
        pixels = to_model_pixels(self.image)  # at the latent's size: the VAE decodes it 4x
        picture_noise = draw(channels=pixels.shape[1])  # diffusers draws the picture's noise first
        self.noise = draw()
        self.picture_input.picture = low_res_noised(np.repeat(pixels, len(self.noise), axis=0), picture_noise,
                                                    self.picture_input.noise_level, self.alphas_cumprod)
        return self.noise * np.float32(plan.init_noise_sigma)

    def steer(self, denoise: Denoise, plan) -> Denoise:
        return tiled(denoise, self.picture_input, self.tile, self.overlap)


def tiled(denoise: Denoise, picture: LowResPicture, tile: int, overlap: int) -> Denoise:
    """MultiDiffusion: ``denoise`` on each overlapping tile, averaged where tiles overlap."""
    def run(x: np.ndarray, sigma: float) -> np.ndarray:
        rows, cols = windows(x.shape[-2], tile, overlap), windows(x.shape[-1], tile, overlap)
        if len(rows) == len(cols) == 1:
            return denoise(x, sigma)
        total = np.zeros_like(x)
        count = np.zeros(x.shape[-2:], dtype=np.float32)
        try:
            for row in rows:
                for col in cols:
                    picture.window = (row, col)
                    total[..., row, col] += denoise(np.ascontiguousarray(x[..., row, col]), sigma)
                    count[row, col] += 1.0
        finally:
            picture.window = (slice(None), slice(None))
        return total / count
    return run
