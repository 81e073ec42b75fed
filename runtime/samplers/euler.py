"""Euler-family samplers in sigma space (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 1 / 2; k-diffusion's ``sample_euler*``)."""

from __future__ import annotations

import math


from ._util import ancestral_step, noise_like, with_processed_x0


def sample_euler(denoise, x, sigmas, *, rng=None, on_step=None):
    """Euler method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
    (Karras et al. 2022, Algorithm 1 with S_churn = 0)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
    return x


def sample_euler_ancestral(denoise, x, sigmas, *, rng=None, on_step=None, eta=1.0, s_noise=1.0):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_next^2 (Ho et al. 2020 ancestral sampling in the Karras et al.
    2022 parameterisation; k-diffusion ``sample_euler_ancestral``)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_like(rng, x) * (s_noise * sigma_up)
    return x


def sample_heun(denoise, x, sigmas, *, rng=None, on_step=None, process_x0=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, S_churn = 0): an Euler step,
    then the trapezoidal correction with the derivative at sigma_next; Euler for the last step to 0.
    Both evaluations clipped by ``process_x0`` (diffusers' HeunDiscreteScheduler ``clip_sample``)."""
    denoise = with_processed_x0(denoise, process_x0)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = denoise(x_2, sigma_next)
            d_2 = (x_2 - denoised_2) / sigma_next
            x = x + (d + d_2) * (0.5 * dt)
    return x


def sample_dpm_2(denoise, x, sigmas, *, rng=None, on_step=None):
    """DPM-Solver-2 in k-diffusion's form (Lu et al. 2022, "DPM-Solver", Algorithm 1 with r = 1/2,
    midpoint taken at the geometric mean sigma_mid = sqrt(sigma * sigma_next)); Euler to sigma 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        x = _dpm_2_step(denoise, x, (x - denoised) / sigma, sigma, sigma_next)
    return x


def sample_dpm_2_ancestral(denoise, x, sigmas, *, rng=None, on_step=None, eta=1.0, s_noise=1.0):
    """Ancestral DPM-Solver-2 (Lu et al. 2022 second-order step to sigma_down, then noise of std
    sigma_up; k-diffusion ``sample_dpm_2_ancestral``)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _dpm_2_step(denoise, x, (x - denoised) / sigma, sigma, sigma_down)
        if sigma_next > 0:
            x = x + noise_like(rng, x) * (s_noise * sigma_up)
    return x


def _dpm_2_step(denoise, x, d, sigma, sigma_to):
    """One DPM-Solver-2 step from sigma to sigma_to: the derivative re-evaluated at the midpoint
    sigma_mid = sqrt(sigma * sigma_to); a plain Euler step when sigma_to is 0."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_to)))
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
    return x + d_2 * (sigma_to - sigma)
