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
                  split: bool = False, image_uncond: dict[str, np.ndarray] | None = None,
                  image_guidance: float = 1.0) -> Callable[[np.ndarray, float], np.ndarray]:
    """``denoise(x, sigma) -> denoised``; with ``uncond`` given, both halves run as one batch, or as
    one call per group when ``split`` (a fraction of the U-Net's activation memory, same result).
    ``image_uncond`` (InstructPix2Pix): a third group without the picture; the groups are then
    diffusers' (text + picture, picture, neither) and ``image_guidance`` weighs the picture
    (Brooks et al. 2023, "InstructPix2Pix", eq. 3)."""
    groups = [cond] if uncond is None else [uncond, cond] if image_uncond is None else [cond, uncond, image_uncond]
    context = {name: np.concatenate([group[name] for group in groups]) for name in cond}

    def combine(outputs):
        if len(outputs) == 2:
            output_uncond, output_cond = outputs
            return output_uncond + np.float32(guidance) * (output_cond - output_uncond)
        if len(outputs) == 3:
            text, image, neither = outputs
            return neither + np.float32(guidance) * (text - image) + np.float32(image_guidance) * (image - neither)
        return outputs[0]

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        c_in = np.float32(1.0 / (sigma**2 + 1) ** 0.5)
        t = np.full(x.shape[0], timestep(sigma), dtype=np.float32)
        if split and len(groups) > 1:
            outputs = [unet(x * c_in, t, group) for group in groups]
        else:
            n = len(groups)
            outputs = np.split(unet(np.concatenate([x] * n) * c_in, np.concatenate([t] * n), context), n)
        return to_denoised(combine(outputs), x, sigma, prediction_type).astype(np.float32, copy=False)

    return denoise
