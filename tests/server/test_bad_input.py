"""Bad input gets a 4xx with a clear JSON `detail`, never a traceback, and the server keeps serving."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
import requests
import webuiapi
from PIL import Image

from live_server import running
from edgediff.server import Limits, create_app

KEY = "test-key-123"
GOOD = dict(prompt="a red circle", steps=1, width=128, height=128)


@pytest.fixture(scope="module")
def server(default_pipe):
    app = create_app(default_pipe, api_key=KEY, api_auth=["alice:wonderland"],
                     limits=Limits(max_side=512, max_steps=50, max_images=4, max_body_bytes=256 << 10,
                                   max_input_pixels=512 * 512))
    with running(app) as url:
        yield url


def post(url, path, body=None, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}{path}", json=body, headers=headers, **kwargs)


def assert_rejected(response, status, *fragments):
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "Traceback" not in detail
    for fragment in fragments:
        assert fragment in detail, detail


@pytest.fixture(autouse=True)
def still_serving(server):
    yield
    response = post(server, "/sdapi/v1/txt2img", GOOD)
    assert response.status_code == 200, response.text


def png_b64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def huge_png_header(width, height):
    """A tiny file whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gif_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="GIF")
    return buffer.getvalue()


def test_api_key_forms(server):
    assert_rejected(post(server, "/sdapi/v1/txt2img", GOOD, key=None), 401, "API key")
    assert_rejected(post(server, "/sdapi/v1/txt2img", GOOD, key="wrong"), 401, "API key")
    assert requests.get(f"{server}/sdapi/v1/samplers").status_code == 401
    assert requests.get(f"{server}/docs").status_code == 401
    assert requests.get(f"{server}/health").status_code == 200  # the one open endpoint
    assert requests.get(f"{server}/sdapi/v1/samplers", headers={"X-API-Key": KEY}).status_code == 200
    assert requests.get(f"{server}/sdapi/v1/samplers", auth=("anyone", KEY)).status_code == 200
    assert requests.get(f"{server}/sdapi/v1/samplers", auth=("alice", "wonderland")).status_code == 200
    assert requests.get(f"{server}/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
    host, port = server.rsplit("//", 1)[1].split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), username="alice", password="wonderland", steps=1)
    assert api.txt2img(prompt="a cat", width=128, height=128, seed=1).image.size == (128, 128)


def test_oversized_body(server):
    assert_rejected(post(server, "/sdapi/v1/txt2img", dict(GOOD, prompt="x" * (300 << 10))), 413, "over the limit")


@pytest.mark.parametrize("field,value,fragment", [
    ("width", 100000, "width: Input should be less than or equal to 512"),
    ("height", 130, "height: Input should be a multiple of"),
    ("steps", -3, "steps"),
    ("steps", 51, "steps: Input should be less than or equal to 50"),
    ("batch_size", 5, "batch_size: Input should be less than or equal to 4"),
    ("cfg_scale", "lots", "cfg_scale"),
    ("seed", -5, "seed"),
    ("sampler_name", "no such sampler", "unknown sampler"),
    ("scheduler", "align_your_steps", "unknown scheduler"),
])
def test_out_of_bounds_fields(server, field, value, fragment):
    assert_rejected(post(server, "/sdapi/v1/txt2img", dict(GOOD, **{field: value})), 422, fragment)


def test_too_many_images(server):
    body = dict(GOOD, batch_size=2, n_iter=3)
    assert_rejected(post(server, "/sdapi/v1/txt2img", body), 422, "batch_size x n_iter must be at most 4, not 6")


def test_unknown_fields_are_ignored(server):
    response = post(server, "/sdapi/v1/txt2img", dict(GOOD, restore_faces=True, alwayson_scripts={"x": 1}, hr_scale=2))
    assert response.status_code == 200 and response.json()["parameters"]["hr_scale"] == 2


def test_not_json(server):
    response = requests.post(f"{server}/sdapi/v1/txt2img", data=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_rejected(response, 422, "JSON")


@pytest.mark.parametrize("image,fragment", [
    ("%%%not base64%%%", "not valid base64"),
    (base64.b64encode(b"just some text, not a picture").decode(), "not a PNG, JPEG or WebP image"),
    (base64.b64encode(huge_png_header(100000, 100000)).decode(), "more pixels than the limit of 262144 pixels"),
    ("data:image/png;base64," + base64.b64encode(huge_png_header(1024, 1024)).decode(), "1024x1024: more pixels than the limit"),
    (base64.b64encode(gif_bytes()).decode(), "is GIF; send PNG, JPEG or WebP"),
    (base64.b64encode(huge_png_header(64, 64)[:40]).decode(), "not a"),  # truncated
])
def test_bad_images(server, image, fragment):
    body = dict(GOOD, init_images=[image], denoising_strength=0.5)
    assert_rejected(post(server, "/sdapi/v1/img2img", body), 422, "init_images[0]", fragment)
    assert_rejected(post(server, "/sdapi/v1/png-info", {"image": image}), 422, fragment)


def test_mask_without_inpainting_support_or_with_it(server, default_pipe):
    import inspect

    picture = png_b64(Image.new("RGB", (128, 128), "white"))
    body = dict(GOOD, init_images=[picture], mask=png_b64(Image.new("L", (128, 128), 255)), denoising_strength=0.5)
    response = post(server, "/sdapi/v1/img2img", body)
    if "mask" in inspect.signature(default_pipe.__call__).parameters:
        assert response.status_code == 200, response.text
    else:
        assert_rejected(response, 501, "inpainting")


def test_errors_are_json_for_unknown_routes_and_methods(server):
    assert_rejected(requests.get(f"{server}/sdapi/v1/nothing", headers={"X-API-Key": KEY}), 404, "Not Found")
    assert_rejected(requests.get(f"{server}/sdapi/v1/txt2img", headers={"X-API-Key": KEY}), 405, "Method Not Allowed")
