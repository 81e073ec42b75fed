"""How much memory an export needs, how much this process may use, and how much it used.

An export holds about one copy of its largest graph's float32 weights at a time (see export.py);
the check up front turns a would-be kernel OOM kill into one clear error line.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import resource
import struct
from pathlib import Path

from edgediff.runtime.errors import EdgediffError

GIB = 1024**3
# Measured on the mid-size test model and the full-size SD 1.5, SD 2.1 and SDXL exports (RESULTS.md,
# "Export memory", "Full-size SDXL"): peak RSS is the libraries' own footprint plus a multiple of one
# graph's fp32 weights. Under 2 GB torch's tracer holds the module, its constant-folded weights and
# the whole serialized graph at once (~4.3x measured); over 2 GB it writes the weights out as it goes
# (1.2x for SD 1.5's U-Net, 1.37x for SDXL's: 13.74 GiB for 9.56 GiB of weights).
BASELINE_BYTES = int(0.6 * GIB)
EMBEDDED_FACTOR = 4.5
EXTERNAL_FACTOR = 1.4
TWO_GB = 2 * 1024**3
SAFETENSORS_ITEM = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM): what the kernel's OOM killer sees."""
    return _status_kib("VmHWM") * 1024


def available_bytes() -> int:
    """Memory this process can still take: MemAvailable, capped by an address-space limit (RLIMIT_AS)."""
    available = _meminfo_kib("MemAvailable") * 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        available = min(available, max(0, soft - _status_kib("VmSize") * 1024))
    return available


def required_bytes(graph_weights: list[int]) -> int:
    """Peak RSS an export needs whose graphs have these fp32 weight sizes (bytes); one graph at a time."""
    return BASELINE_BYTES + max(
        int((EMBEDDED_FACTOR if size < TWO_GB else EXTERNAL_FACTOR) * size) for size in graph_weights)


def check_memory(graph_weights: list[int], what: str) -> None:
    """Refuse up front, in one line, an export the kernel would kill midway. What this process
    already holds is part of both the need and what it has."""
    held = _status_kib("VmRSS") * 1024
    need, have = required_bytes(graph_weights), available_bytes() + held
    if need > have:
        raise EdgediffError(
            f"not enough memory to export {what}: it needs about {need / GIB:.1f} GiB "
            f"(its largest graph holds {max(graph_weights) / GIB:.1f} GiB of float32 weights), "
            f"{have / GIB:.1f} GiB is available; close other programs or use a machine with more memory")


def folder_weight_bytes(component: Path) -> int:
    """float32 bytes of a diffusers component folder's weights, read from the safetensors headers.

    Weights stored as fp16 still load as float32, so sizes come from element counts, not file sizes.
    """
    files = sorted(component.glob("*.safetensors"))
    if not files:  # pickled .bin weights: no cheap header; assume float32 as stored
        return sum(f.stat().st_size for f in component.glob("*.bin"))
    total = 0
    for file in files:
        for name, info in safetensors_index(file)[0].items():
            if name == "__metadata__":
                continue
            count = 1
            for axis in info["shape"]:
                count *= axis
            floating = info["dtype"].startswith(("F", "BF"))
            total += count * (4 if floating else SAFETENSORS_ITEM.get(info["dtype"], 4))
    return total


def module_weight_bytes(module) -> int:
    return sum(p.numel() * 4 for p in module.parameters()) + sum(b.numel() * b.element_size() for b in module.buffers())


def release_freed(collect: bool = False) -> None:
    """Hand memory freed by the previous stage back to the system before the next stage peaks.

    glibc keeps freed small blocks in its heaps; without this the next stage's peak stacks on top.
    ``collect``: run the garbage collector first (torch modules hold reference cycles); it costs
    about a second with torch loaded, so only where modules are let go.
    """
    if collect:
        import gc

        gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def safetensors_index(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(file, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        try:
            return json.loads(handle.read(size)), 8 + size
        except ValueError:
            raise EdgediffError(f"{file} is not a readable safetensors file") from None


def _status_kib(field: str) -> int:
    return _field_kib("/proc/self/status", field)


def _meminfo_kib(field: str) -> int:
    return _field_kib("/proc/meminfo", field)


def _field_kib(path: str, field: str) -> int:
    with open(path) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise EdgediffError(f"cannot read {field} from {path}")
