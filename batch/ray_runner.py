"""The Ray runner: a pool of actors, each holding one loaded Pipeline; the driver deals out jobs.

Ray is imported here only, and only when a batch asks for it (the ``ray`` extra). Each actor loads
the model once, then renders job after job; the driver keeps two jobs queued per actor so that an
actor never waits for the driver between jobs. An actor that dies (killed, out of memory, crashed)
costs the job it was running one attempt; its queued jobs go back to the queue for free, and a
fresh actor takes its place (at most once per worker on average).
"""
from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgediff.runtime.errors import EdgediffError, ModelFolderError
from edgediff.runtime.manifest import MANIFEST_NAME

from .jobs import Job
from .output import model_fingerprint
from .work import GPU_PROVIDERS, Finish, ModelRef, describe_error, render

NAMESPACE = "edgediff-batch"  # actors are named <run>-<n> in it, for `ray list actors` and tests
DEPTH = 2  # jobs queued per actor: one running, one waiting
START_TIMEOUT = 600.0  # seconds for the first actor to load the model (placement included)
SKIP_SHIPPING = ("tensorrt_cache",)  # TensorRT engines belong to one GPU model: each node builds its own


def import_ray():
    try:
        import ray
    except ImportError:
        raise EdgediffError("--ray needs Ray, which is not installed: pip install 'edgediff[ray]'") from None
    return ray


