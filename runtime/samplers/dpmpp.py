"""DPM-Solver++ samplers in sigma space (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models"), with t = -log(sigma) (= lambda, the half log-SNR)."""

from __future__ import annotations

import math


from ._util import ancestral_step, noise_like, with_processed_x0


def sample_dpmpp_2m(denoise, x, sigmas, *, rng=None, on_step=None, process_x0=None):
    """Multistep DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), midpoint form as in diffusers
    (``solver_type="midpoint"``) and k-diffusion: first step and the final step to sigma 0 are
    first order (``lower_order_final``).  With h = t_next - t, r = h_last / h:
    D = (1 + 1/(2r)) denoised - 1/(2r) denoised_last;  x_next = (sigma_next / sigma) x - expm1(-h) D.
    ``process_x0``: diffusers' ``thresholding`` of the data prediction."""
    denoise = with_processed_x0(denoise, process_x0)
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


def _dpmpp_multistep(denoise, x, sigmas, *, rng, on_step, order: int, sde: bool, process_x0=None):
    """DPM-Solver++ multistep of order 1-3, ODE or SDE (Lu et al. 2022, DPM-Solver++ sec. 4 and
    its SDE variant, "sde-dpmsolver++"), in sigma space with lambda = -log(sigma), exactly the
    update rules of diffusers' DPMSolverMultistepScheduler (midpoint form for order 2):
    ODE order 1: x' = (s'/s) x - expm1(-h) D0
    SDE order 1: x' = (s'/s) e^-h x + (1 - e^-2h) D0 + s' sqrt(1 - e^-2h) z
    The first step is first order, the second at most second order, the last step (to sigma 0) is
    first order, and with fewer than 15 steps the second-to-last is at most second order.
    ``process_x0``: diffusers' ``thresholding`` of the data prediction."""
    denoise = with_processed_x0(denoise, process_x0)
    n = len(sigmas) - 1
    lambdas = [-math.log(float(s)) if s > 0 else math.inf for s in sigmas]
    history = []  # denoised of previous steps, newest last
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        history.append(denoised)
        if len(history) > 3:
            history.pop(0)
        if sigma_next == 0:
            x = denoised
            continue
        step_order = min(order, i + 1)
        if i == n - 2 and n < 15:
            step_order = min(step_order, 2)
        h = lambdas[i + 1] - lambdas[i]
        if sde:
            x = x * (sigma_next / sigma * math.exp(-h))
            e2 = -math.expm1(-2.0 * h)  # 1 - e^-2h
        else:
            x = x * (sigma_next / sigma)
            e1 = -math.expm1(-h)  # 1 - e^-h
        m0 = denoised
        if step_order == 1:
            x = x + m0 * (e2 if sde else e1)
        elif step_order == 2:
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            D1 = (m0 - history[-2]) * (1.0 / r0)
            x = x + (m0 + D1 * 0.5) * (e2 if sde else e1)
        else:
            m1, m2 = history[-2], history[-3]
            h_0, h_1 = lambdas[i] - lambdas[i - 1], lambdas[i - 1] - lambdas[i - 2]
            r0, r1 = h_0 / h, h_1 / h
            D1_0, D1_1 = (m0 - m1) * (1.0 / r0), (m1 - m2) * (1.0 / r1)
            D1 = D1_0 + (D1_0 - D1_1) * (r0 / (r0 + r1))
            D2 = (D1_0 - D1_1) * (1.0 / (r0 + r1))
            if sde:
                c1 = (1.0 - math.exp(-2.0 * h)) / (-2.0 * h) + 1.0
                c2 = (1.0 - math.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5
                x = x + m0 * e2 + D1 * c1 + D2 * c2
            else:
                c1 = (math.exp(-h) - 1.0) / h + 1.0
                c2 = (math.exp(-h) - 1.0 + h) / h**2 - 0.5
                x = x + m0 * e1 + D1 * c1 - D2 * c2
        if sde:
            x = x + noise_like(rng, x) * (sigma_next * math.sqrt(e2))
    return x


def sample_dpmpp_2m_sde(denoise, x, sigmas, *, rng=None, on_step=None, process_x0=None):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, DPM-Solver++; diffusers "sde-dpmsolver++", midpoint)."""
    return _dpmpp_multistep(denoise, x, sigmas, rng=rng, on_step=on_step, order=2, sde=True, process_x0=process_x0)


def sample_dpmpp_3m_sde(denoise, x, sigmas, *, rng=None, on_step=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE (Lu et al. 2022, DPM-Solver++ third-order multistep with the SDE noise),
    as k-diffusion's ``sample_dpmpp_3m_sde``, the "DPM++ 3M SDE" of A1111 and ComfyUI.  With
    lambda = -log(sigma), h = lambda' - lambda, h_eta = (1 + eta) h, r_k = h_k / h of the last steps:
    x' = e^-h_eta x + (1 - e^-h_eta) D0 + phi_2 d1 - phi_3 d2 + sigma' sqrt(1 - e^-2 eta h) s_noise z,
    phi_2 = expm1(-h_eta) / h_eta + 1, phi_3 = phi_2 / h_eta - 1/2, d1, d2 the first and second
    divided differences of the denoised history (second order, phi_2 d, with two of them; first order
    at the first step; the step to sigma 0 returns the denoised latent).

    Not diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3): that
    weighs d2 by (1 - e^-2h - 2h) / (2h)^2 - 1/2 = -1 + O(h), where the exponential integrator's term
    is h/3 + O(h^2) as here, takes a midpoint second-order step and lowers the order near the end."""
    n = len(sigmas) - 1
    d_1 = d_2 = h_1 = h_2 = None  # the last two denoised and step sizes
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x = x * math.exp(-h_eta) + denoised * (-math.expm1(-h_eta))
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) * (1 / r0), (d_1 - d_2) * (1 / r1)
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) * (1 / (r0 + r1))
                x = x + d1 * phi_2 - d2 * (phi_2 / h_eta - 0.5)
            elif h_1 is not None:
                x = x + (denoised - d_1) * (phi_2 * h / h_1)
            if eta:
                x = x + noise_like(rng, x) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def sample_dpmpp_3m(denoise, x, sigmas, *, rng=None, on_step=None, process_x0=None):
    """DPM-Solver++(3M) ODE (Lu et al. 2022, DPM-Solver++ third-order multistep)."""
    return _dpmpp_multistep(denoise, x, sigmas, rng=rng, on_step=on_step, order=3, sde=False, process_x0=process_x0)


