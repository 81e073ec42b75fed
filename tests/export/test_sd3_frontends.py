"""SD 3/3.5 through the front ends and the runtime's bookkeeping: the server's A1111 bodies and
batch job lines carry ``t5`` and ``skip_layer_guidance`` into the request (the same image as the
Python call); the memory plan's text length is 77 CLIP + 256 T5 tokens; a Large-Turbo-shaped
model (its own shift, 4 steps, guidance 0: one guidance group) matches diffusers."""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main
from edgediff.runtime import Pipeline
from edgediff.runtime.memory import MemoryPlanner, Shape
from test_sd3 import FP32_TOLERANCE, NEGATIVE, PROMPT, SLG, reference, start_noise

BODY = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 5, "steps": 3, "cfg_scale": 5.0, "sampler_name": "euler",
        "width": 32, "height": 32}


def python_image(folder, **kwargs) -> np.ndarray:
    pipe = Pipeline.load(folder, provider="cpu")
    return np.asarray(pipe(PROMPT, NEGATIVE, steps=3, guidance=5.0, sampler="euler", seed=5, width=32, height=32,
                           **kwargs).images[0])


def test_server_bodies_carry_t5_and_skip_layer_guidance(sd3):
    from fastapi.testclient import TestClient

    from edgediff.server import Limits, create_app

    folder = sd3["sd35m"][1]
    with TestClient(create_app(Pipeline.load(folder, provider="cpu"), limits=Limits(max_steps=50))) as client:
        images = {}
        for name, extra in (("plain", {}), ("t5 off", {"t5": "off"}), ("slg", {"skip_layer_guidance": SLG})):
            done = client.post("/sdapi/v1/txt2img", json={**BODY, **extra})
            assert done.status_code == 200, done.text
            images[name] = np.asarray(Image.open(io.BytesIO(base64.b64decode(done.json()["images"][0]))))
    np.testing.assert_array_equal(images["t5 off"], python_image(folder, t5="off"))
    np.testing.assert_array_equal(images["slg"], python_image(folder, skip_layer_guidance=SLG))
    assert not np.array_equal(images["t5 off"], images["plain"]) and not np.array_equal(images["slg"], images["plain"])

    with TestClient(create_app(Pipeline.load(sd3["sd3"][1], provider="cpu"))) as client:
        refused = client.post("/sdapi/v1/txt2img", json={**BODY, "t5": "on"})
    assert refused.status_code == 422 and "without t5" in refused.text


def test_batch_lines_carry_t5_and_skip_layer_guidance(sd3, tmp_path):
    from edgediff.batch import read_jobs

    folder = sd3["sd35m"][1]
    plain = {"prompt": PROMPT, "negative": NEGATIVE, "seed": 5, "steps": 3, "guidance": 5.0, "sampler": "euler",
             "width": 32, "height": 32}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({**plain, "id": name, **extra}) for name, extra in
                              (("off", {"t5": "off"}), ("slg", {"skip_layer_guidance": SLG}))) + "\n")
    done = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--model", str(folder)])
    assert done.exit_code == 0, done.output
    written = {path.name.split("-")[0]: np.asarray(Image.open(path)) for path in (tmp_path / "out").glob("*.png")}
    np.testing.assert_array_equal(written["off"], python_image(folder, t5="off"))
    np.testing.assert_array_equal(written["slg"], python_image(folder, skip_layer_guidance=SLG))
    # A job without the new fields keeps its derived seed (its identity does not name them).
    seedless = {key: value for key, value in plain.items() if key != "seed"}
    assert read_jobs([seedless])[0]["seed"] == read_jobs([{**seedless, "t5": None}])[0]["seed"]


@pytest.mark.parametrize("kind", ["sd35m", "sd3"])
def test_memory_plan_counts_t5_tokens(sd3, kind):
    """77 CLIP tokens and T5's 256 (zeros of that length where T5 is absent, as diffusers feeds them)."""
    from edgediff.runtime.manifest import read_manifest

    folder = sd3[kind][1]
    planner = MemoryPlanner(folder, read_manifest(folder), "high")
    _, context = planner.stages(Shape(1, 32, 32, True, [("unet", "latent")]))
    assert context == 77 + 256


def test_turbo_shaped_model_matches_diffusers(sd3, tmp_path):
    """Large Turbo runs 4 steps at guidance 0 with its scheduler config's own shift: the shift is read
    from the manifest (data), and guidance 0 runs one group, so the negative prompt changes nothing."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    source, folder = sd3["sd35m"]
    turbo = shutil.copytree(folder, tmp_path / "turbo")
    manifest = json.loads((turbo / "manifest.json").read_text())
    manifest["scheduler"]["shift"] = 5.0
    (turbo / "manifest.json").write_text(json.dumps(manifest))
    pipe = reference(source)
    original = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=5.0)
    latents = start_noise(4)
    try:
        with torch.no_grad():
            expected = pipe(prompt=PROMPT, guidance_scale=0.0, num_inference_steps=4, output_type="np",
                            latents=torch.from_numpy(latents)).images
    finally:
        pipe.scheduler = original
    ours = Pipeline.load(turbo, provider="cpu")
    actual = ours(PROMPT, steps=4, guidance=0.0, sampler="euler", latents=latents).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    negative = ours(PROMPT, "blurry, dark", steps=4, guidance=0.0, sampler="euler", latents=latents).pixels
    np.testing.assert_array_equal(negative, actual)
    shift3 = Pipeline.load(folder, provider="cpu")(PROMPT, steps=4, guidance=0.0, sampler="euler", latents=latents)
    assert np.abs(shift3.pixels - expected).max() > 5 * FP32_TOLERANCE  # the shift matters


def test_t5_reads_the_words_without_markup():
    """T5 gets the prompt without A1111's brackets and weights; a BREAK (whose spaces the parser
    strips) still keeps the words around it apart."""
    from edgediff.runtime.text_conditioning import plain_text

    assert plain_text("a (red:1.3) circle BREAK on [white] background") == "a red circle on white background"
    assert plain_text(PROMPT) == PROMPT
