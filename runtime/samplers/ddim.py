"""DDIM and DDPM in sigma space."""

from __future__ import annotations

import math

from ._util import noise_like, with_processed_x0


def sample_ddim(denoise, x, sigmas, *, rng=None, on_step=None, process_x0=None):
    """DDIM with eta = 0 (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12):
    x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1}) eps.  Divided by sqrt(a_{t-1}) this is
    x_next = denoised + sigma_next * eps with eps = (x - denoised) / sigma, i.e. the Euler step in
    sigma space (Karras et al. 2022, sec. 3).  The walk may end at sigma > 0 (alphas_cumprod[0]).
    ``process_x0`` (clip_sample / thresholding) acts on the x0 term only: eps stays the model's, as
    diffusers' DDIMScheduler keeps ``pred_epsilon`` from before clipping."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        eps = (x - denoised) / sigma
        if process_x0 is not None:
            denoised = process_x0(denoised)
        x = denoised + eps * sigma_next
    return x


def sample_ddpm(denoise, x, sigmas, *, rng=None, on_step=None, process_x0=None):
    """DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
    eq. 6-7) between arbitrary timesteps, with the posterior variance beta~ ("fixed_small"):
    mean = posterior mean of q(x_{t'} | x_t, x0), std = sqrt((1 - a_{t'}) / (1 - a_t) * (1 - a_t / a_{t'})).
    In sigma space (x = x_t / sqrt(a_t)): x_next = x0 + (sigma_next^2 / sigma^2) (x - x0)
    + sigma_next * sqrt(1 - sigma_next^2 / sigma^2) * z, x0 clipped or thresholded by ``process_x0``."""
    denoise = with_processed_x0(denoise, process_x0)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        ratio = (sigma_next / sigma) ** 2
        x = denoised + (x - denoised) * ratio
        if sigma_next > 0:
            x = x + noise_like(rng, x) * (sigma_next * math.sqrt(max(1.0 - ratio, 0.0)))
    return x
