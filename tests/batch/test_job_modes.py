"""Job lines carry the hires fix, a picture and image guidance: translated into the request as
``pipe(...)`` takes them, so a job's image is the one ``pipe(...)`` draws with the same values."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from edgediff.batch import plan_jobs, read_jobs, run_batch
from edgediff.batch.jobs import to_request
from edgediff.models import default_model_dir
from edgediff.runtime import Pipeline
from edgediff.runtime.manifest import read_manifest

FAST = dict(steps=2, width=64, height=64, seed=11, sampler="euler")
HIRES = {"scale": 1.5, "steps": 2, "strength": 0.5, "upscaler": "Latent (bicubic)"}


def test_hires_and_picture_jobs_draw_what_pipe_draws(tmp_path):
    (tmp_path / "pictures").mkdir()
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    picture.save(tmp_path / "pictures" / "in.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(job) for job in [
        {"id": "hires", "prompt": "a red circle", "hires": HIRES, **FAST},
        {"id": "edit", "prompt": "a blue circle", "image": "pictures/in.png", **FAST},  # relative to the jobs file
    ]) + "\n")
    summary = run_batch(jobs, tmp_path / "out", progress=False)
    assert summary.failed == 0 and summary.done == 2
    pipe = Pipeline.load(None, provider="cpu")
    expected = {"hires": pipe("a red circle", hires=HIRES, **FAST).images[0],
                "edit": pipe("a blue circle", image=picture, **FAST).images[0]}
    for name, image in expected.items():
        [path] = (tmp_path / "out").glob(f"{name}-*.png")
        with Image.open(path) as written:
            np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(image))
            if name == "hires":
                assert written.size == (96, 96) and "Hires upscaler: Latent (bicubic)" in written.info["parameters"]


def test_optional_fields_reach_the_request_and_the_key(tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "white").save(picture)
    line = {"prompt": "make it winter", "image": "in.png", "image_guidance": 1.5, **FAST}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({"prompt": "plain", **FAST}) + "\n")
    manifest = read_manifest(default_model_dir())
    alphas = np.load(default_model_dir() / manifest.alphas_cumprod)
    plan = lambda: plan_jobs(read_jobs(tmp_path / "jobs.jsonl"), manifest, alphas, "model")  # noqa: E731
    edit, plain = plan()
    request = to_request(edit.params)
    assert (request.image_guidance, request.image) == (1.5, str(picture.resolve()))
    assert "image" not in plain.params and "hires" not in plain.params  # older jobs keep their keys
    Image.new("RGB", (64, 64), "black").save(picture)  # another picture under the same name: another job
    assert plan()[0].key != edit.key and plan()[1].key == plain.key
