"""Random LoRAs for the tiny models, written as diffusers/PEFT and as kohya files.

Layers cover U-Net attention (q, k, v, out of self and cross attention), convolutions (resnet 3x3
kernels: LoCon), the transformer's proj_in (a 1x1 conv in SD 1.x, a Linear in SD 2.x) and the text
encoder's attention and MLP.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def lora_layers(pipe, rank: int = 4, seed: int = 0, magnitude: float = 0.15,
                encoders: tuple[str, ...] = ("text_encoder",)) -> dict[str, tuple]:
    """{"unet.<module>" / "text_encoder.<module>" / ...: (down, up)} with small random values."""
    rng = np.random.default_rng(seed)
    layers = {}
    for component, targets in (("unet", UNET_TARGETS), *((encoder, TEXT_TARGETS) for encoder in encoders)):
        for name, module in getattr(pipe, component).named_modules():
            if not name.endswith(targets) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if isinstance(module, torch.nn.Linear):
                down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
            else:
                down_shape = (rank, module.in_channels, *module.kernel_size)
                up_shape = (module.out_channels, rank, 1, 1)
            down = rng.standard_normal(down_shape).astype(np.float32) * magnitude
            up = rng.standard_normal(up_shape).astype(np.float32) * magnitude
            layers[f"{component}.{name}"] = (down, up)
    return layers


def save_peft(layers: dict, path: Path) -> Path:
    """diffusers' own layout (what ``save_lora_weights`` writes): lora_A is down, lora_B is up; no alpha."""
    tensors = {}
    for name, (down, up) in layers.items():
        tensors[f"{name}.lora_A.weight"] = torch.from_numpy(down)
        tensors[f"{name}.lora_B.weight"] = torch.from_numpy(up)
    save_file(tensors, str(path))
    return path


def save_kohya(layers: dict, path: Path, alpha: float, prefixes: dict | None = None, rename=None) -> Path:
    """``prefixes``: component -> kohya prefix; ``rename``: (component, flat name) -> the name kohya writes."""
    prefixes = prefixes or {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    tensors = {}
    for name, (down, up) in layers.items():
        component, module = name.split(".", 1)
        flat = module.replace(".", "_")
        flat = prefixes[component] + (rename(component, flat) if rename else flat)
        # kohya saves Linear LoRAs of 1x1-conv layers as 1x1 convs too.
        tensors[f"{flat}.lora_down.weight"] = torch.from_numpy(down)
        tensors[f"{flat}.lora_up.weight"] = torch.from_numpy(up)
        tensors[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path
