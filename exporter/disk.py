"""Disk an export needs, checked before the first graph: a full disk found midway costs minutes of
tracing (SD 3.5 Medium's T5-XXL fills 24 GB of work files before its first output byte).

While a graph is exported its folder holds the traced graph's float32 weights (the work files), the
fusions' and quantizer's new weights beside them, and the written file; the graphs finished before
it stay. So the peak is reached in some graph ``i``: the outputs of graphs ``< i`` plus ``i``'s
float32 weights plus twice its output (the quantized or fused copy in the work folder, then the
file; or the CPU check's file, deleted before the target's is written).
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from edgediff.runtime.errors import EdgediffError

GB = 1000**3


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def required_bytes(graphs: list[tuple[int, int]]) -> int:
    """Peak disk of exporting ``graphs`` in order, each given as (float32 weight bytes, output bytes)."""
    done, peak = 0, 0
    for weights, output in graphs:
        peak = max(peak, done + weights + 2 * output)
        done += output
    return peak


def check_disk(graphs: list[tuple[int, int]], out: Path, what: str) -> None:
    """Refuse up front, in one line, an export that would fill the disk holding ``out``."""
    need, have = required_bytes(graphs), free_bytes(out.parent)
    if need > have:
        raise EdgediffError(
            f"not enough disk to export {what}: it needs about {need / GB:.1f} GB free beside {out} "
            f"(work files and outputs), {have / GB:.1f} GB is free; free some space or choose another folder")


def disk_full(error: OSError, name: str, staging: Path) -> EdgediffError | None:
    """The one line for a disk that filled anyway (other programs write too); None for other errors."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return EdgediffError(f"the disk filled while exporting {name}: free some space and run the same command "
                         f"again (the graphs already finished are kept in {staging})")
