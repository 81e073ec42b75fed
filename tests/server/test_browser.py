"""The web page at `/`, used as a person uses it: in a real headless Chromium (Debian's `chromium`,
driven by Playwright; `.ci/run` installs it), against the real server on the shipped default model.

Every result is compared pixel for pixel with `edgediff generate` or the Pipeline given the same
settings. Each test also fails on any console error or uncaught exception of the page, and checks
that every visible control has an accessible name.

Screenshots for the README: `EDGEDIFF_SCREENSHOTS=docs pytest tests/server/test_browser.py -k matches_generate`
writes docs/page-idle.png, docs/page-generating.png and docs/page-gallery.png.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image, ImageOps

from live_server import running
from edgediff.cli import main
from edgediff.server import Limits, create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the test extra)")
CHROMIUM = os.environ.get("EDGEDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                                         ".ci/run installs it); set EDGEDIFF_CHROMIUM to another binary")
expect = sync_api.expect
expect.set_options(timeout=20_000)  # 2 loaded cores: the 5 s default is tight for a page waiting on a generation
KEY = "page-key-42"
SLOW_STEPS = 40  # ~1.5 s on the default model (2 cores): the page polls progress a few times


def png_pixels(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):
        data = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    from edgediff.runtime import metadata

    buffer = io.BytesIO()
    metadata.save_image(image, buffer, text, format="PNG")
    return buffer.getvalue()


def cli_generate(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    run = CliRunner().invoke(main, ["generate", *args, "--provider", "cpu", "--memory", "high", "-o", str(out)])
    assert run.exit_code == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # small /dev/shm in containers crashes Chromium
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A diffusers/PEFT LoRA on the default model's text encoder, and a file the list leaves out."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("loras")
    rng = np.random.default_rng(0)
    tensors = {}
    for projection in ("q_proj", "k_proj", "v_proj"):
        layer = f"text_encoder.encoder.layers.0.self_attn.{projection}"
        tensors[f"{layer}.lora_A.weight"] = rng.standard_normal((4, 32), dtype=np.float32)
        tensors[f"{layer}.lora_B.weight"] = rng.standard_normal((32, 4), dtype=np.float32)
    save_file(tensors, str(folder / "shapes.safetensors"))
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def server(default_pipe, lora_dir):
    with running(create_app(default_pipe, limits=Limits(max_side=512), lora_dir=lora_dir)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(default_pipe):
    with running(create_app(default_pipe, api_key=KEY, api_auth=["alice:wonderland"])) as url:
        yield url


NETWORK_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


class Watched:
    """A browser context whose pages report console errors and uncaught exceptions. Chromium
    itself logs an error line for every HTTP error answer; a test that provokes one on purpose
    names its status in ``expected_statuses``, and only those lines are let through."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1100, "height": 760}, accept_downloads=True)
        self.problems: list[str] = []
        self.expected_statuses: set[int] = set()

    def _console(self, message):
        if message.type != "error":
            return
        network = NETWORK_ERROR.match(message.text)
        if network is None or int(network.group(1)) not in self.expected_statuses:
            self.problems.append(f"console: {message.text}")

    def page(self, url: str, ready: bool = True):
        page = self.context.new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        page.goto(url)
        if ready:
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
        return page


@pytest.fixture
def watched(browser):
    watched = Watched(browser)
    yield watched
    watched.context.close()
    assert watched.problems == []


def assert_labelled(page):
    """Every visible input, select, textarea and button has an accessible name, as Chromium's
    accessibility computation (Playwright's) finds it."""
    controls = page.locator("input, select, textarea, button")
    checked = 0
    for i in range(controls.count()):
        control = controls.nth(i)
        if control.is_visible():
            expect(control).to_have_accessible_name(re.compile(r"\S"))
            checked += 1
    assert checked >= 10


def gallery_images(page) -> list[str]:
    return page.locator("#gallery img").evaluate_all("(images) => images.map((i) => i.src)")


