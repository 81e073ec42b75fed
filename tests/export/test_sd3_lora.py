"""LoRAs on the SD 3.5 Medium-shaped model through the exporter's weight map: diffusers/PEFT
names (``transformer.transformer_blocks.N.attn.to_q.lora_A.weight``, and CLIP-L's / CLIP-G's
``text_encoder.`` / ``text_encoder_2.``) match diffusers' ``load_lora_weights`` (fp32 within 2e-3);
kohya's spelling of the same names (``lora_transformer_*``, ``lora_te1_*``, ``lora_te2_*``) gives the
same image; T5 layers (``text_encoder_3.``, ``lora_te3_``), which diffusers' SD 3 loader does not
load, are refused in one line; LoRAs for the other denoiser are one line each way. The CLIPs' weight
maps take SDXL-format embeddings (clip_l, clip_g) on an SD 3 exported without T5, as diffusers'
``load_textual_inversion`` into both CLIPs; with T5 (which takes none) they are one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgediff.runtime import Pipeline
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.lora import LoraError
from lora_files import save_kohya, save_peft
from test_sd3 import FP32_TOLERANCE, GUIDANCE, NEGATIVE, PROMPT, run_diffusers, start_noise

# Joint attention (image and context sides), MMDiT-X's second attention, the MLPs, the adaLN and
# the embedders: every kind of Linear the transformer has.
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_v_proj",
           "attn.to_add_out", "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff_context.net.2", "norm1.linear",
           "context_embedder", "proj_out")
# CLIP's attention and MLP (what diffusers' text-encoder loader ranks) and the pooled projection.
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "text_projection")
T5_TARGETS = ("SelfAttention.q", "SelfAttention.o", "DenseReluDense.wi_0", "DenseReluDense.wo")
KOHYA = {"transformer": "lora_transformer_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
         "text_encoder_3": "lora_te3_"}  # kohya's sd-scripts (lora_sd3.py) names the three encoders so
WEIGHT = 0.7


def linear_layers(model, component, targets=TARGETS, rank=4, seed=0, magnitude=0.2) -> dict:
    rng = np.random.default_rng(seed)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            layers[f"{component}.{name}"] = (
                rng.standard_normal((rank, module.in_features)).astype(np.float32) * magnitude,
                rng.standard_normal((module.out_features, rank)).astype(np.float32) * magnitude)
    return layers


@pytest.fixture(scope="module")
def loras(sd3, tmp_path_factory):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    root = tmp_path_factory.mktemp("sd3-lora")
    source = sd3["sd35m"][0]
    layers = linear_layers(SD3Transformer2DModel.from_pretrained(source / "transformer"), "transformer")
    assert len(layers) > 40
    clip = {}
    for seed, component in enumerate(("text_encoder", "text_encoder_2"), start=1):
        clip.update(linear_layers(CLIPTextModelWithProjection.from_pretrained(source / component), component,
                                  CLIP_TARGETS, seed=seed))
    assert len(clip) == 2 * (3 * 6 + 1)  # every Linear of both 3-layer CLIPs
    t5 = linear_layers(T5EncoderModel.from_pretrained(source / "text_encoder_3"), "text_encoder_3", T5_TARGETS, seed=3)
    assert len(t5) == 2 * 4
    return {"peft": save_peft(layers, root / "peft.safetensors"),
            "kohya": save_kohya(layers, root / "kohya.safetensors", alpha=4.0, prefixes=KOHYA),
            "peft_clip": save_peft({**layers, **clip}, root / "peft-clip.safetensors"),
            "kohya_clip": save_kohya({**layers, **clip}, root / "kohya-clip.safetensors", alpha=4.0, prefixes=KOHYA),
            "peft_t5": save_peft({**layers, **clip, **t5}, root / "peft-t5.safetensors"),
            "kohya_t5": save_kohya({**layers, **t5}, root / "kohya-t5.safetensors", alpha=4.0, prefixes=KOHYA)}


def diffusers_with_lora(source, lora, latents):
    """diffusers' image with ``lora`` loaded at ``WEIGHT``, 4 steps (and the pipeline, to inspect)."""
    from diffusers import StableDiffusion3Pipeline

    reference = StableDiffusion3Pipeline.from_pretrained(source)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(lora))
    return run_diffusers(reference, latents, num_inference_steps=4, joint_attention_kwargs={"scale": WEIGHT}), reference


