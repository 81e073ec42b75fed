"""Samplers without torch: registry, errors, plans and analytic checks."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.samplers import SAMPLERS, list_samplers, make_plan, resolve_sampler


def scaled_linear_alphas_cumprod(T=1000, beta_start=0.00085, beta_end=0.012):
    betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


ALPHAS = scaled_linear_alphas_cumprod()
SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": False,
        "prediction_type": "epsilon"}


@pytest.mark.parametrize("alias,expected", [
    ("dpmpp_2m_karras", ("dpmpp_2m_karras", "karras")),
    ("DPM++ 2M Karras", ("dpmpp_2m_karras", "karras")),
    ("DPM++ 2M", ("dpmpp_2m", None)),
    ("Euler a", ("euler_a", None)),
    ("euler_a", ("euler_a", None)),
    ("euler_ancestral", ("euler_a", None)),
    ("euler_karras", ("euler", "karras")),
    ("Euler a Karras", ("euler_a", "karras")),
    ("DDIM", ("ddim", None)),
    ("UniPC", ("unipc", None)),
    ("unipc_karras", ("unipc", "karras")),
    ("DEIS", ("deis", None)),
    ("TCD", ("tcd", None)),
    ("PLMS", ("pndm", None)),
    ("PNDMScheduler", ("pndm", None)),
])
def test_aliases(alias, expected):
    assert resolve_sampler(alias) == expected


@pytest.mark.parametrize("bad", ["foo", "", "euler_foo", "karras"])
def test_unknown_sampler_is_a_one_line_user_error(bad):
    with pytest.raises(EdgediffError) as err:
        make_plan(bad, ALPHAS, SD15, 20)
    msg = str(err.value)
    assert "\n" not in msg and "unknown sampler" in msg and "--sampler list" in msg


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=-3), dict(steps=2.5), dict(steps=20, strength=0.0),
                                    dict(steps=20, strength=1.5), dict(steps=20, schedule="nope")])
def test_bad_arguments_are_user_errors(kwargs):
    steps = kwargs.pop("steps")
    with pytest.raises(EdgediffError):
        make_plan("euler", ALPHAS, SD15, steps, **kwargs)


def test_list_samplers_has_every_sampler_once():
    rows = list_samplers()
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)) == len(SAMPLERS)
    for name, aliases, description in rows:
        assert isinstance(aliases, list) and description and "\n" not in description
        assert resolve_sampler(name)[0] == name


def test_plan_shape_and_timesteps():
    plan = make_plan("euler", ALPHAS, SD15, 20)
    assert plan.sigmas.dtype == np.float64 and len(plan.sigmas) == 21 and plan.sigmas[-1] == 0.0
    assert np.all(np.diff(plan.sigmas) < 0)
    assert [plan.timestep(s) for s in plan.sigmas[:3]] == [951.0, 901.0, 851.0]
    # leading spacing: diffusers' Euler starts at sqrt(sigma_max^2 + 1)
    assert plan.init_noise_sigma == pytest.approx(math.sqrt(plan.sigmas[0] ** 2 + 1))
    # an intermediate sigma maps by log-sigma interpolation, between its neighbours
    mid = math.sqrt(plan.sigmas[0] * plan.sigmas[1])
    assert 901.0 < plan.timestep(mid) < 951.0


def test_strength_starts_part_way_down():
    full = make_plan("dpmpp_2m", ALPHAS, SD15, 20)
    half = make_plan("dpmpp_2m", ALPHAS, SD15, 20, strength=0.5)
    assert len(half.sigmas) == 11 and np.array_equal(half.sigmas, full.sigmas[10:])
    tiny = make_plan("dpmpp_2m", ALPHAS, SD15, 20, strength=0.01)
    assert tiny.steps == 1


def _clean_denoiser(x0):
    return lambda x, sigma: x0.copy()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_exact_denoiser_lands_on_the_clean_latent(sampler, steps):
    """A denoiser that returns the true clean latent: every sampler must end on it (a walk that
    ends at sigma_min > 0, as DEIS and TCD, on the noised latent there: x_t = (x0 + sigma_min eps) * sqrt(a_0),
    eps the noise in the last model input)."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    plan = make_plan(sampler, ALPHAS, dict(SD15, set_alpha_to_one=True), steps)
    x = x0 + rng.standard_normal(x0.shape, dtype=np.float32) * np.float32(plan.sigmas[0])
    last = {}
    out = plan.run(_clean_denoiser(x0), x, rng=np.random.default_rng(1),
                   on_step=lambda i, sigma, x, d: last.update(eps=(x - x0) / np.float32(sigma)))
    assert out.dtype == np.float32 and out.shape == x0.shape
    expected = (x0 + last["eps"] * np.float32(plan.sigmas[-1])) * np.float32(plan.final_scale)
    np.testing.assert_allclose(out, expected, atol=2e-4 * max(1.0, plan.sigmas[0] / 100))


