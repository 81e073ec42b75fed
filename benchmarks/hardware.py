"""The machine: CPU, RAM, GPUs (NVML), library versions, theoretical peaks, and size warnings."""
from __future__ import annotations

import os
import platform
import re
import threading
import time
from pathlib import Path

# Dense peak TFLOPs (fp16 tensor cores with fp32 accumulate, and plain fp32) from the vendors' data
# sheets. Matched against the NVML device name, longest key first.
GPU_PEAK_TFLOPS = {
    "H200": {"fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"fp16": 756.0, "fp32": 51.0},
    "H100": {"fp16": 989.0, "fp32": 67.0},  # SXM
    "A100": {"fp16": 312.0, "fp32": 19.5},
    "L40S": {"fp16": 362.0, "fp32": 91.6},
    "L4": {"fp16": 121.0, "fp32": 30.3},
    "A10G": {"fp16": 70.0, "fp32": 31.2},
    "A10": {"fp16": 125.0, "fp32": 31.2},
    "RTX 4090": {"fp16": 165.2, "fp32": 82.6},
    "RTX 3090": {"fp16": 71.0, "fp32": 35.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_ghz() -> float | None:
    """Nominal clock: ``cpu MHz`` from /proc/cpuinfo (under a hypervisor: the host's base clock)."""
    try:
        values = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(),
                                                re.MULTILINE)]
    except OSError:
        return None
    return max(values) / 1000 if values else None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fp32_flops_per_cycle(flags: set[str]) -> tuple[int, str]:
    """FLOPs per cycle per core, assuming two FMA units per core (true of recent Intel server cores and
    AMD Zen 5; Zen 4 double-pumps 512-bit ops, so halve for it). An FMA is 2 FLOPs per lane."""
    if "avx512f" in flags:
        return 64, "avx512f: 16 fp32 lanes x 2 (FMA) x 2 FMA units = 64 FLOPs/cycle/core"
    if "avx2" in flags and "fma" in flags:
        return 32, "avx2+fma: 8 fp32 lanes x 2 (FMA) x 2 FMA units = 32 FLOPs/cycle/core"
    if "avx" in flags:
        return 16, "avx: 8 fp32 lanes x (1 add + 1 mul) = 16 FLOPs/cycle/core"
    return 8, "sse: 4 fp32 lanes x (1 add + 1 mul) = 8 FLOPs/cycle/core"


def cpu_peak(threads: int | None = None) -> dict:
    flags = cpu_flags()
    per_cycle, why = fp32_flops_per_cycle(flags)
    ghz = cpu_ghz()
    cores = threads or usable_cores()
    peak = cores * ghz * 1e9 * per_cycle if ghz else None
    return {"flops": peak, "cores": cores, "ghz": ghz, "flops_per_cycle": per_cycle,
            "assumption": f"{cores} cores x {ghz} GHz (nominal, /proc/cpuinfo) x {why}; fp32 peak, "
                          "also used for int8/bf16 rows"}


def gpu_peak(name: str, precision: str = "fp16") -> float | None:
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_TFLOPS[key]["fp16" if precision in ("fp16", "bf16") else "fp32"] * 1e12
    return None


def bf16_supported() -> tuple[bool, str]:
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True, "AMX-BF16"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16"
    return False, "no AMX-BF16 or AVX512-BF16 in /proc/cpuinfo (bf16 would be emulated)"


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def gpus() -> list[dict]:
    nvml = _nvml()
    if nvml is None:
        return []
    found = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        found.append({"index": index, "name": name,
                      "memory_gb": nvml.nvmlDeviceGetMemoryInfo(handle).total / 1e9})
    return found


class GpuMemoryMonitor:
    """Peak GPU memory used while it runs (NVML, polled every 20 ms; device-wide minus the baseline)."""

    def __init__(self, index: int = 0, interval: float = 0.02):
        self.nvml = _nvml()
        self.index, self.interval = index, interval
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _used(self) -> int:
        handle = self.nvml.nvmlDeviceGetHandleByIndex(self.index)
        return int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used)

    def __enter__(self):
        if self.nvml is None:
            return self
        self._baseline = self._used()
        self.peak_bytes = 0

        def poll():
            while not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, self._used() - self._baseline)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._used() - self._baseline)
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux: VmHWM from /proc/self/status. Not ``ru_maxrss``: across fork+exec it keeps the parent's
    RSS at fork time, so a small worker started by a big parent would report the parent's size.
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def ram() -> dict:
    import psutil

    memory = psutil.virtual_memory()
    return {"total_gb": memory.total / 1e9, "available_gb": memory.available / 1e9}


def versions() -> dict:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for package in ("edgediff", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml",
                    "torch", "diffusers", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": usable_cores(), "ghz": cpu_ghz(), "ram_gb": ram()["total_gb"],
            "os": f"{platform.system()} {platform.release()}", "bf16": bf16_supported()[1], "gpus": gpus(),
            "busy": other_load()}


def other_load() -> list[str]:
    """Other processes using CPU now (they distort timings): name and percent of one core."""
    try:
        import psutil
    except ImportError:
        return []
    procs = list(psutil.process_iter(["pid", "name", "cmdline"]))
    for proc in procs:
        try:
            proc.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    me = os.getpid()
    for proc in procs:
        try:
            share = proc.cpu_percent(None)
        except psutil.Error:
            continue
        if proc.pid != me and share >= 20:
            cmd = " ".join(" ".join(proc.info.get("cmdline") or [proc.info.get("name") or "?"]).split())[:80]
            busy.append(f"{cmd} ({share:.0f}% of a core)")
    return busy


def estimate_bytes(config_dir: Path) -> dict:
    """fp32 parameter bytes per weighted component that model_index.json names, counted on the meta
    device (no memory allocated)."""
    import importlib
    import json

    import torch

    sizes = {}
    for name, entry in json.loads((config_dir / "model_index.json").read_text()).items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1], None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizers, schedulers
        with torch.device("meta"):
            module = (cls.from_config(cls.load_config(config_dir / name)) if hasattr(cls, "load_config")
                      else cls(cls.config_class.from_pretrained(config_dir / name)))
        sizes[name] = 4 * sum(p.numel() for p in module.parameters())
    return sizes


def _export_need(unet_bytes: int) -> int:
    try:
        from edgediff.exporter.memory import required_bytes
    except ImportError:  # no export extra: the bench's export will say so itself
        return 0
    return required_bytes([unet_bytes])


def size_warnings(weights: dict, *, exporting: bool, gpu_wanted: bool) -> list[str]:
    """Warnings when this machine looks too small for what was asked."""
    warnings = []
    total = sum(weights.values())
    # The export's own estimate of its peak (exporter/memory.py, measured per graph size);
    # diffusers' fp32 pipeline holds every weight plus activations (~1.4x).
    denoiser = max(weights.get("unet", 0), weights.get("transformer", 0))  # SD3's is a transformer
    need = max(_export_need(denoiser) if exporting else 0, 1.4 * total)
    memory = ram()
    if memory["total_gb"] * 1e9 < need:
        warnings.append(f"this machine has {memory['total_gb']:.1f} GB of RAM; the benchmark needs about "
                        f"{need / 1e9:.1f} GB (export peak) and will likely be killed")
    elif memory["available_gb"] * 1e9 < need:
        warnings.append(f"only {memory['available_gb']:.1f} GB of RAM is free; about {need / 1e9:.1f} GB is needed")
    if gpu_wanted and not gpus():
        warnings.append("a GPU provider was asked for but NVML sees no NVIDIA GPU: GPU rows will be unmeasured")
    return warnings
