"""`edgediff export` with a line before and after each memory-heavy step, for export_memory's per-stage RSS.

    python -m edgediff.benchmarks.export_probe SOURCE OUT --precision fp32 ...   (edgediff export's arguments)

The exporter logs one line per graph stage; fusion, writing, validation and the LoRA weight map
share one. This wraps those functions in place (nothing in the exporter changes) and prints
``probe <function> start|end rss <GiB> hwm <GiB>`` to stderr around each call.
"""
from __future__ import annotations

import functools
import sys

import torch

from edgediff.exporter import export, optimize

GIB = 1024**3
PROBED = {export: ("load_stripped", "spill", "write_graph", "validate", "reference_outputs", "module_weight_map"),
          optimize: ("optimize", "to_fp16")}


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _say(name: str, when: str) -> None:
    print(f"probe {name} {when} rss {_kib('VmRSS') / 2**20:.2f} hwm {_kib('VmHWM') / 2**20:.2f}",
          file=sys.stderr, flush=True)


def _wrap(owner, name: str, function) -> None:
    @functools.wraps(function)
    def probed(*args, **kwargs):
        _say(name, "start")
        try:
            return function(*args, **kwargs)
        finally:
            _say(name, "end")

    setattr(owner, name, probed)


def install() -> None:
    for module, names in PROBED.items():
        for name in names:
            if hasattr(module, name):
                _wrap(module, name, getattr(module, name))
    _wrap(torch.onnx, "export", torch.onnx.export)


if __name__ == "__main__":
    install()
    from edgediff.cli import main

    sys.argv = ["edgediff", "export", *sys.argv[1:]]
    sys.exit(main())
