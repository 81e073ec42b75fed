"""One invalid request, one message: the Python API, the CLI, the server (422) and a batch job line
all check through runtime/request.py, so each gives the same line for the same mistake."""
from __future__ import annotations

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from edgediff.batch import JobsFileError, plan_jobs, read_jobs
from edgediff.cli import main
from edgediff.runtime import EdgediffError
from edgediff.server import create_app
from live_server import running

PICTURE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))
MASK = Image.fromarray(np.full((128, 128), 255, np.uint8))


@pytest.fixture(scope="module")
def server(default_pipe):
    with running(create_app(default_pipe)) as url:
        yield url


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    PICTURE.save(root / "in.png")
    MASK.save(root / "mask.png")
    return root


def from_api(pipe, **kwargs):
    with pytest.raises(EdgediffError) as caught:
        pipe("a cat", steps=kwargs.pop("steps", 1), **kwargs)
    return str(caught.value)


def from_cli(*flags):
    result = CliRunner().invoke(main, ["generate", "a cat", "--steps", "1", *map(str, flags)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0][len("error: "):]


def from_server(url, path="/sdapi/v1/txt2img", **body):
    response = requests.post(f"{url}{path}", json={"prompt": "a cat", "steps": 1, **body})
    assert response.status_code == 422, response.text
    return response.json()["detail"]


def from_batch(pipe, **job):
    with pytest.raises(JobsFileError) as caught:
        jobs = read_jobs([{"prompt": "a cat", "steps": 1, **job}])
        plan_jobs(jobs, pipe.manifest, pipe.alphas_cumprod, "model")
    message = str(caught.value)
    assert message.startswith("jobs:1: "), message
    return message[len("jobs:1: "):]


def test_unknown_sampler(default_pipe, server):
    api = from_api(default_pipe, sampler="warp drive")
    assert api.startswith("unknown sampler 'warp drive'")
    assert from_cli("--sampler", "warp drive") == api
    assert from_server(server, sampler_name="warp drive") == api
    assert from_batch(default_pipe, sampler="warp drive") == api


def test_unknown_schedule(default_pipe, server):
    api = from_api(default_pipe, schedule="Align Your Steps")
    assert api.startswith("unknown scheduler 'Align Your Steps'; expected automatic or one of karras")
    assert from_cli("--schedule", "Align Your Steps") == api
    assert from_server(server, scheduler="Align Your Steps") == api
    assert from_batch(default_pipe, schedule="Align Your Steps") == api


def test_mask_blur_too_large(default_pipe, server, files):
    """1e9 pixels once asked for a 37 GiB blur kernel; now it is one line, before any work."""
    api = from_api(default_pipe, image=PICTURE, mask=MASK, mask_blur=10**9)
    assert api == "mask_blur must be a number of pixels from 0 to 256, not 1e+09"
    assert from_cli("--image", files / "in.png", "--mask", files / "mask.png", "--mask-blur", "1e9") == api
    image = "data:image/png;base64," + __import__("base64").b64encode((files / "in.png").read_bytes()).decode()
    mask = __import__("base64").b64encode((files / "mask.png").read_bytes()).decode()
    assert from_server(server, "/sdapi/v1/img2img", init_images=[image], mask=mask, mask_blur=10**9) == api


def test_prompt_syntax(default_pipe, server):
    api = from_api(default_pipe, prompt_syntax="markdown")
    assert api == "unknown prompt syntax 'markdown'; expected one of a1111, plain"
    assert from_cli("--prompt-syntax", "markdown") == api
    assert from_server(server, prompt_syntax="markdown") == api


@pytest.mark.parametrize("field,value,message", [
    ("width", 100, "width must be a positive multiple of 32 for this model, not 100"),
    ("steps", 0, "steps must be a whole number >= 1, not 0"),
])
def test_sizes_and_steps(default_pipe, field, value, message):
    """The server's OpenAPI schema states these bounds itself, so its 422 is pydantic's wording
    (tests/server/test_bad_input.py); the other three front-ends share the runtime's line."""
    assert default_pipe.manifest.size_multiple == 32
    assert from_api(default_pipe, **{field: value}) == message
    assert from_cli(f"--{field}", value) == message
    assert from_batch(default_pipe, **{field: value}) == message
