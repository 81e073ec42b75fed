"""Stability's x4 upscaler (``StableDiffusionUpscalePipeline``) as data for the manifest.

The layout is recognised from the components, never a name: a ``low_res_scheduler`` that noises the
low-resolution picture, and a U-Net whose input channels are the latent's plus the picture's and
which embeds a class label (the noise level). What the runtime needs beyond the graphs goes into
the manifest's ``upscale`` entry: the low-resolution schedule's alphas_cumprod up to
``max_noise_level`` (diffusers' ``low_res_scheduler.add_noise``), the picture's channels, and the
U-Net tile the runtime denoises large pictures in (runtime/upscale.py).
"""
from __future__ import annotations

import numpy as np

from edgediff.runtime.errors import EdgediffError

DEFAULT_MAX_NOISE_LEVEL = 350  # diffusers' StableDiffusionUpscalePipeline default


def is_upscaler(pipe) -> bool:
    """A picture-noising scheduler and a U-Net fed the picture beside the latent, with class labels."""
    unet = getattr(pipe, "unet", None)
    if getattr(pipe, "low_res_scheduler", None) is None or unet is None:
        return False
    config, vae = unet.config, pipe.vae.config
    return (getattr(config, "num_class_embeds", None) is not None
            and config.in_channels == vae.latent_channels + vae.in_channels)


def manifest_fields(pipe) -> dict:
    """The ``upscale`` entry; the scheduler and prediction type are the pipeline's own."""
    settings = getattr(pipe, "config", {}) or {}
    max_noise_level = int(settings.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))
    classes = int(pipe.unet.config.num_class_embeds)
    if not 0 <= max_noise_level < classes:
        raise EdgediffError(f"max_noise_level {max_noise_level} is outside the U-Net's {classes} class labels")
    low_res = pipe.low_res_scheduler
    alphas_cumprod = np.asarray(low_res.alphas_cumprod, dtype=np.float64)[: max_noise_level + 1]
    low_res_config = {k: v for k, v in dict(low_res.config).items() if isinstance(v, (int, float, str, bool))}
    return {"upscale": {
        "max_noise_level": max_noise_level,
        "picture_channels": int(pipe.vae.config.in_channels),
        "low_res_scheduler": {**low_res_config, "_class_name": type(low_res).__name__},
        "low_res_alphas_cumprod": [float(a) for a in alphas_cumprod],
        # MultiDiffusion tiles of the U-Net's training size, a quarter overlapping (runtime/upscale.py)
        "tile_latent": int(pipe.unet.config.sample_size),
        "tile_overlap": int(pipe.unet.config.sample_size) // 4,
    }}
