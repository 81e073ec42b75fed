"""Write a diffusers ``StableDiffusion3Pipeline`` as the single file Stability distributes
(``sd3.5_medium.safetensors``): the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``
(fused qkv, ``x_block``/``context_block``, shift/scale order of the last adaLN layers), the VAE as
``first_stage_model.*`` and the text encoders under ``text_encoders.clip_l/clip_g/t5xxl.transformer.``
"""
from __future__ import annotations

from pathlib import Path

import torch

from original_format import vae_to_original

PREFIX = "model.diffusion_model."
ENCODERS = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
            "text_encoder_3": "text_encoders.t5xxl.transformer."}


def _swap(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' ``swap_scale_shift`` swaps the halves: it is its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block(state: dict, i: int, last: bool) -> dict:
    d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
    out = {}
    for leaf in ("weight", "bias"):
        out[f"{o}x_block.attn.qkv.{leaf}"] = torch.cat([state[f"{d}attn.to_{c}.{leaf}"] for c in "qkv"])
        out[f"{o}context_block.attn.qkv.{leaf}"] = torch.cat([state[f"{d}attn.add_{c}_proj.{leaf}"] for c in "qkv"])
        pairs = {"attn.to_out.0": "x_block.attn.proj", "norm1.linear": "x_block.adaLN_modulation.1",
                 "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
        if not last:
            pairs.update({"attn.to_add_out": "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
                          "ff_context.net.2": "context_block.mlp.fc2"})
        for new, old in pairs.items():
            out[f"{o}{old}.{leaf}"] = state[f"{d}{new}.{leaf}"]
        context_norm = state[f"{d}norm1_context.linear.{leaf}"]
        out[f"{o}context_block.adaLN_modulation.1.{leaf}"] = _swap(context_norm) if last else context_norm
        if f"{d}attn2.to_q.{leaf}" in state:  # MMDiT-X's second attention (SD 3.5 Medium)
            out[f"{o}x_block.attn2.qkv.{leaf}"] = torch.cat([state[f"{d}attn2.to_{c}.{leaf}"] for c in "qkv"])
            out[f"{o}x_block.attn2.proj.{leaf}"] = state[f"{d}attn2.to_out.0.{leaf}"]
    norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
    for new, old in norms.items():
        if f"{d}{new}.weight" in state:
            out[f"{o}{old}.weight"] = state[f"{d}{new}.weight"]
    return out


def transformer_to_original(state: dict, num_layers: int) -> dict:
    """diffusers SD3Transformer2DModel state dict -> ``model.diffusion_model.*``."""
    out = {"pos_embed": state["pos_embed.pos_embed"], "final_layer.adaLN_modulation.1.weight":
           _swap(state["norm_out.linear.weight"]), "final_layer.adaLN_modulation.1.bias": _swap(state["norm_out.linear.bias"])}
    fixed = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    for new, old in fixed.items():
        for leaf in ("weight", "bias"):
            out[f"{old}.{leaf}"] = state[f"{new}.{leaf}"]
    for i in range(num_layers):
        out.update(_block(state, i, last=i == num_layers - 1))
    return {PREFIX + key: value for key, value in out.items()}


def sd3_to_original(pipe, encoders=("text_encoder", "text_encoder_2", "text_encoder_3")) -> dict:
    """The whole file's tensors; ``encoders``: which text encoders go inside (those the pipeline has)."""
    state = transformer_to_original(pipe.transformer.state_dict(), pipe.transformer.config.num_layers)
    state.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    for name in encoders:
        module = getattr(pipe, name, None)
        if module is not None:
            state.update({ENCODERS[name] + key: value for key, value in module.state_dict().items()
                          if not key.endswith("position_ids") and key != "encoder.embed_tokens.weight"})
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def save_sd3_original(pipe, path: Path, **kwargs) -> Path:
    from safetensors.torch import save_file

    save_file(sd3_to_original(pipe, **kwargs), str(path))
    return Path(path)
