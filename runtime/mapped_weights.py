"""Let go of the pages of weight files that OpenVINO maps but no longer reads.

OpenVINO's CPU plugin maps a compiled blob (or an ONNX graph's external data) read-only, then copies
each weight into the layout its kernels use: convolutions on the first inference, the rest while
compiling. It keeps the mapping, so every page it read stays in the process's resident set next to
the copy: the SD 1.5 U-Net (3.3 GB of fp32 weights) peaks at 6.8 GiB with 3.3 GiB of it file pages,
read once and never again (RESULTS.md, "OpenVINO's second copy of the weights").

``madvise(MADV_DONTNEED)`` on a read-only file mapping drops those pages from the process; they stay
in the page cache, which the kernel frees first under pressure, and a page read again is mapped back
from there (or the file). Nothing is lost: a read-only mapping has no private changes to discard.
A ``Releasing`` thread does this every ``period`` seconds while a compile or a first inference copies
the weights, so the two copies never add up; after that one pass suffices. Linux only (``/proc``);
elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

MADV_DONTNEED = 4
MAPS = Path("/proc/self/maps")


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def read_only_mappings(files: tuple[Path, ...]) -> list[tuple[int, int]]:
    """Address ranges of this process's read-only mappings of ``files`` (folders: any file in them)."""
    roots = tuple(str(path) + os.sep for path in files)  # a folder's files, not its namesakes' ("unet2")
    exact = {str(path) for path in files}
    ranges = []
    try:
        lines = MAPS.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1] in ("r--s", "r--p") and (fields[5].startswith(roots) or fields[5] in exact):
            start, end = (int(value, 16) for value in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release(files: tuple[Path, ...]) -> int:
    """Drop the resident pages of the read-only mappings of ``files``; returns the bytes of address
    range advised (0 where /proc or madvise is missing)."""
    ranges = read_only_mappings(files)
    if not ranges:
        return 0
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
        return 0
    return sum(end - start for start, end in ranges if madvise(start, end - start, MADV_DONTNEED) == 0)


class Releasing:
    """``with Releasing(files):`` releases the mappings of ``files`` every ``period`` seconds while
    the block runs (OpenVINO's compile and inference release the GIL), and once more at its end."""

    def __init__(self, files: tuple[Path, ...], period: float = 0.05):
        self.files, self.period = tuple(Path(path).resolve() for path in files), period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgediff-release-mapped", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            release(self.files)

    def __enter__(self) -> "Releasing":
        if MAPS.exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        release(self.files)
