"""prompt_syntax="plain" reads a prompt as diffusers does: brackets and weights are text, BREAK is a
word, and the prompt is cut at the encoder's 77 positions. "a1111" (the default) weights them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgediff.runtime import Pipeline
from helpers import FP32_TOLERANCE

STEPS, GUIDANCE = 6, 7.5
BRACKETS = "a (red:1.5) cat, [blurry] ((sharp)) BREAK photo"
LONG = "a (red:1.5) cat on a mat, " * 20  # about 180 tokens: diffusers keeps the first 75


def diffusers_pixels(source, prompt, negative, latents):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=torch.from_numpy(latents), output_type="np").images


@pytest.mark.parametrize("prompt,negative", [(BRACKETS, "(ugly:1.3)"), (LONG, "")])
def test_plain_syntax_gives_diffusers_image(tiny_sources, tiny_exports, prompt, negative):
    folder = tiny_exports["sd1", "fp32"]
    pipe = Pipeline.load(folder, provider="cpu")
    m = pipe.manifest
    side = m.default_size // m.vae_scale_factor
    latents = np.random.default_rng(7).standard_normal((1, m.latent_channels, side, side), dtype=np.float32)
    expected = diffusers_pixels(tiny_sources["sd1"], prompt, negative, latents)
    run = dict(steps=STEPS, guidance=GUIDANCE, sampler="euler", latents=latents)
    plain = pipe(prompt, negative, prompt_syntax="plain", **run).pixels
    a1111 = pipe(prompt, negative, **run).pixels
    assert np.abs(plain - expected).max() < FP32_TOLERANCE
    assert np.abs(a1111 - expected).max() > 10 * FP32_TOLERANCE  # the default reads the syntax


def test_unknown_syntax_is_one_input_error(tiny_exports):
    from edgediff.runtime import InputError

    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    with pytest.raises(InputError, match="unknown prompt syntax 'markdown'; expected one of a1111, plain"):
        pipe("a cat", steps=1, prompt_syntax="markdown")
