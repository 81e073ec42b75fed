"""What the property tests found (each was a traceback before), kept as plain tests."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main
from edgediff.models import default_model_dir
from edgediff.runtime import EdgediffError, ModelFolderError, Pipeline
from edgediff.runtime import memory, sessions
from edgediff.runtime.errors import InputError, OutOfMemoryError
from edgediff.runtime.manifest import read_manifest
from fuzz_inputs import USABLE


@pytest.fixture
def model(tmp_path):
    return shutil.copytree(default_model_dir(), tmp_path / "model")


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_error_line(result, *fragments):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- seeds ---------------------------------------------------------------------------------------

def test_negative_seed_means_random_and_the_cli_prints_it(tmp_path):
    seeds, pixels = [], []
    for name in ("a.png", "b.png"):
        result = cli("generate", "a red circle", "--seed", "-1", "--steps", "1", "--width", "32", "--height", "32",
                     "-o", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        line = next(line for line in result.stderr.splitlines() if line.startswith("seed: "))
        seeds.append(int(line.split()[1]))
        pixels.append(np.asarray(Image.open(tmp_path / name)))
    assert seeds[0] != seeds[1] and min(seeds) >= 0
    assert not np.array_equal(*pixels)
    again = cli("generate", "a red circle", "--seed", seeds[0], "--steps", "1", "--width", "32", "--height", "32",
                "-o", tmp_path / "c.png")
    assert "seed: " not in again.stderr  # a seed that was given is not announced again
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c.png")), pixels[0])


@pytest.mark.parametrize("seed", [-1, -5, np.int64(-1), None])
def test_api_negative_or_no_seed_is_random(pipe, seed):
    result = pipe("x", steps=1, width=32, height=32, seed=seed)
    assert 0 <= result.seed < 2**64


def test_seed_range_is_0_to_2_pow_64_minus_1(pipe, tmp_path):
    assert pipe("x", steps=1, width=32, height=32, seed=2**64 - 1).seed == 2**64 - 1
    assert pipe("x", steps=1, width=32, height=32, seed=np.uint64(2**64 - 1)).seed == 2**64 - 1
    for bad in (2**64, 1.5, "1", True, float("inf")):
        with pytest.raises(InputError, match="seed"):
            pipe("x", steps=1, width=32, height=32, seed=bad)
    one_error_line(cli("generate", "x", "--seed", 2**64, "-o", tmp_path / "x.png"), "2**64 - 1")
    one_error_line(cli("generate", "x", "--seed", "1.5", "-o", tmp_path / "x.png"), "--seed")


# ---- API arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    (dict(prompt=2.5), "prompt must be text"), (dict(prompt=True), "prompt must be text"),
    (dict(prompt=None), "prompt must be text"), (dict(prompt=["a", 3]), "prompt must be text"),
    (dict(prompt=[]), "at least one prompt"), (dict(prompt="\ud800"), "not valid Unicode"),
    (dict(negative_prompt="\udfff"), "negative_prompt is not valid Unicode"),
    (dict(negative_prompt=["a", "b"]), "one negative prompt per prompt"),
    (dict(guidance="7"), "guidance"), (dict(guidance=None), "guidance"), (dict(guidance=float("nan")), "guidance"),
    (dict(steps=True), "steps"), (dict(steps=2.5), "steps"), (dict(steps=10**6), "steps"),
    (dict(schedule=3), "schedule must be a name"), (dict(schedule=b"karras"), "schedule must be a name"),
    (dict(sampler=3), "sampler must be a name"), (dict(width="64"), "width"), (dict(width=True), "width"),
    (dict(height=10**30), "at most 65536"), (dict(image=b"\x89PNG"), "image must be"), (dict(image=3), "image must be"),
    (dict(image=["x"]), "image must be"), (dict(image=np.zeros((64, 64, 2), np.uint8)), "image arrays"),
    (dict(image=np.zeros((64, 64, 3), np.float64)), "image arrays"),
])
def test_bad_api_arguments_raise_one_input_error(pipe, kwargs, fragment):
    kwargs = {"prompt": "x", "steps": 1, "width": 32, "height": 32, **kwargs}
    with pytest.raises(InputError, match=fragment) as caught:
        pipe(kwargs.pop("prompt"), **kwargs)
    assert "\n" not in str(caught.value)


def test_numpy_integers_are_sizes_and_steps(pipe):
    result = pipe("x", steps=np.int64(1), width=np.int64(64), height=np.int32(32))
    assert result.images[0].size == (64, 32)


@pytest.mark.parametrize("kind", sorted(USABLE))
def test_pictures_in_any_mode_start_img2img(pipe, pictures, kind):
    for image in (str(pictures[kind]), Image.open(pictures[kind])):  # a path works as well as a picture
        assert pipe("x", steps=1, image=image, strength=0.5).images[0].size == (64, 64)


@pytest.mark.parametrize("array", [np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64), np.uint16)])
def test_alpha_and_16_bit_arrays_start_img2img(pipe, array):
    assert pipe("x", steps=1, image=array).images[0].size == (64, 64)


@pytest.mark.parametrize("kind,fragment", [("truncated.png", "cannot read image"), ("text.png", "cannot read image"),
                                           ("empty.png", "cannot read image"), ("missing.png", "image not found"),
                                           ("folder.png", "is a folder"), ("one_pixel.png", "multiple of 32")])
def test_unusable_pictures_are_one_line(pipe, pictures, kind, fragment, tmp_path):
    with pytest.raises(EdgediffError, match=fragment):
        pipe("x", steps=1, image=str(pictures[kind]))
    one_error_line(cli("generate", "x", "--steps", "1", "--image", pictures[kind], "-o", tmp_path / "x.png"), fragment)


def test_output_name_too_long_is_one_line(tmp_path):
    one_error_line(cli("generate", "x", "--steps", "1", "-o", tmp_path / ("x" * 300 + ".png")), "cannot write")


# ---- memory --------------------------------------------------------------------------------------

def test_huge_size_is_refused_before_any_work_with_the_estimate(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: (8 * 10**9, "MemAvailable"))
    ran = []
    monkeypatch.setattr(pipe.sessions, "use", lambda name: ran.append(name))
    with pytest.raises(OutOfMemoryError, match=r"8192x8192 generation needs about [\d.]+ GB .* 8\.0 GB is free "
                                               r"\(MemAvailable\); try a smaller size such as \d+x\d+") as caught:
        pipe("x", steps=1, width=8192, height=8192)
    assert not ran and "--no-memory-check" in str(caught.value)


def test_memory_check_can_be_turned_off(monkeypatch, tmp_path):
    # low memory: nothing stays resident, so every run needs more than the byte left here
    pipe = Pipeline.load(provider="cpu", memory="low")
    monkeypatch.setattr(memory, "available_bytes", lambda: (1, "MemAvailable"))
    with pytest.raises(OutOfMemoryError):
        pipe("x", steps=1, width=32, height=32)
    assert pipe("x", steps=1, width=32, height=32, check_memory=False).images[0].size == (32, 32)
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, model=None, **kw: pipe))
    one_error_line(cli("generate", "x", "--steps", "1", "--width", "32", "-o", tmp_path / "a.png"), "needs about")
    assert cli("generate", "x", "--steps", "1", "--width", "32", "--no-memory-check", "-o", tmp_path / "b.png").exit_code == 0


def test_estimate_grows_with_size_batch_and_guidance(pipe):
    sizes = [pipe.estimate_memory(1, side, side).peak_bytes for side in (64, 128, 256, 512)]
    # (the estimate includes this process's own resident memory, so compare growth, not ratios)
    assert sizes == sorted(sizes) and sizes[-1] - sizes[0] > 100 * 2**20
    assert pipe.estimate_memory(2, 256, 256).peak_bytes > pipe.estimate_memory(1, 256, 256).peak_bytes
    assert pipe.estimate_memory(1, 512, 512, guided=False).peak_bytes < pipe.estimate_memory(1, 512, 512).peak_bytes
    # at large sizes the score matrix of the highest-resolution self-attention dominates
    assert "self-attention" in str(pipe.estimate_memory(1, 1024, 1024))


class FailingSession:
    """An InferenceSession whose run fails as ONNX Runtime's allocator does."""
    message = "Failed to allocate memory for requested buffer of size 2013265920"

    def __init__(self, path, options, providers):
        pass

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def get_inputs(self):
        return [SimpleNamespace(name="x", type="tensor(float)", shape=["batch", 4])]

    get_outputs = get_inputs

    def run(self, names, feed):
        raise RuntimeError(self.message)


