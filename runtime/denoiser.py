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
                  split: bool = False, image_uncond: dict[str, np.ndarray] | None = None,
                  image_guidance: float = 1.0, skip: SkipLayerGuidance | None = None) -> Callable[[np.ndarray, float], np.ndarray]:
    """``denoise(x, sigma) -> denoised``; with ``uncond`` given, both halves run as one batch, or as
    one call per group when ``split`` (a fraction of the U-Net's activation memory, same result).
    ``image_uncond`` (InstructPix2Pix): a third group without the picture; the groups are then
    diffusers' (text + picture, picture, neither) and ``image_guidance`` weighs the picture
    (Brooks et al. 2023, "InstructPix2Pix", eq. 3). ``skip``: skip-layer guidance, applied where
    two-group classifier-free guidance is (as diffusers)."""
    groups = [cond] if uncond is None else [uncond, cond] if image_uncond is None else [cond, uncond, image_uncond]
    # One group passes ``cond`` itself: input providers tell the halves apart by identity (controlnet.py).
    context = cond if len(groups) == 1 else {name: np.concatenate([group[name] for group in groups]) for name in cond}

    def combine(outputs):
        if len(outputs) == 2:
            output_uncond, output_cond = outputs
            return output_uncond + np.float32(guidance) * (output_cond - output_uncond)
        if len(outputs) == 3:
            text, image, neither = outputs
            return neither + np.float32(guidance) * (text - image) + np.float32(image_guidance) * (image - neither)
        return outputs[0]

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        c_in = input_scale(sigma, prediction_type)
        t = np.full(x.shape[0], timestep(sigma), dtype=np.float32)
        if split and len(groups) > 1:
            outputs = [unet(x * c_in, t, group) for group in groups]
        else:
            n = len(groups)
            outputs = np.split(unet(np.concatenate([x] * n) * c_in, np.concatenate([t] * n), context), n)
        output = combine(outputs)
        if skip is not None and len(groups) == 2 and skip.active(sigma):
            output_skip = unet(x * c_in, t, skip.context)
            output = output + (outputs[1] - output_skip) * np.float32(skip.scale)
        return to_denoised(output, x, sigma, prediction_type).astype(np.float32, copy=False)

    return denoise
