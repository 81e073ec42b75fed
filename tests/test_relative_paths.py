"""Every command run as a user runs it: the installed ``edgediff`` script, in another working
directory, with relative paths everywhere (README's own examples are written that way).

One tiny SD 1.x pipeline is saved and exported inside a temporary working directory; every command
then runs as a subprocess there. An export whose staging folder is relative once crashed in the
optimizer (which changed the working directory while holding the relative path).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tiny_models import save_pipeline  # noqa: E402

EDGEDIFF = shutil.which("edgediff", path=str(Path(sys.executable).parent)) or shutil.which("edgediff")


def run(cwd: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``edgediff ARGS`` in ``cwd``; fails the test on a non-zero exit, showing stderr."""
    result = subprocess.run([EDGEDIFF, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"edgediff {' '.join(map(str, args))} in {cwd}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The working directory: the source pipeline as ``tiny-sd1``, its fp32 export as ``sd1-fp32``."""
    assert EDGEDIFF, "the edgediff console script is not installed"
    root = tmp_path_factory.mktemp("relative")
    save_pipeline("sd1", root / "tiny-sd1")
    run(root, "export", "tiny-sd1", "sd1-fp32", "--precision", "fp32")
    return root


@pytest.mark.parametrize("args, out", [
    (("--precision", "fp16", "--optimize-for", "cpu"), "models/sd1-fp16"),
    (("--precision", "int8"), "../exported/sd1-int8"),  # a parent folder, reached from a sub-folder
])
def test_export_with_relative_paths(home, args, out):
    cwd = home / "sub"
    cwd.mkdir(exist_ok=True)
    run(cwd, "export", "../tiny-sd1", out, *args)
    manifest = json.loads((cwd / out / "manifest.json").read_text())
    assert manifest["precision"] == args[1]
    assert not list((cwd / out).parent.glob(".*.partial"))  # the staging folder was renamed into place


def test_fp32_export_and_info(home):
    assert (home / "sd1-fp32" / "manifest.json").is_file()
    result = run(home, "info", "sd1-fp32", "--verify")
    assert "unet" in result.stdout


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def inputs(home):
    """A start picture, a mask, a LoRA and an embedding, all in the working directory."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from lora_files import lora_layers, save_kohya
    from tiny_models import build_pipeline

    side = json.loads((home / "sd1-fp32" / "manifest.json").read_text())["default_size"]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(home / "start.png")
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    mask.save(home / "mask.png")
    save_kohya(lora_layers(build_pipeline("sd1"), magnitude=0.5), home / "style.safetensors", alpha=4.0)
    save_file({"emb_params": torch.from_numpy(rng.standard_normal((2, 32)).astype(np.float32))},
              str(home / "wavystyle.safetensors"))
    (home / "out").mkdir()
    for prompt, name in (("a house", "plain"), ("a house, wavystyle", "plain-embedding")):
        run(home, "generate", prompt, *GENERATE, "-o", f"{name}.png")
    return home


GENERATE = ("--model", "sd1-fp32", "--steps", "2", "--seed", "7", "--provider", "cpu")


@pytest.mark.parametrize("name, extra", [
    ("img2img", ("--image", "start.png", "--strength", "0.6")),
    ("inpaint", ("--image", "start.png", "--mask", "mask.png", "--strength", "0.8")),
    ("lora", ("--lora", "style.safetensors:1.0")),
    ("embedding", ("--embedding", "wavystyle.safetensors")),
])
def test_generate_reads_relative_inputs(inputs, name, extra):
    prompt, plain = ("a house, wavystyle", "plain-embedding") if name == "embedding" else ("a house", "plain")
    run(inputs, "generate", prompt, *GENERATE, *extra, "-o", f"out/{name}.png")
    # Each input was read: the picture differs from the same seed without it.
    assert (abs(_pixels(inputs / "out" / f"{name}.png") - _pixels(inputs / f"{plain}.png"))).max() > 0


def test_generate_from_png_repeats_the_image(inputs):
    run(inputs, "generate", "a red barn", *GENERATE, "-o", "first.png")
    run(inputs, "generate", "--from-png", "first.png", "--model", "sd1-fp32", "--provider", "cpu", "-o", "again.png")
    assert (_pixels(inputs / "again.png") == _pixels(inputs / "first.png")).all()


def test_batch_with_relative_jobs_model_and_out(home):
    (home / "jobs.jsonl").write_text(json.dumps({"prompt": "a boat", "steps": 1, "seed": 3}) + "\n")
    run(home, "batch", "jobs.jsonl", "--model", "sd1-fp32", "--out", "batch-out")
    assert len(list((home / "batch-out").rglob("*.png"))) == 1


def test_serve_a_relative_model_folder(home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([EDGEDIFF, "serve", "--model", "sd1-fp32", "--host", "127.0.0.1", "--port", str(port),
                             "--provider", "cpu"], cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "edgediff serve did not come up"
                time.sleep(0.2)
        body = json.dumps({"prompt": "a boat", "steps": 1, "seed": 3}).encode()
        request = urllib.request.Request(f"{url}/sdapi/v1/txt2img", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert len(json.load(response)["images"]) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bench_with_relative_model_cache_and_out(home):
    run(home, "bench", "--model", "tiny-sd1", "--resolution", "32", "--steps", "1", "--provider", "cpu",
        "--precision", "fp32", "--memory", "low", "--repeats", "1", "--no-diffusers", "--no-bf16",
        "--cache", "bench-cache", "--out", "bench-out", timeout=600)
    assert json.loads((home / "bench-out" / "bench.json").read_text())["summary"]["rows"]
