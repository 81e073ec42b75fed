"""DEIS multistep in sigma space (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
Exponential Integrator"), the "logrho" variant of diffusers' DEISMultistepScheduler, where
rho = sigma (the k-diffusion sigma is the paper's rho = sigma_t / alpha_t)."""

from __future__ import annotations

import math

import numpy as np

from ._util import with_processed_x0


def _ind_fn(t: float, b: float, c: float) -> float:
    """Integral of the Lagrange basis polynomial in log rho through (log b -> 1, log c -> 0):
    Integrate[(log t - log c) / (log b - log c), t] (Zhang & Chen 2023, eq. 15, "logrho")."""
    return t * (-math.log(c) + math.log(t) - 1.0) / (math.log(b) - math.log(c))


def sample_deis(denoise, x, sigmas, *, rng=None, on_step=None, process_x0=None):
    """DEIS-2 multistep, logrho (Zhang & Chen 2023, sec. 4, eq. 14-15; "rho-AB-DEIS"): the noise
    prediction eps = (x - denoised) / rho is extrapolated by the polynomial in log rho through the
    last two steps and integrated exactly over rho (d x / d rho = eps in sigma space):
    order 1: x' = x + (rho' - rho) eps_i (DDIM)
    order 2: x' = x + C_0 eps_i + C_1 eps_{i-1},
      C_0 = F(rho'; rho_i, rho_{i-1}) - F(rho_i; rho_i, rho_{i-1}),
      C_1 = F(rho'; rho_{i-1}, rho_i) - F(rho_i; rho_{i-1}, rho_i)   (F = ``_ind_fn``).
    The first step is first order; with fewer than 15 steps the last step is first order
    (diffusers' ``lower_order_final``).  The walk ends at sigma_min > 0 like diffusers'.
    ``process_x0``: diffusers' ``thresholding``, applied to x0 before eps is formed from it.

    Where this differs from diffusers, on purpose: with karras, exponential or beta sigmas diffusers'
    DEISMultistepScheduler repeats the last sigma as the final one; at 1 step that is sigma_max, so
    it returns its starting noise unchanged.  Here the one step goes to sigma_min, as at every other
    step count (where we match diffusers)."""
    denoise = with_processed_x0(denoise, process_x0)
    n = len(sigmas) - 1
    rho = [float(s) for s in sigmas]
    # per-step table: (C_0, C_1); C_1 is None for a first-order step
    table = []
    for i in range(n):
        if i == 0 or (i == n - 1 and n < 15) or rho[i + 1] == 0:
            table.append((rho[i + 1] - rho[i], None))
        else:
            t, s0, s1 = rho[i + 1], rho[i], rho[i - 1]
            c0 = _ind_fn(t, s0, s1) - _ind_fn(s0, s0, s1)
            c1 = _ind_fn(t, s1, s0) - _ind_fn(s0, s1, s0)
            table.append((c0, c1))

    eps_last = None
    for i in range(n):
        sigma = rho[i]
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        eps = (x - denoised) * np.float32(1.0 / sigma)
        c0, c1 = table[i]
        if c1 is None:
            x = x + eps * np.float32(c0)
        else:
            x = x + eps * np.float32(c0) + eps_last * np.float32(c1)
        eps_last = eps
    return x
