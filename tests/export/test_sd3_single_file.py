"""SD 3/3.5 single files as distributed (original key layout, sd3_original.py): exported from the
file, every graph is byte for byte the one the diffusers folder it came from exports; text encoders
the file lacks come from --text-encoders; what cannot be exported is one line, and no model folder.

The --config folder of the SD 3.5 Medium case holds *other* weights (seed 1): the export must take
the file's (seed 0).
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edgediff.cli import main
from edgediff.exporter.sd3_file import header, shipped_config
from sd3_original import save_sd3_original
from test_sd3 import build_sd3, reference


@pytest.fixture(scope="module")
def files(sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-files")
    build_sd3("sd35m", seed=1).save_pretrained(root / "sd35m-config")
    return {"sd35m": save_sd3_original(reference(sd3["sd35m"][0]), root / "sd3.5_medium.safetensors"),
            "sd3-bare": save_sd3_original(reference(sd3["sd3"][0], t5=False), root / "sd3_medium.safetensors",
                                          encoders=()),
            "config": root / "sd35m-config"}


def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args), "--precision", "fp32"])


def graph_hashes(folder):
    return {name: entry["sha256"] for name, entry in json.loads((folder / "manifest.json").read_text())["graphs"].items()}


def test_single_file_exports_the_folders_graphs(sd3, files, tmp_path):
    """Transformer (dual attention, RMS q/k norm), VAE, CLIP-L, CLIP-G and T5 all from the file."""
    out = tmp_path / "sd35m"
    done = export(files["sd35m"], out, "--config", files["config"])
    assert done.exit_code == 0, done.output
    expected = graph_hashes(sd3["sd35m"][1])
    assert set(expected) == {"text_encoder", "text_encoder_2", "text_encoder_3", "unet", "vae_decoder", "vae_encoder"}
    assert graph_hashes(out) == expected
    assert json.loads((out / "manifest.json").read_text())["source"]["kind"] == "single-file"


def test_text_encoders_from_a_folder(sd3, files, tmp_path):
    """A file without text encoders (SD 3 Medium's shape, no T5 anywhere): CLIP-L and CLIP-G from
    --text-encoders, the export says in one line that it goes without T5."""
    source, folder = sd3["sd3"]
    out = tmp_path / "sd3"
    done = export(files["sd3-bare"], out, "--config", source, "--text-encoders", source)
    assert done.exit_code == 0, done.output
    assert graph_hashes(out) == graph_hashes(folder)
    assert "has no T5" in done.output and "exporting without it" in done.output


def one_line_failure(done, out, *words):
    assert done.exit_code != 0
    lines = done.output.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in done.output
    assert all(word in lines[-1] for word in words), lines[-1]
    assert not out.exists()


def test_missing_text_encoders_is_one_line(sd3, files, tmp_path):
    done = export(files["sd3-bare"], tmp_path / "out", "--config", sd3["sd3"][0])
    one_line_failure(done, tmp_path / "out", "no CLIP text encoders", "--text-encoders")


def test_dropped_key_is_one_line(files, tmp_path):
    state = load_file(str(files["sd35m"]))
    del state["model.diffusion_model.joint_blocks.1.x_block.attn2.qkv.weight"]
    save_file(state, str(tmp_path / "damaged.safetensors"))
    done = export(tmp_path / "damaged.safetensors", tmp_path / "out", "--config", files["config"])
    one_line_failure(done, tmp_path / "out", "joint_blocks.1.x_block.attn2.qkv.weight", "damaged")


def test_config_is_chosen_from_the_keys(files):
    """Dual-attention blocks mean SD 3.5 Medium; the file's name is never read."""
    assert shipped_config(set(header(files["sd35m"]))) == "sd35m"
    assert shipped_config(set(header(files["sd3-bare"]))) == "sd3m"


def test_t5_tensors_under_diffusers_names(sd3, files):
    """T5's tensors in the file, read one at a time under diffusers' names (for a streamed T5 export),
    equal the folder's T5."""
    from pathlib import Path

    import torch
    from transformers import T5EncoderModel

    from edgediff.exporter.sd3_file import _t5_tensors

    tensors = _t5_tensors(Path(files["sd35m"]), {"text_encoder_3": "file"})
    state = T5EncoderModel.from_pretrained(sd3["sd35m"][0] / "text_encoder_3").state_dict()
    stored = [name for name in state if name != "encoder.embed_tokens.weight"]  # tied to shared.weight
    assert all(name in tensors and torch.equal(tensors[name], state[name]) for name in stored)
