"""Property tests: whatever the arguments, `edgediff generate` and ``Pipeline.__call__`` either write
a picture of the expected size or fail with one clear line (an EdgediffError) — never a traceback.

Runs on the shipped default model (128x128, sizes in multiples of 32); steps stay tiny and most
sizes are small, while huge sizes must be refused by the memory estimate before any work.
Examples found by these tests are kept as regular tests in test_fuzz_examples.py.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgediff.cli import main
from edgediff.runtime import EdgediffError, Pipeline
from fuzz_inputs import SIDE, USABLE

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DEFAULT = 128


def prompts():
    return st.one_of(
        st.text(max_size=40),
        st.builds(lambda text, n: text * n, st.text(min_size=1, max_size=8), st.integers(50, 400)),  # long
        st.sampled_from(["a red circle", "", "\ud800 lone surrogate", "\x00nul", "漢字 🎨 émoji", " " * 80]),
    )


def cli_number(valid, junk):
    return st.one_of(st.none(), st.sampled_from(valid + junk))


SIZES = ["32", "64", "96", "128"]
HUGE = ["8192", "16384", "65536", "65600", "1000000000000"]
BAD_SIZES = ["0", "-32", "33", "100", "127", "x", "64.0", ""]
SAMPLERS = ["euler", "euler_a", "Euler a", "DPM++ 2M Karras", "dpmpp_2m_sde", "ddim", "heun", "lcm", "unipc",
            "euler_a_karras", "pndm", "lms", "warp_drive", "", " ", "DPM++ 9M", "euler__"]
SCHEDULES = ["karras", "exponential", "sgm_uniform", "beta", "leading", "trailing", "default", "junk", "", "Karras"]
OUTPUTS = ["out.png", "out.jpg", "out.webp", "é 漢字.png", "out.txt", "out", "no/such/dir/out.png", "folder.png",
           "x" * 300 + ".png", None]


def cli_args(pictures):
    return st.fixed_dictionaries({
        "prompt": prompts(),
        "--seed": cli_number(["0", "-1", "-5", "7", str(2**32 + 1), str(2**64 - 1)],
                             [str(2**64), str(-2**70), "1.5", "abc", "", "1e3"]),
        "--width": st.one_of(st.none(), st.sampled_from(SIZES * 3 + HUGE + BAD_SIZES)),
        "--height": st.one_of(st.none(), st.sampled_from(SIZES * 3 + HUGE + BAD_SIZES)),
        "--steps": st.sampled_from(["1", "1", "2", "0", "-1", "1001", "2.5", "x"]),
        "--guidance": cli_number(["7.5", "1", "0", "1e-3", "15"], ["-1", "nan", "inf", "-inf", "1e309", "x"]),
        "--sampler": st.one_of(st.none(), st.sampled_from(SAMPLERS)),
        "--schedule": st.one_of(st.none(), st.sampled_from(SCHEDULES)),
        "--strength": cli_number(["0.5", "1", "0.01"], ["0", "1.5", "-0.1", "nan", "x"]),
        "--image": st.one_of(st.none(), st.none(), st.sampled_from(sorted(pictures))),
        "-o": st.sampled_from(OUTPUTS),
    })


def expected_size(width, height, image_size):
    def side(value, index):
        return int(value) if value is not None else (image_size[index] if image_size else DEFAULT)
    return side(width, 0), side(height, 1)


def check_cli_outcome(result, folder: Path, output: Path | None, size):
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.exit_code == 0:
        written = output or next(folder.glob("edgediff-*.png"))
        with Image.open(written) as picture:
            assert picture.size == size
            if written.suffix == ".png":
                assert picture.format == "PNG"
        assert not [line for line in lines if line.startswith("error:")]
    else:
        assert result.exit_code in (1, 2), (result.exit_code, text)
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def run_cli(argv: dict, pictures: dict[str, Path], runner: CliRunner | None = None):
    """Invoke `edgediff generate` with ``argv`` in a fresh folder; check the outcome."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        args = ["generate", argv["prompt"]] if argv.get("prompt") is not None else ["generate"]
        output = None
        for flag, value in argv.items():
            if flag == "prompt" or value is None:
                continue
            if flag == "--image":
                value = str(pictures[value])
            if flag == "-o":
                output = folder / value
                if value == "folder.png":
                    output.mkdir()
                value = str(output)
            args += [flag, value]
        image = argv.get("--image")
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            result = (runner or CliRunner()).invoke(main, args)
        finally:
            os.chdir(cwd)
        try:
            size = expected_size(argv.get("--width"), argv.get("--height"),
                                 (SIDE, SIDE) if image in USABLE else None)
        except ValueError:
            size = None  # a size that is not a number can only fail
        check_cli_outcome(result, folder, output, size)
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def cached_load(monkeypatch, pipe):
    """Every CLI call reuses one resident pipeline: the property is about arguments, not loading."""
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, model=None, **kw: pipe))


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_cli_generate_any_arguments(data, pictures, cached_load):
    event(f"exit {run_cli(data.draw(cli_args(pictures)), pictures).exit_code}")


