"""Modes: how a generation starts, what the U-Net sees besides the latent, and how it ends.

A mode is one small strategy object. The pipeline asks every mode the same things, in this order:

- ``graphs(text_encoders)``: the graphs it runs, in order, with what each one reads; the memory
  plan (runtime/memory.py) sizes exactly this list, so the plan cannot drift from what runs;
- ``encode(vae_encode)``: the VAE encoder's moments it needs (``vae_encode(pixels) -> moments``);
- ``start(draw, sample_latent, plan)``: the starting latent in sigma space, drawing its random
  numbers in diffusers' order (``draw()``: the unit starting noise; ``sample_latent(moments)``: a
  sample of the VAE's latent Gaussian, from the same generator);
- ``providers``: extra U-Net input providers (see :class:`UNetInputProvider`), applied in order
  to every U-Net call's feed;
- ``steer(denoise, plan)``: the denoiser the sampler calls (blend inpainting puts the known region
  back before each call); ``finish_latent(x)`` and ``finish_pixels(pixels)``: the last touches.

Conventions are diffusers' (``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline``);
see runtime/inpaint.py for the mask. :func:`choose_mode` picks one from the request and the U-Net's
declared input channels, so no mode is keyed on a model name.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
from PIL import Image

from .denoiser import noised
from .errors import EdgediffError
from .inpaint import Mask, keep_known, masked_pixels, prepare_mask

Feed = dict[str, np.ndarray]  # one U-Net call's inputs by name: sample, timestep, encoder_hidden_states, ...
Denoise = Callable[[np.ndarray, float], np.ndarray]


class UNetInputProvider(Protocol):
    """Adds to (or rewrites) every U-Net call's inputs. ``graphs``: the extra graphs it runs per
    step, as (graph, what it reads) for the memory plan; ``__call__(feed) -> feed`` sees the
    sample (already scaled by c_in, both guidance halves stacked when they run as one batch), the
    timestep and the text context, and returns the feed the U-Net runs on."""

    graphs: tuple[tuple[str, str], ...]

    def __call__(self, feed: Feed) -> Feed: ...


class MaskedPictureInput:
    """An inpainting U-Net's extra input channels: the latent-size mask and the masked picture's
    latent, concatenated after the latent (diffusers' ``num_channels_unet == 9`` branch)."""

    graphs: tuple[tuple[str, str], ...] = ()

    def __init__(self, mask_latent: np.ndarray, masked_latent: np.ndarray):
        self.mask_latent, self.masked_latent = mask_latent, masked_latent

    def __call__(self, feed: Feed) -> Feed:
        x_in = feed["sample"]
        repeat = x_in.shape[0] // self.masked_latent.shape[0]
        sample = np.concatenate([x_in, np.broadcast_to(self.mask_latent, (x_in.shape[0], 1, *x_in.shape[2:])),
                                 np.concatenate([self.masked_latent] * repeat)], axis=1)
        return {**feed, "sample": sample}


def to_model_pixels(image: Image.Image) -> np.ndarray:
    """A picture as the VAE encoder takes it: (1, 3, h, w) float32 in [-1, 1]."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0


class Txt2Img:
    """Start from noise at the plan's initial sigma."""

    encodes = False
    takes_strength = True  # a picture's strength cuts the plan (img2img); InstructPix2Pix's does not
    providers: tuple[UNetInputProvider, ...] = ()  # a mode that adds one sets its own tuple

    def graphs(self, text_encoders: list[str]) -> list[tuple[str, str]]:
        encoder = [("vae_encoder", "pixels")] if self.encodes else []
        unet = [("unet", "latent")] + [g for provider in self.providers for g in provider.graphs]
        return [(name, "text") for name in text_encoders] + encoder + unet + [("vae_decoder", "decode")]

    def encode(self, vae_encode: Callable[[np.ndarray], list]) -> None:
        pass

    def start(self, draw: Callable[[], np.ndarray], sample_latent, plan) -> np.ndarray:
        self.noise = draw()
        return self.noise * np.float32(plan.init_noise_sigma)

    def steer(self, denoise: Denoise, plan) -> Denoise:
        return denoise

    def condition(self, cond: Feed, uncond: Feed | None) -> tuple[Feed, Feed | None, dict]:
        """The guidance groups' contexts (cond, uncond) and runtime/denoiser.make_denoiser's extra
        keywords (InstructPix2Pix's third group)."""
        return cond, uncond, {}

    def guidance_groups(self, guided: bool) -> int:
        """How many groups ``condition`` makes: the U-Net's batch multiple (the memory plan's)."""
        return 2 if guided else 1

    def finish_latent(self, x: np.ndarray) -> np.ndarray:
        return x

    def finish_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return pixels


class Img2Img(Txt2Img):
    """Start from the picture's latent, noised to the sigma where ``strength`` of the steps remain."""

    encodes = True

    def __init__(self, image: Image.Image, prediction_type: str = "epsilon"):
        self.image = image
        self.prediction_type = prediction_type  # flow models noise as (1 - sigma) x0 + sigma noise

    def encode(self, vae_encode) -> None:
        self.moments = vae_encode(to_model_pixels(self.image))

    def start(self, draw, sample_latent, plan) -> np.ndarray:
        self.x0 = sample_latent(self.moments)  # diffusers: the posterior first, then the noise
        self.noise = draw()
        return noised(self.x0, self.noise, plan.sigmas[0], self.prediction_type)


class LatentImg2Img(Txt2Img):
    """Img2img from a latent given in sampler space (the hires fix's second pass after a latent
    upscale, runtime/hires.py): no VAE encoder; the latent is noised to the plan's first sigma
    as :class:`Img2Img` noises an encoded picture."""

    def __init__(self, x0: np.ndarray, prediction_type: str = "epsilon"):
        self.x0 = np.asarray(x0, dtype=np.float32)
        self.prediction_type = prediction_type  # flow models noise as (1 - sigma) x0 + sigma noise

    def start(self, draw, sample_latent, plan) -> np.ndarray:
        self.noise = draw()
        return noised(self.x0, self.noise, plan.sigmas[0], self.prediction_type)


class BlendInpaint(Img2Img):
    """Inpainting with a U-Net that has no mask inputs: the known region is put back, noised to
    the current sigma, before every model call (inpaint.keep_known), and is the picture's own
    latent at the end; a blurred mask blends the result over the picture. Flow models noise the
    known region with flow's forward process (diffusers' ``StableDiffusion3InpaintPipeline``)."""

    def __init__(self, image: Image.Image, mask: Mask, strength: float, prediction_type: str = "epsilon"):
        super().__init__(image, prediction_type)
        self.mask, self.full_strength = mask, strength == 1.0

    def start(self, draw, sample_latent, plan) -> np.ndarray:
        x = super().start(draw, sample_latent, plan)
        return self.noise * np.float32(plan.init_noise_sigma) if self.full_strength else x

    def steer(self, denoise: Denoise, plan) -> Denoise:
        forward = lambda x0, noise, sigma: noised(x0, noise, sigma, self.prediction_type)  # noqa: E731
        return keep_known(denoise, self.mask.latent, self.x0, self.noise, float(plan.sigmas[0]), forward)

    def finish_latent(self, x: np.ndarray) -> np.ndarray:  # as diffusers' last step
        return self.mask.latent * x + (np.float32(1.0) - self.mask.latent) * self.x0

    def finish_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return overlay(pixels, self.mask, self.image)


class InpaintUNet(Txt2Img):
    """An inpainting U-Net (``2 * latent_channels + 1`` input channels) sees the mask and the
    masked picture's latent at every step. Without a picture or a mask it repaints everything (as
    A1111). At full strength diffusers starts from noise and never encodes the picture itself."""

    encodes = True

    def __init__(self, image: Image.Image | None, mask: Mask, strength: float, size: tuple[int, int]):
        self.image, self.mask, self.size = image, mask, size
        self.need_x0 = image is not None and strength != 1.0

    def encode(self, vae_encode) -> None:
        width, height = self.size
        pixels = to_model_pixels(self.image) if self.image is not None else np.zeros((1, 3, height, width), np.float32)
        self.moments = vae_encode(pixels) if self.need_x0 else None
        self.masked_moments = vae_encode(masked_pixels(pixels, self.mask))

    def start(self, draw, sample_latent, plan) -> np.ndarray:
        x0 = sample_latent(self.moments) if self.need_x0 else None
        self.noise = draw()
        self.providers = (*self.providers, MaskedPictureInput(self.mask.latent, sample_latent(self.masked_moments)))
        return x0 + self.noise * np.float32(plan.sigmas[0]) if self.need_x0 else \
            self.noise * np.float32(plan.init_noise_sigma)

    def finish_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return overlay(pixels, self.mask, self.image)


class PictureLatentInput:
    """InstructPix2Pix's extra channels: the picture's latent, concatenated after the latent. It
    arrives in the feed as ``picture_latent`` (a context entry, so each guidance group carries its
    own: zeros for the unconditional-picture group) and leaves it for the channels."""

    graphs: tuple[tuple[str, str], ...] = ()

    def __call__(self, feed: Feed) -> Feed:
        feed = dict(feed)
        picture = feed.pop("picture_latent")
        return {**feed, "sample": np.concatenate([feed["sample"], picture], axis=1)}


class InstructPix2Pix(Txt2Img):
    """A U-Net fed the picture's latent (``2 * latent_channels`` input channels), with text and
    picture guidance, as diffusers' ``StableDiffusionInstructPix2PixPipeline``: the picture's
    latent is the VAE posterior's mode, unscaled; sampling starts from noise; guidance runs three
    groups (text + picture, picture, neither) when guidance > 1 and image guidance >= 1."""

    encodes, takes_strength = True, False
    providers = (PictureLatentInput(),)

    def __init__(self, image: Image.Image, image_guidance: float):
        self.image, self.image_guidance = image, float(image_guidance)

    def encode(self, vae_encode) -> None:
        self.picture = vae_encode(to_model_pixels(self.image))[0]  # the mode: the mean, as diffusers' argmax

    def guidance_groups(self, guided: bool) -> int:
        return 3 if guided and self.image_guidance >= 1.0 else 1

    def condition(self, cond, uncond):
        cond = {**cond, "picture_latent": self.picture}
        if uncond is None or self.image_guidance < 1.0:
            return cond, None, {}
        return cond, {**uncond, "picture_latent": self.picture}, dict(
            image_uncond={**uncond, "picture_latent": np.zeros_like(self.picture)}, image_guidance=self.image_guidance)


# What a U-Net's extra input channels are, as data: channels = a * latent_channels + b.
UNET_INPUTS = {"inpainting": (2, 1), "instruct-pix2pix": (2, 0)}
DEFAULT_IMAGE_GUIDANCE = 1.5  # diffusers' StableDiffusionInstructPix2PixPipeline default


def unet_kind(unet_channels: int, latent_channels: int) -> str:
    """"inpainting", "instruct-pix2pix" or "plain" from the U-Net's declared ``sample`` channels."""
    return next((kind for kind, (a, b) in UNET_INPUTS.items() if unet_channels == a * latent_channels + b), "plain")


def overlay(pixels: np.ndarray, mask: Mask, image: Image.Image | None) -> np.ndarray:
    """A blurred mask: the result over the picture through it, so the seam is soft (A1111)."""
    if mask.overlay is None:
        return pixels
    return mask.overlay * pixels + (1.0 - mask.overlay) * (np.asarray(image, np.float32) / 255.0)


def choose_mode(request, manifest, unet_channels: int):
    """The mode for a checked request; None when an all-black mask leaves nothing to repaint."""
    m = manifest
    if m.upscale:  # the x4 upscaler (runtime/upscale.py); request.check required its picture
        from .upscale import Upscale

        return Upscale(request.image, request.noise_level, m.upscale, m.latent_multiple)
    kind = unet_kind(unet_channels, m.latent_channels)
    inpainting_unet = kind == "inpainting"
    if request.image_guidance is not None and kind != "instruct-pix2pix":
        raise EdgediffError("image guidance needs an InstructPix2Pix model (a U-Net fed the picture's latent); this "
                            f"model's U-Net takes {unet_channels} input channels")
    if kind == "instruct-pix2pix":
        if request.image is None or request.mask is not None or request.start_latent is not None:
            raise EdgediffError("this InstructPix2Pix model edits a picture: give it an image (--image) and no mask")
        if "vae_encoder" not in m.graphs:
            raise EdgediffError("this model has no vae_encoder graph, which InstructPix2Pix needs: re-export it")
        guidance = DEFAULT_IMAGE_GUIDANCE if request.image_guidance is None else request.image_guidance
        return InstructPix2Pix(request.image, guidance)
    image, size = request.image, (request.width, request.height)
    if (image is not None or inpainting_unet) and "vae_encoder" not in m.graphs:
        what = "inpainting" if inpainting_unet or request.mask is not None else "img2img"
        raise EdgediffError(f"this model has no vae_encoder graph, which {what} needs: re-export it with this "
                            "version of edgediff")
    if request.start_latent is not None:
        if inpainting_unet:
            raise EdgediffError("an inpainting model cannot start from an upscaled latent; use a pixel hires "
                                "upscaler (lanczos)")
        return LatentImg2Img(request.start_latent, m.prediction_type)
    mask = None
    if request.mask is not None:
        mask = prepare_mask(request.mask, request.original_image.size, size, m.vae_scale_factor,
                            blur=request.mask_blur, invert=request.mask_invert)
        if mask.empty:
            return None
    elif inpainting_unet:  # txt2img / img2img on an inpainting model: repaint everything (as A1111)
        mask = prepare_mask(np.full((size[1], size[0]), 255, np.uint8), size, size, m.vae_scale_factor)
    if inpainting_unet:
        return InpaintUNet(image, mask, request.strength, size)
    if mask is not None:
        return BlendInpaint(image, mask, request.strength, m.prediction_type)
    return Img2Img(image, m.prediction_type) if image is not None else Txt2Img()
