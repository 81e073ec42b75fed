"""The one place model output becomes the clean-latent estimate, with classifier-free guidance.

k-diffusion's ``CompVisDenoiser``/``CompVisVDenoiser`` in sigma space (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Table 1): the U-Net sees
``x * c_in`` at timestep ``t(sigma)``; epsilon, v (Salimans & Ho 2022, "Progressive Distillation")
and sample predictions are mapped to ``denoised``. Guidance follows Ho & Salimans 2022
("Classifier-Free Diffusion Guidance").
"""
from __future__ import annotations

from typing import Callable

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# (x_in, t, context) -> output; context maps the U-Net's conditioning inputs to arrays
UNet = Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], np.ndarray]


def to_denoised(model_output: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return x / (sigma**2 + 1) - model_output * (sigma / (sigma**2 + 1) ** 0.5)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def make_denoiser(unet: UNet, timestep: Callable[[float], float], prediction_type: str,
                  cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray] | None, guidance: float,
                  split: bool = False) -> Callable[[np.ndarray, float], np.ndarray]:
    """``denoise(x, sigma) -> denoised``; with ``uncond`` given, both halves run as one batch, or as
    two calls of half the batch when ``split`` (half the U-Net's activation memory, same result)."""
    guided = uncond is not None
    context = {name: np.concatenate([uncond[name], value]) for name, value in cond.items()} if guided else cond

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        c_in = np.float32(1.0 / (sigma**2 + 1) ** 0.5)
        t = np.full(x.shape[0], timestep(sigma), dtype=np.float32)
        if guided and split:
            output_uncond, output_cond = (unet(x * c_in, t, half) for half in (uncond, cond))
        elif guided:
            output_uncond, output_cond = np.split(unet(np.concatenate([x, x]) * c_in, np.concatenate([t, t]), context), 2)
        else:
            output = unet(x * c_in, t, context)
        if guided:
            output = output_uncond + np.float32(guidance) * (output_cond - output_uncond)
        return to_denoised(output, x, sigma, prediction_type).astype(np.float32, copy=False)

    return denoise
