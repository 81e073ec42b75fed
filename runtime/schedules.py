"""Noise schedules as data: the model's training schedule and the sigma sequences samplers walk.

Everything here is NumPy + stdlib.  The training schedule comes from the model folder
(``alphas_cumprod.npy``) and the scheduler config the exporter stored; nothing is keyed on a
model's name.

Sigma space (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): ``x_sigma = x_t / sqrt(alpha_bar_t)`` and ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``,
so ``x_sigma = x0 + sigma * eps``.

Three timestep "families" reproduce the way the diffusers schedulers pick their timesteps, so
that a plan built here walks exactly the sigmas its diffusers counterpart walks:

- ``"k"``    Euler/Heun/KDPM2/LMS style: ``steps`` float timesteps spaced by ``timestep_spacing``,
             sigmas linearly interpolated in t; karras/exponential/beta span the spaced sigmas.
- ``"dpm"``  DPMSolver/UniPC/DEIS style: integer timesteps from ``steps + 1`` spacing points;
             karras/exponential/beta span the whole training range, karras timesteps rounded.
- ``"ddim"`` DDIM/DDPM/PNDM/LCM/TCD style: integer timesteps, the walk ends at
             ``alphas_cumprod[0]`` (or 1.0 with ``set_alpha_to_one``) instead of sigma 0.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import EdgediffError

__all__ = [
    "NoiseSchedule",
    "SCHEDULES",
    "spaced_timesteps",
    "karras_sigmas",
    "exponential_sigmas",
    "beta_sigmas",
    "beta_ppf",
    "FlowSchedule",
    "flow_sigmas",
]

#: sigma schedules a user can ask for (``schedule=``); None means the model's own spacing.
SCHEDULES = ("karras", "exponential", "sgm_uniform", "beta", "leading", "linspace", "trailing")

ZERO_SNR_ALPHA_BAR = 2.0**-24  # what diffusers puts in place of alphas_cumprod[-1] == 0


class NoiseSchedule:
    """The model's training schedule: ``alphas_cumprod`` and the sigma <-> timestep mapping."""

    def __init__(self, alphas_cumprod: np.ndarray):
        a = np.array(alphas_cumprod, dtype=np.float64).reshape(-1)
        if a.size < 2:
            raise EdgediffError("alphas_cumprod must hold the whole training schedule (got %d values)" % a.size)
        if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
            raise EdgediffError("alphas_cumprod must be finite values in [0, 1]")
        if a[-1] == 0.0:  # zero terminal SNR (Lin et al. 2023): diffusers uses 2**-24 instead of 0
            a[-1] = ZERO_SNR_ALPHA_BAR
        self.alphas_cumprod = a
        self.num_train_timesteps = a.size
        self.sigmas = np.sqrt((1.0 - a) / a)  # indexed by training timestep t, ascending
        self.log_sigmas = np.log(np.maximum(self.sigmas, 1e-10))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma):
        """Continuous timestep for ``sigma``: linear interpolation of t in log-sigma (k-diffusion's
        ``DiscreteSchedule.sigma_to_t``, diffusers' ``_sigma_to_t``)."""
        sigma = np.asarray(sigma, dtype=np.float64)
        log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
        ls = self.log_sigmas
        low_idx = np.clip(np.searchsorted(ls, log_sigma, side="right") - 1, 0, ls.size - 2)
        low, high = ls[low_idx], ls[low_idx + 1]
        w = np.clip((low - log_sigma) / (low - high), 0.0, 1.0)
        t = (1.0 - w) * low_idx + w * (low_idx + 1)
        return t.reshape(sigma.shape)

    def t_to_sigma(self, t):
        """Sigma at (possibly fractional) timestep ``t``: linear interpolation in t, as the
        diffusers Euler-family schedulers do (``np.interp``)."""
        t = np.asarray(t, dtype=np.float64)
        return np.interp(t, np.arange(self.num_train_timesteps, dtype=np.float64), self.sigmas)

    def t_to_sigma_log(self, t):
        """Sigma at fractional ``t`` interpolating log-sigma (k-diffusion's ``t_to_sigma``)."""
        t = np.asarray(t, dtype=np.float64)
        return np.exp(np.interp(t, np.arange(self.num_train_timesteps, dtype=np.float64), self.log_sigmas))


