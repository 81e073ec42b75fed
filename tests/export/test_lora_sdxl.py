"""LoRAs and textual inversion on the tiny SDXL against diffusers' ``StableDiffusionXLPipeline``.

The LoRAs are random (lora_files.py) and touch U-Net attention and convolutions and both text
encoders; the kohya files name the U-Net in the original (SGM) numbering, as kohya's SDXL trainer
writes them, and diffusers converts them with its own code. Same starting noise, pixels in [0, 1].
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from edgediff.cli import main
from edgediff.runtime import Pipeline
from edgediff.runtime.lora import LoraError, sgm_to_diffusers
from lora_files import lora_layers, save_kohya, save_peft
from tiny_models import build_pipeline, build_sdxl_pipeline

pytest.importorskip("peft")

TOLERANCE = 2e-3
PROMPT, NEGATIVE, STEPS, GUIDANCE = "a red circle on a white background", "blurry, dark", 4, 6.0
ENCODERS = ("text_encoder", "text_encoder_2")
KOHYA_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def to_sgm(layers_per_block: int):
    """diffusers' U-Net module names (``_`` for ``.``) as the original SDXL U-Net numbers them."""
    per = layers_per_block + 1
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3"}

    def rename(component, flat):
        if component != "unet":
            return flat
        match = re.match(r"(down|up)_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)$", flat)
        if match:
            side, block, kind, layer, rest = match.groups()
            index = int(block) * per + int(layer) + (1 if side == "down" else 0)
            inner, rest = (0, resnet.get(rest, rest)) if kind == "resnets" else (1, rest)
            return f"{'input' if side == 'down' else 'output'}_blocks_{index}_{inner}_{rest}"
        match = re.match(r"mid_block_(resnets|attentions)_(\d+)_(.+)$", flat)
        kind, layer, rest = match.groups()
        number = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[kind, layer]
        return f"middle_block_{number}_{resnet.get(rest, rest) if kind == 'resnets' else rest}"
    return rename


@pytest.fixture(scope="module")
def sdxl(tiny_store, tmp_path_factory):
    """Diffusers folder, fp32 and int8 exports (the session's), and LoRA files {name: path} for the tiny SDXL."""
    root = tmp_path_factory.mktemp("sdxl-lora")
    source = tiny_store.source("sdxl")
    base = build_sdxl_pipeline("sdxl")
    files = {}
    for seed in (0, 1):
        layers = lora_layers(base, seed=seed, encoders=ENCODERS)
        files[f"peft{seed}"] = save_peft(layers, root / f"peft{seed}.safetensors")
        files[f"kohya{seed}"] = save_kohya(layers, root / f"kohya{seed}.safetensors", alpha=2.0, prefixes=KOHYA_SDXL,
                                           rename=to_sgm(base.unet.config.layers_per_block))
    files["sd1"] = save_kohya(lora_layers(build_pipeline("sd1")), root / "sd1.safetensors", alpha=2.0)
    return {"source": source, "fp32": tiny_store.export("sdxl", "fp32"), "int8": tiny_store.export("sdxl", "int8"),
            "files": files, "root": root}


def noise(folder) -> np.ndarray:
    m = Pipeline.load(folder, provider="cpu").manifest
    side = m.default_size // m.vae_scale_factor
    return np.random.default_rng(7).standard_normal((1, m.latent_channels, side, side), dtype=np.float32)


def reference(source):
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, latents, prompt=PROMPT) -> np.ndarray:
    with torch.no_grad():
        return pipe(prompt, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=torch.from_numpy(latents), output_type="np").images