def record_progress(page):
    """Collect every value the #progress bar and its text take, from now on (a MutationObserver)."""
    page.evaluate("""() => {
        window.seen = {values: [], texts: [], previews: 0};
        const bar = document.getElementById("progress");
        new MutationObserver(() => window.seen.values.push(bar.value)).observe(bar, {attributes: true});
        new MutationObserver(() => window.seen.texts.push(document.getElementById("progress-text").textContent))
            .observe(document.getElementById("progress-text"), {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => window.seen.previews++).observe(document.getElementById("preview"),
                                                                  {attributes: true, attributeFilter: ["src"]});
    }""")


def drop_file(page, selector: str, data: bytes, name: str, kind: str = "image/png"):
    """What dropping a file from the desktop does: dragover, then drop with a DataTransfer holding it."""
    page.eval_on_selector(selector, """(target, [b64, name, kind]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: kind}));
        for (const type of ["dragover", "drop"]) {
            target.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
    }""", [base64.b64encode(data).decode(), name, kind])


def screenshot(page, name: str):
    """Into $EDGEDIFF_SCREENSHOTS (e.g. docs), palette-quantized to keep the PNGs small."""
    folder = os.environ.get("EDGEDIFF_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(page.screenshot())) as image:
        image.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            Path(folder) / f"page-{name}.png", optimize=True)


def test_generate_matches_generate(watched, server, tmp_path):
    page = watched.page(server + "/")
    assert_labelled(page)
    prompt = page.locator("#prompt")
    prompt.fill("a red circle on a white background")
    page.fill("#negative", "blurry")
    page.select_option("#sampler", "Euler a")
    page.select_option("#scheduler", "automatic")
    page.fill("#steps", str(SLOW_STEPS))
    page.fill("#cfg", "6.5")
    page.fill("#seed", "42")
    screenshot(page, "idle")
    record_progress(page)
    page.click("#generate")
    if os.environ.get("EDGEDIFF_SCREENSHOTS"):  # a preview with some shape in it
        expect(page.locator("#preview")).to_be_visible()
        page.wait_for_function("() => document.getElementById('progress').value >= 0.5")
        screenshot(page, "generating")
    expect(page.locator("#gallery img")).to_have_count(1, timeout=60_000)
    seen = page.evaluate("window.seen")  # everything the page showed while it ran
    between = [v for v in seen["values"] if 0 < v < 1]
    assert between and between == sorted(between) and seen["values"][-1] == 1, seen  # forwards, to the end
    assert any(re.fullmatch(rf"step \d+/{SLOW_STEPS} · about [\d.]+ s left", t) for t in seen["texts"]), seen
    assert seen["previews"] >= 1
    expect(page.locator("#progress-text")).to_contain_text("Done: 1 image")
    screenshot(page, "gallery")

    out = cli_generate(tmp_path, "cli.png", "a red circle on a white background", "--negative", "blurry",
                       "--sampler", "Euler a", "--steps", str(SLOW_STEPS), "--guidance", "6.5", "--seed", "42")
    np.testing.assert_array_equal(png_pixels(gallery_images(page)[0]), png_pixels(out.read_bytes()))
    with Image.open(out) as cli_image:
        expect(page.locator("#gallery .infotext")).to_have_text(cli_image.info["parameters"])
    download = page.locator("#gallery a", has_text="Download")
    expect(download).to_have_attribute("download", "edgediff-42.png")

    # Keyboard alone: "reuse last seed", then Ctrl+Enter from the prompt box makes the same image again.
    page.fill("#seed", "-1")
    page.focus("#seed-reuse")
    page.keyboard.press("Enter")
    expect(page.locator("#seed")).to_have_value("42")
    prompt.focus()
    page.keyboard.press("Control+Enter")
    expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)
    assert gallery_images(page)[0] == gallery_images(page)[1]


