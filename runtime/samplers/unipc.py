"""UniPC multistep in sigma space (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework
for Fast Sampling of Diffusion Models"), data prediction (UniPC with x0 model), B(h) = e^h - 1 ("bh2"),
with lambda = -log(sigma) (the half log-SNR), as diffusers' UniPCMultistepScheduler."""

from __future__ import annotations

import math

import numpy as np

from ._util import with_processed_x0


def _unipc_coefficients(h: float, rks: list, order: int):
    """(B_h, rhos_p, rhos_c) of Zhao et al. 2023, Algorithm 2 (UniP-p / UniC-p, B(h) variant):
    with hh = -h (data prediction), phi_k the exponential integrator functions,
    R_p[i][k] = r_k^i and b_i = i! h phi_{i+1}(hh) / B(h); rhos solve R rho = b.
    Order 2 predictor and order 1 corrector use the paper's closed form rho = 1/2."""
    hh = -h
    h_phi_1 = math.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1.0
    B_h = math.expm1(hh)  # "bh2"
    rks = list(rks) + [1.0]
    R, b = [], []
    factorial_i = 1
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial_i
    R, b = np.array(R, dtype=np.float64), np.array(b, dtype=np.float64)
    if order == 1:
        rhos_p = np.zeros(0)
    elif order == 2:
        rhos_p = np.array([0.5])
    else:
        rhos_p = np.linalg.solve(R[:-1, :-1], b[:-1])
    rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    return B_h, rhos_p, rhos_c


def sample_unipc(denoise, x, sigmas, *, rng=None, on_step=None, order: int = 2, process_x0=None):
    """UniPC-p multistep (Zhao et al. 2023, Algorithm 2 / 3, "bh2", data prediction): each step runs
    the corrector UniC on the previous predictor's result with the fresh model output (which costs no
    extra model call), then the predictor UniP.  With lambda = -log(sigma), h = lambda' - lambda,
    r_k = (lambda_{i-k} - lambda_i) / h, D_k = (denoised_{i-k} - denoised_i) / r_k:
    UniP: x' = (sigma'/sigma) x - expm1(-h) denoised_i - B(h) sum_k rho^p_k D_k
    UniC: x'^c = (sigma'/sigma) x - expm1(-h) denoised_i - B(h) (sum_k rho^c_k D_k + rho^c_p (denoised' - denoised_i))
    Warm-up: step i uses order min(order, i + 1, n - i) (``lower_order_final``); the step to sigma 0
    returns the denoised latent.  ``process_x0``: diffusers' ``thresholding`` of the data prediction."""
    denoise = with_processed_x0(denoise, process_x0)
    n = len(sigmas) - 1
    lambdas = [-math.log(float(s)) if s > 0 else math.inf for s in sigmas]
    # per-step table for the transition i -> i+1: (order, sigma'/sigma, expm1(-h), rks, B_h, rhos_p, rhos_c)
    table = []
    for i in range(n):
        p = min(order, i + 1, n - i)
        if float(sigmas[i + 1]) == 0:
            table.append((1, 0.0, -1.0, [], -1.0, np.zeros(0), np.array([0.5])))
            continue
        h = lambdas[i + 1] - lambdas[i]
        rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, p)]
        B_h, rhos_p, rhos_c = _unipc_coefficients(h, rks, p)
        table.append((p, float(sigmas[i + 1]) / float(sigmas[i]), math.expm1(-h), rks, B_h, rhos_p, rhos_c))

    history = []  # denoised of previous steps, newest last
    x_last = None  # the sample the last predictor started from
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        if x_last is not None:  # UniC: correct the previous step with the new model output
            p, ratio, phi_1, rks, B_h, _, rhos_c = table[i - 1]
            m0 = history[-1]
            res = (denoised - m0) * np.float32(rhos_c[-1])
            for k in range(1, p):
                res = res + (history[-(k + 1)] - m0) * np.float32(rhos_c[k - 1] / rks[k - 1])
            x = x_last * np.float32(ratio) - m0 * np.float32(phi_1) - res * np.float32(B_h)
        history.append(denoised)
        if len(history) > order:
            history.pop(0)
        p, ratio, phi_1, rks, B_h, rhos_p, _ = table[i]
        x_last = x
        if sigma_next == 0:
            x = denoised
            continue
        x_next = x * np.float32(ratio) - denoised * np.float32(phi_1)
        for k in range(1, p):
            x_next = x_next - (history[-(k + 1)] - denoised) * np.float32(B_h * rhos_p[k - 1] / rks[k - 1])
        x = x_next
    return x
