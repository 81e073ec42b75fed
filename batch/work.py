"""What the driver and every worker share: the model reference, rendering one job, error lines.

runner.py (the driver, and the worker without Ray) and ray_runner.py (Ray actors) both import this
module; neither imports the other at module level, so batch/ has no import cycle.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.metadata import result_infotext
from edgediff.runtime.request import default_model

from .jobs import Job, to_request
from .output import encode_png

GPU_PROVIDERS = ("cuda", "tensorrt", "dml")
Finish = Callable[[Job, dict[str, Any]], None]


@dataclass(frozen=True)
class ModelRef:
    """Where workers find the model: ``path`` on a shared filesystem, or the shipped default
    model of ``default_precision`` inside each worker's own install."""

    path: Path
    fingerprint: str
    default_precision: str | None = None
    identity: dict[str, str] = field(default_factory=dict)  # model_name, model_hash for the infotext


def resolve_model(model: str | Path | None, gpu: bool) -> tuple[Path, str | None]:
    """The model folder as the driver sees it, and the precision when it is the shipped default
    (runtime.request.default_model, the one choice Pipeline.load makes too)."""
    if model is not None:
        return Path(model).resolve(), None
    return default_model(gpu)


def render(pipe, job: Job, model: dict[str, str]) -> dict[str, Any]:
    """One job on a loaded pipeline: its PNG bytes (metadata included) and the stage timings."""
    started = time.perf_counter()
    result = pipe.generate(to_request(job.params))
    png = encode_png(result.images[0], job, result_infotext(result, 0, model))
    timings = {stage: round(seconds, 4) for stage, seconds in result.timings.items()}
    timings["job"] = round(time.perf_counter() - started, 4)
    return {"png": png, "timings": timings}


def describe_error(error: BaseException) -> str:
    """One line for results.jsonl: the error's type and first line, plus where a bug raised it."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, EdgediffError):
        return message
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {message}{where}"