def test_on_step_called_once_per_step():
    calls = []
    plan = make_plan("dpmpp_2m_karras", ALPHAS, SD15, 7)
    x = np.zeros((1, 4, 8, 8), np.float32)
    plan.run(lambda x, s: x * 0, x, on_step=lambda i, sigma, x, d: calls.append((i, sigma)))
    assert [c[0] for c in calls] == list(range(7))
    assert [c[1] for c in calls] == [float(s) for s in plan.sigmas[:-1]]


def test_runtime_samplers_never_import_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; "
            "sys.modules['transformers'] = None; import edgediff.runtime.samplers, edgediff.runtime.schedules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _one_step_result(sampler, config, value=5.0):
    """The result of one step with a denoiser that always predicts ``value`` for the clean latent
    (both walks end at sigma 0, so the result is the processed prediction)."""
    plan = make_plan(sampler, ALPHAS, dict(config, set_alpha_to_one=True), 1)
    x = np.full((1, 4, 8, 8), 3.0, np.float32)
    return plan.run(lambda x, sigma: np.full_like(x, value), x)


@pytest.mark.parametrize("sampler,config,expected", [
    ("ddim", {}, 1.0),                                   # missing: DDIM's own default clip_sample=True
    ("ddim", {"clip_sample": False}, 5.0),
    ("ddim", {"clip_sample": False, "_use_default_values": ["clip_sample"]}, 1.0),  # a default of the original
    ("ddim", {"clip_sample": True, "clip_sample_range": 2.0}, 2.0),
    ("ddpm", {}, 1.0),
    ("heun", {}, 5.0),                                   # Heun's default is False
    ("heun", {"clip_sample": True}, 1.0),
    ("heun", {"clip_sample": True, "_use_default_values": ["clip_sample"]}, 5.0),
    ("euler", {"clip_sample": True}, 5.0),               # EulerDiscreteScheduler has no clip_sample
    ("ddim", {"thresholding": True, "sample_max_value": 3.0}, 1.0),  # s = 3: clip to 3, divide by 3
    ("dpmpp_2m", {"thresholding": True, "sample_max_value": 2.5}, 1.0),
    ("dpmpp_2m", {"clip_sample": True}, 5.0),            # DPM-Solver: thresholding only
])
def test_clip_sample_and_thresholding_follow_the_counterpart(sampler, config, expected):
    base = {k: v for k, v in SD15.items() if k != "clip_sample"}
    out = _one_step_result(sampler, dict(base, **config))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_tcd_ignores_clip_sample_as_diffusers_does():
    base = {k: v for k, v in SD15.items() if k != "clip_sample"}
    clipped = _one_step_result("tcd", dict(base, clip_sample=True, thresholding=True))
    np.testing.assert_array_equal(clipped, _one_step_result("tcd", dict(base, clip_sample=False)))
    assert np.abs(clipped).max() > 4
