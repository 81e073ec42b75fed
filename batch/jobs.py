"""Jobs files: one JSON object per line, checked in full before any work starts.

A job names what to draw (``prompt``, ``negative``, ``seed``, ``steps``, ``sampler``, ``schedule``,
``width``, ``height``, ``guidance``) and may carry an ``id``; missing fields take the batch's
defaults. Optional fields, passed as given to the request: ``hires`` (the hires fix's dict, as
``pipe(hires=...)``), ``image`` (a picture file, relative to the jobs file's folder: img2img, or
the picture an InstructPix2Pix model edits or an x4 upscaler enlarges), ``image_guidance`` and
``noise_level``. Every problem is reported as
``FILE:LINE: what is wrong``.

A job without a seed gets one derived from the job itself (a hash of its fields after defaults,
its id, and how many identical seedless jobs came before it), so a re-run, a run on Ray and a run
without Ray draw the same image, and two identical seedless lines still draw two images; a
negative seed (A1111's "random") is seedless. Every value is checked by the runtime's request
(runtime/request.py), so a job line and a ``pipe(...)`` call get the same message.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edgediff.runtime.arguments import is_whole
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.manifest import Manifest
from edgediff.runtime.request import DEFAULT_SAMPLER, GenerationRequest
from edgediff.runtime.flow import make_model_plan
from edgediff.runtime.samplers import resolve_sampler

FIELDS = ("id", "prompt", "negative", "seed", "steps", "sampler", "schedule", "width", "height", "guidance")
# SD 3/3.5 switches ("on"/"off"; true/false or a settings object): in a job only where given, so the
# keys and derived seeds of jobs without them stay what they were.
OPTIONAL = ("t5", "skip_layer_guidance", "hires", "image", "image_guidance", "noise_level")
# hires, image (a file, relative to the jobs file; its content keys the output), image_guidance,
# noise_level (an x4 upscaler's): likewise.
DEFAULTS: dict[str, Any] = {"negative": "", "steps": 20, "sampler": DEFAULT_SAMPLER, "schedule": None,
                            "width": None, "height": None, "guidance": 7.5}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class JobsFileError(EdgediffError):
    """A jobs file (or a default for its jobs) that cannot be run as written."""


@dataclass(frozen=True)
class Job:
    """One checked job. ``params`` are exactly the pipeline's keyword arguments (plus the prompts)."""

    line: int
    id: str | None
    params: dict[str, Any]  # prompt, negative, seed, steps, sampler, schedule, width, height, guidance (+ OPTIONAL)
    key: str  # hash of params, id and the model: names the output and proves it complete

    @property
    def filename(self) -> str:
        return f"{self.id}-{self.key[:8]}.png" if self.id else f"{self.key}.png"


def read_jobs(source: str | Path | Iterable[dict], defaults: dict[str, Any] | None = None) -> list[dict]:
    """Parse and check a jobs file (or a list of job dicts); return jobs with defaults applied and
    seeds resolved, still independent of any model. Raises JobsFileError naming the line."""
    defaults = check_defaults(defaults or {})
    if isinstance(source, (str, Path)):
        label, rows, folder = str(source), _lines(Path(source)), Path(source).parent
    else:
        label, rows, folder = "jobs", ((number, raw) for number, raw in enumerate(source, 1)), Path()
    jobs, seen = [], {}
    for number, raw in rows:
        try:
            job = _check_job(raw, defaults, folder)
        except JobsFileError as error:
            raise JobsFileError(f"{label}:{number}: {error}") from None
        if job["seed"] is None:  # the n-th identical seedless job gets the n-th derived seed
            identity = _canonical(job)
            seen[identity] = seen.get(identity, -1) + 1
            job["seed"] = derived_seed(job, seen[identity])
        jobs.append({"line": number, **job})
    if not jobs:
        raise JobsFileError(f"{label}: no jobs in it")
    return jobs


