"""ControlNet with img2img and inpainting: parity with diffusers' StableDiffusionControlNetImg2ImgPipeline
and StableDiffusionControlNetInpaintPipeline from the same noise, on the tiny models of conftest.py and a
ControlNet with re-drawn zero convolutions (test_controlnet.py); and the memory plan counting it.

Each case shows the image moves clearly without the residuals, so the comparison could fail.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgediff.runtime import Pipeline, memory
from helpers import feed_numpy_noise
from test_controlnet import hint

TOLERANCE = 2e-3
MOVED = 10 * TOLERANCE
STEPS, GUIDANCE, PROMPT = 6, 6.0, "a blue square"
PICTURE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
HINT = hint(2, side=48)  # another size than the output: resized to it, as diffusers' control image processor does
MODULE = "diffusers.pipelines.controlnet.pipeline_controlnet_"


@pytest.fixture(scope="module")
def net(tiny_store):
    """(the ControlNet's diffusers folder, its export), made from the tiny SD 1.x U-Net (seed 11: the
    session's, test_controlnet.py's "a")."""
    return tiny_store.controlnet("a", 11)


def mask_image(size=32):
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size * 3 // 4, size // 8: size // 2] = 255
    return Image.fromarray(mask)


def reference(cls: str, source, net_folder):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(source, controlnet=diffusers.ControlNetModel.from_pretrained(
        net_folder), safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(pipe, exported, unit=None, **kwargs):
    control = None if unit is None else [{"model": exported, "image": HINT, **unit}]
    return pipe(PROMPT, steps=STEPS, guidance=GUIDANCE, sampler="euler", rng=np.random.default_rng(3),
                control=control, **kwargs).pixels


# diffusers' img2img and inpaint ControlNet pipelines default to scales 0.8 and 0.5: always given here.
@pytest.mark.parametrize("unit,kwargs", [({}, {"controlnet_conditioning_scale": 1.0}),
                                         ({"scale": 0.5, "start": 0.2, "end": 0.8},
                                          {"controlnet_conditioning_scale": 0.5, "control_guidance_start": 0.2,
                                           "control_guidance_end": 0.8}),
                                         ({"guess_mode": True}, {"guess_mode": True, "controlnet_conditioning_scale": 1.0})])
def test_img2img_matches_diffusers(tiny_sources, tiny_exports, net, monkeypatch, unit, kwargs):
    expected_pipe = reference("StableDiffusionControlNetImg2ImgPipeline", tiny_sources["sd1"], net[0])
    feed_numpy_noise(monkeypatch, 3, MODULE + "img2img")
    with torch.no_grad():
        expected = expected_pipe(PROMPT, image=PICTURE, control_image=HINT, strength=0.6, num_inference_steps=STEPS,
                                 guidance_scale=GUIDANCE, height=32, width=32, output_type="np", **kwargs).images
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    assert np.abs(ours(pipe, net[1], unit, image=PICTURE, strength=0.6) - expected).max() < TOLERANCE
    assert np.abs(ours(pipe, net[1], None, image=PICTURE, strength=0.6) - expected).max() > MOVED


@pytest.mark.parametrize("model", ["4-channel", "9-channel"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_matches_diffusers(tiny_sources, tiny_exports, inpaint_source, inpaint_export, net, monkeypatch,
                                   model, strength):
    """A ControlNet for SD 1.x drives both the blend inpainting of a 4-channel model and a 9-channel
    inpainting U-Net: it sees the 4-channel latent, before the mask and picture channels join."""
    source, exported = ((tiny_sources["sd1"], tiny_exports["sd1", "fp32"]) if model == "4-channel"
                        else (inpaint_source, inpaint_export))
    expected_pipe = reference("StableDiffusionControlNetInpaintPipeline", source, net[0])
    feed_numpy_noise(monkeypatch, 3, MODULE + "inpaint")
    with torch.no_grad():
        expected = expected_pipe(PROMPT, image=PICTURE, mask_image=mask_image(), control_image=HINT, strength=strength,
                                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
                                 controlnet_conditioning_scale=1.0, output_type="np").images
    pipe = Pipeline.load(exported, provider="cpu")
    picture = dict(image=PICTURE, mask=mask_image(), strength=strength)
    assert np.abs(ours(pipe, net[1], {}, **picture) - expected).max() < TOLERANCE
    assert np.abs(ours(pipe, net[1], None, **picture) - expected).max() > MOVED


@pytest.mark.parametrize("mode", ["low", "high"])
def test_memory_plan_counts_the_controlnet(tiny_exports, net, monkeypatch, mode):
    """Its graph is in the plan's stage list, run on the U-Net's input, and its weights are loaded
    beside the U-Net's while it samples: the estimate grows by at least its weights (and, in
    memory="low", its arena held during the U-Net's run)."""
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)  # the process's own memory aside
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu", memory=mode)
    unit = {"model": net[1], "image": hint(2)}
    plain, controlled = pipe.estimate_memory(1, 32, 32), pipe.estimate_memory(1, 32, 32, control=[unit])
    profile = pipe.planner.profiles["controlnet 0"]
    shape = pipe._shape(1, 32, 32, True, pipe._mode_for(False), False, [net[1]])
    stages, _ = pipe.planner.stages(shape)
    assert [stage[0] for stage in stages] == ["text_encoder", "controlnet 0", "unet", "vae_decoder"]
    assert stages[1][1:] == stages[2][1:]  # the U-Net's batch and latent size
    grown = controlled.peak_bytes - plain.peak_bytes
    cn_weights, cn_activations = profile.weight_bytes, controlled.activations["controlnet 0"]
    assert cn_weights > 0 and cn_activations > 0
    if mode == "low":  # the U-Net stage peaks: its weights and activations, and the ControlNet's
        unet = pipe.planner.profiles["unet"]
        assert controlled.stage == "unet" and controlled.peak_bytes == (
            unet.weight_bytes + controlled.activations["unet"] + cn_weights + cn_activations)
    else:
        assert grown >= cn_weights
    pipe(PROMPT, steps=1, width=32, height=32, seed=0, control=[unit])
    assert "controlnet 0" in pipe.memory_plan.activations  # the generation's own plan had it