def test_paint_a_mask_and_inpaint(watched, server, default_pipe):
    start = default_pipe("a yellow circle", steps=4, seed=1).images[0]
    page = watched.page(server + "/")
    drop_file(page, "#input-set", png_bytes(start), "start.png")
    expect(page.locator("#paint")).to_be_visible()
    expect(page.locator("#width")).to_have_value("128")
    assert_labelled(page)
    page.fill("#prompt", "a purple square")
    page.fill("#steps", "6")
    page.fill("#seed", "5")
    page.fill("#blur", "2")
    page.eval_on_selector("#brush", "(e) => { e.value = 20; e.dispatchEvent(new Event('input')); }")
    page.focus("#strength")
    page.keyboard.press("ArrowLeft")  # 0.75 -> 0.7, from the keyboard
    expect(page.locator("#strength-value")).to_have_text("0.7")

    canvas = page.locator("#mask").bounding_box()
    scale = canvas["width"] / 128  # the canvas is shown larger than the picture's 128 pixels

    def stroke(x0, x1, y):
        page.mouse.move(canvas["x"] + x0 * scale, canvas["y"] + y * scale)
        page.mouse.down()
        for x in np.linspace(x0, x1, 8):
            page.mouse.move(canvas["x"] + x * scale, canvas["y"] + y * scale)
        page.mouse.up()

    stroke(20, 108, 64)        # a band across the middle, 20 pixels high
    page.check("#erase")
    stroke(10, 50, 64)         # rubbed out again on the left
    page.uncheck("#erase")
    page.check("#invert")      # repaint all but the band
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(1, timeout=60_000)
    body = sent.value.post_data_json
    assert body["inpainting_mask_invert"] == 1 and body["mask_blur"] == 2 and body["denoising_strength"] == 0.7
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].partition(",")[2]))).convert("L")
    m = np.asarray(mask)
    assert mask.size == (128, 128) and set(np.unique(m)) == {0, 255}
    assert m[64, 80] == 255 and m[64, 30] == 0 and m[30, 80] == 0 and m[100, 80] == 0
    band = np.flatnonzero(m[:, 80])
    assert 17 <= len(band) <= 23 and band.min() <= 64 <= band.max()  # the brush's 20 pixels

    reference = default_pipe("a purple square", steps=6, guidance=7.0, sampler="DPM++ 2M", schedule="karras",
                             seed=5, width=128, height=128, image=Image.fromarray(png_pixels(png_bytes(start))), strength=0.7,
                             mask=ImageOps.invert(mask), mask_blur=2).images[0]
    np.testing.assert_array_equal(png_pixels(gallery_images(page)[0]), np.asarray(reference))


def test_drop_a_png_and_regenerate_it(watched, server, tmp_path):
    made = cli_generate(tmp_path, "made.png", "a blue square", "--negative", "green, dark", "--steps", "6",
                        "--guidance", "5", "--seed", "1234", "--sampler", "DPM++ 2M Karras")
    page = watched.page(server + "/")
    page.fill("#prompt", "something else")
    page.select_option("#sampler", "Euler")
    page.select_option("#scheduler", "automatic")
    drop_file(page, "#gallery", made.read_bytes(), "made.png")
    expect(page.locator("#prompt")).to_have_value("a blue square")
    expect(page.locator("#negative")).to_have_value("green, dark")
    for field, value in (("#steps", "6"), ("#cfg", "5.0"), ("#seed", "1234"), ("#width", "128"),
                         ("#sampler", "DPM++ 2M"), ("#scheduler", "karras")):
        expect(page.locator(field)).to_have_value(value)
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(1, timeout=60_000)
    np.testing.assert_array_equal(png_pixels(gallery_images(page)[0]), png_pixels(made.read_bytes()))

    # The gallery's own buttons: settings back into the form, the image as the next input.
    page.fill("#prompt", "changed")
    page.fill("#steps", "3")
    page.click("#gallery button:has-text('Send parameters')")
    expect(page.locator("#prompt")).to_have_value("a blue square")
    expect(page.locator("#steps")).to_have_value("6")
    page.click("#gallery button:has-text('Use as input')")
    expect(page.locator("#paint")).to_be_visible()
    assert page.eval_on_selector("#input-image", "(e) => e.src") == gallery_images(page)[0]

    # A picture without settings: one readable message, the form untouched.
    drop_file(page, "#gallery", png_bytes(Image.new("RGB", (64, 64), "white")), "plain.png")  # answered 200
    expect(page.locator("#message")).to_contain_text("plain.png carries no generation settings")
    expect(page.locator("#prompt")).to_have_value("a blue square")


