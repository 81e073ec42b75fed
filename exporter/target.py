"""The export that fits this machine, for `edgediff export` run without --precision/--optimize-for.

The rule, best provider first (benchmarks/RESULTS.md holds the measurements):
- CUDA (or TensorRT) present: fp16 fused for CUDA. DirectML present: fp16 fused for DirectML.
- OpenVINO installed and a CPU with native bf16 (AMX-BF16 or AVX512-BF16): fp32 without ONNX
  Runtime's fusions (``--optimize-for none``), the graph OpenVINO reads; ``--provider auto`` then
  runs OpenVINO with its bf16 hint: 0.72 s per SD 1.5 U-Net step against 2.23 s for ONNX Runtime's
  int8 and 2.80 s for its fp32 (Xeon with AMX, one core; "Issue 16").
- Otherwise fp32 fused for the CPU. int8 is 16-20% faster per U-Net step where the CPU has VNNI
  (0.85 vs 1.00 s on Zen 5, 2.23 vs 2.80 s on the Xeon), 2.2x slower without it (Zen 2: 58.1 vs
  26.7 s end to end), and its U-Net takes no LoRA and no longer matches diffusers to fp32
  tolerance; fp32 is the default that behaves exactly like the reference, int8 one flag away.
Explicit flags keep their meaning: ``--precision`` alone takes ``default_target`` (cuda for fp16,
cpu otherwise), ``--optimize-for`` alone keeps fp16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
FLAG_PRECISION = "fp16"  # --optimize-for alone: the precision the option has always come with


@dataclass(frozen=True)
class ExportTarget:
    precision: str
    optimize_for: str
    why: str

    def flags(self) -> str:
        return f"--precision {self.precision} --optimize-for {self.optimize_for}"


def machine_target(providers: Iterable[str] | None = None, cpu_flags: Iterable[str] | None = None) -> ExportTarget:
    """What this machine's best provider runs. ``providers`` are runtime short names ("cuda",
    "tensorrt", "dml", "openvino", "cpu"), ``cpu_flags`` /proc/cpuinfo flags; both default to this
    machine's."""
    if providers is None:
        from edgediff.runtime.sessions import available_providers

        providers = available_providers()
    if cpu_flags is None:
        from edgediff.runtime.session_cache import cpu_flags as read_flags

        cpu_flags = read_flags()
    providers, cpu_flags = set(providers), set(cpu_flags)
    if providers & {"cuda", "tensorrt"}:
        return ExportTarget("fp16", "cuda", "CUDA is available")
    if "dml" in providers:
        return ExportTarget("fp16", "dml", "DirectML is available")
    if "openvino" in providers and cpu_flags & BF16_FLAGS:
        return ExportTarget("fp32", "none", "no GPU; OpenVINO is installed and this CPU has native bf16, "
                                            "so --provider auto runs these graphs on OpenVINO in bf16")
    return ExportTarget("fp32", "cpu", "no GPU; fp32 fused for ONNX Runtime's CPU provider")


def choose(precision: str | None, optimize_for: str | None, default_target: Callable[[str], str],
           log: Callable[[str], None], **machine) -> tuple[str, str]:
    """The (precision, optimize_for) to export with; without either flag, this machine's best,
    announced in one line that also says how to export for another machine."""
    if precision is None and optimize_for is None:
        target = machine_target(**machine)
        log(f"exporting for this machine: {target.flags()} ({target.why}); for another machine pass "
            "--precision/--optimize-for (a CUDA GPU: --precision fp16 --optimize-for cuda; "
            "a CPU: --precision fp32 --optimize-for cpu)")
        return target.precision, target.optimize_for
    precision = precision or FLAG_PRECISION
    return precision, optimize_for or default_target(precision)
