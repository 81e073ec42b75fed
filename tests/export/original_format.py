"""Write a diffusers ``StableDiffusionPipeline`` as an original (LDM/CompVis) single-file checkpoint.

The reverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``),
modelled on diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py but driven by the
model configs, so it also handles the tiny test pipelines (any number of blocks and layers):

* UNet -> ``model.diffusion_model.*`` (input_blocks / middle_block / output_blocks)
* VAE -> ``first_stage_model.*`` (mid-block attention q/k/v/proj_out as 1x1 conv weights)
* SD 1.x CLIP -> ``cond_stage_model.transformer.text_model.*``
* SD 2.x OpenCLIP -> ``cond_stage_model.model.*`` (fused ``in_proj_weight``/``in_proj_bias``)
* SDXL: CLIP -> ``conditioner.embedders.0.transformer.*``, OpenCLIP bigG (with its text projection)
  -> ``conditioner.embedders.1.model.*``, the U-Net's ``add_embedding`` -> ``label_emb.0``
"""
from __future__ import annotations

from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(rest: str, pairs) -> str:
    head, _, leaf = rest.rpartition(".")  # leaf is weight/bias
    for new, old in pairs:
        if head == new:
            return f"{old}.{leaf}"
    return rest


def unet_to_original(state: dict, config) -> dict:
    """diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    per_block = config["layers_per_block"]
    n_blocks = len(config["block_out_channels"])
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    places = {}  # diffusers prefix -> (ldm prefix, rename pairs)
    for block in range(n_blocks):
        for layer in range(per_block):
            i = 1 + block * (per_block + 1) + layer
            places[f"down_blocks.{block}.resnets.{layer}."] = (f"input_blocks.{i}.0.", _UNET_RESNET)
            places[f"down_blocks.{block}.attentions.{layer}."] = (f"input_blocks.{i}.1.", [])
        if block < n_blocks - 1:
            i = 1 + block * (per_block + 1) + per_block
            places[f"down_blocks.{block}.downsamplers.0.conv."] = (f"input_blocks.{i}.0.op.", [])
    places["mid_block.resnets.0."] = ("middle_block.0.", _UNET_RESNET)
    places["mid_block.attentions.0."] = ("middle_block.1.", [])
    places["mid_block.resnets.1."] = ("middle_block.2.", _UNET_RESNET)
    for block in range(n_blocks):
        has_attention = any(k.startswith(f"up_blocks.{block}.attentions.") for k in state)
        for layer in range(per_block + 1):
            i = block * (per_block + 1) + layer
            places[f"up_blocks.{block}.resnets.{layer}."] = (f"output_blocks.{i}.0.", _UNET_RESNET)
            places[f"up_blocks.{block}.attentions.{layer}."] = (f"output_blocks.{i}.1.", [])
        if block < n_blocks - 1:
            i = block * (per_block + 1) + per_block
            places[f"up_blocks.{block}.upsamplers.0.conv."] = (f"output_blocks.{i}.{2 if has_attention else 1}.conv.", [])

    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head in fixed:
            out[UNET_PREFIX + f"{fixed[head]}.{leaf}"] = value
            continue
        for new, (old, pairs) in places.items():
            if key.startswith(new):
                out[UNET_PREFIX + old + _rename(key[len(new):], pairs)] = value
                break
        else:
            raise KeyError(f"no original-format place for UNet key {key}")
    return out


def vae_to_original(state: dict, config) -> dict:
    """diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys."""
    n_blocks = len(config["block_out_channels"])
    fixed = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    places = {}
    for block in range(n_blocks):
        places[f"encoder.down_blocks.{block}.resnets."] = (f"encoder.down.{block}.block.", "resnet")
        places[f"encoder.down_blocks.{block}.downsamplers.0.conv."] = (f"encoder.down.{block}.downsample.conv.", None)
        up = n_blocks - 1 - block  # LDM counts decoder blocks from the lowest resolution
        places[f"decoder.up_blocks.{block}.resnets."] = (f"decoder.up.{up}.block.", "resnet")
        places[f"decoder.up_blocks.{block}.upsamplers.0.conv."] = (f"decoder.up.{up}.upsample.conv.", None)
    for side in ("encoder", "decoder"):
        for k in range(2):
            places[f"{side}.mid_block.resnets.{k}."] = (f"{side}.mid.block_{k + 1}.", "resnet")
        places[f"{side}.mid_block.attentions.0."] = (f"{side}.mid.attn_1.", "attention")

    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if head in fixed:
            out[VAE_PREFIX + f"{fixed[head]}.{leaf}"] = value
            continue
        for new, (old, kind) in places.items():
            if key.startswith(new):
                rest = key[len(new):]
                if kind == "resnet":
                    rest = rest.replace("conv_shortcut", "nin_shortcut")
                elif kind == "attention":
                    rest = _rename(rest, _VAE_ATTENTION)
                    if value.ndim == 2:  # linear -> 1x1 conv, as the LDM VAE stores them
                        value = value[:, :, None, None]
                out[VAE_PREFIX + old + rest] = value
                break
        else:
            if head.split(".")[-1] in ("conv_in", "conv_out", "quant_conv", "post_quant_conv"):
                out[VAE_PREFIX + key] = value
            else:
                raise KeyError(f"no original-format place for VAE key {key}")
    return out


def clip_to_original(state: dict, prefix: str = CLIP_PREFIX) -> dict:
    """transformers CLIPTextModel (SD 1.x) -> ``cond_stage_model.transformer.text_model.*``."""
    return {prefix + key.removeprefix("text_model."): value for key, value in state.items()
            if not key.endswith("position_ids")}


def open_clip_to_original(state: dict, prefix: str = OPEN_CLIP_PREFIX) -> dict:
    """transformers CLIPTextModel (SD 2.x) -> OpenCLIP ``cond_stage_model.model.*`` keys; a
    projection (SDXL's second encoder) becomes OpenCLIP's ``text_projection`` matrix (x @ P)."""
    OPEN_CLIP_PREFIX = prefix  # noqa: N806 - the same layout under another prefix
    state = {key.removeprefix("text_model."): value for key, value in state.items()
             if not key.endswith("position_ids")}
    out = {}
    if "text_projection.weight" in state:
        out[OPEN_CLIP_PREFIX + "text_projection"] = state.pop("text_projection.weight").T
    out |= {
        OPEN_CLIP_PREFIX + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        OPEN_CLIP_PREFIX + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        OPEN_CLIP_PREFIX + "ln_final.weight": state.pop("final_layer_norm.weight"),
        OPEN_CLIP_PREFIX + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    layers = sorted({int(key.split(".")[2]) for key in state if key.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"{OPEN_CLIP_PREFIX}transformer.resblocks.{n}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{leaf}") for p in ("q", "k", "v")])
            for new, old in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{old}.{leaf}"] = state.pop(f"{src}{new}.{leaf}")
    if state:
        raise KeyError(f"no original-format place for text encoder keys {sorted(state)}")
    return out


def pipeline_to_original(pipe, *, open_clip: bool | None = None) -> dict:
    """All of a pipeline's weights in one original-format state dict (contiguous tensors)."""
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        state = {
            **unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
            **vae_to_original(pipe.vae.state_dict(), pipe.vae.config),
            **clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.text_model."),
            **open_clip_to_original(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."),
        }
        return {key: value.detach().clone().contiguous() for key, value in state.items()}
    if open_clip is None:  # SD 2.x text encoders use gelu; SD 1.x's OpenAI CLIP uses quick_gelu
        open_clip = pipe.text_encoder.config.hidden_act == "gelu"
    text = pipe.text_encoder.state_dict()
    state = {
        **unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_original(pipe.vae.state_dict(), pipe.vae.config),
        **(open_clip_to_original(text) if open_clip else clip_to_original(text)),
    }
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def save_original(pipe, path: Path, **kwargs) -> Path:
    """Write ``pipe`` as a single-file checkpoint: ``.safetensors``, else a pickled ``{"state_dict": ...}``."""
    state = pipeline_to_original(pipe, **kwargs)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, str(path))
    return path
