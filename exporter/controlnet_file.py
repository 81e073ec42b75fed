"""Single-file ControlNets as model sites distribute them: the original layout of lllyasviel's
ControlNet (``input_blocks.*``, ``zero_convs.*``, ``input_hint_block.*``, ``middle_block_out.*``,
perhaps under ``control_model.``) or diffusers' own names in one ``.safetensors`` file.

A single file carries no config. Its shapes give the architecture (widths, layers, transformer
depth, text width, hint embedding, SDXL's added embedding); what no shape shows follows the
families' original configs, as diffusers' LDM conversion and ComfyUI's model detection read them:
8 attention heads where the transformers project with 1x1 convolutions (SD 1.x), 64 channels per
head where they project linearly (SD 2.x, SDXL), 32 normalization groups, SDXL's 256-wide size-id
embedding. ``--config`` (a ControlNet's config.json, or its folder) overrides all of it. Every
weight must land: a file with a weight left over or missing is refused, not half-loaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from edgediff.runtime.errors import EdgediffError

PREFIX = "control_model."  # full original checkpoints hold the ControlNet under this
RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
PLAIN = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "middle_block_out.0": "controlnet_mid_block",
         "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
         "middle_block.2": "mid_block.resnets.1"}


def file_keys(path: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of a single file, read without its weights; None where it may not be read
    (a pickle without --allow-pickle: the model loader refuses it in one line)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with open(path, "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
            return {name: tuple(spec["shape"]) for name, spec in header.items() if name != "__metadata__"}
        except (OSError, ValueError, KeyError, TypeError, OverflowError, MemoryError):
            raise EdgediffError(f"{path} is not a readable .safetensors file") from None
    if suffix in (".pth", ".pt", ".ckpt", ".bin") and allow_pickle:
        try:  # tensors only; a checkpoint holding other objects is no ControlNet, the model loader takes it
            return {name: tuple(t.shape) for name, t in _read_pickle(path).items()}
        except EdgediffError:
            return None
    return None


def _read_pickle(path: Path) -> dict:
    """Tensors only (torch's ``weights_only``), memory-mapped where torch's zip format allows."""
    import torch

    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling raises many types
        raise EdgediffError(f"{path} is not a readable PyTorch file ({str(error).strip()[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EdgediffError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if hasattr(v, "shape")}


def layout(keys) -> str | None:
    """"original", "diffusers" or None (not a ControlNet), from the names alone."""
    names = {k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys}
    if any(k.startswith("input_hint_block.") for k in names) and any(k.startswith("zero_convs.") for k in names):
        return "original"
    return "diffusers" if "controlnet_cond_embedding.conv_in.weight" in names else None


def to_diffusers(state: dict) -> dict:
    """diffusers' names for an original-layout state dict (diffusers' ``convert_controlnet_checkpoint``,
    generalised to any number of hint-embedding convolutions and SDXL's added embedding)."""
    if any(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    levels = 1 + len({int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    layers, uneven = divmod(len(blocks) - 1 - (levels - 1), levels)
    if uneven or layers < 1:
        raise EdgediffError(f"its {len(blocks)} input blocks over {levels} levels are no ControlNet layout edgediff knows")
    hint = sorted({int(m.group(1)) for k in state if (m := re.match(r"input_hint_block\.(\d+)\.", k))})
    names = {f"input_hint_block.{hint[0]}": "controlnet_cond_embedding.conv_in",
             f"input_hint_block.{hint[-1]}": "controlnet_cond_embedding.conv_out",
             **{f"input_hint_block.{i}": f"controlnet_cond_embedding.blocks.{n}" for n, i in enumerate(hint[1:-1])}}
    converted = {}
    for key, value in state.items():
        converted[_rename(key, layers, names)] = value
    return converted


def _rename(key: str, layers: int, hint_names: dict) -> str:
    head, _, tail = key.rpartition(".")  # tail: weight / bias
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)(\..*)?", head):
        index, part, rest = int(m.group(1)), m.group(2), m.group(3) or ""
        if index > 0:
            level, layer = divmod(index - 1, layers + 1)
            if layer == layers:  # the level's downsampler: input_blocks.i.0.op
                return f"down_blocks.{level}.downsamplers.0.conv.{tail}"
            kind = "resnets" if part == "0" else "attentions"
            return f"down_blocks.{level}.{kind}.{layer}{_resnet(rest) if part == '0' else rest}.{tail}"
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0", head):
        return f"controlnet_down_blocks.{m.group(1)}.{tail}"
    if head in hint_names:
        return f"{hint_names[head]}.{tail}"
    for old, new in PLAIN.items():
        if head == old or head.startswith(old + "."):
            rest = head[len(old):]
            return f"{new}{_resnet(rest) if new.startswith('mid_block.resnets') else rest}.{tail}"
    return key  # left as it is: the strict load names it


def _resnet(rest: str) -> str:
    for old, new in RESNET_PARTS.items():
        if rest.startswith("." + old):
            return "." + new + rest[len(old) + 1:]
    return rest


def infer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """A ``ControlNetModel`` config from diffusers-layout shapes; the conventions above fill the rest."""
    def count(pattern: str) -> int:
        return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})

    levels = count(r"down_blocks\.(\d+)\.")
    widths = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
    attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in shapes for i in range(levels)]
    depth = [count(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1 for i in range(levels)]
    proj_in = next((s for k, s in shapes.items() if k.endswith("attentions.0.proj_in.weight")), None)
    linear = proj_in is not None and len(proj_in) == 2
    heads = [w // 64 for w in widths] if linear else 8
    if linear and any(w % 64 or w < 64 for w in widths):
        raise EdgediffError(f"its widths {widths} are not whole 64-channel attention heads (the SD 2.x/SDXL "
                            "convention); pass --config with the ControlNet's config.json")
    to_k = next((s for k, s in sorted(shapes.items()) if k.endswith("attn2.to_k.weight")), None)
    hint = [shapes["controlnet_cond_embedding.conv_in.weight"]] + [
        shapes[f"controlnet_cond_embedding.blocks.{i}.weight"] for i in range(count(r"controlnet_cond_embedding\.blocks\.(\d+)\."))]
    added = shapes.get("add_embedding.linear_1.weight")
    return {
        "in_channels": shapes["conv_in.weight"][1], "conditioning_channels": hint[0][1],
        "block_out_channels": widths, "layers_per_block": count(r"down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "mid_block.attentions.0.proj_in.weight" in shapes
        else "UNetMidBlock2D",
        "transformer_layers_per_block": depth, "cross_attention_dim": to_k[1] if to_k else widths[-1],
        "attention_head_dim": heads, "use_linear_projection": linear, "norm_num_groups": 32,
        "conditioning_embedding_out_channels": [s[0] for s in hint[::2]],
        "addition_embed_type": "text_time" if added else None,
        "addition_time_embed_dim": 256 if added else None,
        "projection_class_embeddings_input_dim": added[1] if added else None,
    }


def given_config(config: Path) -> dict:
    """``--config``: a ControlNet's config.json, or the folder holding it."""
    path = config / "config.json" if config.is_dir() else config
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise EdgediffError(f"--config {config}: no readable ControlNet config.json") from None
    if not isinstance(data, dict) or data.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise EdgediffError(f"--config {config} is not a ControlNet config (its _class_name is not ControlNetModel)")
    return data


def read_state(path: Path, allow_pickle: bool) -> dict:
    """The file's tensors (torch), in diffusers' names."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = _read_pickle(path) if allow_pickle else {}
    return to_diffusers(state) if layout(state) == "original" else state


def load_controlnet(path: Path, allow_pickle: bool, config: Path | None):
    """(ControlNetModel, its config) from one file; every weight must land."""
    import torch
    from diffusers import ControlNetModel

    try:
        state = read_state(path, allow_pickle)
        settings = given_config(config) if config else infer_config({k: tuple(v.shape) for k, v in state.items()})
    except (KeyError, IndexError, TypeError) as error:
        raise EdgediffError(f"{path} looks like a ControlNet but its layout is unknown to edgediff "
                            f"(no {str(error)[:120]})") from None
    try:
        model = ControlNetModel.from_config(settings).to(torch.float32)
    except Exception as error:  # diffusers raises many types for a config it cannot build
        raise EdgediffError(f"{path}: cannot build a ControlNet from {'--config' if config else 'its shapes'} "
                            f"({str(error).splitlines()[0][:160]})") from None
    missing, unexpected = _fit(model, state)
    if missing or unexpected:
        what = (f"missing {len(missing)} weights ({missing[0]}...)" if missing else "") + \
            (", " if missing and unexpected else "") + \
            (f"{len(unexpected)} weights it cannot place ({unexpected[0]}...)" if unexpected else "")
        raise EdgediffError(f"{path} does not have a ControlNet layout edgediff knows: {what}" +
                            ("" if config else "; if it is a ControlNet, pass --config with its config.json"))
    return model.eval(), model.config


def _fit(model, state: dict) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``model``; the names that did not fit (shapes included)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in state if k not in own or tuple(own[k].shape) != tuple(state[k].shape))
    if not missing and not unexpected:
        model.load_state_dict(state, strict=True)
    return missing, unexpected
