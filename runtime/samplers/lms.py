"""Linear multistep (LMS) sampler in sigma space."""

from __future__ import annotations

import numpy as np


_GL_NODES, _GL_WEIGHTS = (v.tolist() for v in np.polynomial.legendre.leggauss(4))  # exact to degree 7


def lms_coefficients(sigmas, order: int = 4) -> list[list[float]]:
    """Per-step Adams-Bashforth weights: for step i with history of length k = min(i + 1, order),
    coefficient j integrates the Lagrange basis polynomial through sigmas[i], ..., sigmas[i - k + 1]
    over [sigmas[i], sigmas[i + 1]].  The basis has degree < 4, so 4-point Gauss-Legendre is exact
    (k-diffusion and diffusers use adaptive quadrature of the same integral)."""
    sigmas = [float(s) for s in sigmas]
    table = []
    for i in range(len(sigmas) - 1):
        k = min(i + 1, order)
        nodes = [sigmas[i - m] for m in range(k)]
        a, b = sigmas[i], sigmas[i + 1]
        half, mid = 0.5 * (b - a), 0.5 * (b + a)
        taus = [mid + half * u for u in _GL_NODES]
        coeffs = []
        for j in range(k):
            total = 0.0
            for tau, w in zip(taus, _GL_WEIGHTS):
                prod = 1.0
                for m in range(k):
                    if m != j:
                        prod *= (tau - nodes[m]) / (nodes[j] - nodes[m])
                total += w * prod
            coeffs.append(total * half)
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
            x = x + d * coeff
    return x