def test_peft_lora_matches_diffusers(sd3, loras):
    source, folder = sd3["sd35m"]
    latents = start_noise(5)
    expected, _ = diffusers_with_lora(source, loras["peft"], latents)
    pipe = Pipeline.load(folder, provider="cpu")
    run = dict(steps=4, guidance=GUIDANCE, sampler="euler", latents=latents)
    actual = pipe(PROMPT, NEGATIVE, loras=[(loras["peft"], WEIGHT)], **run).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    plain = pipe(PROMPT, NEGATIVE, **run).pixels
    assert np.abs(plain - expected).max() > 5 * FP32_TOLERANCE  # the LoRA changes the image
    kohya = pipe(PROMPT, NEGATIVE, loras=[(loras["kohya"], WEIGHT)], **run).pixels
    assert np.abs(kohya - actual).max() < 1e-5


def test_clip_lora_layers_match_diffusers(sd3, loras):
    """Transformer, CLIP-L and CLIP-G layers in one file, as diffusers' SD3LoraLoaderMixin loads it:
    the text encoders' LoRA scaled by the same weight (``joint_attention_kwargs["scale"]``)."""
    source, folder = sd3["sd35m"]
    latents = start_noise(5)
    expected, reference = diffusers_with_lora(source, loras["peft_clip"], latents)
    assert "lora_A" in str(reference.text_encoder_2)  # diffusers did load the CLIP layers
    pipe = Pipeline.load(folder, provider="cpu")
    run = dict(steps=4, guidance=GUIDANCE, sampler="euler", latents=latents)
    actual = pipe(PROMPT, NEGATIVE, loras=[(loras["peft_clip"], WEIGHT)], **run).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    transformer_only = pipe(PROMPT, NEGATIVE, loras=[(loras["peft"], WEIGHT)], **run).pixels
    assert np.abs(transformer_only - expected).max() > 5 * FP32_TOLERANCE  # the CLIP layers reach the image
    kohya = pipe(PROMPT, NEGATIVE, loras=[(loras["kohya_clip"], WEIGHT)], **run).pixels
    assert np.abs(kohya - actual).max() < 1e-5


def test_export_without_clip_weight_maps_asks_for_a_re_export(sd3, loras, tmp_path):
    """An SD 3 export made before its CLIP encoders were weight-mapped: their LoRA layers would match
    nothing, so the file is refused with the way out, not applied in part."""
    folder = shutil.copytree(sd3["sd35m"][1], tmp_path / "old-export")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graphs"]["text_encoder_2"]["weights"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(folder, provider="cpu")
    with pytest.raises(LoraError, match="text_encoder_2 graph was exported without a weight map.*re-export"):
        pipe(PROMPT, steps=1, loras=[(loras["peft_clip"], 1.0)])
    assert pipe(PROMPT, steps=1, loras=[(loras["peft"], 1.0)]).pixels.shape == (1, 32, 32, 3)  # the transformer's alone


@pytest.mark.parametrize("spelling", ["peft_t5", "kohya_t5"])
@pytest.mark.parametrize("kind", ["sd35m", "sd3"])
def test_t5_lora_layers_are_one_line(sd3, loras, spelling, kind):
    """diffusers' SD 3 loader loads no T5 LoRA (its loadable modules are the transformer and the two
    CLIPs): a file with T5 layers is refused, naming them, with or without T5 in the model."""
    pipe = Pipeline.load(sd3[kind][1], provider="cpu")
    with pytest.raises(LoraError, match=r"text_encoder_3 \(T5\)") as error:
        pipe(PROMPT, steps=1, loras=[(loras[spelling], 1.0)])
    assert "\n" not in str(error.value) and loras[spelling].name in str(error.value)