def test_server_errors_are_one_readable_message(watched, server):
    watched.expected_statuses.add(422)
    page = watched.page(server + "/")
    page.fill("#prompt", "a red circle")
    page.fill("#width", "100")
    page.click("#generate")
    message = page.locator("#message")
    expect(message).to_be_visible()
    expected = requests.post(f"{server}/sdapi/v1/txt2img", json=dict(prompt="a red circle", width=100)).json()["detail"]
    assert "width" in expected and "multiple of 32" in expected
    expect(message).to_have_text(expected)
    expect(page.locator("#gallery img")).to_have_count(0)
    expect(page.locator("#generate")).to_be_enabled()



def test_lora_from_the_server_folder(watched, server, default_pipe, lora_dir):
    page = watched.page(server + "/")
    expect(page.locator("#loras li")).to_have_count(1)  # shapes.safetensors; notes.txt is left out
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.check("#loras input[type=checkbox]")
    page.fill("#loras input[type=number]", "0.6")
    expect(page.locator("#prompt")).to_have_value("a red circle <lora:shapes:0.6>")
    assert_labelled(page)
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(1, timeout=60_000)
    settings = dict(steps=4, guidance=7.0, sampler="DPM++ 2M", schedule="karras", seed=3, width=128, height=128)
    with_lora = default_pipe("a red circle <lora:shapes:0.6>", lora_dir=lora_dir, **settings).images[0]
    without = default_pipe("a red circle", **settings).images[0]
    shown = png_pixels(gallery_images(page)[0])
    np.testing.assert_array_equal(shown, np.asarray(with_lora))
    assert not np.array_equal(shown, np.asarray(without))  # the LoRA did something
    expect(page.locator("#gallery .infotext")).to_contain_text("Lora hashes")

    # The prompt is the truth: removing the tag unticks the box; parameters sent back tick it again.
    page.fill("#prompt", "a red circle")
    expect(page.locator("#loras input[type=checkbox]")).not_to_be_checked()
    page.fill("#loras input[type=number]", "1")
    expect(page.locator("#prompt")).to_have_value("a red circle")  # unticked: the weight writes nothing
    page.click("#gallery button:has-text('Send parameters')")
    expect(page.locator("#prompt")).to_have_value("a red circle <lora:shapes:0.6>")
    expect(page.locator("#loras input[type=checkbox]")).to_be_checked()
    expect(page.locator("#loras input[type=number]")).to_have_value("0.6")


def test_api_key_prompt(watched, keyed_server):
    assert requests.get(keyed_server + "/").status_code == 200  # the page itself holds nothing secret
    watched.expected_statuses.add(401)  # the first requests, before the key is given
    page = watched.page(keyed_server + "/", ready=False)
    dialog = page.locator("#auth")
    expect(dialog).to_be_visible()
    expect(page.locator("#auth-key")).to_be_focused()
    assert_labelled(page)
    page.fill("#auth-key", "wrong")
    page.keyboard.press("Enter")
    expect(page.locator("#auth-why")).to_contain_text("did not accept")
    page.fill("#auth-key", KEY)
    page.keyboard.press("Enter")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(dialog).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('edgediff-key')") == KEY
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "2")
    page.fill("#count", "2")
    page.fill("#seed", "70")
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)
    downloads = page.locator("#gallery a", has_text="Download")  # image i has seed + i
    assert downloads.evaluate_all("(links) => links.map((a) => a.download)") == ["edgediff-70.png", "edgediff-71.png"]
    page.reload()  # same tab: the key is kept, no prompt
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(dialog).to_be_hidden()

    # Escape closes the box: one message, and the next Generate asks again.
    page = watched.page(keyed_server + "/", ready=False)  # a new tab: a new sessionStorage
    dialog = page.locator("#auth")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#message")).to_contain_text("wants an API key")
    page.click("#generate")
    expect(dialog).to_be_visible()
    page.fill("#auth-key", KEY)
    page.keyboard.press("Enter")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")

    # A1111's basic auth (--api-auth user:password) in the same box.
    other = Watched(watched.context.browser)
    other.expected_statuses.add(401)
    try:
        page = other.page(keyed_server + "/", ready=False)
        page.fill("#auth-key", "alice:wonderland")
        page.click("#auth-ok")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#sampler option")).not_to_have_count(0)
    finally:
        other.context.close()
    assert other.problems == []


