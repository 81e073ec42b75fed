"""The U-Net's conditioning inputs beyond the text, built from manifest data (no model names).

Which inputs exist is read from the U-Net graph's declared inputs: ``text_embeds`` and ``time_ids``
are SDXL's pooled text embedding and micro-conditioning (Podell et al. 2023, "SDXL", section 2.2),
``timestep_cond`` is a Latent Consistency Model's embedded guidance scale (Luo et al. 2023, "Latent
Consistency Models", eq. 8), as diffusers' ``StableDiffusionXLPipeline`` builds them.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import EdgediffError

Size = tuple[int, int]  # (height, width), as diffusers orders size ids


def embeds_guidance(unet_inputs: Sequence[str]) -> bool:
    """A U-Net that takes the guidance scale as an input is not run twice for guidance."""
    return "timestep_cond" in unet_inputs


def guidance_embedding(guidance: float, dim: int, batch: int) -> np.ndarray:
    """Sinusoidal embedding of ``(guidance - 1) * 1000`` (diffusers' ``get_guidance_scale_embedding``,
    after VDM's timestep embedding), float32 of shape (batch, dim)."""
    w = np.float32((guidance - 1.0) * 1000.0)
    half = dim // 2
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -np.float32(math.log(10000.0) / (half - 1)))
    angles = w * frequencies
    embedding = np.concatenate([np.sin(angles), np.cos(angles)])
    if dim % 2:
        embedding = np.pad(embedding, (0, 1))
    return np.repeat(embedding[None].astype(np.float32), batch, axis=0)


def size_ids(layout: Sequence[str], *, original_size: Size, crops_coords_top_left: tuple[int, int],
             target_size: Size, batch: int) -> np.ndarray:
    """SDXL's ``time_ids``: the sizes and crop offset the model was told about, in the manifest's order."""
    values = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
              "target_size": target_size}
    unknown = [name for name in layout if name not in values]
    if unknown:
        raise EdgediffError(f"this model's U-Net wants size ids {unknown} that edgediff cannot provide; "
                            "re-export it with this version of edgediff")
    ids = [float(v) for name in layout for v in values[name]]
    return np.tile(np.asarray(ids, dtype=np.float32), (batch, 1))


def check_size_pair(label: str, value) -> Size:
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise EdgediffError(f"{label} must be a (height, width) pair of whole numbers, not {value!r}") from None
    if height < 0 or width < 0:
        raise EdgediffError(f"{label} must not be negative, not {value!r}")
    return height, width
