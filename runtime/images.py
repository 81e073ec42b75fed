"""Pictures in: any file Pillow reads, a PIL image or a NumPy array, as 8-bit RGB.

CMYK, palette, greyscale, 16-bit and alpha pictures are converted (alpha is dropped, as diffusers'
image processor does); what cannot be read is one InputError.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError


def open_image(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    try:
        with Image.open(path) as picture:
            return to_rgb(picture, f"image {path}")
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"image {path} is a folder") from None
    except InputError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad files
        raise InputError(f"cannot read image {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def to_rgb(image, label: str = "image") -> Image.Image:
    """``image`` (PIL image, array (height, width[, channels]) of uint8/uint16, or a path) as RGB."""
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL image, an array or a path, not {type(image).__name__}")
    try:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit greyscale: keep the top 8 bits
            values = np.asarray(image).astype(np.int64)
            image = Image.fromarray(np.clip(values >> 8 if values.max() > 255 else values, 0, 255).astype(np.uint8))
        elif image.mode == "F":
            image = Image.fromarray(np.clip(np.asarray(image) * 255 if np.asarray(image).max() <= 1 else
                                            np.asarray(image), 0, 255).astype(np.uint8))
        elif image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")
    except Exception as error:  # truncated data is only found when the pixels are decoded
        raise InputError(f"cannot read {label}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    channels = array.shape[2] if array.ndim == 3 else 1
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or channels not in (1, 3, 4) or 0 in array.shape:
        raise InputError(f"image arrays must be uint8 or uint16 of shape (height, width[, 1, 3 or 4]), "
                         f"not {array.dtype} {array.shape}")
    if channels == 1:
        array = array.reshape(array.shape[:2])
    return Image.fromarray(np.ascontiguousarray(array))
