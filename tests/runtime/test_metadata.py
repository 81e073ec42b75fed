"""A1111 infotext: written into every image, read back by a third-party reader, regenerated from."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sd_parsers import ParserManager

from edgediff.cli import main
from edgediff.models import default_model_dir
from edgediff.runtime import metadata
from edgediff.runtime.manifest import read_manifest
from edgediff.runtime.samplers import SAMPLERS, make_plan

PARAMS = dict(prompt='a red circle, "quoted": yes', negative_prompt="blurry, dark", steps=3, guidance=6.5,
              sampler="dpmpp_2m_karras", seed=1234, width=128, height=128)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_infotext_has_a1111_layout_and_parses_back():
    text = metadata.infotext(dict(PARAMS, strength=0.6, model_name="my model", model_hash="0123456789",
                                  loras=[("detail", 0.8, "abcdef012345")], prompt="line one\nline two"))
    lines = text.split("\n")
    assert lines[:3] == ["line one", "line two", "Negative prompt: blurry, dark"]
    assert lines[3].startswith("Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, "
                               "Size: 128x128, Model hash: 0123456789, Model: my model, Denoising strength: 0.6, "
                               'Lora hashes: "detail: abcdef012345"')
    parsed = metadata.parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two" and parsed["Negative prompt"] == "blurry, dark"
    assert parsed["Lora hashes"] == "detail: abcdef012345" and parsed["Version"].startswith("edgediff ")
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Seed"]) == ("128", "128", "1234")
    kwargs = metadata.generation_kwargs(parsed)
    assert kwargs == dict(prompt="line one\nline two", negative_prompt="blurry, dark", steps=3, guidance=6.5,
                          seed=1234, width=128, height=128, sampler="DPM++ 2M", schedule="karras")


def test_parses_a1111_written_text():
    """A line as A1111 1.10 writes it, with quoted values holding commas and colons."""
    text = ("masterpiece, a castle\nNegative prompt: lowres\nSteps: 25, Sampler: Euler a, Schedule type: "
            'Automatic, CFG scale: 7, Seed: 99, Size: 512x768, Model hash: 6ce0161689, Model: v1-5, '
            'Lora hashes: "add_detail: 7c6bad76eb54, x: 1", Hires upscaler: "Latent (nearest), x", Version: v1.10.1')
    parsed = metadata.parse_infotext(text)
    assert parsed["Hires upscaler"] == "Latent (nearest), x" and parsed["Version"] == "v1.10.1"
    kwargs = metadata.generation_kwargs(parsed)
    assert kwargs["sampler"] == "Euler a" and "schedule" not in kwargs
    assert (kwargs["width"], kwargs["height"], kwargs["guidance"]) == (512, 768, 7.0)
    assert metadata.parse_infotext("just a prompt, no settings")["Prompt"] == "just a prompt, no settings"


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_label_resolves_to_the_same_plan(name):
    manifest = read_manifest(default_model_dir())
    alphas = np.load(default_model_dir() / manifest.alphas_cumprod)
    label, schedule = metadata.sampler_label(name)
    kwargs = metadata.generation_kwargs({"Sampler": label, "Schedule type": schedule})
    ours = make_plan(name, alphas, manifest.scheduler, 6)
    theirs = make_plan(kwargs["sampler"], alphas, manifest.scheduler, 6, schedule=kwargs.get("schedule"))
    assert theirs.fn.__class__ is ours.fn.__class__ and getattr(theirs.fn, "func", theirs.fn) is getattr(ours.fn, "func", ours.fn)
    np.testing.assert_array_equal(theirs.sigmas, ours.sigmas)
    np.testing.assert_array_equal(theirs.timesteps, ours.timesteps)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_formats_roundtrip_and_third_party_reader(fmt, tmp_path):
    text = metadata.infotext(dict(PARAMS, prompt="ünïcode prompt, 猫"))
    path = tmp_path / f"x.{fmt.lower()}"
    metadata.save_image(Image.new("RGB", (16, 16), "red"), path, text)
    assert metadata.read_infotext(path) == text
    info = ParserManager().parse(path)
    assert info is not None and info.prompts[0].value == "ünïcode prompt, 猫"
    buffer = io.BytesIO()
    metadata.save_image(Image.new("RGB", (16, 16)), buffer, None, format=fmt)
    assert metadata.read_infotext(io.BytesIO(buffer.getvalue())) is None


def test_little_endian_user_comment_is_read():
    exif = Image.Exif()
    exif.get_ifd(metadata.EXIF_IFD)[metadata.USER_COMMENT] = b"UNICODE\0" + "Steps: 3, Seed: 1".encode("utf-16-le")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG", exif=exif.tobytes())
    assert metadata.read_infotext(io.BytesIO(buffer.getvalue())) == "Steps: 3, Seed: 1"


def test_generate_writes_parameters_and_from_png_regenerates_bit_for_bit(tmp_path):
    first, again, other = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "other.png"
    code, err = run("generate", PARAMS["prompt"], "--negative", PARAMS["negative_prompt"], "--steps", 3,
                    "--guidance", 6.5, "--seed", 1234, "--sampler", "euler_a", "-o", first)
    assert code == 0, err
    info = ParserManager().parse(first)
    sampler = info.samplers[0]
    assert info.prompts[0].value == PARAMS["prompt"] and info.negative_prompts[0].value == "blurry, dark"
    assert sampler.name == "Euler a"
    assert (sampler.parameters["steps"], sampler.parameters["cfg_scale"], sampler.parameters["seed"]) == ("3", "6.5", "1234")
    assert info.metadata["Size"] == "128x128"

    code, err = run("generate", "--from-png", first, "-o", again)
    assert code == 0, err
    np.testing.assert_array_equal(pixels(again), pixels(first))
    assert metadata.read_infotext(again) == metadata.read_infotext(first)

    code, err = run("generate", "--from-png", first, "--seed", 7, "-o", other)  # a flag given wins
    assert code == 0, err
    parsed = metadata.parse_infotext(metadata.read_infotext(other))
    assert parsed["Seed"] == "7" and parsed["Prompt"] == PARAMS["prompt"] and parsed["Sampler"] == "Euler a"
    assert not np.array_equal(pixels(other), pixels(first))


def test_no_metadata_and_from_png_without_parameters(tmp_path):
    bare = tmp_path / "bare.png"
    code, err = run("generate", "a blue square", "--steps", 2, "--seed", 1, "--no-metadata", "-o", bare)
    assert code == 0, err
    assert metadata.read_infotext(bare) is None
    code, err = run("generate", "--from-png", bare, "-o", tmp_path / "y.png")
    assert code == 1 and err.splitlines() == [f"error: {bare} carries no A1111 parameters to regenerate from"]
    code, err = run("generate", "--from-png", tmp_path / "missing.png", "-o", tmp_path / "y.png")
    assert code == 1 and "image not found" in err and "Traceback" not in err
