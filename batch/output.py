"""The output folder: one PNG per job, written atomically, and ``results.jsonl``.

A PNG carries A1111's ``parameters`` infotext (so PNG Info tabs and image browsers read it) and its
job (key and parameters) in an ``edgediff-job`` chunk; a re-run counts a job as done only when its
file decodes and names the same key, so a torn write or a stale file is redone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.manifest import MANIFEST_NAME

from .jobs import Job

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

JOB_CHUNK = "edgediff-job"
RESULTS = "results.jsonl"
_TMP = ".tmp"


def encode_png(image: Image.Image, job: Job, text: str) -> bytes:
    """The PNG bytes of one job's image (made on the worker). ``text``: its infotext
    (metadata.result_infotext, with the driver's model name and hash, so the bytes do not depend
    on where a worker found its copy of the model)."""
    info = PngImagePlugin.PngInfo()
    # The same ``parameters`` chunk as metadata.save_image writes, next to the job's own.
    info.add_text("parameters", text)
    info.add_text(JOB_CHUNK, json.dumps({"key": job.key, "id": job.id, "params": job.params}, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_complete(path: Path, key: str) -> bool:
    """True when ``path`` is a whole PNG written for the job ``key``."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every row: a truncated file fails here
            recorded = json.loads(image.text.get(JOB_CHUNK, "{}"))
    except (OSError, ValueError, SyntaxError):
        return False
    return isinstance(recorded, dict) and recorded.get("key") == key


def model_fingerprint(model_dir: Path) -> str:
    """Identifies a model export: its manifest names every graph's sha256."""
    try:
        return hashlib.sha256((Path(model_dir) / MANIFEST_NAME).read_bytes()).hexdigest()[:16]
    except OSError as error:
        raise EdgediffError(f"cannot read the model's manifest in {model_dir}: {error.strerror or error}") from None


class OutputFolder:
    """The batch's folder, locked for one run at a time; results are appended as jobs finish."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".lock", "w")
        except OSError as error:
            raise EdgediffError(f"cannot write to {self.path}: {error.strerror or error}") from None
        try:
            _lock(self._lock)
        except OSError:
            self._lock.close()
            raise EdgediffError(f"another batch is writing to {self.path}") from None
        for stale in self.path.glob(f".*.png.*{_TMP}"):  # left by a run that was killed mid-write
            stale.unlink(missing_ok=True)
        self._results = open(self.path / RESULTS, "a+b")
        if self._results.tell():
            self._results.seek(-1, os.SEEK_END)
            if self._results.read(1) != b"\n":
                self._results.write(b"\n")  # a killed run's torn last line stays on its own line

    def done(self, job: Job) -> bool:
        return is_complete(self.path / job.filename, job.key)

    def write(self, job: Job, png: bytes) -> None:
        write_atomic(self.path / job.filename, png)

    def record(self, entry: dict[str, Any]) -> None:
        self._results.write((json.dumps(entry, sort_keys=True) + "\n").encode())
        self._results.flush()

    def close(self) -> None:
        self._results.close()
        self._lock.close()

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(handle) -> None:
    """An exclusive lock held while the handle is open; OSError when another process has it."""
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        import msvcrt

        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
