"""LoRAs at run time against diffusers' ``load_lora_weights`` + ``set_adapters`` on the same latents.

The LoRAs are random (lora_files.py) and touch U-Net attention and convolutions and the text
encoder; the exported graphs are the session's tiny exports (tests/export/conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgediff.runtime import Pipeline
from lora_files import lora_layers, save_kohya, save_peft
from tiny_models import build_pipeline

pytest.importorskip("peft")

TOLERANCE = 2e-3  # pixels in [0, 1], as the base parity test
PROMPT, NEGATIVE, STEPS = "a red circle on a white background", "blurry", 4


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """{(kind, name): path}: two different LoRAs per model, each in both formats."""
    root = tmp_path_factory.mktemp("loras")
    files = {}
    for kind in ("sd1", "sd2"):
        base = build_pipeline(kind)
        for seed in (0, 1):
            layers = lora_layers(base, seed=seed)
            files[kind, f"peft{seed}"] = save_peft(layers, root / f"{kind}-peft{seed}.safetensors")
            files[kind, f"kohya{seed}"] = save_kohya(layers, root / f"{kind}-kohya{seed}.safetensors", alpha=2.0)
    return files


def noise(folder) -> np.ndarray:
    m = Pipeline.load(folder, provider="cpu").manifest
    side = m.default_size // m.vae_scale_factor
    return np.random.default_rng(3).standard_normal((1, m.latent_channels, side, side), dtype=np.float32)


def diffusers_reference(source, loras: list):
    """diffusers' pipeline with these LoRA files loaded as adapters a0, a1, ...; weights set per run."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for index, path in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
    return pipe


def diffusers_pixels(pipe, weights: list[float], latents) -> np.ndarray:
    pipe.set_adapters([f"a{i}" for i in range(len(weights))], weights)
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                    latents=torch.from_numpy(latents), output_type="np").images


def edgediff_pixels(pipe, loras, latents) -> np.ndarray:
    return pipe(PROMPT, NEGATIVE, steps=STEPS, sampler="euler", latents=latents, loras=loras).pixels


@pytest.mark.parametrize("kind,fmt,precision,weights", [
    ("sd1", "peft", "fp32", (0.5, 1.0)), ("sd1", "kohya", "fp32", (0.5, 1.0)),
    ("sd2", "peft", "fp32", (0.5, 1.0)), ("sd2", "kohya", "fp32", (0.5, 1.0)), ("sd1", "kohya", "fp16", (1.0,)),
])
def test_lora_matches_diffusers(tiny_sources, tiny_exports, lora_files, kind, fmt, precision, weights):
    folder = tiny_exports[kind, precision]
    latents = noise(folder)
    path = lora_files[kind, f"{fmt}0"]
    pipe = Pipeline.load(folder, provider="cpu", memory="high")
    base = edgediff_pixels(pipe, None, latents)
    reference = diffusers_reference(tiny_sources[kind], [path])
    for weight in weights:
        result = pipe(PROMPT, NEGATIVE, steps=STEPS, sampler="euler", latents=latents, loras=[(path, weight)])
        expected = diffusers_pixels(reference, [weight], latents)
        assert np.abs(result.pixels - base).max() > 20 * TOLERANCE  # the LoRA changes the image ...
        assert np.abs(result.pixels - expected).max() < (TOLERANCE if precision == "fp32" else 3e-3)  # ... as diffusers'
        assert result.loras == [(path.stem, weight)]


def test_two_loras_and_weight_zero(tiny_sources, tiny_exports, lora_files):
    folder = tiny_exports["sd1", "fp32"]
    latents = noise(folder)
    loras = [(lora_files["sd1", "peft0"], 0.7), (lora_files["sd1", "kohya1"], 0.6)]
    pipe = Pipeline.load(folder, provider="cpu", memory="high")
    expected = diffusers_pixels(diffusers_reference(tiny_sources["sd1"], [p for p, _ in loras]), [w for _, w in loras],
                                latents)
    assert np.abs(edgediff_pixels(pipe, loras, latents) - expected).max() < TOLERANCE
    base = Pipeline.load(folder, provider="cpu")(PROMPT, NEGATIVE, steps=STEPS, sampler="euler", latents=latents)
    zero = edgediff_pixels(pipe, [(path, 0.0) for path, _ in loras], latents)
    np.testing.assert_array_equal(zero, base.pixels)


def test_only_changed_graphs_are_recreated(tiny_exports, lora_files, tmp_path):
    """memory="high": a LoRA with U-Net layers only leaves the text-encoder session as it was."""
    from safetensors.numpy import load_file, save_file

    unet_only = {k: v for k, v in load_file(str(lora_files["sd1", "kohya0"])).items() if k.startswith("lora_unet_")}
    path = save_file(unet_only, str(tmp_path / "unet-only.safetensors")) or tmp_path / "unet-only.safetensors"
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu", memory="high")
    pipe(PROMPT, steps=1, seed=0)
    sessions = dict(pipe.sessions._resident)
    for weight in (0.5, 0.8):
        pipe(PROMPT, steps=1, seed=0, loras=[(path, weight)])
        assert pipe.sessions._resident["text_encoder"] is sessions["text_encoder"]
        assert pipe.sessions._resident["unet"] is not sessions["unet"]
        sessions = dict(pipe.sessions._resident)
    pipe(PROMPT, steps=1, seed=0, loras=[(path, 0.8)])  # unchanged: nothing re-created
    assert pipe.sessions._resident == sessions


def test_prompt_tags_and_unmatched_layers(tiny_exports, lora_files, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(lora_files["sd1", "kohya0"]))
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = np.zeros((4, 8), np.float32)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = np.zeros((8, 4), np.float32)
    save_file(tensors, str(tmp_path / "style.safetensors"))
    warnings = []
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu", warn=warnings.append)
    latents = noise(tiny_exports["sd1", "fp32"])
    tagged = pipe(f"{PROMPT} <lora:style:0.5>", NEGATIVE, steps=STEPS, sampler="euler", latents=latents,
                  lora_dir=tmp_path)
    direct = pipe(PROMPT, NEGATIVE, steps=STEPS, sampler="euler", latents=latents,
                  loras=[(tmp_path / "style.safetensors", 0.5)])
    np.testing.assert_array_equal(tagged.pixels, direct.pixels)
    assert tagged.loras == [("style", 0.5)]
    assert len(warnings) == 1 and "1 of" in warnings[0] and "no_such_block" in warnings[0]


def test_external_data_graphs_take_the_same_patch(tiny_exports, lora_files, tmp_path):
    """Graphs over 2 GB keep weights in a .data file; their patch goes through add_external_initializers."""
    import shutil

    import onnx

    folder = shutil.copytree(tiny_exports["sd1", "fp32"], tmp_path / "model")
    graph = folder / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    latents = noise(folder)
    loras = [(lora_files["sd1", "kohya0"], 1.0)]
    inline = edgediff_pixels(Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu"), loras, latents)
    external = edgediff_pixels(Pipeline.load(folder, provider="cpu"), loras, latents)
    base = edgediff_pixels(Pipeline.load(folder, provider="cpu"), None, latents)
    assert np.abs(external - base).max() > 20 * TOLERANCE
    assert np.abs(external - inline).max() < 1e-5
