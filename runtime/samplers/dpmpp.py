"""DPM-Solver++ samplers in sigma space (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models"), with t = -log(sigma) (= lambda, the half log-SNR)."""

from __future__ import annotations

import math

import numpy as np

from ._util import ancestral_step, noise_like


def sample_dpmpp_2m(denoise, x, sigmas, *, rng=None, on_step=None):
    """Multistep DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), midpoint form as in diffusers
    (``solver_type="midpoint"``) and k-diffusion: first step and the final step to sigma 0 are
    first order (``lower_order_final``).  With h = t_next - t, r = h_last / h:
    D = (1 + 1/(2r)) denoised - 1/(2r) denoised_last;  x_next = (sigma_next / sigma) x - expm1(-h) D."""
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_next)
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (sigma_next / sigma) - denoised_d * math.expm1(-h)
            h_last = h
        old_denoised = denoised
    return x
