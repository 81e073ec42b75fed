"""Batch generation: check every job, skip the finished ones, run the rest here or on Ray.

The driver (this process) checks the jobs file, writes every PNG and every ``results.jsonl`` line;
workers (this process without Ray, Ray actors with it) only render, so the output folder never
has to be shared between machines.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import numpy as np

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.manifest import read_manifest
from edgediff.runtime.metadata import model_identity

from .jobs import Job, plan_jobs, read_jobs
from .output import OutputFolder, model_fingerprint
from .progress import Progress
from .work import GPU_PROVIDERS, Finish, ModelRef, describe_error, render, resolve_model

@dataclass
class Summary:
    out: Path
    jobs: int  # distinct jobs in the file
    skipped: int  # already complete before this run
    done: int
    failed: int
    seconds: float  # this run's work, worker start included

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        text = (f"wrote {self.done} images to {self.out} in {self.seconds:.1f} s "
                f"({self.images_per_second:.2f} images/s); {self.skipped} already complete")
        return text + (f"; {self.failed} failed (see results.jsonl)" if self.failed else "")


# Over ~60 lines by its keyword-only signature (the CLI's options); the body is check, plan, run, summarise.
def run_batch(jobs: str | Path | Iterable[dict], out: str | Path, *, model: str | Path | None = None,
              defaults: dict[str, Any] | None = None, provider: str = "auto", memory: str = "high",
              ray: str | None = None, workers: int | None = None, cpus_per_worker: float = 1.0,
              gpus_per_worker: float | None = None, ship_model: bool = False, retries: int = 2,
              progress: TextIO | bool = True, on_result: Callable[[dict], None] | None = None) -> Summary:
    """Render every job of ``jobs`` (a JSONL path or job dicts) into ``out``.

    ``ray=None`` renders in this process; ``ray=""`` starts a local Ray cluster and any other
    string is the address of one (``"auto"``: the running cluster). A job that fails is retried
    ``retries`` times, then recorded as failed; the batch goes on. ``on_result(entry)`` sees every
    ``results.jsonl`` entry as it is written.
    """
    label = str(jobs) if isinstance(jobs, (str, Path)) else "jobs"
    checked = read_jobs(jobs, defaults)  # every line is checked before anything starts
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise EdgediffError(f"retries must be a whole number >= 0, not {retries!r}")
    if ray is None:
        if workers not in (None, 1) or ship_model:
            raise EdgediffError("--workers and --ship-model need --ray (without it one process renders)")
        runner = LocalRunner(provider, memory, retries)
    else:
        from .ray_runner import RayRunner  # Ray is imported there, only when asked for

        runner = RayRunner(ray, workers=workers, cpus_per_worker=cpus_per_worker,
                           gpus_per_worker=gpus_per_worker, ship_model=ship_model, provider=provider,
                           memory=memory, retries=retries)
    with runner:
        path, precision = resolve_model(model, runner.gpu)
        manifest = read_manifest(path)
        model_ref = ModelRef(path, model_fingerprint(path), precision, model_identity(path, manifest))
        alphas = np.load(model_ref.path / manifest.alphas_cumprod) if manifest.alphas_cumprod else None  # flow: none
        planned = plan_jobs(checked, manifest, alphas, model_ref.fingerprint, label)
        with OutputFolder(Path(out)) as folder:
            todo = [job for job in planned if not folder.done(job)]
            stream = sys.stderr if progress is True else progress or None
            bar = Progress(len(todo), stream) if stream and todo else None
            counts = {"ok": 0, "failed": 0}

            def finish(job: Job, outcome: dict[str, Any]) -> None:
                entry = {"key": job.key, "line": job.line, "id": job.id, "file": job.filename,
                         "job": job.params, "seed": job.params["seed"], "attempts": outcome["attempts"],
                         "worker": outcome.get("worker"), "timings": outcome.get("timings", {})}
                if "png" in outcome:
                    try:
                        folder.write(job, outcome["png"])
                    except OSError as error:
                        outcome = {"error": f"cannot write {job.filename}: {error.strerror or error}"}
                entry["status"] = "failed" if "error" in outcome else "ok"
                entry["error"] = outcome.get("error")
                folder.record(entry)
                counts[entry["status"]] += 1
                if bar:
                    bar.update(entry["status"] == "ok")
                if on_result:
                    on_result(entry)

            started = time.perf_counter()
            if todo:
                runner.run(todo, model_ref, finish)
            return Summary(Path(out), len(planned), len(planned) - len(todo), counts["ok"], counts["failed"],
                           time.perf_counter() - started)


class LocalRunner:
    """One pipeline in this process, jobs one after another."""

    def __init__(self, provider: str, memory: str, retries: int):
        from edgediff.runtime.sessions import resolve_provider

        self.provider = provider
        self.memory = memory
        self.retries = retries
        self.gpu = resolve_provider(provider) in GPU_PROVIDERS

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, todo: list[Job], model: ModelRef, finish: Finish) -> None:
        from edgediff.runtime import Pipeline

        pipe = Pipeline.load(model.path, provider=self.provider, memory=self.memory)
        for job in todo:
            for attempt in range(1, self.retries + 2):
                try:
                    outcome = render(pipe, job, model.identity)
                    break
                except Exception as error:  # a failed job is recorded, never stops the batch
                    outcome = {"error": describe_error(error)}
            finish(job, {**outcome, "attempts": attempt, "worker": "local"})