# ---- the Python API ------------------------------------------------------------------------------

def api_images(pictures):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), rng.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8),
              rng.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16), np.zeros((SIDE, SIDE, 3), np.float64),
              np.zeros((0, 4, 3), np.uint8), np.zeros((SIDE, SIDE, 2), np.uint8)]
    return st.one_of(st.none(), st.sampled_from(sorted(pictures)).map(lambda k: str(pictures[k])),
                     st.sampled_from(sorted(USABLE)).map(lambda k: Image.open(pictures[k])),
                     st.sampled_from(range(len(arrays))).map(lambda i: arrays[i]),
                     st.sampled_from([b"\x89PNG", 3, ["x"]]))


def mostly(valid, junk):
    """Valid seven times in eight, so that whole calls succeed often enough to check their output."""
    return st.sampled_from(range(8)).flatmap(lambda i: junk if i == 0 else valid)  # 1 in 8 junk


def api_args(pictures):
    anything = st.sampled_from([None, True, "2", b"x", [], 2.5, float("nan")])
    sizes = mostly(st.sampled_from([None, 32, 64, 96, 32, 64, np.int32(64), np.int64(96)]),
                   st.sampled_from([0, -32, 33, 8192, 16384, 2**20, 10**30, 64.0, "64", True]))
    return st.fixed_dictionaries({
        "prompt": mostly(st.one_of(prompts(), st.lists(prompts(), min_size=1, max_size=2)), anything),
        "negative_prompt": mostly(st.one_of(st.just(""), prompts()), st.one_of(st.lists(st.text(max_size=5), max_size=3), anything)),
        "steps": mostly(st.sampled_from([1, 2, np.int64(1)]), st.sampled_from([0, -2, 2.5, True, "2", None, 10**6])),
        "guidance": mostly(st.one_of(st.floats(0, 20), st.integers(0, 12)),
                           st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                     st.sampled_from(["7", None, True, np.float32(3.0), 1e308, -1]))),
        "seed": mostly(st.one_of(st.none(), st.integers(-2**70, 2**64 - 1)),
                       st.one_of(st.integers(2**64, 2**70), st.sampled_from([1.5, "1", np.uint64(2**64 - 1), np.int64(-1), True, float("inf")]))),
        "width": sizes, "height": sizes,
        "sampler": mostly(st.sampled_from(SAMPLERS[:12] + ["dpmpp_2m_karras"]), st.sampled_from(SAMPLERS[12:] + [None, 3])),
        "schedule": mostly(st.sampled_from(SCHEDULES[:7] + [None]), st.sampled_from(SCHEDULES[7:] + [3, b"karras"])),
        "strength": mostly(st.floats(0.01, 1), st.one_of(st.floats(-1, 2), st.sampled_from([float("nan"), "0.5", None]))),
        "image": st.one_of(st.none(), st.none(), api_images(pictures)),
        "check_memory": st.sampled_from([True, True, True, False]),
    })


def check_api_call(pipe, kwargs):
    prompt = kwargs.pop("prompt")
    if not kwargs.get("check_memory", True) and any(
            isinstance(kwargs.get(k), int) and kwargs[k] > 1024 for k in ("width", "height")):
        kwargs["check_memory"] = True  # without the check a huge size would really try to run
    try:
        result = pipe(prompt, **kwargs)
    except EdgediffError as error:
        message = str(error)
        assert message and "\n" not in message, repr(message)
        return None
    image = kwargs.get("image")
    if isinstance(image, (str, np.ndarray)) or isinstance(image, Image.Image):
        image_size = (SIDE, SIDE)
    else:
        image_size = None
    size = expected_size(kwargs.get("width"), kwargs.get("height"), image_size)
    count = 1 if isinstance(prompt, str) else len(prompt)
    assert len(result.images) == count and all(im.size == size for im in result.images)
    assert result.pixels.shape == (count, size[1], size[0], 3) and np.isfinite(result.pixels).all()
    assert isinstance(result.seed, int) and 0 <= result.seed < 2**64
    return result


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_api_any_arguments(data, pipe, pictures):
    event("generated" if check_api_call(pipe, data.draw(api_args(pictures))) else "EdgediffError")


def test_fuzz_arguments_reach_success_and_failure(pipe, pictures, cached_load):
    """The strategies are not all-failing: a plain request through each path writes a picture."""
    assert check_api_call(pipe, {"prompt": "a red circle", "steps": 1, "width": 32, "height": 64}) is not None
    assert check_api_call(pipe, {"prompt": "x", "steps": 1, "image": str(pictures["cmyk.jpg"])}) is not None
    result = run_cli({"prompt": "a red circle", "--steps": "1", "--width": "64", "-o": "out.png"}, pictures)
    assert result.exit_code == 0
    assert math.isfinite(float(result.stderr.split("seed ")[1].split(",")[0]))