def plan_jobs(jobs: list[dict], manifest: Manifest, alphas_cumprod, model_fingerprint: str,
              label: str = "jobs") -> list[Job]:
    """Resolve sizes against the model, check sampler plans, and key each job to its output.

    Jobs with the same key (same params, id and model) are one output: the first line wins."""
    planned, keys, checked_plans = [], set(), set()
    for raw in jobs:
        params = {name: raw[name] for name in (*FIELDS, *OPTIONAL) if name != "id" and name in raw}
        try:
            checked = to_request(params).check(manifest)  # the model's rules: size multiple, step limit
            params["width"], params["height"] = checked.width, checked.height
            plan_key = (params["sampler"], params["schedule"], params["steps"])
            if plan_key not in checked_plans:
                make_model_plan(manifest, alphas_cumprod, params["sampler"], params["steps"],
                                schedule=params["schedule"], strength=1.0,
                                latent_size=(checked.height // manifest.vae_scale_factor,
                                             checked.width // manifest.vae_scale_factor))
                checked_plans.add(plan_key)
        except EdgediffError as error:
            raise JobsFileError(f"{label}:{raw['line']}: {error}") from None
        keyed = {**params, "image": _file_digest(params["image"])} if "image" in params else params  # its content
        key = _digest({"params": keyed, "id": raw["id"], "model": model_fingerprint})[:16]
        if key not in keys:
            keys.add(key)
            planned.append(Job(line=raw["line"], id=raw["id"], params=params, key=key))
    return planned


def derived_seed(job: dict, occurrence: int = 0) -> int:
    """The seed of a seedless job: 32 bits of a hash of its fields, id and occurrence number."""
    return int(_digest({"job": _canonical(job), "n": occurrence})[:8], 16)


def check_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """Batch-wide defaults (from the command line), checked like a job's fields."""
    unknown = sorted(set(defaults) - set(DEFAULTS))
    if unknown:
        raise JobsFileError(f"no default for field {unknown[0]!r}; defaults exist for {', '.join(DEFAULTS)}")
    merged = dict(DEFAULTS)
    for name, value in defaults.items():
        if value is None and name not in ("schedule", "width", "height"):
            continue
        try:
            if name == "negative":
                _text("negative", value)
            to_request({"prompt": "", name: value}).check_fields()
        except EdgediffError as error:
            raise JobsFileError(f"default {name}: {error}") from None
        merged[name] = value
    return merged


def to_request(job: dict[str, Any]) -> GenerationRequest:
    """A job's fields as the runtime's request (runtime/request.py holds every value rule)."""
    names = {"negative": "negative_prompt"}
    return GenerationRequest(**{names.get(name, name): value for name, value in job.items()
                                if name not in ("id", "line")})


def _lines(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobsFileError(f"jobs file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise JobsFileError(f"cannot read jobs file {path}: {error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise JobsFileError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None


def _check_job(raw: Any, defaults: dict[str, Any], folder: Path = Path()) -> dict[str, Any]:
    """The jobs-file format (an object of known fields, one prompt as a string, an id that names a
    file, a picture as a file name) here; every value rule is the request's."""
    if not isinstance(raw, dict):
        raise JobsFileError(f"a job must be a JSON object, not {type(raw).__name__}")
    unknown = [name for name in raw if name not in (*FIELDS, *OPTIONAL)]
    if unknown:
        raise JobsFileError(f"unknown field {unknown[0]!r}; a job has {', '.join((*FIELDS, *OPTIONAL))}")
    if "prompt" not in raw:
        raise JobsFileError("the job has no 'prompt'")
    job = {name: raw.get(name, defaults.get(name)) for name in FIELDS}
    job.update((name, raw[name]) for name in OPTIONAL if raw.get(name) is not None)
    if "image" in job:
        _text("image", job["image"])
        job["image"] = str((folder / job["image"]).resolve())
        if not Path(job["image"]).is_file():
            raise JobsFileError(f"image file not found: {job['image']}")
    job["id"] = None if job["id"] is None else _id(job["id"])
    for name in ("prompt", "negative"):
        _text(name, job[name])
    if is_whole(job["seed"]) and job["seed"] < 0:
        job["seed"] = None  # "random" in a batch: the job's derived seed, so a re-run draws the same
    try:
        request = to_request(job).check_fields()
        # Canonical names, so that aliases of one sampler ("DPM++ 2M Karras") are one job and one seed.
        job["sampler"], implied = resolve_sampler(job["sampler"])
    except EdgediffError as error:
        raise JobsFileError(str(error)) from None
    job.update(steps=request.steps, guidance=request.guidance, schedule=request.schedule or implied)
    return job


def _text(name: str, value) -> None:
    if not isinstance(value, str):
        raise JobsFileError(f"{name} must be a string, not {json.dumps(value)}")


def _id(value):
    value = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise JobsFileError(f"id must be 1-64 letters, digits, '.', '_' or '-' (it names the file), "
                            f"not {json.dumps(value)}")
    return value


def _canonical(job: dict) -> str:
    return json.dumps({name: job[name] for name in (*FIELDS, *OPTIONAL) if name != "seed" and name in job},
                      sort_keys=True)


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