class BatchWorker:
    """Lives in a Ray actor: one Pipeline, loaded once, rendering one job per call."""

    def __init__(self, model: dict[str, Any], provider: str, memory: str, threads: int | None):
        from edgediff.runtime import Pipeline

        path = materialize(model)
        self.identity = model["identity"]
        self.fingerprint = model_fingerprint(path)
        self.pipe = Pipeline.load(path, provider=provider, memory=memory, threads=threads)

    def ready(self) -> dict[str, Any]:
        import ray

        return {"fingerprint": self.fingerprint, "provider": self.pipe.provider, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    def render(self, job: Job) -> dict[str, Any]:
        return render(self.pipe, job, self.identity)


def materialize(model: dict[str, Any]) -> Path:
    """The model folder on this node: the shared path, the shipped default model of this install,
    or (``--ship-model``) the files from the object store, written once per node into a cache."""
    if model["files"] is None:
        if model["precision"]:
            from edgediff.models import default_model_dir

            return default_model_dir(model["precision"])
        path = Path(model["path"])
        if not (path / MANIFEST_NAME).is_file():
            raise ModelFolderError(f"model folder {path} not found on this Ray node; give a path every node "
                                   "shares, or --ship-model")
        return path
    import ray

    root = Path(os.environ.get("EDGEDIFF_MODEL_CACHE") or Path(tempfile.gettempdir()) / "edgediff-models")
    target = root / model["fingerprint"]
    if (target / MANIFEST_NAME).is_file():
        return target  # another actor on this node wrote it already
    staging = root / f".{model['fingerprint']}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    # The manifest goes last: as in an export, its presence means the folder is complete.
    for relative in sorted(model["files"], key=lambda name: name == MANIFEST_NAME):
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(ray.get(model["files"][relative]))
    try:
        staging.rename(target)
    except OSError:  # lost the race to an actor next door: its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class _Slot:
    name: str
    actor: Any
    ready: bool = False
    dead: bool = False
    inflight: list = field(default_factory=list)  # object refs in submission order


@dataclass
class _Task:
    job: Job
    attempts: int = 0
    error: str | None = None


class RayRunner:
    def __init__(self, address: str, *, workers: int | None, cpus_per_worker: float, gpus_per_worker: float | None,
                 ship_model: bool, provider: str, memory: str, retries: int):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise EdgediffError(f"workers must be a whole number >= 1, not {workers!r}")
        if not cpus_per_worker > 0 or (gpus_per_worker is not None and not gpus_per_worker >= 0):
            raise EdgediffError("cpus per worker must be > 0 and GPUs per worker >= 0")
        self.ray = import_ray()
        self.address = address
        self.workers = workers
        self.cpus = float(cpus_per_worker)
        self.gpus = gpus_per_worker
        self.ship_model = ship_model
        self.provider = provider
        self.memory = memory
        self.retries = retries
        self.owns = False
        self.slots: list[_Slot] = []
        self.gpu = provider in GPU_PROVIDERS

    def __enter__(self) -> "RayRunner":
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address or None, logging_level="WARNING",
                         include_dashboard=None if self.address else False)
            except Exception as error:  # ConnectionError, ValueError, RuntimeError, depending on the cause
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
                raise EdgediffError(f"cannot start or reach {where}: {_first_line(error)}") from None
            self.owns = True
        try:
            self._size_pool(ray.cluster_resources())
        except BaseException:
            self.__exit__()
            raise
        return self

    def _size_pool(self, resources: dict[str, float]) -> None:
        if self.gpus is None:  # a GPU per actor where the cluster has them and the provider can use one
            wants_gpu = self.provider in ("cuda", "tensorrt") or (self.provider == "auto" and resources.get("GPU", 0) > 0)
            self.gpus = 1.0 if wants_gpu else 0.0
        self.gpu = self.gpu or self.gpus > 0
        if self.workers is None:
            per = ("GPU", self.gpus) if self.gpus else ("CPU", self.cpus)
            self.workers = max(1, int(resources.get(per[0], 0) // per[1]))
        short = [f"{self.workers} x {need:g} {kind} (the cluster has {resources.get(kind, 0):g})"
                 for kind, need in (("CPU", self.cpus), ("GPU", self.gpus))
                 if need and self.workers * need > resources.get(kind, 0) + 1e-9]
        if short:
            message = f"{self.workers} Ray workers do not fit: {'; '.join(short)}; use fewer --workers"
            if self.owns and not self.address:
                raise EdgediffError(message)
            print(f"edgediff: {message} (waiting for the cluster to grow)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for slot in self.slots:
            if not slot.dead:
                self.ray.kill(slot.actor)
        self.slots = []
        if self.owns:
            self.ray.shutdown()
            self.owns = False

    # One driver loop that owns Ray's futures, retries and the finish callback together; split, each part
    # would need all of that state.
    def run(self, todo: list[Job], model: ModelRef, finish: Finish) -> None:
        ray = self.ray
        spec = {"path": str(model.path), "precision": model.default_precision,
                "fingerprint": model.fingerprint, "identity": model.identity, "files": self._ship(model.path) if self.ship_model else None}
        worker = ray.remote(BatchWorker)
        run_id, numbers = uuid.uuid4().hex[:8], itertools.count()
        threads = None if self.gpus else max(1, int(self.cpus))  # a CPU actor uses the cores Ray gave it
        waiting: dict[Any, tuple[str, _Slot, _Task | None]] = {}

        def spawn() -> None:
            name = f"{run_id}-{next(numbers)}"
            actor = worker.options(name=name, namespace=NAMESPACE, num_cpus=self.cpus, num_gpus=self.gpus,
                                   max_restarts=0).remote(spec, self.provider, self.memory, threads)
            slot = _Slot(name, actor)
            self.slots.append(slot)
            waiting[actor.ready.remote()] = ("ready", slot, None)

        for _ in range(self.workers):
            spawn()
        replacements = self.workers
        queue = deque(_Task(job) for job in todo)
        started_any, deadline, last_error = False, time.monotonic() + START_TIMEOUT, None

        def charge(task: _Task, error: str) -> bool:
            """Count a failed attempt; True when the job may run again."""
            task.attempts += 1
            task.error = error
            if task.attempts > self.retries:
                finish(task.job, {"error": error, "attempts": task.attempts})
                return False
            return True

        while queue or any(kind == "job" for kind, _, _ in waiting.values()):
            for slot in self.slots:
                while slot.ready and not slot.dead and len(slot.inflight) < DEPTH and queue:
                    task = queue.popleft()
                    ref = slot.actor.render.remote(task.job)
                    slot.inflight.append(ref)
                    waiting[ref] = ("job", slot, task)
            if not waiting:  # every actor died and none may replace them
                for task in queue:
                    finish(task.job, {"error": task.error or f"no Ray worker left ({last_error})",
                                      "attempts": task.attempts})
                return
            timeout = None if started_any else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
            if not ready:
                raise EdgediffError(f"no Ray worker started within {START_TIMEOUT:.0f} s (cluster resources: "
                                    f"{ray.available_resources()})")
            kind, slot, task = waiting.pop(ready[0])
            if kind == "ready":
                try:
                    info = ray.get(ready[0])
                except ray.exceptions.RayError as error:
                    slot.dead = True
                    last_error = _ray_error(error)
                    if not started_any and all(s.dead for s in self.slots):
                        raise EdgediffError(f"the Ray workers could not load the model: {last_error}") from None
                    print(f"edgediff: a Ray worker could not start: {last_error}", file=sys.stderr)
                    continue
                if info["fingerprint"] != model.fingerprint:
                    raise EdgediffError(f"the model at {model.path} on Ray node {info['node'][:12]} differs from "
                                        "the driver's; give a path every node shares, or --ship-model")
                slot.ready = started_any = True
                continue
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayActorError as error:
                last_error = _ray_error(error)
                again = self._lost(slot, ready[0], task, waiting, finish, charge,
                                   f"Ray worker {slot.name} died: {last_error}")
                queue.extendleft(reversed(again))
                if replacements:
                    replacements -= 1
                    spawn()
                continue
            except ray.exceptions.RayError as error:
                slot.inflight.remove(ready[0])
                if charge(task, _ray_error(error)):
                    queue.appendleft(task)
                continue
            slot.inflight.remove(ready[0])
            finish(task.job, {**outcome, "attempts": task.attempts + 1, "worker": slot.name})

    def _lost(self, slot: _Slot, died: Any, died_task: _Task, waiting: dict, finish: Finish, charge,
              error: str) -> list[_Task]:
        """An actor died: keep what it finished, charge the job it was running, requeue the rest."""
        slot.dead = True
        refs = list(slot.inflight)  # submission order
        tasks = {ref: (died_task if ref == died else waiting.pop(ref)[2]) for ref in refs}
        self.ray.wait(refs, num_returns=len(refs), timeout=10)
        again, charged = [], False
        for ref in refs:
            try:
                outcome = self.ray.get(ref, timeout=0)
            except Exception:
                if not charged:  # an actor runs its calls in order: the oldest unfinished one was running
                    charged = True
                    if not charge(tasks[ref], error):
                        continue
                again.append(tasks[ref])
                continue
            finish(tasks[ref].job, {**outcome, "attempts": tasks[ref].attempts + 1, "worker": slot.name})
        slot.inflight = []
        return again

    def _ship(self, model_dir: Path) -> dict[str, Any]:
        """Every file of the model into the object store, once; each node pulls it once."""
        files = {}
        for path in sorted(model_dir.rglob("*")):
            relative = path.relative_to(model_dir)
            if path.is_file() and relative.parts[0] not in SKIP_SHIPPING:
                files[relative.as_posix()] = self.ray.put(path.read_bytes())
        self._shipped = files  # the refs must outlive the actors that read them
        return files


def _ray_error(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, type(error)):
        return describe_error(cause)
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