def test_input_picture_by_file_chooser_and_paste(watched, server):
    picture = png_bytes(Image.new("RGB", (200, 150), "navy"))
    page = watched.page(server + "/")
    with page.expect_file_chooser() as chooser:
        page.focus("#choose")
        page.keyboard.press("Enter")
    chooser.value.set_files(files=[{"name": "navy.png", "mimeType": "image/png", "buffer": picture}])
    expect(page.locator("#paint")).to_be_visible()
    expect(page.locator("#width")).to_have_value("192")  # the server's multiple of 32, nearest
    expect(page.locator("#height")).to_have_value("160")
    page.click("#input-clear")
    expect(page.locator("#paint")).to_be_hidden()
    page.eval_on_selector("#prompt", """(target, b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
        target.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true}));
    }""", base64.b64encode(picture).decode())
    expect(page.locator("#paint")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("")  # the picture did not land in the text


def test_stop_and_queue_full(watched, default_pipe):
    """Stop keeps the image reached; a full queue is the server's 503 message, with its Retry-After."""
    watched.expected_statuses.add(503)
    with running(create_app(default_pipe, limits=Limits(max_queue=1))) as url:
        page = watched.page(url + "/")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "150")
        record_progress(page)
        page.click("#generate")
        # The bar moves forwards, step by step, whatever the machine's speed: three updates, then Stop.
        page.wait_for_function("() => new Set(window.seen.values.filter((v) => v > 0 && v < 1)).size >= 3")
        between = [v for v in page.evaluate("window.seen.values") if 0 < v < 1]
        assert between == sorted(between)
        expect(page.locator("#progress-text")).to_contain_text("/150")
        page.click("#stop")
        expect(page.locator("#gallery img")).to_have_count(1, timeout=60_000)
        expect(page.locator("#progress-text")).to_contain_text("Stopped: 1 image")

        body = dict(prompt="busy", steps=150, width=128, height=128)
        with ThreadPoolExecutor(2) as pool:
            running_one = pool.submit(requests.post, f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
            wait_for(url, lambda p: p["state"]["sampling_steps"] == 150)
            queued = pool.submit(requests.post, f"{url}/sdapi/v1/txt2img", json=dict(body, steps=1), timeout=120)
            wait_for(url, lambda p: p["state"]["job_count"] == 2)
            page.fill("#steps", "2")
            page.click("#generate")
            expect(page.locator("#message")).to_have_text(re.compile(
                r"the generation queue is full; retry later \(try again in about \d+ s\)"))
            requests.post(f"{url}/sdapi/v1/interrupt", timeout=30)
            assert running_one.result().status_code == 200 and queued.result().status_code == 200
        expect(page.locator("#gallery img")).to_have_count(1)


def wait_for(url, condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition(requests.get(f"{url}/sdapi/v1/progress?skip_current_image=true", timeout=30).json()):
        assert time.monotonic() < deadline, "the server never reached the expected state"
        time.sleep(0.05)


def test_tab_reaches_every_control(watched, server):
    """Keyboard alone: Tab visits every visible control (with a picture loaded, so its tools show)."""
    page = watched.page(server + "/")
    drop_file(page, "#input-set", png_bytes(Image.new("RGB", (128, 128), "gray")), "gray.png")
    expect(page.locator("#input-tools")).to_be_visible()
    controls = set(page.locator("input, select, textarea, button, a[href]").evaluate_all(
        "(all) => all.filter((e) => e.checkVisibility() && !e.disabled).map((e) => e.id || e.textContent)"))
    page.focus("body")
    visited = set()
    for _ in range(len(controls) + 5):
        page.keyboard.press("Tab")
        visited.add(page.evaluate("() => document.activeElement.id || document.activeElement.textContent"))
    assert controls <= visited, controls - visited