@pytest.mark.parametrize("message", ["[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                                     "running Attention node. Failed to allocate memory for requested buffer of size 2013265920",
                                     "CUDA failure 2: out of memory ; GPU=0", "std::bad_alloc"])
def test_allocation_failure_while_running_is_one_line(monkeypatch, tmp_path, message):
    from edgediff.runtime.manifest import GraphEntry, TensorSpec

    monkeypatch.setattr(onnxruntime, "InferenceSession", FailingSession)
    monkeypatch.setattr(FailingSession, "message", message)
    entry = GraphEntry("unet/model.onnx", "", "fp32", [TensorSpec("x", "float32", ("batch", 4))],
                       [TensorSpec("x", "float32", ("batch", 4))])
    session = sessions.GraphSession("unet", tmp_path, entry, "cpu", "cpu", print)
    with pytest.raises(OutOfMemoryError, match=r"unet ran out of memory on CPUExecutionProvider \(input 2x4.*try a smaller size"):
        session.run(x=np.zeros((2, 4), np.float32))


# ---- manifests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("change,fragment", [
    (lambda m: m["graphs"]["vae_encoder"].update(path=3), "graphs.vae_encoder.path"),
    (lambda m: m["graphs"]["text_encoder"].update(path=["text_encoder/model.onnx"]), "graphs.text_encoder.path"),
    (lambda m: m.update(graphs=[1, 2]), "'graphs' must be an object"),
    (lambda m: m.update(tokenizer=0), "'tokenizer' must be an object"),
    (lambda m: m["tokenizer"].pop("max_length"), "'tokenizer.max_length' is missing"),
    (lambda m: m.update(scaling_factor="0.18"), "scaling_factor"),
    (lambda m: m["graphs"]["unet"]["inputs"][0].update(dtype="float64"), "graphs.unet.inputs[0].dtype"),
    (lambda m: m["graphs"]["unet"]["inputs"][0].update(shape=["batch", -4]), "graphs.unet.inputs[0].shape"),
    (lambda m: m.update(schema_version=2), "schema version 2 is not supported"),
    (lambda m: m.update(schema_version="1"), "schema version '1' is not supported"),
    (lambda m: m.pop("prediction_type"), "'prediction_type' is missing"),
])
def test_damaged_manifest_names_the_field(model, change, fragment):
    data = json.loads((model / "manifest.json").read_text())
    change(data)
    (model / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match="re-export") as caught:
        read_manifest(model)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("spec,fragment", [
    ({"name": "sample", "dtype": "float32", "shape": ["batch", 5, "latent_height", "latent_width"]}, "'batch', 5"),
    ({"name": "sample", "dtype": "float16", "shape": ["batch", 4, "latent_height", "latent_width"]}, "float16"),
    ({"name": "latents", "dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]}, "latents"),
])
def test_manifest_that_disagrees_with_its_graph_is_caught_at_session_creation(model, tmp_path, spec, fragment):
    data = json.loads((model / "manifest.json").read_text())
    data["graphs"]["unet"]["inputs"][0] = spec
    (model / "manifest.json").write_text(json.dumps(data))
    result = cli("generate", "x", "--model", model, "--steps", "1", "--width", "32", "-o", tmp_path / "x.png")
    line = one_error_line(result, "manifest graphs.unet.inputs", "re-export")
    assert fragment in line
