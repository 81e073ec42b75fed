"""Images in and out of the API: base64 decoding with checks, PNG encoding, latent previews."""
from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgediff.runtime import metadata

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class BadImage(ValueError):
    """An image field that is not an acceptable picture; the message names the field."""


def image_bytes(data: str, field: str) -> bytes:
    """The bytes of a base64 (or ``data:`` URL) image field."""
    if not isinstance(data, str) or not data:
        raise BadImage(f"{field} is empty")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{field} is not valid base64") from None


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 PNG/JPEG/WebP as RGB, refusing anything whose header promises more than
    ``max_pixels`` before any pixel is decoded."""
    raw = image_bytes(data, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:  # reads the header only
                if image.format not in ACCEPTED_FORMATS:
                    raise BadImage(f"{field} is {image.format or 'an unknown format'}; send PNG, JPEG or WebP")
                width, height = image.size
                if width * height > max_pixels:
                    raise BadImage(f"{field} is {width}x{height}: more pixels than the limit of {max_pixels} pixels")
                return image.convert("RGB")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own, larger bound
        raise BadImage(f"{field} has more pixels than the limit of {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise BadImage(f"{field} is not a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise BadImage(f"{field} is not a readable image ({error})") from None


def encode_png(image: Image.Image, text: str | None) -> str:
    """Base64 PNG with the A1111 ``parameters`` text chunk."""
    buffer = io.BytesIO()
    metadata.save_image(image, buffer, text, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def latent_preview(latents: np.ndarray, scale: int = 2) -> Image.Image:
    """A false-colour view of a latent with no decoder run: its first three channels, each
    standardised (mean 0.5, +-2 std to 0..1), nearest-upscaled. Model-agnostic on purpose: no
    per-model latent-to-RGB constants, so colours are not the image's, only its layout."""
    x = np.asarray(latents, dtype=np.float32)[0]
    x = x[np.arange(3) % x.shape[0]]
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True) + 1e-6
    rgb = np.clip(0.5 + (x - mean) / (4 * std), 0.0, 1.0).transpose(1, 2, 0)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
