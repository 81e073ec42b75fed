"""Sigma schedules and the sigma <-> timestep mapping (NumPy only)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgediff.runtime.schedules import (
    NoiseSchedule, beta_ppf, beta_sigmas, exponential_sigmas, karras_sigmas, spaced_timesteps,
)


def _alphas():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1 - betas)


def test_sigma_t_roundtrip():
    s = NoiseSchedule(_alphas())
    t = np.array([0.0, 1.0, 10.5, 500.25, 998.0, 999.0])
    np.testing.assert_allclose(s.sigma_to_t(s.t_to_sigma_log(t)), t, atol=1e-9)
    assert s.sigma_to_t(s.sigmas[37]) == pytest.approx(37.0)


def test_zero_terminal_snr_is_data():
    a = _alphas().copy()
    a[-1] = 0.0
    s = NoiseSchedule(a)
    assert s.alphas_cumprod[-1] == 2.0**-24 and math.isfinite(s.sigma_max)


def test_karras_formula():
    sig = karras_sigmas(5, 0.03, 14.6)
    rho = 7.0
    expect = [(14.6 ** (1 / rho) + i / 4 * (0.03 ** (1 / rho) - 14.6 ** (1 / rho))) ** rho for i in range(5)]
    np.testing.assert_allclose(sig, expect, rtol=1e-12)
    assert sig[0] == pytest.approx(14.6) and sig[-1] == pytest.approx(0.03)


def test_exponential_is_log_uniform():
    sig = exponential_sigmas(6, 0.03, 14.6)
    assert np.allclose(np.diff(np.log(sig)), np.log(0.03 / 14.6) / 5)


def test_beta_ppf_against_known_values():
    # Beta(0.6, 0.6) is symmetric: ppf(0.5) = 0.5, ppf(q) + ppf(1 - q) = 1
    assert beta_ppf([0.5], 0.6, 0.6)[0] == pytest.approx(0.5, abs=1e-12)
    q = np.array([0.1, 0.25, 0.9])
    np.testing.assert_allclose(beta_ppf(q, 0.6, 0.6) + beta_ppf(1 - q, 0.6, 0.6), 1.0, atol=1e-12)
    # Beta(1, 1) is uniform; Beta(2, 1) has cdf x^2
    np.testing.assert_allclose(beta_ppf(q, 1.0, 1.0), q, atol=1e-12)
    np.testing.assert_allclose(beta_ppf(q, 2.0, 1.0), np.sqrt(q), atol=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    np.testing.assert_allclose(beta_ppf(q, 0.6, 0.6), scipy_stats.beta.ppf(q, 0.6, 0.6), atol=1e-10)
    sig = beta_sigmas(7, 0.03, 14.6)
    assert sig[0] == pytest.approx(14.6) and sig[-1] == pytest.approx(0.03) and np.all(np.diff(sig) < 0)


def test_spacings():
    assert spaced_timesteps("k", 1000, 4, "leading", 1).tolist() == [751, 501, 251, 1]
    assert spaced_timesteps("k", 1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert spaced_timesteps("dpm", 1000, 4, "leading", 1).tolist() == [801, 601, 401, 201]
    assert spaced_timesteps("ddim", 1000, 4, "linspace").tolist() == [999, 666, 333, 0]
