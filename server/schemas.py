"""Request and response bodies as AUTOMATIC1111's API spells them (``modules/api/models.py``).

Only the fields edgediff acts on are declared; any other field an A1111 client sends is accepted
and ignored (``extra="allow"``), as A1111 ignores what its scripts do not use. Bounds that depend
on the server's configuration (size, steps, batch) are checked in generation.py against its Limits.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

_FINITE = dict(allow_inf_nan=False)
MAX_SEED = 2**63 - 1


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Txt2ImgRequest(_Open):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: a random seed, reported back in `info`")
    sampler_name: Optional[str] = Field(None, description="A1111 label or edgediff name; see /sdapi/v1/samplers")
    sampler_index: Optional[str] = Field(None, description="deprecated A1111 spelling of sampler_name")
    scheduler: Optional[str] = Field(None, description="schedule type; see /sdapi/v1/schedulers")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(20, ge=1)
    cfg_scale: float = Field(7.0, ge=0, le=100, **_FINITE)
    width: Optional[int] = Field(None, ge=1, description="default: the model's native size")
    height: Optional[int] = Field(None, ge=1)
    send_images: bool = True
    prompt_syntax: str = Field("a1111", description="edgediff's extension: a1111 (emphasis weights, BREAK, long "
                                                    "prompts) or plain (the prompt read literally, as diffusers)")
    # edgediff's SD 3/3.5 extensions (runtime/text_conditioning.py, runtime/flow.py); other models refuse them
    t5: Optional[str] = Field(None, description='SD 3/3.5: "on" or "off" (zeros in T5\'s place); default: on '
                                                "where the model has T5")
    skip_layer_guidance: Optional[bool | dict[str, Any]] = Field(
        None, description="SD 3.5: true for the model's recommended skip-layer guidance, or {layers, scale, start, "
                          "stop}; default off")
    # A1111's hires fix (txt2img only; ranges are the runtime's, runtime/hires.py)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, **_FINITE)
    hr_upscaler: Optional[str] = Field(None, description="Latent, Latent (bicubic), ..., Lanczos; default Latent")
    hr_second_pass_steps: int = Field(0, description="0: the first pass's steps")
    hr_resize_x: int = Field(0, description="0: from hr_scale")
    hr_resize_y: int = 0
    denoising_strength: float = Field(0.75, gt=0, le=1, **_FINITE, description="the hires fix's second pass")


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., min_length=1, description="base64 images (data: URLs accepted)")
    denoising_strength: float = Field(0.75, gt=0, le=1, **_FINITE)
    mask: Optional[str] = Field(None, description="base64 mask, white repaints (needs inpainting support)")
    mask_blur: Optional[int] = Field(None, description="pixels; bounds as the runtime's mask_blur")
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    image_cfg_scale: Optional[float] = Field(None, description="InstructPix2Pix models: the picture's guidance "
                                                               "(A1111's field); default 1.5")
    noise_level: Optional[int] = Field(None, description="edgediff's extension, x4 upscaler models: noise added to "
                                                         "the picture (0 to the model's max_noise_level); default 20")
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs carrying the A1111 `parameters` text")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seed, all_seeds, infotexts, prompt, ... as A1111's")


class PngInfoRequest(BaseModel):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: Optional[str]
    sha256: Optional[str]
    filename: str
    config: Optional[str] = None


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: Optional[str] = Field(None, description="a small false-colour view of the current latent")
    textinfo: Optional[str] = None


def bounded(model: type[BaseModel], *, multiple: int, max_side: int, max_steps: int, max_images: int) -> type[BaseModel]:
    """``model`` with this server's limits in its fields, so /openapi.json (and /docs) tell
    clients, and the fuzzer, what the server takes."""
    side = dict(ge=multiple, le=max_side, multiple_of=multiple)
    return create_model(
        model.__name__, __base__=model,
        width=(Optional[int], Field(None, description="default: the model's native size", **side)),
        height=(Optional[int], Field(None, **side)),
        steps=(int, Field(20 if max_steps >= 20 else max_steps, ge=1, le=max_steps)),
        batch_size=(int, Field(1, ge=1, le=max_images)),
        n_iter=(int, Field(1, ge=1, le=max_images)),
    )
