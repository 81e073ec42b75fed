"""Parity with diffusers: same weights, same starting noise, same prompts -> the same image.

fp32 graphs must agree within 2e-3 (pixels in [0, 1]). fp16 graphs are compared with the same
fp32 diffusers run; FP16_TOLERANCE is 3x the worst case measured on these tiny models.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgediff.runtime import Pipeline
from tiny_models import build_pipeline
from helpers import FP32_TOLERANCE, NEGATIVE, PROMPT

FP16_TOLERANCE = 3e-3  # measured worst case 1.0e-3 (sd2, ddim); fp32 runs differ by ~1e-6
STEPS, GUIDANCE = 12, 7.5
# Our deterministic samplers and the diffusers scheduler (and config overrides) each one matches.
DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def diffusers_pixels(source, sampler: str, latents: np.ndarray) -> np.ndarray:
    """diffusers' own pipeline, loaded from the same folder that was exported."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    cls_name, overrides = DIFFUSERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=torch.from_numpy(latents), output_type="np")
    return out.images


def edgediff_pixels(folder, sampler: str, latents: np.ndarray) -> np.ndarray:
    pipe = Pipeline.load(folder, provider="cpu")
    return pipe(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler=sampler, latents=latents).pixels


def start_noise(folder) -> np.ndarray:
    pipe = Pipeline.load(folder, provider="cpu")
    m = pipe.manifest
    side = m.default_size // m.vae_scale_factor
    return np.random.default_rng(7).standard_normal((1, m.latent_channels, side, side), dtype=np.float32)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("sampler", sorted(DIFFUSERS))
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_matches_diffusers(tiny_sources, tiny_exports, kind, sampler, precision):
    latents = start_noise(tiny_exports[kind, precision])
    expected = diffusers_pixels(tiny_sources[kind], sampler, latents)
    actual = edgediff_pixels(tiny_exports[kind, precision], sampler, latents)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}[precision]


def test_parity_detects_a_different_model(tiny_exports):
    """The comparison can fail: another seed's weights give another image."""
    import diffusers

    latents = start_noise(tiny_exports["sd1", "fp32"])
    other = build_pipeline("sd1", seed=1)
    other.scheduler = diffusers.EulerDiscreteScheduler.from_config(other.scheduler.config)
    with torch.no_grad():
        expected = other(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         latents=torch.from_numpy(latents), output_type="np").images
    actual = edgediff_pixels(tiny_exports["sd1", "fp32"], "euler", latents)
    assert np.abs(actual - expected).max() > 10 * FP32_TOLERANCE
