"""One generation at a time per loaded model, in a worker thread, others queued in arrival order.

The event loop only enqueues jobs and awaits their futures. Interrupt and client disconnects stop
the running job between steps: ``on_step`` raises, and the sampler unwinds.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgediff.runtime.errors import EdgediffError

log = logging.getLogger("edgediff.server")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


class _Stop(Exception):
    """Raised inside on_step to leave the sampler loop."""

    def __init__(self, latents: np.ndarray):
        self.latents = latents


@dataclass
class Job:
    """A request's images: ``calls`` holds one GenerationRequest per image.
    ``finish(outputs, interrupted)`` turns [(PIL image, Result or None if interrupted)] into the
    response, in the worker."""

    calls: list[Any]
    finish: Callable[[list, bool], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    interrupted: threading.Event = field(default_factory=threading.Event)
    abandoned: threading.Event = field(default_factory=threading.Event)  # the client went away
    image_no: int = 0
    step: int = 0
    steps: int = 0
    latents: np.ndarray | None = None
    started: float = 0.0
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    def abandon(self) -> None:
        self.abandoned.set()

    def _resolve(self, setter, value) -> None:
        def apply():
            if not self.future.done():
                setter(value)
        self.loop.call_soon_threadsafe(apply)


class Worker:
    """Owns the pipeline; runs queued jobs in arrival order on one thread."""

    def __init__(self, pipe, max_queue: int):
        self.pipe = pipe
        self.max_queue = max(1, max_queue)
        self._queue: collections.deque[Job] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self.current: Job | None = None
        self.completed = 0  # jobs answered with images, for /health and the load benchmark
        self._seconds_per_job = 1.0  # running mean, for Retry-After
        self._thread = threading.Thread(target=self._run, name="edgediff-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._ready:
            self._drop_abandoned()
            if len(self._queue) >= self.max_queue:
                raise QueueFull(max(1, round(self._seconds_per_job * (len(self._queue) + 1))))
            self._queue.append(job)
            self._ready.notify()

    def pending(self) -> int:
        with self._ready:
            return sum(not job.abandoned.is_set() for job in self._queue)

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.interrupted.set()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            for job in self._queue:
                job.abandon()
            self._ready.notify_all()
        self.interrupt()
        self._thread.join(timeout=30)

    def _drop_abandoned(self) -> None:
        self._queue = collections.deque(job for job in self._queue if not job.abandoned.is_set())

    def _next(self) -> Job | None:
        with self._ready:
            while True:
                self._drop_abandoned()  # queued requests of disconnected clients never run
                if self._closed:
                    return None
                if self._queue:
                    self.current = self._queue.popleft()
                    return self.current
                self._ready.wait()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            job.started = time.perf_counter()
            try:
                images, interrupted = self._generate(job)
                if job.abandoned.is_set():
                    job._resolve(job.future.set_exception, _Abandoned())
                else:
                    response = job.finish(images, interrupted)
                    self.completed += 1  # before the client can read its answer
                    job._resolve(job.future.set_result, response)
            except Exception as error:  # handed to the request; EdgediffError is the client's
                if not isinstance(error, EdgediffError):
                    log.exception("generation failed")
                job._resolve(job.future.set_exception, error)
            finally:
                elapsed = time.perf_counter() - job.started
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed
                self.current = None

    def _generate(self, job: Job) -> tuple[list, bool]:
        outputs = []

        def on_step(step, steps, latents):
            job.step, job.steps, job.latents = step, steps, latents
            if job.interrupted.is_set() or job.abandoned.is_set():
                raise _Stop(latents)

        for job.image_no, call in enumerate(job.calls):
            job.step, job.steps, job.latents = 0, call.steps, None
            try:
                result = self.pipe(**dict(call.kwargs(), on_step=on_step))
                outputs.append((result.images[0], result))
            except _Stop as stop:
                if not job.abandoned.is_set():  # A1111 returns what the run had reached
                    outputs.append((self.pipe.decode(stop.latents)[0][0], None))
                return outputs, True
        return outputs, False


class _Abandoned(Exception):
    """The client disconnected; nobody reads this job's result."""
