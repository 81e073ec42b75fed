"""Every sampler through a tiny exported model; the deterministic ones against diffusers' pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgediff.runtime import Pipeline
from edgediff.runtime.samplers import SAMPLERS
from test_parity import FP32_TOLERANCE, NEGATIVE, PROMPT, start_noise
from test_sampler_parity import COUNTERPARTS

STEPS, GUIDANCE = 6, 7.5


@pytest.fixture(scope="module")
def runs(tiny_exports):
    """Per sampler: two runs from the same latents with different generators."""
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu", memory="high")
    latents = start_noise(tiny_exports["sd1", "fp32"])
    return {name: [pipe(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler=name, latents=latents,
                        rng=np.random.default_rng(seed)).pixels for seed in (1, 2)]
            for name in SAMPLERS}, latents


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_draws_a_finite_image(runs, sampler):
    first, second = runs[0][sampler]
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all()
    assert first.std() > 1e-3  # not a flat image


STOCHASTIC = {"euler_a", "dpm2_a", "ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_a", "dpmpp_sde", "lcm", "tcd"}
DETERMINISTIC = sorted(set(COUNTERPARTS) - STOCHASTIC)


@pytest.mark.parametrize("sampler", sorted(STOCHASTIC))
def test_stochastic_samplers_draw_from_the_generator(runs, sampler):
    first, second = runs[0][sampler]
    assert np.abs(first - second).max() > 1e-4


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_match_diffusers_pipeline(tiny_sources, runs, sampler):
    import diffusers

    first, second = runs[0][sampler]
    np.testing.assert_array_equal(first, second)  # the generator plays no part
    if sampler == "lms":
        pytest.importorskip("scipy")
    cls_name, extra, _ = COUNTERPARTS[sampler]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sources["sd1"], safety_checker=None)
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        latents=torch.from_numpy(runs[1]), output_type="np").images
    assert np.abs(first - expected).max() < FP32_TOLERANCE
