"""Images that remember how they were made: AUTOMATIC1111's ``parameters`` infotext.

The text is what A1111 writes (``modules/processing.py: create_infotext``) so that the tools people
already use (A1111's PNG Info tab, sd-parsers, image browsers) open our images with their settings::

    a corgi on a beach
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, ...

PNGs carry it in a ``parameters`` tEXt chunk; JPEG and WebP in EXIF UserComment (tag 0x9286) as
``b"UNICODE\\0"`` + UTF-16-BE, which is what A1111 writes through piexif. ``Model hash`` is the first
10 hex digits of the U-Net graph's sha256 from the manifest (A1111 hashes the checkpoint file; an
exported model has no single file, and the U-Net is what tells two models apart).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import IO, Any, Mapping

from PIL import Image, PngImagePlugin

from .errors import EdgediffError

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_UNICODE = b"UNICODE\0"

# Our sampler names -> A1111's sampler labels. Samplers A1111 lacks keep a readable label that
# resolve_sampler() takes back. The schedule a name implies (dpmpp_2m_karras) goes to "Schedule type".
A1111_SAMPLERS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
    "lms": "LMS", "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m": "DPM++ 3M",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_2s_a": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE",
    "unipc": "UniPC", "lcm": "LCM", "deis": "DEIS", "tcd": "TCD",
}
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                   "beta": "Beta", "leading": "Leading", "linspace": "Linspace", "trailing": "Trailing"}
AUTOMATIC = "Automatic"  # A1111's "the sampler's own schedule"; ours: the model's configured spacing

# A1111's parameter regex and quoting (modules/infotext_utils.py).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NAME_SYMBOLS = str.maketrans("", "", ":,")


def sampler_label(sampler: str, schedule: str | None = None) -> tuple[str, str]:
    """(A1111 sampler label, A1111 schedule type) for one of our sampler names or aliases."""
    from .samplers import resolve_sampler

    name, implied = resolve_sampler(sampler)
    schedule = schedule or implied
    label = A1111_SAMPLERS.get(name, name)
    return label, A1111_SCHEDULES.get(schedule, schedule) if schedule else AUTOMATIC


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',\n:') else text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _version() -> str:
    from edgediff import __version__

    return f"edgediff {__version__}"


def infotext(params: Mapping[str, Any] | Any) -> str:
    """The A1111 ``parameters`` text for one image.

    ``params`` (a mapping or a dataclass) uses the pipeline's keyword names: prompt,
    negative_prompt, steps, guidance, sampler, schedule, seed, width, height; optional strength
    (img2img's denoising strength), image_guidance, noise_level, hires (a checked HiresFix), model_name,
    model_hash, loras (``[(name, weight, hash)]``, hash may be None), version (None leaves it out; default: this edgediff's version).
    """
    p = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
    sampler, schedule = sampler_label(p.get("sampler") or "dpmpp_2m_karras", p.get("schedule"))
    loras = [tuple(lora) + (None,) * (3 - len(lora)) for lora in p.get("loras") or ()]
    # As A1111's Lora extension writes it: names without ':' and ',', only LoRAs that have a hash.
    lora_hashes = ", ".join(f"{str(name).translate(_NAME_SYMBOLS)}: {h}" for name, _, h in loras if h)
    fields = {
        "Steps": p.get("steps"),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": None if p.get("guidance") is None else float(p["guidance"]),
        "Seed": p.get("seed"),
        "Size": f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else None,
        "Model hash": p.get("model_hash"),
        "Model": p.get("model_name"),
        "Denoising strength": p.get("strength"),
        "Image CFG scale": p.get("image_guidance"),  # InstructPix2Pix, as A1111 writes it
        "Noise level": p.get("noise_level"),  # the x4 upscaler's (edgediff's own field)
        **_hires_fields(p.get("hires")),
        "Lora hashes": lora_hashes or None,
        "Loras": ", ".join(f"{name}: {w:g}" for name, w, _ in loras) or None,
        # edgediff's own field, only when not A1111's reading, so --from-png reads the prompt alike
        "Prompt syntax": p.get("prompt_syntax") if p.get("prompt_syntax", "a1111") != "a1111" else None,
        **(p.get("control") or {}),  # "ControlNet N" entries (controlnet.infotext_fields)
        "Version": p.get("version", _version()),
    }
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    prompt = str(p.get("prompt") or "")
    negative = str(p.get("negative_prompt") or "")
    return f"{prompt}{chr(10) + 'Negative prompt: ' + negative if negative else ''}\n{line}".strip()


def _hires_fields(h: Any) -> dict[str, Any]:
    """A1111's hires fields (``sample_hr_pass``'s extra_generation_params) of a checked HiresFix."""
    if h is None:
        return {}
    resize = h.width or h.height
    return {"Hires upscale": None if resize else f"{h.scale:g}",
            "Hires resize": f"{h.target[0]}x{h.target[1]}" if resize else None,
            "Hires steps": h.steps or None, "Hires upscaler": h.label}


def _hires_kwargs(parsed: Mapping[str, str]) -> dict[str, Any] | None:
    """``hires=`` from an infotext's Hires fields (None without them)."""
    if "Hires upscale" not in parsed and "Hires resize-1" not in parsed:
        return None
    hires: dict[str, Any] = {"upscaler": parsed.get("Hires upscaler", "Latent")}
    for key, name, kind in (("Hires upscale", "scale", float), ("Hires steps", "steps", int),
                            ("Denoising strength", "strength", float), ("Hires resize-1", "width", int),
                            ("Hires resize-2", "height", int)):
        if key in parsed:
            try:
                hires[name] = kind(parsed[key])
            except ValueError:
                raise EdgediffError(f"bad {key!r} in the image's parameters: {parsed[key]!r}") from None
    return hires


def result_infotext(result: Any, index: int = 0, identity: Mapping[str, str] | None = None) -> str:
    """The infotext of image ``index`` of a pipeline Result, from the checked request that made it."""
    seed = result.seeds[index] if result.seeds else result.seed
    return request_infotext(result.request, result.images[index], index, seed, result.lora_files, identity)


def request_infotext(request: Any, image: Image.Image, index: int, seed: int | None,
                     lora_files: Any = (), identity: Mapping[str, str] | None = None) -> str:
    """The one place the CLI, the server and batch build an image's infotext: from the checked
    GenerationRequest (runtime/request.py), the image, its seed and the LoRA files applied
    [(name, weight, path)] (their A1111 short hashes go to ``Lora hashes``)."""
    r, hires = request, getattr(request, "hires", None)
    loras = [(name, weight, lora_hash(path) if Path(path).suffix.lower() == ".safetensors" else None)
             for name, weight, path in lora_files]
    return infotext(dict(prompt=r.prompt[index], negative_prompt=r.negatives[index], steps=r.steps,
                         guidance=r.guidance, sampler=r.sampler, schedule=r.schedule, seed=seed,
                         width=r.width if hires else image.width, height=r.height if hires else image.height,
                         strength=hires.strength if hires else r.strength if r.image is not None and
                         getattr(r, "noise_level", None) is None else None, noise_level=getattr(r, "noise_level", None),
                         image_guidance=getattr(r, "image_guidance", None), hires=hires, loras=loras,
                         prompt_syntax=r.prompt_syntax, control=_control_fields(r), **(identity or {})))


def _control_fields(request: Any) -> dict[str, str]:
    from .controlnet import infotext_fields

    return infotext_fields(getattr(request, "control", None))


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's ``parse_generation_parameters``: {"Prompt", "Negative prompt", "Steps", "Size-1",
    "Size-2", ...}, values as strings, quoted ones unquoted. Never raises on odd text."""
    result: dict[str, str] = {}
    prompt, negative, in_negative = [], [], False
    *lines, last = str(text).strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result["Prompt"], result["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    for key, value in _PARAM.findall(last):
        value = _unquote(value.strip())
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


def generation_kwargs(parsed: Mapping[str, str]) -> dict[str, Any]:
    """Pipeline keyword arguments from :func:`parse_infotext`'s result (only those present):
    prompt, negative_prompt, steps, guidance, sampler, schedule, seed, width, height, prompt_syntax,
    image_guidance, noise_level, hires (A1111's Hires fields)."""
    from .samplers import normalize_schedule

    kwargs: dict[str, Any] = {"prompt": parsed.get("Prompt", ""), "negative_prompt": parsed.get("Negative prompt", "")}
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int),
                            ("Size-1", "width", int), ("Size-2", "height", int),
                            ("Image CFG scale", "image_guidance", float), ("Noise level", "noise_level", int)):
        if key in parsed:
            try:
                kwargs[name] = kind(parsed[key])
            except ValueError:
                raise EdgediffError(f"bad {key!r} in the image's parameters: {parsed[key]!r}") from None
    if "Prompt syntax" in parsed:
        kwargs["prompt_syntax"] = parsed["Prompt syntax"]
    hires = _hires_kwargs(parsed)
    if hires is not None:
        kwargs["hires"] = hires
    if "Sampler" in parsed:
        kwargs["sampler"] = parsed["Sampler"]
        schedule = normalize_schedule(parsed.get("Schedule type"))  # "Automatic": the sampler's own
        if schedule:
            kwargs["schedule"] = schedule
    return kwargs


