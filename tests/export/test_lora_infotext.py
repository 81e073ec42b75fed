"""LoRAs reach the image's metadata: ``--lora`` files and ``<lora:...>`` tags are listed in A1111's
``Lora hashes`` field with their short hashes, the same from the CLI and the Python API."""
from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner
from sd_parsers import ParserManager

from edgediff.cli import main
from edgediff.runtime import Pipeline, metadata
from lora_files import lora_layers, save_kohya, save_peft
from tiny_models import build_pipeline

pytest.importorskip("peft")


def addnet_hash(path) -> str:
    """A1111's short LoRA hash, computed here independently: sha256 of the bytes after the
    safetensors header (kohya's addnet hash), first 12 hex digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    base = build_pipeline("sd1")
    (root / "dir").mkdir()
    given = save_peft(lora_layers(base, seed=0), root / "detail.safetensors")
    tagged = save_kohya(lora_layers(base, seed=1), root / "dir" / "style.safetensors", alpha=2.0)
    return given, tagged


def test_cli_writes_lora_hashes_that_sd_parsers_reads(tiny_exports, loras, tmp_path):
    given, tagged = loras
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["generate", "a cat <lora:style:0.3>", "--model", str(tiny_exports["sd1", "fp32"]),
                                       "--steps", "2", "--seed", "5", "--lora", f"{given}:0.5",
                                       "--lora-dir", str(given.parent / "dir"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    info = ParserManager().parse(out)  # an A1111 image to sd-parsers, its parameters kept whole
    assert info is not None and info.prompts[0].value == "a cat <lora:style:0.3>"
    assert info.samplers[0].parameters["seed"] == "5"
    fields = metadata.parse_infotext(info.raw_parameters["parameters"])
    assert fields["Lora hashes"] == f"detail: {addnet_hash(given)}, style: {addnet_hash(tagged)}"


def test_python_result_gives_the_same_infotext(tiny_exports, loras, tmp_path):
    given, tagged = loras
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    result = pipe("a cat <lora:style:0.3>", steps=2, seed=5, loras=[(given, 0.5)], lora_dir=given.parent / "dir")
    text = metadata.result_infotext(result, 0, metadata.model_identity(pipe.model_dir, pipe.manifest))
    out = tmp_path / "y.png"
    CliRunner().invoke(main, ["generate", "a cat <lora:style:0.3>", "--model", str(tiny_exports["sd1", "fp32"]),
                              "--steps", "2", "--seed", "5", "--lora", f"{given}:0.5",
                              "--lora-dir", str(given.parent / "dir"), "-o", str(out)])
    assert metadata.read_infotext(out) == text
    assert f'Lora hashes: "detail: {addnet_hash(given)}, style: {addnet_hash(tagged)}"' in text
