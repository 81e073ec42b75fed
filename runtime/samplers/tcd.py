"""Trajectory Consistency Distillation sampling in sigma space."""

from __future__ import annotations

import math

import numpy as np

from ._util import noise_like


def tcd_tables(timesteps, train_sigmas, gamma: float = 0.3):
    """sigma_s for each step: the intermediate point s = floor((1 - gamma) t_next) of strategic
    stochastic sampling (Zheng et al. 2024, sec. 4.4), t_next = 0 after the last step, as diffusers'
    TCDScheduler; ``train_sigmas[t]`` is the sigma of training timestep t."""
    ts = np.asarray(timesteps, dtype=np.float64)
    t_next = np.append(ts[1:], 0.0)
    s = np.floor((1.0 - gamma) * t_next).astype(np.int64)
    return np.asarray(np.asarray(train_sigmas)[s], dtype=np.float32).astype(np.float64)


def sample_tcd(denoise, x, sigmas, *, rng=None, on_step=None, gamma: float = 0.3, sigmas_s=None):
    """Strategic stochastic sampling (Zheng et al. 2024, "Trajectory Consistency Distillation",
    Algorithm 4 / eq. 14): from x at sigma_t predict x0 and eps = (x - x0) / sigma_t, move
    deterministically to the intermediate sigma_s (s = (1 - gamma) t_next):  x_s = x0 + sigma_s eps,
    then re-noise forward to sigma_next:  x_next = x_s + sqrt(sigma_next^2 - sigma_s^2) z.
    gamma = 0 is deterministic (the DDIM-like consistency step), gamma = 1 is the LCM step.  The last
    step returns x_s (s = 0: the walk ends at sigma_min like diffusers').  ``sigmas_s`` (from
    ``tcd_tables``, bound by the plan) must match ``gamma``; without it sigma_s = sigma_next (gamma 0)."""
    n = len(sigmas) - 1
    if sigmas_s is None:
        sigmas_s = np.asarray(sigmas[1:], dtype=np.float64)
    # per-step table: (sigma_s, re-noise std); the last step adds no noise
    table = []
    for i in range(n):
        sigma_s, sigma_next = float(sigmas_s[i]), float(sigmas[i + 1])
        std = math.sqrt(max(sigma_next**2 - sigma_s**2, 0.0)) if (gamma > 0 and i < n - 1) else None
        table.append((sigma_s, std))
    for i in range(n):
        sigma = float(sigmas[i])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        sigma_s, std = table[i]
        eps = (x - denoised) * np.float32(1.0 / sigma)
        x = denoised + eps * np.float32(sigma_s)
        if std is not None:
            x = x + noise_like(rng, x) * np.float32(std)
    return x
