#!/usr/bin/env bash
# First thing to run on a machine with a GPU (at most 8 minutes on one H100): CUDA parity on tiny
# models, full-size SD 1.5 / SDXL fp16 and int4 step time, peak VRAM, cold start, IO binding.
# Writes gpu-check-results/gpu_check.json and appends a table to benchmarks/RESULTS.md
# (with --dry-run: to gpu-check-results/gpu_check.md, unless --results names a file).
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--results FILE] [--budget-s S] [--families a,b]
# --dry-run: the same code on the CPU with tiny models (seconds to a minute; CI runs it).
# Needs the checkout installed: pip install -e '.[export,cuda,bench]' (nvidia-ml-py for peak VRAM).
set -euo pipefail
cd "$(dirname "$0")/.."
# The checkout's own virtual environment when it has one, else python on PATH; EDGEDIFF_PYTHON overrides.
if [ -z "${EDGEDIFF_PYTHON:-}" ] && [ -x .venv/bin/python ]; then EDGEDIFF_PYTHON=.venv/bin/python; fi
PYTHON="${EDGEDIFF_PYTHON:-python}"
if ! "$PYTHON" -c "import edgediff.benchmarks" 2>/dev/null; then
    echo "gpu_check: edgediff is not installed for $PYTHON: pip install -e '.[export,cuda,bench]' (or set EDGEDIFF_PYTHON)" >&2
    exit 2
fi
# The budget stops new work at --budget-s (default 450 s); the hard limit keeps the whole run under 8 minutes.
exec timeout --kill-after=10 480 "$PYTHON" -m edgediff.benchmarks.gpu_check "$@"
