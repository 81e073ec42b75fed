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
