"""A session without ONNX Runtime's CPU arena fixes glibc's mmap threshold at 4 MiB: freed big
blocks no longer raise it (up to 32 MiB), so a transformer's 27 MB activations are mapped and
unmapped one by one instead of growing a fragmented heap (SD 3.5 Medium at 1024x1024: 6.86 GiB
peak before, 5.75 GiB after; benchmarks/RESULTS.md)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    import onnxruntime
    from edgediff.runtime import sessions

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    sessions._session_options(onnxruntime, "cpu", threads=1, arena=sys.argv[1] == "arena")
    big = np.ones(20_000_000 // 8)
    del big  # glibc raises its dynamic mmap threshold to this block's size when it is freed
    before = libc.mallinfo2().hblks
    block = np.ones(10_000_000 // 8)
    print(libc.mallinfo2().hblks - before)
""")


def _mapped_blocks(arena: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, arena], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_no_arena_session_maps_big_blocks():
    assert _mapped_blocks("arena") == 0  # glibc's default: the 10 MB block comes from the heap
    assert _mapped_blocks("no-arena") == 1  # mapped: unmapped again when freed
