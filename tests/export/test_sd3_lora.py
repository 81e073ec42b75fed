"""LoRAs on the SD 3.5 Medium-shaped transformer through the exporter's weight map: diffusers/PEFT
names (``transformer.transformer_blocks.N.attn.to_q.lora_A.weight``) match diffusers'
``load_lora_weights`` (fp32 within 2e-3); kohya's spelling of the same names (``lora_transformer_*``)
gives the same image; LoRAs for the other denoiser are one line each way."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgediff.runtime import Pipeline
from edgediff.runtime.lora import LoraError
from lora_files import save_kohya, save_peft
from test_sd3 import FP32_TOLERANCE, GUIDANCE, NEGATIVE, PROMPT, run_diffusers, start_noise

# Joint attention (image and context sides), MMDiT-X's second attention, the MLPs, the adaLN and
# the embedders: every kind of Linear the transformer has.
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_v_proj",
           "attn.to_add_out", "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff_context.net.2", "norm1.linear",
           "context_embedder", "proj_out")
WEIGHT = 0.7


def transformer_layers(transformer, rank=4, seed=0, magnitude=0.2) -> dict:
    rng = np.random.default_rng(seed)
    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            layers[f"transformer.{name}"] = (
                rng.standard_normal((rank, module.in_features)).astype(np.float32) * magnitude,
                rng.standard_normal((module.out_features, rank)).astype(np.float32) * magnitude)
    return layers


@pytest.fixture(scope="module")
def loras(sd3, tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("sd3-lora")
    layers = transformer_layers(SD3Transformer2DModel.from_pretrained(sd3["sd35m"][0] / "transformer"))
    assert len(layers) > 40
    return {"peft": save_peft(layers, root / "peft.safetensors"),
            "kohya": save_kohya(layers, root / "kohya.safetensors", alpha=4.0, prefixes={"transformer": "lora_transformer_"})}


def test_peft_lora_matches_diffusers(sd3, loras):
    from diffusers import StableDiffusion3Pipeline

    source, folder = sd3["sd35m"]
    reference = StableDiffusion3Pipeline.from_pretrained(source)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(loras["peft"]))
    latents = start_noise(5)
    expected = run_diffusers(reference, latents, num_inference_steps=4, joint_attention_kwargs={"scale": WEIGHT})
    pipe = Pipeline.load(folder, provider="cpu")
    run = dict(steps=4, guidance=GUIDANCE, sampler="euler", latents=latents)
    actual = pipe(PROMPT, NEGATIVE, loras=[(loras["peft"], WEIGHT)], **run).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    plain = pipe(PROMPT, NEGATIVE, **run).pixels
    assert np.abs(plain - expected).max() > 5 * FP32_TOLERANCE  # the LoRA changes the image
    kohya = pipe(PROMPT, NEGATIVE, loras=[(loras["kohya"], WEIGHT)], **run).pixels
    assert np.abs(kohya - actual).max() < 1e-5


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
