"""The real server, driven by webuiapi (a third-party AUTOMATIC1111 client), on the default model."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import requests
import webuiapi
from click.testing import CliRunner
from PIL import Image
from sd_parsers import ParserManager

from live_server import running
from edgediff.cli import main
from edgediff.runtime import Pipeline
from edgediff.runtime.samplers import resolve_sampler
from edgediff.server import Limits, create_app

SMALL = dict(width=128, height=128, steps=4, cfg_scale=7.0)


@pytest.fixture(scope="module")
def server(default_pipe):
    with running(create_app(default_pipe, limits=Limits(max_steps=2000, max_queue=1))) as url:
        yield url


def client(url):
    host, port = url.rsplit("//", 1)[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)


def test_txt2img_carries_metadata_and_matches_generate(server, tmp_path):
    result = client(server).txt2img(prompt="a red circle on a white background", negative_prompt="blurry",
                                    seed=42, **SMALL)
    assert result.image.size == (128, 128)
    assert result.info["seed"] == 42 and result.info["all_seeds"] == [42]
    png = io.BytesIO(base64.b64decode(result.json["images"][0]))
    info = ParserManager().parse(png)
    assert info.prompts[0].value == "a red circle on a white background"
    assert info.samplers[0].parameters["seed"] == "42" and info.samplers[0].name == "Euler a"
    assert result.info["infotexts"][0] == result.image.info["parameters"]

    out = tmp_path / "cli.png"
    run = CliRunner().invoke(main, ["generate", "a red circle on a white background", "--negative", "blurry",
                                    "--seed", "42", "--steps", "4", "--guidance", "7", "--sampler", "Euler a",
                                    "--provider", "cpu", "--memory", "high", "-o", str(out)])
    assert run.exit_code == 0, run.stderr
    # The server keeps its sessions resident (memory high); low memory runs the guidance halves
    # apart, which may round a pixel differently.
    with Image.open(out) as cli_image:
        np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), np.asarray(cli_image.convert("RGB")))
        assert cli_image.info["parameters"] == result.image.info["parameters"]


def test_random_seed_is_reported_and_reproduces(server):
    api = client(server)
    first = api.txt2img(prompt="a blue square", seed=-1, **SMALL)
    seed = first.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and f"Seed: {seed}," in first.info["infotexts"][0]
    again = api.txt2img(prompt="a blue square", seed=seed, **SMALL)
    np.testing.assert_array_equal(np.asarray(first.image), np.asarray(again.image))


def test_batch_gives_consecutive_seeds(server, default_pipe):
    result = client(server).txt2img(prompt="a green triangle", seed=7, batch_size=2, n_iter=1, **SMALL)
    assert len(result.images) == 2 and result.info["all_seeds"] == [7, 8]
    alone = default_pipe("a green triangle", steps=4, guidance=7.0, sampler="euler_a", seed=8).images[0]
    np.testing.assert_array_equal(np.asarray(result.images[1].convert("RGB")), np.asarray(alone))


def test_img2img_matches_the_pipeline(server, default_pipe):
    start = default_pipe("a yellow circle", steps=4, seed=1).images[0]
    result = client(server).img2img(images=[start], prompt="a purple circle", denoising_strength=0.5, seed=5,
                                    **SMALL)
    assert result.image.size == (128, 128)
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    direct = default_pipe("a purple circle", steps=4, guidance=7.0, sampler="euler_a", seed=5, image=start,
                          strength=0.5).images[0]
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), np.asarray(direct))


def test_lists_options_and_png_info(server):
    api = client(server)
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM"} <= set(names)
    for name in names:
        resolve_sampler(name)  # every listed name is one the server takes back
    assert "karras" in [s["name"] for s in api.get_schedulers()]
    models = api.get_sd_models()
    assert len(models) == 1 and models[0]["model_name"] == "default"
    assert api.util_get_current_model() == models[0]["title"]
    api.set_options({"samples_format": "webp", "unknown_option": 1})
    assert api.get_options()["samples_format"] == "webp" and "unknown_option" not in api.get_options()
    assert requests.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 422

    made = api.txt2img(prompt="an orange star", seed=3, **SMALL)
    info = api.png_info(made.image)
    assert info.info == made.info["infotexts"][0]
    assert info.json["parameters"]["Prompt"] == "an orange star" and info.json["parameters"]["Seed"] == "3"


def _long_request(url, box, steps=999):
    try:
        box["response"] = requests.post(f"{url}/sdapi/v1/txt2img", json=dict(SMALL, prompt="a long one", seed=1,
                                                                              steps=steps, sampler_name="Euler"))
    except Exception as error:  # the test reads it
        box["error"] = error


def _wait_for_step(url, at_least, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = requests.get(f"{url}/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= at_least:
            return progress
        time.sleep(0.05)
    raise AssertionError("the generation never reached step %d" % at_least)


def test_progress_preview_interrupt_and_queue(server):
    box, queued_box = {}, {}
    running_thread = threading.Thread(target=_long_request, args=(server, box))
    running_thread.start()
    progress = _wait_for_step(server, 3)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 999
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (32, 32)  # the 16x16 latent, doubled
    assert requests.get(f"{server}/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None

    queued_thread = threading.Thread(target=_long_request, args=(server, queued_box, 2))
    queued_thread.start()  # takes the one queue slot
    deadline = time.monotonic() + 10
    while requests.get(f"{server}/sdapi/v1/progress").json()["state"]["job_count"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    full = requests.post(f"{server}/sdapi/v1/txt2img", json=dict(SMALL, prompt="one too many"))
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1 and "queue is full" in full.json()["detail"]

    assert requests.post(f"{server}/sdapi/v1/interrupt").status_code == 200
    running_thread.join(timeout=60)
    response = box["response"]
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) == 1  # what the run had reached
    queued_thread.join(timeout=60)
    assert queued_box["response"].status_code == 200  # the interrupt stopped only the running job
    assert json.loads(queued_box["response"].json()["info"])["interrupted"] is False


class CountingPipeline(Pipeline):
    """Records every generation it runs, to see which requests ran."""

    def __call__(self, prompt, *args, **kwargs):
        self.ran = getattr(self, "ran", []) + [prompt]
        return super().__call__(prompt, *args, **kwargs)


def _open_request(url, prompt, steps):
    """Send a txt2img request on a raw socket and leave it waiting; closing the socket is a
    client that goes away."""
    host, port = url.rsplit("//", 1)[1].split(":")
    body = json.dumps(dict(SMALL, prompt=prompt, steps=steps)).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_disconnected_clients_leave_no_work_behind():
    pipe = CountingPipeline.load(None, provider="cpu", memory="high")
    with running(create_app(pipe, limits=Limits(max_steps=100000))) as url:
        running_one = _open_request(url, "running then gone", 1000)
        _wait_for_step(url, 1)
        queued_one = _open_request(url, "queued then gone", 2)
        deadline = time.monotonic() + 10
        while requests.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        queued_one.close()
        time.sleep(1.0)  # a few polls: the queued request is dropped
        running_one.close()
        deadline = time.monotonic() + 20
        while requests.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"]:
            assert time.monotonic() < deadline, "work kept running for a client that left"
            time.sleep(0.05)
        ok = requests.post(f"{url}/sdapi/v1/txt2img", json=dict(SMALL, prompt="still serving"))
        assert ok.status_code == 200
    assert pipe.ran == ["running then gone", "still serving"]


def test_server_imports_no_torch_and_no_exporter():
    import subprocess
    import sys
    import textwrap

    from torch_blocker import BLOCK_TORCH

    script = BLOCK_TORCH + textwrap.dedent("""
        import edgediff.server, edgediff.cli
        assert not [m for m in sys.modules if m.startswith("edgediff.exporter")], "the server pulled in the exporter"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_pipeline_decode_shows_where_the_run_was(default_pipe):
    """What an interrupted request returns: Pipeline.decode of the latents on_step saw (the state
    at the start of that step). Near the end of a run it is close to the final image; at the
    start, noise."""
    seen = []
    result = default_pipe("a red circle", steps=20, sampler="euler", seed=4,
                          on_step=lambda step, steps, latents: seen.append(latents.copy()))
    images, pixels = default_pipe.decode(seen[-1])
    assert images[0].size == (128, 128) and pixels.shape == result.pixels.shape
    assert np.abs(pixels - result.pixels).max() < 0.05
    assert np.abs(default_pipe.decode(seen[0])[1] - result.pixels).max() > 0.2