def run_edgediff(pipe, latents, prompt=PROMPT, **kwargs) -> np.ndarray:
    return pipe(prompt, NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler", latents=latents, **kwargs).pixels


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_matches_diffusers(sdxl, fmt):
    latents = noise(sdxl["fp32"])
    path = sdxl["files"][f"{fmt}0"]
    warnings = []
    pipe = Pipeline.load(sdxl["fp32"], provider="cpu", memory="high", warn=warnings.append)
    base = run_edgediff(pipe, latents)
    for weight in (0.5, 1.0):
        expected = reference(sdxl["source"])
        expected.load_lora_weights(str(path))
        expected.fuse_lora(lora_scale=weight)
        expected = run_diffusers(expected, latents)
        actual = run_edgediff(pipe, latents, loras=[(path, weight)])
        assert np.abs(actual - base).max() > 20 * TOLERANCE  # the LoRA changes the image ...
        assert np.abs(actual - expected).max() < TOLERANCE  # ... as diffusers' does
    assert warnings == []  # every layer found its weight, SGM names included


def test_each_part_of_the_lora_matters(sdxl, tmp_path):
    """Dropping the layers of one component (U-Net, either text encoder) changes the image: all three apply."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_numpy

    latents = noise(sdxl["fp32"])
    pipe = Pipeline.load(sdxl["fp32"], provider="cpu", memory="high")
    tensors = load_file(str(sdxl["files"]["kohya0"]))
    full = run_edgediff(pipe, latents, loras=[(sdxl["files"]["kohya0"], 1.0)])
    for prefix in KOHYA_SDXL.values():
        path = tmp_path / f"without-{prefix}.safetensors"
        save_numpy({k: v for k, v in tensors.items() if not k.startswith(prefix)}, str(path))
        assert np.abs(run_edgediff(pipe, latents, loras=[(path, 1.0)]) - full).max() > 5 * TOLERANCE, prefix


def test_two_loras_and_weight_zero(sdxl):
    latents = noise(sdxl["fp32"])
    loras = [(sdxl["files"]["peft0"], 0.7), (sdxl["files"]["kohya1"], 0.6)]
    expected = reference(sdxl["source"])
    for index, (path, _) in enumerate(loras):
        expected.load_lora_weights(str(path), adapter_name=f"a{index}")
    expected.set_adapters(["a0", "a1"], [w for _, w in loras])
    pipe = Pipeline.load(sdxl["fp32"], provider="cpu", memory="high")
    assert np.abs(run_edgediff(pipe, latents, loras=loras) - run_diffusers(expected, latents)).max() < TOLERANCE
    base = run_edgediff(Pipeline.load(sdxl["fp32"], provider="cpu"), latents)
    np.testing.assert_array_equal(run_edgediff(pipe, latents, loras=[(p, 0.0) for p, _ in loras]), base)


def test_both_text_encoders_are_mapped(sdxl):
    """Every weight of both encoders is mapped; the first encoder's last layer, which SDXL's
    penultimate-layer output never reads, is marked unused rather than left out."""
    manifest = json.loads((sdxl["fp32"] / "manifest.json").read_text())
    base = build_sdxl_pipeline("sdxl")
    for graph in ENCODERS:
        weights = manifest["graphs"][graph]["weights"]
        state = {k for k, v in getattr(base, graph).state_dict().items() if k.endswith("weight") and v.ndim in (2, 4)}
        assert set(weights) == state
        unused = {k for k, v in weights.items() if v["init"] is None}
        last = base.text_encoder.config.num_hidden_layers - 1
        assert unused == ({k for k in state if f"layers.{last}." in k} if graph == "text_encoder" else set())


def test_sgm_names_of_full_size_sdxl():
    """kohya's names for SDXL (3 down blocks, 2 resnets each) land on diffusers' modules."""
    cases = {
        "input_blocks_0_0": "conv_in",
        "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
        "input_blocks_3_0_op": "down_blocks_0_downsamplers_0_conv",
        "input_blocks_4_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0":
            "down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_out_0",
        "middle_block_0_emb_layers_1": "mid_block_resnets_0_time_emb_proj",
        "middle_block_1_proj_in": "mid_block_attentions_0_proj_in",
        "middle_block_2_out_layers_3": "mid_block_resnets_1_conv2",
        "output_blocks_2_2_conv": "up_blocks_0_upsamplers_0_conv",
        "output_blocks_5_1_proj_out": "up_blocks_1_attentions_2_proj_out",
        "output_blocks_8_0_skip_connection": "up_blocks_2_resnets_2_conv_shortcut",
        "label_emb_0_0": "add_embedding_linear_1",
        "down_blocks_1_attentions_0_proj_in": "down_blocks_1_attentions_0_proj_in",  # diffusers names pass
    }
    assert {name: sgm_to_diffusers(name, 2) for name in cases} == cases


def generate(model, tmp_path, *extra):
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(model), "--steps", "1", "--seed", "0",
                                       "-o", str(tmp_path / "x.png"), *map(str, extra)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_other_architectures_are_one_line_errors(sdxl, tiny_exports, tmp_path):
    assert "another architecture" in generate(sdxl["fp32"], tmp_path, "--lora", sdxl["files"]["sd1"])
    line = generate(tiny_exports["sd1", "fp32"], tmp_path, "--lora", sdxl["files"]["kohya0"])
    assert "text_encoder_2" in line and "1 text encoder" in line


def test_quantized_unets_refuse_loras(sdxl, tmp_path):
    """int8 (and int4) U-Net weights are not stored as trained: a U-Net LoRA is refused, naming the precision;
    a LoRA on the text encoders alone still applies."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_numpy

    assert "int8 unet graph" in generate(sdxl["int8"], tmp_path, "--lora", sdxl["files"]["kohya0"])
    int4 = shutil.copytree(sdxl["fp32"], tmp_path / "int4")
    manifest = json.loads((int4 / "manifest.json").read_text())
    manifest["graphs"]["unet"]["precision"] = "int4"
    (int4 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoraError, match="int4 unet graph"):
        Pipeline.load(int4, provider="cpu")("x", steps=1, seed=0, loras=[(sdxl["files"]["peft0"], 1.0)])
    text_only = tmp_path / "text-only.safetensors"
    save_numpy({k: v for k, v in load_file(str(sdxl["files"]["kohya0"])).items() if not k.startswith("lora_unet_")},
               str(text_only))
    pipe = Pipeline.load(sdxl["int8"], provider="cpu")
    latents = noise(sdxl["int8"])
    assert np.abs(run_edgediff(pipe, latents, loras=[(text_only, 1.0)]) - run_edgediff(pipe, latents)).max() > 0


@pytest.fixture(scope="module")
def embedding(sdxl):
    """An SDXL embedding: two vectors for each text encoder (widths 32 and 48 in the tiny model)."""
    rng = np.random.default_rng(0)
    path = sdxl["root"] / "glowstyle.safetensors"
    save_file({"clip_l": torch.from_numpy(rng.standard_normal((2, 32)).astype(np.float32)),
               "clip_g": torch.from_numpy(rng.standard_normal((2, 48)).astype(np.float32))}, str(path))
    return path


def test_sdxl_embedding_matches_diffusers(sdxl, embedding):
    from safetensors.torch import load_file

    prompt = "a house, glowstyle, at night"
    latents = noise(sdxl["fp32"])
    pipe = Pipeline.load(sdxl["fp32"], provider="cpu")
    actual = run_edgediff(pipe, latents, prompt, embeddings=[embedding])
    assert [len(tokenizer.added_tokens["glowstyle"]) for tokenizer in pipe.tokenizers] == [2, 2]
    plain = run_edgediff(pipe, latents, prompt)
    reference_pipe = reference(sdxl["source"])
    state = load_file(str(embedding))
    reference_pipe.load_textual_inversion(state["clip_l"], token="glowstyle", text_encoder=reference_pipe.text_encoder,
                                          tokenizer=reference_pipe.tokenizer)
    reference_pipe.load_textual_inversion(state["clip_g"], token="glowstyle",
                                          text_encoder=reference_pipe.text_encoder_2, tokenizer=reference_pipe.tokenizer_2)
    expected = run_diffusers(reference_pipe, latents, prompt)
    assert np.abs(actual - plain).max() > 20 * TOLERANCE
    assert np.abs(actual - expected).max() < TOLERANCE


def test_embedding_for_the_wrong_number_of_encoders(sdxl, embedding, tiny_exports):
    single = sdxl["root"] / "single.safetensors"
    save_file({"emb_params": torch.zeros((1, 32))}, str(single))
    with pytest.raises(Exception, match="vectors for one text encoder; this model has 2"):
        Pipeline.load(sdxl["fp32"], provider="cpu")("single", steps=1, seed=0, embeddings=[single])
    with pytest.raises(Exception, match="vectors for 2 text encoders; this model has 1"):
        Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")("x", steps=1, seed=0, embeddings=[embedding])
