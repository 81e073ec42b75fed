"""img2img parity with diffusers' StableDiffusionImg2ImgPipeline from the same noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgediff.runtime import EdgediffError, Pipeline
from helpers import feed_numpy_noise as feed_noise

STEPS, GUIDANCE, PROMPT = 10, 6.0, "a blue square"


def feed_numpy_noise(monkeypatch, seed):
    feed_noise(monkeypatch, seed, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img")


@pytest.mark.parametrize("kind,sampler,scheduler", [("sd1", "euler", "EulerDiscreteScheduler"),
                                                    ("sd2", "ddim", "DDIMScheduler")])
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_matches_diffusers(tiny_sources, tiny_exports, monkeypatch, kind, sampler, scheduler, strength):
    import diffusers

    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sources[kind], safety_checker=None)
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    feed_numpy_noise(monkeypatch, seed=3)
    with torch.no_grad():
        expected = reference(PROMPT, image=picture, strength=strength, num_inference_steps=STEPS,
                             guidance_scale=GUIDANCE, output_type="np").images

    pipe = Pipeline.load(tiny_exports[kind, "fp32"], provider="cpu")
    actual = pipe(PROMPT, image=picture, strength=strength, steps=STEPS, guidance=GUIDANCE, sampler=sampler,
                  rng=np.random.default_rng(3)).pixels
    assert np.abs(actual - expected).max() < 2e-3
    # And the picture matters: another picture gives another image.
    other = pipe(PROMPT, image=Image.new("RGB", (32, 32), "white"), strength=strength, steps=STEPS,
                 guidance=GUIDANCE, sampler=sampler, rng=np.random.default_rng(3)).pixels
    assert np.abs(other - expected).max() > 5 * 2e-3


def test_img2img_needs_a_valid_size(tiny_exports):
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    with pytest.raises(EdgediffError, match="multiple of 4"):
        pipe("x", image=Image.new("RGB", (30, 30)), steps=2)
    assert pipe("x", image=Image.new("RGB", (30, 30)), width=32, height=32, steps=2).images[0].size == (32, 32)
