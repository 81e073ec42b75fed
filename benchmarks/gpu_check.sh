#!/usr/bin/env bash
# First thing to run on a machine with a GPU (at most 8 minutes on one H100): CUDA parity on tiny
# models, full-size SD 1.5 / SDXL fp16 and int4 step time, peak VRAM, cold start, IO binding.
# Writes gpu-check-results/gpu_check.json and appends a table to benchmarks/RESULTS.md.
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--results FILE] [--budget-s S] [--families a,b]
# --dry-run: the same code on the CPU with tiny models (seconds to a minute; CI runs it).
# Needs the checkout installed: pip install -e '.[export,cuda,bench]' (nvidia-ml-py for peak VRAM).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${EDGEDIFF_PYTHON:-python}"
# The budget stops new work at --budget-s (default 450 s); the hard limit keeps the whole run under 8 minutes.
exec timeout --kill-after=10 480 "$PYTHON" -m edgediff.benchmarks.gpu_check "$@"
