"""Latent Consistency Model sampling in sigma space."""

from __future__ import annotations

import math

import numpy as np

from ._util import noise_like, with_processed_x0


def lcm_timesteps(num_train: int, steps: int, original_steps: int = 50) -> np.ndarray:
    """LCM's timesteps (Luo et al. 2023, sec. 4.3 "skipping-step"): every ``T // original_steps``-th
    training step, then ``steps`` of them evenly spaced in index, as diffusers' LCMScheduler."""
    k = num_train // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    steps = min(steps, original_steps)
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.float64)


def lcm_boundary_scalings(timesteps, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """Consistency-model boundary condition (Song et al. 2023, Consistency Models, eq. 7; Luo et al.
    2023 LCM): c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2)."""
    st = np.asarray(timesteps, dtype=np.float64) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / np.sqrt(st**2 + sigma_data**2)
    return c_skip, c_out


def sample_lcm(denoise, x, sigmas, *, rng=None, on_step=None, c_skip=None, c_out=None, process_x0=None):
    """Multistep LCM sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3): at each
    step the consistency function f(x, t) = c_skip x_t + c_out x0 (x_t = x / sqrt(1 + sigma^2), the
    VP-space latent) is the clean estimate; re-noise it with fresh noise to sigma_next.  x0 is
    clipped or thresholded by ``process_x0`` before the boundary condition, as diffusers does."""
    denoise = with_processed_x0(denoise, process_x0)
    n = len(sigmas) - 1
    if c_skip is None:
        c_skip, c_out = np.zeros(n), np.ones(n)
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        x = denoised * float(c_out[i]) + x * float(c_skip[i] / math.sqrt(1.0 + sigma * sigma))
        if sigma_next > 0:
            x = x + noise_like(rng, x) * sigma_next
    return x
