"""The one place model output becomes the clean-latent estimate, with classifier-free guidance.

k-diffusion's ``CompVisDenoiser``/``CompVisVDenoiser`` in sigma space (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Table 1): the U-Net sees
``x * c_in`` at timestep ``t(sigma)``; epsilon, v (Salimans & Ho 2022, "Progressive Distillation")
and sample predictions are mapped to ``denoised``. Guidance follows Ho & Salimans 2022
("Classifier-Free Diffusion Guidance").

Flow-matching models (``prediction_type="flow"``; Esser et al. 2024, "Scaling Rectified Flow
Transformers", SD 3/3.5) predict the velocity v = noise - x0 of x = (1 - sigma) x0 + sigma * noise:
they see x itself (c_in = 1) and ``denoised = x - sigma * v``, ComfyUI's ``CONST`` model sampling.
The samplers walk the same sigmas either way; :func:`noised` is the matching forward process.
Skip-layer guidance (SD 3.5; diffusers' ``StableDiffusion3Pipeline``) is one more conditional run
with some transformer blocks skipped: the guided output moves by ``scale * (cond - skipped)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

# (x_in, t, context) -> output; context maps the U-Net's conditioning inputs to arrays
UNet = Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], np.ndarray]


def to_denoised(model_output: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return x / (sigma**2 + 1) - model_output * (sigma / (sigma**2 + 1) ** 0.5)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "flow":
        return x - sigma * model_output
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def input_scale(sigma: float, prediction_type: str) -> np.float32:
    """c_in: a VP model sees x_t = x / sqrt(sigma^2 + 1); a flow model sees x itself."""
    return np.float32(1.0 if prediction_type == "flow" else 1.0 / (sigma**2 + 1) ** 0.5)


def noised(x0: np.ndarray, noise: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """The forward process at ``sigma`` in the samplers' space: ``x0 + sigma * noise``, or for flow
    ``(1 - sigma) * x0 + sigma * noise`` (diffusers' ``scale_noise``, ComfyUI's ``CONST.noise_scaling``)."""
    sigma = np.float32(sigma)
    if prediction_type == "flow":
        return (sigma * noise + (np.float32(1.0) - sigma) * x0).astype(np.float32, copy=False)
    return (x0 + noise * sigma).astype(np.float32, copy=False)


@dataclass(frozen=True)
class SkipLayerGuidance:
    """One more conditional run with ``context`` (the conditional inputs with the skip mask set) at
    the sigmas ``active`` accepts; the guided output moves by ``scale * (cond - skipped)``."""

    context: dict[str, np.ndarray]
    scale: float
    active: Callable[[float], bool]


def make_denoiser(unet: UNet, timestep: Callable[[float], float], prediction_type: str,
                  cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray] | None, guidance: float,
                  split: bool = False, skip: SkipLayerGuidance | None = None) -> Callable[[np.ndarray, float], np.ndarray]:
    """``denoise(x, sigma) -> denoised``; with ``uncond`` given, both halves run as one batch, or as
    two calls of half the batch when ``split`` (half the U-Net's activation memory, same result).
    ``skip``: skip-layer guidance, applied where classifier-free guidance is (as diffusers)."""
    guided = uncond is not None
    context = {name: np.concatenate([uncond[name], value]) for name, value in cond.items()} if guided else cond

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        c_in = input_scale(sigma, prediction_type)
        t = np.full(x.shape[0], timestep(sigma), dtype=np.float32)
        if guided and split:
            output_uncond, output_cond = (unet(x * c_in, t, half) for half in (uncond, cond))
        elif guided:
            output_uncond, output_cond = np.split(unet(np.concatenate([x, x]) * c_in, np.concatenate([t, t]), context), 2)
        else:
            output = unet(x * c_in, t, context)
        if guided:
            output = output_uncond + np.float32(guidance) * (output_cond - output_uncond)
            if skip is not None and skip.active(sigma):
                output_skip = unet(x * c_in, t, skip.context)
                output = output + (output_cond - output_skip) * np.float32(skip.scale)
        return to_denoised(output, x, sigma, prediction_type).astype(np.float32, copy=False)

    return denoise
