"""Small helpers shared by the sampler modules (NumPy only)."""

from __future__ import annotations

import math

import numpy as np


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) for an ancestral step from sigma_from to sigma_to (k-diffusion
    ``get_ancestral_step``): sigma_down^2 + sigma_up^2 = sigma_to^2."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    sigma_down = math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def noise_like(rng, x: np.ndarray) -> np.ndarray:
    """Unit-variance float32 noise shaped like x, drawn from the numpy Generator ``rng``."""
    if rng is None:
        rng = np.random.default_rng()
    return rng.standard_normal(x.shape, dtype=np.float32)


def clip_x0(clip_range: float):
    """diffusers' ``clip_sample``: the predicted clean latent clipped to [-clip_range, clip_range]."""
    return lambda x0: np.clip(x0, -clip_range, clip_range).astype(np.float32, copy=False)


def dynamic_threshold(ratio: float, max_value: float):
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", sec. 2.3; diffusers ``thresholding``): per
    sample s = the ``ratio`` quantile of |x0|, clamped to [1, max_value]; x0 -> clip(x0, -s, s) / s."""

    def threshold(x0):
        flat = np.abs(x0.reshape(x0.shape[0], -1))
        s = np.clip(np.quantile(flat, ratio, axis=1), 1.0, max_value).astype(np.float32)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return (np.clip(x0, -s, s) / s).astype(np.float32, copy=False)

    return threshold


def with_processed_x0(denoise, process_x0):
    """``denoise`` followed by ``process_x0`` (clipping or thresholding), or ``denoise`` itself."""
    if process_x0 is None:
        return denoise
    return lambda x, sigma: process_x0(denoise(x, sigma))
