"""Linear multistep (LMS) sampler in sigma space."""

from __future__ import annotations

import numpy as np


def lms_coefficients(sigmas, order: int = 4) -> list[np.ndarray]:
    """Per-step Adams-Bashforth weights: for step i with history of length k = min(i + 1, order),
    coefficient j integrates the Lagrange basis polynomial through sigmas[i], ..., sigmas[i - k + 1]
    over [sigmas[i], sigmas[i + 1]] (exactly, with polynomial arithmetic; k-diffusion and diffusers
    use numerical quadrature of the same integral)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    table = []
    for i in range(len(sigmas) - 1):
        k = min(i + 1, order)
        nodes = sigmas[i - np.arange(k)]
        coeffs = np.empty(k)
        for j in range(k):
            poly = np.polynomial.Polynomial([1.0])
            for m in range(k):
                if m != j:
                    poly = poly * np.polynomial.Polynomial([-nodes[m], 1.0]) / (nodes[j] - nodes[m])
            integral = poly.integ()
            coeffs[j] = integral(sigmas[i + 1]) - integral(sigmas[i])
        table.append(coeffs)
    return table


def sample_lms(denoise, x, sigmas, *, rng=None, on_step=None, order: int = 4):
    """Linear multistep method of order 4 on the probability-flow ODE (Karras et al. 2022 ODE,
    Adams-Bashforth with variable steps; k-diffusion ``sample_lms``, Crowson 2022):
    x_next = x + sum_j c_ij d_{i-j} with d = (x - denoised) / sigma."""
    coefficients = lms_coefficients(sigmas, order)
    ds = []
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        ds.insert(0, (x - denoised) / sigma)
        if len(ds) > order:
            ds.pop()
        for coeff, d in zip(coefficients[i], ds):
            x = x + d * float(coeff)
    return x