def model_identity(model_dir: str | Path, manifest: Any) -> dict[str, str]:
    """{"model_name": folder name, "model_hash": first 10 hex of the U-Net graph's sha256}."""
    unet = manifest.graphs.get("unet")
    identity = {"model_name": Path(model_dir).name}
    if unet is not None and unet.sha256:
        identity["model_hash"] = unet.sha256[:10]
    return identity


def lora_hash(path: str | Path) -> str:
    """A1111's short LoRA hash for ``Lora hashes``: the first 12 hex of the sha256 of a
    safetensors file's tensor bytes (kohya's "addnet" hash, which skips the JSON header)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def save_image(image: Image.Image, target: str | Path | IO[bytes], text: str | None = None,
               format: str | None = None) -> None:
    """Write ``image`` to a path or binary file, with ``text`` as A1111 stores it: a PNG
    ``parameters`` chunk, EXIF UserComment for JPEG/WebP; other formats get no metadata."""
    fmt = (format or Image.registered_extensions().get(Path(str(getattr(target, "name", target))).suffix.lower())
           or "PNG").upper()
    options: dict[str, Any] = {}
    if text is not None and fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        options["pnginfo"] = info
    elif text is not None and fmt in ("JPEG", "WEBP"):
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE + text.encode("utf-16-be")
        options["exif"] = exif.tobytes()
    if fmt == "JPEG":
        options["quality"] = 95
        image = image.convert("RGB")
    image.save(target, format=fmt, **options)


def read_infotext(source: str | Path | IO[bytes] | Image.Image) -> str | None:
    """The A1111 parameters text of an image (PNG text chunk or EXIF UserComment), or None."""
    if isinstance(source, Image.Image):
        return _infotext_of(source)
    with Image.open(source) as image:
        return _infotext_of(image)


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get("parameters")
    if isinstance(text, str):
        return text
    try:
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Exception:  # broken EXIF: no metadata rather than no image
        return None
    if isinstance(comment, str):
        return comment or None
    if not isinstance(comment, bytes) or not comment:
        return None
    prefix, body = comment[:8], comment[8:]
    if prefix == _UNICODE:
        # piexif (A1111) writes big-endian; some tools write little-endian: the one whose
        # text has its zero bytes where ASCII would put them wins.
        little = body[1::2].count(0) > body[0::2].count(0)
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace") or None
    if prefix.startswith(b"ASCII"):
        return body.decode("ascii", errors="replace") or None
    return comment.decode("utf-8", errors="replace") or None
