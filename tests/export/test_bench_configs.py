"""The shipped full-size configs (no weights) describe the real SD 1.5 and SD 2.1 architectures."""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from edgediff.benchmarks.hardware import estimate_bytes  # noqa: E402
from edgediff.benchmarks.models import config_source, copy_config  # noqa: E402


def _load(family, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = copy_config(family, tmp_path / family)  # + vocab.json/merges.txt, as the single-file loader does
    return (UNet2DConditionModel.load_config(folder / "unet"), AutoencoderKL.load_config(folder / "vae"),
            CLIPTextConfig.from_pretrained(folder / "text_encoder"), CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
            folder)


def test_sd15_config(tmp_path):
    unet, vae, text, tokenizer, folder = _load("sd15", tmp_path)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert unet["attention_head_dim"] == 8 and unet["sample_size"] == 64
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    assert (text.num_hidden_layers, text.hidden_size, text.hidden_act) == (12, 768, "quick_gelu")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.model_max_length == 77
    import json

    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["steps_offset"] == 1
    assert scheduler["skip_prk_steps"] and scheduler["beta_schedule"] == "scaled_linear"
    sizes = estimate_bytes(config_source("sd15"))
    assert 859e6 < sizes["unet"] / 4 < 860e6  # SD 1.5 U-Net: 859.5 M parameters
    assert 123e6 < sizes["text_encoder"] / 4 < 124e6  # CLIP ViT-L/14 text tower: 123.1 M


def test_sd21_config(tmp_path):
    unet, vae, text, tokenizer, folder = _load("sd21", tmp_path)
    assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["use_linear_projection"]
    assert unet["upcast_attention"] and unet["cross_attention_dim"] == 1024 and unet["sample_size"] == 96
    assert (text.num_hidden_layers, text.hidden_size, text.hidden_act) == (23, 1024, "gelu")
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    import json

    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["prediction_type"] == "v_prediction"
    sizes = estimate_bytes(config_source("sd21"))
    assert 865e6 < sizes["unet"] / 4 < 866e6  # SD 2.x U-Net: 865.9 M parameters


def test_sdxl_config(tmp_path):
    from transformers import CLIPTextConfig, CLIPTokenizer

    unet, vae, text, tokenizer, folder = _load("sdxl", tmp_path)
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 2048
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["sample_size"] == 128
    assert vae["force_upcast"] and vae["scaling_factor"] == 0.13025
    text_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    assert (text_2.num_hidden_layers, text_2.hidden_size, text_2.projection_dim) == (32, 1280, 1280)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"))  # BPE files copied here too
    assert tokenizer_2("a photo of a cat").input_ids == tokenizer("a photo of a cat").input_ids
    assert tokenizer_2.pad_token == "!" and tokenizer.pad_token == "<|endoftext|>"
    sizes = estimate_bytes(config_source("sdxl"))  # every weighted component model_index.json names
    assert set(sizes) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert 2567e6 < sizes["unet"] / 4 < 2568e6  # SDXL base U-Net: 2567.5 M parameters
    assert 694e6 < sizes["text_encoder_2"] / 4 < 695e6  # OpenCLIP bigG text tower with projection: 694.7 M


def test_sd35m_config(tmp_path):
    """SD 3.5 Medium: MMDiT-X transformer (2.5 B with its 384x384 position table), CLIP-L and CLIP-G
    with projections, T5-XXL v1.1's encoder (4.76 B), the 16-channel VAE; counted on the meta device."""
    import json

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    folder = copy_config("sd35m", tmp_path / "sd35m")
    transformer = SD3Transformer2DModel.load_config(folder / "transformer")
    assert transformer["dual_attention_layers"] == list(range(13)) and transformer["qk_norm"] == "rms_norm"
    assert (transformer["num_layers"], transformer["caption_projection_dim"], transformer["pos_embed_max_size"]) == (24, 1536, 384)
    vae = AutoencoderKL.load_config(folder / "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler").config.shift == 3.0
    clip_l, clip_g = (CLIPTextConfig.from_pretrained(folder / name) for name in ("text_encoder", "text_encoder_2"))
    assert (clip_l.projection_dim, clip_g.projection_dim, clip_g.num_hidden_layers) == (768, 1280, 32)
    assert CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")).pad_token == "!"
    t5_tokenizer = T5TokenizerFast.from_pretrained(str(folder / "tokenizer_3"))  # synthetic, T5's size
    assert len(t5_tokenizer) == 32100 and (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id) == (0, 1)
    assert t5_tokenizer("a photo of a cat").input_ids[-1] == 1
    with torch.device("meta"):
        mmdit = SD3Transformer2DModel.from_config(transformer)
        t5 = T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_3"))
    state = sum(v.numel() for v in mmdit.state_dict().values())  # parameters + the position table
    assert 2469e6 < state < 2470e6  # the checkpoint's 4.94 GB in bf16
    encoder = sum(v.numel() for name, v in t5.state_dict().items() if name.startswith("encoder."))
    assert 4762e6 < encoder < 4763e6  # T5-XXL v1.1 encoder: 24 x 193 M + the 32128 x 4096 embedding
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == ["transformers", "T5EncoderModel"]