def spaced_timesteps(family: str, num_train: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Descending timesteps exactly as the diffusers schedulers of ``family`` space them."""
    T, n = int(num_train), int(steps)
    if spacing not in ("leading", "linspace", "trailing"):
        raise EdgediffError(f"unknown timestep_spacing {spacing!r}; expected leading, linspace or trailing")
    if family == "k":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.float64) - 1
    elif family == "dpm":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
        else:
            ts = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
        ts = ts.astype(np.float64)
    elif family == "ddim":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        ts = ts.astype(np.float64)
    else:
        raise ValueError(f"unknown timestep family {family!r}")
    return np.ascontiguousarray(ts)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: ``(max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho``."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Sigmas uniform in log-sigma from ``sigma_max`` down to ``sigma_min`` (k-diffusion)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def beta_sigmas(steps: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, "Beta Sampling is All You Need": sigmas at the Beta(alpha, beta) quantiles
    of ``1 - linspace(0, 1, steps)``, mapped onto [sigma_min, sigma_max]."""
    ppf = beta_ppf(1 - np.linspace(0, 1, steps), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q, a: float, b: float) -> np.ndarray:
    """Quantile function of the Beta(a, b) distribution (inverse of I_x(a, b)), by bisection to
    double precision; stands in for ``scipy.stats.beta.ppf``."""
    out = []
    for qi in np.asarray(q, dtype=np.float64).reshape(-1):
        if qi <= 0.0:
            out.append(0.0)
            continue
        if qi >= 1.0:
            out.append(1.0)
            continue
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if _betainc(a, b, mid) < qi:
                lo = mid
            else:
                hi = mid
        out.append(0.5 * (lo + hi))
    return np.array(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Flow matching (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
# Synthesis", sections 2 and 5.3.2): x_sigma = (1 - sigma) x0 + sigma * noise with sigma in [0, 1],
# the model's timestep is sigma * num_train_timesteps, and resolution-dependent "shift" moves the
# sigmas towards noise. The sigmas are diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``.


class FlowSchedule:
    """The training sigmas of a flow-matching scheduler config, and sigma <-> timestep."""

    def __init__(self, config: dict):
        self.num_train_timesteps = int(config.get("num_train_timesteps") or 1000)
        self.shift = float(config.get("shift", 1.0))
        T = self.num_train_timesteps
        # diffusers' __init__ works in float32: sigma_max and sigma_min are float32 values.
        sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
        if not config.get("use_dynamic_shifting"):
            sigmas = np.float32(self.shift) * sigmas / (1 + np.float32(self.shift - 1) * sigmas)
        self.sigmas = sigmas.astype(np.float64)[::-1].copy()  # ascending, as NoiseSchedule's
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def sigma_to_t(self, sigma):
        return np.asarray(sigma, dtype=np.float64) * self.num_train_timesteps


def flow_shift_mu(config: dict, image_seq_len: int) -> float:
    """Resolution-dependent shift: mu linear in the number of image tokens (diffusers'
    ``calculate_shift`` with the scheduler config's base/max sequence lengths and shifts)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def flow_sigmas(config: dict, steps: int, image_seq_len: int, schedule: str | None = None) -> np.ndarray:
    """``steps`` descending sigmas (no final 0) as diffusers' ``set_timesteps`` walks them: linear
    in t between the training sigmas' ends, shifted (static ``shift`` or, with
    ``use_dynamic_shifting``, exp(mu) / (exp(mu) + 1/sigma - 1)), stretched to ``shift_terminal``,
    then respaced as karras/exponential/beta when the config or ``schedule`` asks."""
    train = FlowSchedule(config)
    T = train.num_train_timesteps
    sigmas = np.linspace(train.sigma_max * T, train.sigma_min * T, steps) / T
    if config.get("use_dynamic_shifting"):
        mu = flow_shift_mu(config, image_seq_len)
        scale = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
        sigmas = scale / (scale + (1 / sigmas - 1))
    else:
        sigmas = train.shift * sigmas / (1 + (train.shift - 1) * sigmas)
    if config.get("shift_terminal"):
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config["shift_terminal"]))
    respace = schedule or next((name for name in ("karras", "exponential", "beta")
                                if config.get(f"use_{name}_sigmas")), None)
    if respace == "karras":
        sigmas = karras_sigmas(steps, float(sigmas[-1]), float(sigmas[0]))
    elif respace == "exponential":
        sigmas = exponential_sigmas(steps, float(sigmas[-1]), float(sigmas[0]))
    elif respace == "beta":
        sigmas = beta_sigmas(steps, float(sigmas[-1]), float(sigmas[0]))
    return np.asarray(sigmas, dtype=np.float32).astype(np.float64)