def sample_dpmpp_2s_ancestral(denoise, x, sigmas, *, rng=None, on_step=None, eta=1.0, s_noise=1.0):
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, DPM-Solver++ Algorithm 1, singlestep order 2,
    r = 1/2) to sigma_down, then noise of std sigma_up (k-diffusion ``sample_dpmpp_2s_ancestral``)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            d = (x - denoised) / sigma
            x = x + d * (sigma_down - sigma)
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            sigma_s = math.exp(-s)
            x_2 = x * (sigma_s / sigma) - denoised * math.expm1(-0.5 * h)
            denoised_2 = denoise(x_2, sigma_s)
            x = x * (sigma_down / sigma) - denoised_2 * math.expm1(-h)
        if sigma_next > 0:
            x = x + noise_like(rng, x) * (s_noise * sigma_up)
    return x


def sample_dpmpp_sde(denoise, x, sigmas, *, rng=None, on_step=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ SDE, singlestep order 2 (Lu et al. 2022, DPM-Solver++ with the SDE noise of
    k-diffusion ``sample_dpmpp_sde``, r = 1/2).  k-diffusion draws the noise from a Brownian tree
    (torchsde) so that the two sub-steps see correlated increments; here each sub-step draws fresh
    independent Gaussian noise from ``rng``, which has the same distribution per sub-step."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, sigma, x, denoised)
        if sigma_next == 0:
            d = (x - denoised) / sigma
            x = x + d * (sigma_next - sigma)
            continue
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # step 1
        sd, su = ancestral_step(sigma, math.exp(-s), eta)
        s_ = -math.log(sd)
        x_2 = x * (math.exp(-s_) / sigma) - denoised * math.expm1(t - s_)
        x_2 = x_2 + noise_like(rng, x) * (s_noise * su)
        denoised_2 = denoise(x_2, math.exp(-s))
        # step 2
        sd, su = ancestral_step(sigma, sigma_next, eta)
        t_next_ = -math.log(sd)
        denoised_d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (math.exp(-t_next_) / sigma) - denoised_d * math.expm1(t - t_next_)
        x = x + noise_like(rng, x) * (s_noise * su)
    return x
