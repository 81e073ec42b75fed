"""Plan the configurations, run each in a fresh process, and gather one result document.

Library entry point: :func:`run_benchmark` (the ``edgediff bench`` command only parses arguments
and calls it).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edgediff.runtime.errors import EdgediffError

from . import hardware
from .models import BENCH_GRAPHS, config_source, default_cache, ensure_export, ensure_model

GPU_PROVIDERS = ("cuda", "tensorrt", "dml")
ALL_PROVIDERS = ("cpu", "openvino", *GPU_PROVIDERS)
PRECISIONS = ("fp32", "int8", "fp16", "bf16", "int4")
MEMORY_MODES = ("low", "high")
# Which export each provider runs: CPU runs want fp32 or int8 graphs (fp16 on the CPU runs through
# casts, slower: benchmarks/RESULTS.md), GPUs fp16.
# OpenVINO's bf16 is an inference-precision hint on the fp32 graphs (AMX / AVX512-BF16 CPUs).
PROVIDER_PRECISIONS = {"cpu": ("fp32", "int8", "int4"), "openvino": ("fp32", "bf16"), "cuda": ("fp16", "int4"),
                       "tensorrt": ("fp16",), "dml": ("fp16",)}
# Measured only when --precision names them (4-bit U-Net weights: the small-GPU/SDXL export).
OPT_IN_PRECISIONS = ("int4",)
# OpenVINO reads unfused graphs only (ONNX Runtime's fused ops are unknown to it).
EXPORT_TARGET = {"cpu": "cpu", "openvino": "none", "cuda": "cuda", "tensorrt": "cuda", "dml": "dml"}
EXPORT_PRECISION = {"bf16": "fp32"}
# Environment a worker runs with, per (provider, precision): runtime/sessions.py reads these.
WORKER_ENV = {("openvino", "fp32"): {"EDGEDIFF_OPENVINO_PRECISION": "FP32"},
              ("openvino", "bf16"): {"EDGEDIFF_OPENVINO_PRECISION": "BF16"}}


@dataclass
class BenchParams:
    model: str = "sd15"
    cache: Path = field(default_factory=default_cache)
    out: Path = Path("bench-results")
    resolution: int = 256
    steps: int = 20
    batch: int = 1
    providers: tuple[str, ...] | None = None  # None: every provider present (GPU ones listed as unmeasured)
    precisions: tuple[str, ...] | None = None  # None: fp32+int8 on the CPU, fp16 on GPUs
    memory: tuple[str, ...] = MEMORY_MODES
    repeats: int = 3  # steady-state runs per stage after the first run
    threads: int | None = None  # None: every core this process may use, for both engines
    seed: int = 0
    diffusers: bool = True  # measure diffusers/PyTorch on the same weights in the same run
    diffusers_bf16: bool = True  # also diffusers with bf16 autocast on the CPU
    timeout_s: int = 3600  # per configuration
    oneshot: int = 0  # rounds of the one-shot CLI rows (fresh processes, first and cached run); 0: none

    def check(self) -> None:
        config_source(self.model)  # raises a one-line error for an unknown model
        if self.resolution <= 0 or self.resolution % 8:
            raise EdgediffError(f"--resolution must be a positive multiple of 8, not {self.resolution}")
        if self.steps < 1:
            raise EdgediffError(f"--steps must be at least 1, not {self.steps}")
        if self.batch < 1:
            raise EdgediffError(f"--batch must be at least 1, not {self.batch}")
        if self.repeats < 1:
            raise EdgediffError(f"--repeats must be at least 1, not {self.repeats}")
        for provider in self.providers or ():
            if provider not in ALL_PROVIDERS:
                raise EdgediffError(f"unknown provider {provider!r}; choose from {', '.join(ALL_PROVIDERS)}")
        for precision in self.precisions or ():
            if precision not in PRECISIONS:
                raise EdgediffError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        for mode in self.memory:
            if mode not in MEMORY_MODES:
                raise EdgediffError(f"unknown memory mode {mode!r}; choose low or high")


@dataclass
class Config:
    engine: str  # edgediff | diffusers
    provider: str  # cpu/cuda/tensorrt/dml; for diffusers: cpu or cuda (torch device)
    precision: str  # fp32/int8/fp16; diffusers: fp32/bf16/fp16
    memory: str | None = None  # edgediff: low/high; diffusers: "offload" (enable_model_cpu_offload) or None
    unmeasured: str | None = None  # reason, when it cannot run here

    @property
    def label(self) -> str:
        engine = "edgediff" if self.engine == "edgediff" else "diffusers"
        extra = f" {self.memory}" if self.memory else (" autocast" if self.precision == "bf16" else "")
        return f"{engine} {self.provider} {self.precision}{extra}"


def plan(params: BenchParams, available: list[str], cuda_torch: bool, bf16: bool) -> list[Config]:
    """Every configuration asked for; those that cannot run here carry the reason."""
    providers = params.providers or ALL_PROVIDERS
    configs = []
    for provider in providers:
        missing = None if provider in available else (
            "unmeasured (no GPU lent to this session)" if provider in GPU_PROVIDERS and not hardware.gpus()
            else "unmeasured (openvino not installed: pip install 'edgediff[openvino]')"
            if provider == "openvino" else f"unmeasured ({provider} provider not installed in this onnxruntime)")
        if params.providers is None and missing and provider == "dml":
            continue  # DirectML is Windows-only: list it only when asked for
        for precision in PROVIDER_PRECISIONS[provider]:
            if precision not in (params.precisions or set(PRECISIONS) - set(OPT_IN_PRECISIONS)):
                continue
            for memory in params.memory:
                configs.append(Config("edgediff", provider, precision, memory, missing))
    if params.diffusers:
        wants_cpu = "cpu" in providers
        wants_gpu = any(p in ("cuda", "tensorrt") for p in providers)
        if wants_cpu and (not params.precisions or {"fp32", "int8", "int4"} & set(params.precisions)):
            configs.append(Config("diffusers", "cpu", "fp32"))
            if params.diffusers_bf16:
                configs.append(Config("diffusers", "cpu", "bf16", unmeasured=None if bf16 else
                                      "unmeasured (this CPU has no native bf16: AMX-BF16 or AVX512-BF16)"))
        if wants_gpu and (not params.precisions or {"fp16", "int4"} & set(params.precisions)):
            why = (None if cuda_torch else "unmeasured (no GPU lent to this session)" if not hardware.gpus()
                   else "unmeasured (this torch build has no CUDA)")
            # Whole pipeline on the GPU, and what a 4 GB GPU needs with diffusers (modules moved in turn).
            configs.append(Config("diffusers", "cuda", "fp16", unmeasured=why))
            configs.append(Config("diffusers", "cuda", "fp16", "offload", unmeasured=why))
    if not configs:
        raise EdgediffError("nothing to measure: the --provider/--precision choices select no configuration")
    return configs


class Progress:
    """One progress bar on stderr (redrawn in place on a terminal, a line every few seconds otherwise)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, fraction: float, label: str, force: bool = False) -> None:
        overall = min(1.0, (self.done + max(0.0, min(1.0, fraction))) / max(1, self.total))
        now = time.monotonic()
        if not (self.tty or force or now - self._last >= 10):
            return
        self._last = now
        filled = int(overall * self.width)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {overall:4.0%} "
                f"{self.done + 1 if self.done < self.total else self.total}/{self.total} "
                f"{time.monotonic() - self.started:5.0f}s {label}")
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, label: str) -> None:
        self.done += 1
        self.update(0.0, label, force=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_worker(spec: dict, log_file: Path, on_progress: Callable[[float, str], None], timeout_s: int) -> dict:
    """Run one configuration in a fresh interpreter; return its result (or {"error": line})."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "edgediff.benchmarks.worker", str(spec_path),
                                        str(result_path)], stdout=subprocess.PIPE, stderr=log, text=True)
            started = time.monotonic()
            warnings = []
            for line in process.stdout:
                if line.startswith("progress "):
                    _, done, total, what = line.rstrip("\n").split(" ", 3)
                    on_progress(int(done) / max(1, int(total)), what)
                elif line.startswith("warning "):
                    warnings.append(line[8:].strip())
                if time.monotonic() - started > timeout_s:
                    process.kill()
            code = process.wait()
        if code != 0 or not result_path.is_file():
            tail = [line for line in log_file.read_text().splitlines() if line.strip()][-1:] or ["no output"]
            why = "killed (out of memory?)" if code in (-9, 137) else f"exit status {code}"
            return {"error": f"{why}: {tail[0][:300]}", "log": str(log_file)}
        return json.loads(result_path.read_text())


def run_benchmark(params: BenchParams, log: Callable[[str], None] | None = None, stream=None) -> dict:
    """Build/export (cached), measure every configuration, and return the result document."""
    log = log or (lambda line: print(f"bench: {line}", file=sys.stderr, flush=True))
    params.check()
    from edgediff.runtime.sessions import available_providers

    available = available_providers()
    threads = params.threads or hardware.usable_cores()
    bf16, bf16_why = hardware.bf16_supported()
    cuda_torch = _torch_cuda()
    configs = plan(params, available, cuda_torch, bf16)
    runnable = [c for c in configs if not c.unmeasured]

    config_dir = config_source(params.model)
    exports_needed = sorted({(EXPORT_PRECISION.get(c.precision, c.precision), EXPORT_TARGET[c.provider])
                             for c in runnable if c.engine == "edgediff"})
    from .worker import DIFFUSERS_LEFT_OUT  # neither side loads these (SD 3.5's T5: off in the bench)

    weights = {name: size for name, size in hardware.estimate_bytes(config_dir).items() if name not in DIFFUSERS_LEFT_OUT}
    warnings = hardware.size_warnings(weights, exporting=bool(exports_needed),
                                      gpu_wanted=any(c.provider != "cpu" for c in configs))
    busy = hardware.other_load()
    if busy:
        warnings.append("other processes are using the CPU, timings are distorted: " + "; ".join(busy))
    for line in warnings:
        log(f"warning: {line}")

    source = ensure_model(params.model, Path(params.cache), params.seed, log=log)
    exports = {}
    for precision, target in exports_needed:
        exports[(precision, target)] = ensure_export(source, precision, target, BENCH_GRAPHS, log=log)

    latent = params.resolution // 8
    flops = {}
    from .flops import unet_step_flops

    counted = dict(exports)
    cached_fp32 = source.parent / "export-fp32-cpu"
    if not counted and (cached_fp32 / "manifest.json").is_file():
        counted[("fp32", "cpu")] = cached_fp32  # the architecture's arithmetic, for rows measured elsewhere
    for (precision, target), folder in counted.items():
        try:
            flops[f"{precision}-{target}"] = unet_step_flops(folder, 2 * params.batch, latent, latent)
        except Exception as error:  # the count is a derived figure; never lose the timings over it
            flops[f"{precision}-{target}"] = {"total": None, "error": str(error).splitlines()[0][:200]}

    out = Path(params.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, staged = [], set()
    for config in runnable:
        key = (config.engine, config.provider, config.precision)
        # Per-stage times do not depend on the memory mode: measured once per engine/provider/precision.
        tasks.append((config, ["e2e"] if key in staged else ["stages", "e2e"]))
        staged.add(key)
    progress = Progress(sum(len(phases) for _, phases in tasks), stream=stream)
    rows = []
    for config, phases in tasks:
        row = {**asdict(config), "label": config.label}
        for phase in phases:
            label = f"{config.label} {phase}"
            spec = {"engine": config.engine, "phase": phase, "provider": config.provider,
                    "precision": config.precision, "memory": config.memory, "resolution": params.resolution,
                    "steps": params.steps, "batch": params.batch, "repeats": params.repeats, "threads": threads,
                    "generations": 2 if config.memory == "high" else 1,
                    "env": WORKER_ENV.get((config.provider, config.precision), {}) if config.engine == "edgediff"
                    else {},
                    "model_dir": str(exports[(EXPORT_PRECISION.get(config.precision, config.precision),
                                              EXPORT_TARGET[config.provider])]
                                     if config.engine == "edgediff" else source)}
            progress.update(0.0, label, force=True)
            result = run_worker(spec, out / "logs" / f"{label.replace(' ', '_')}.log",
                                lambda fraction, what, label=label: progress.update(fraction, f"{label}: {what}"),
                                params.timeout_s)
            row[phase] = result
            progress.step(f"{label}: done")
        rows.append(row)
    progress.close()
    # Stage times measured once per (provider, precision) are shared by both memory rows.
    for row in rows:
        if "stages" not in row:
            twin = next((r for r in rows if r is not row and r["engine"] == row["engine"] and "stages" in r and
                         r["provider"] == row["provider"] and r["precision"] == row["precision"]), None)
            if twin:
                row["stages"] = twin["stages"]
    for config in configs:
        if config.unmeasured:
            rows.append({**asdict(config), "label": config.label})

    oneshot = None
    if params.oneshot:
        from . import oneshot as one_shot

        cpu_exports = [folder for (precision, target), folder in sorted(exports.items()) if target == "cpu"]
        if cpu_exports:
            log(f"one-shot CLI rows: {params.oneshot} interleaved rounds")
            oneshot = one_shot.run(cpu_exports, source if params.diffusers else None, params.resolution,
                                   params.steps, params.oneshot, "auto", params.diffusers_bf16 and bf16, log=log,
                                   threads=threads)
    from .report import summarize

    document = {
        "params": {**asdict(params), "cache": str(params.cache), "out": str(params.out)},
        "machine": hardware.machine(), "versions": hardware.versions(),
        "threads": {"torch": threads, "onnxruntime_intra_op": f"default (the {threads} cores the worker may use)"},
        "bf16": bf16_why, "cpu_peak": hardware.cpu_peak(threads), "unet_flops": flops,
        "command": " ".join(["edgediff", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "warnings": warnings, "rows": rows, "oneshot": oneshot,
    }
    document["summary"] = summarize(document)
    return document


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