def test_lora_for_the_other_denoiser_is_one_line(sd3, loras, tmp_path):
    """An SD 3 LoRA on a U-Net model (the shipped SD 1.x-shaped default), and a U-Net LoRA on SD 3."""
    default = Pipeline.load(None, provider="cpu")
    with pytest.raises(LoraError, match="an SD 3 LoRA .* on a model whose denoiser is a U-Net") as error:
        default("a red circle", steps=1, loras=[(loras["peft"], 1.0)])
    assert "\n" not in str(error.value)

    unet_lora = tmp_path / "sd15.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(unet_lora))
    pipe = Pipeline.load(sd3["sd35m"][1], provider="cpu")
    with pytest.raises(LoraError, match="a U-Net LoRA .* on a model whose denoiser is an MMDiT transformer"):
        pipe(PROMPT, steps=1, loras=[(unet_lora, 1.0)])
    original = tmp_path / "original-layout.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(96, 4)}, str(original))
    with pytest.raises(LoraError, match="original layout"):
        pipe(PROMPT, steps=1, loras=[(original, 1.0)])


def test_sdxl_embedding_on_sd3_without_t5_matches_diffusers(sd3, tmp_path):
    """SD 3's CLIP-L and CLIP-G are SDXL's: an SDXL embedding (two vectors each) extends both tables,
    as diffusers' TextualInversionLoaderMixin does when pointed at each (StableDiffusion3Pipeline has
    no loader of its own, nor the prompt expansion: ``maybe_convert_prompt`` is called here)."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders import TextualInversionLoaderMixin

    class WithEmbeddings(StableDiffusion3Pipeline, TextualInversionLoaderMixin):
        pass

    rng = np.random.default_rng(0)
    state = {"clip_l": torch.from_numpy(rng.standard_normal((2, 32)).astype(np.float32)),
             "clip_g": torch.from_numpy(rng.standard_normal((2, 48)).astype(np.float32))}
    save_file(state, str(tmp_path / "glowstyle.safetensors"))
    prompt = "a red circle, glowstyle, on a white background"
    source, folder = sd3["sd3"]
    pipe = Pipeline.load(folder, provider="cpu")
    latents = start_noise(5)
    run = dict(steps=4, guidance=GUIDANCE, sampler="euler", latents=latents)
    actual = pipe(prompt, NEGATIVE, embeddings=[tmp_path / "glowstyle.safetensors"], **run).pixels
    plain = pipe(prompt, NEGATIVE, **run).pixels
    reference = WithEmbeddings.from_pretrained(source, text_encoder_3=None, tokenizer_3=None)
    reference.set_progress_bar_config(disable=True)
    for vectors, encoder, tokenizer in ((state["clip_l"], reference.text_encoder, reference.tokenizer),
                                        (state["clip_g"], reference.text_encoder_2, reference.tokenizer_2)):
        reference.load_textual_inversion(vectors, token="glowstyle", text_encoder=encoder, tokenizer=tokenizer)
    expanded = reference.maybe_convert_prompt(prompt, reference.tokenizer)
    assert expanded == reference.maybe_convert_prompt(prompt, reference.tokenizer_2) != prompt
    with torch.no_grad():
        expected = reference(prompt=expanded, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, num_inference_steps=4,
                             latents=torch.from_numpy(latents), output_type="np").images
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    assert np.abs(plain - expected).max() > 5 * FP32_TOLERANCE  # the embedding reaches the image

    with pytest.raises(EdgediffError, match="vectors for 2 text encoders; this model has 3") as error:
        Pipeline.load(sd3["sd35m"][1], provider="cpu")(prompt, steps=1, embeddings=[tmp_path / "glowstyle.safetensors"])
    assert "\n" not in str(error.value)
