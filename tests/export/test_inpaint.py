"""Inpainting parity with diffusers' StableDiffusionInpaintPipeline from the same noise: a 9-channel
inpainting U-Net, and an ordinary 4-channel model whose known region is put back every step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgediff.runtime import Pipeline
from helpers import feed_numpy_noise as feed_noise

STEPS, GUIDANCE, PROMPT = 6, 6.0, "a blue square"
PICTURE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def mask_image(size=32):
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size * 3 // 4, size // 8: size // 2] = 255
    return Image.fromarray(mask)


def feed_numpy_noise(monkeypatch, seed):
    feed_noise(monkeypatch, seed, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint")


@pytest.fixture(scope="module")
def models(tiny_sources, tiny_exports, inpaint_source, inpaint_export):
    """{kind: (diffusers inpainting pipeline, edgediff pipeline)}, loaded once for the module."""
    import diffusers

    def both(source, exported):
        reference = diffusers.StableDiffusionInpaintPipeline.from_pretrained(source, safety_checker=None)
        reference.set_progress_bar_config(disable=True)
        return reference, Pipeline.load(exported, provider="cpu")

    return {"9-channel": both(inpaint_source, inpaint_export),
            "4-channel": both(tiny_sources["sd1"], tiny_exports["sd1", "fp32"])}


@pytest.mark.parametrize("model", ["9-channel", "4-channel"])
@pytest.mark.parametrize("sampler,scheduler", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler")])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_matches_diffusers(models, monkeypatch, model, sampler, scheduler, strength):
    import diffusers

    reference, pipe = models[model]
    mask = mask_image(64 if strength == 1.0 else 32)  # a mask of another size is resized
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
    feed_numpy_noise(monkeypatch, seed=3)
    with torch.no_grad():
        expected = reference(PROMPT, image=PICTURE, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                             guidance_scale=GUIDANCE, height=32, width=32, output_type="np").images

    actual = pipe(PROMPT, image=PICTURE, mask=mask, strength=strength, steps=STEPS, guidance=GUIDANCE,
                  sampler=sampler, rng=np.random.default_rng(3)).pixels
    assert np.abs(actual - expected).max() < 2e-3
    # The mask matters: another mask gives another image.
    other = pipe(PROMPT, image=PICTURE, mask=Image.new("L", (32, 32), 255), strength=strength, steps=STEPS,
                 guidance=GUIDANCE, sampler=sampler, rng=np.random.default_rng(3)).pixels
    assert np.abs(other - expected).max() > 5 * 2e-3


def test_empty_mask_returns_the_picture(tiny_exports):
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    result = pipe(["a", "b"], ["", ""], image=PICTURE, mask=Image.new("L", (16, 16), 0), steps=2)
    assert [np.array_equal(np.asarray(i), np.asarray(PICTURE)) for i in result.images] == [True, True]
    # Inverted, the same mask repaints everything: plain img2img, draw for draw.
    inverted = pipe("a", image=PICTURE, mask=Image.new("L", (16, 16), 0), mask_invert=True, strength=0.6,
                    steps=4, sampler="euler", seed=5).pixels
    img2img = pipe("a", image=PICTURE, strength=0.6, steps=4, sampler="euler", seed=5).pixels
    np.testing.assert_allclose(inverted, img2img, atol=1e-6)


def test_blurred_mask_keeps_the_picture_outside_it(tiny_exports):
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    sharp = pipe("a", image=PICTURE, mask=mask_image(), steps=3, sampler="euler", seed=2).pixels[0]
    soft = pipe("a", image=PICTURE, mask=mask_image(), mask_blur=2, steps=3, sampler="euler", seed=2).pixels[0]
    original = np.asarray(PICTURE, np.float32) / 255
    far = np.ones((32, 32), bool)
    far[3:29, 0:21] = False  # beyond the mask (rows 8-23, columns 4-15) and its 5-pixel blur kernel
    np.testing.assert_allclose(soft[far], original[far], atol=1e-6)
    assert np.abs(sharp[far] - original[far]).max() > 1e-2  # without blur: the VAE's reconstruction
    inside = np.zeros((32, 32), bool)
    inside[12:20, 8:12] = True  # deep inside the mask: repainted
    assert np.abs(soft[inside] - original[inside]).min(axis=-1).mean() > 1e-2


def test_inpainting_model_also_draws_without_a_mask(inpaint_export):
    pipe = Pipeline.load(inpaint_export, provider="cpu")
    assert pipe("a", steps=2, seed=1).pixels.shape == (1, 32, 32, 3)  # txt2img: repaint everything
    assert pipe("a", image=PICTURE, steps=2, seed=1).pixels.shape == (1, 32, 32, 3)
