"""Per-step NumPy overhead of each sampler (the time the sampler itself adds around the model).

    python -m edgediff.benchmarks.sampler_overhead [--steps 20] [--repeats 5] [--shape 1,4,64,64]

A trivial denoiser (returns ``x * 0.5``, one NumPy multiply, timed separately and subtracted) is
driven through every registered sampler on an SD 1.5 schedule; the table gives milliseconds per
sampler step of sampler work (median of the repeats).  Runs on one core.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from edgediff.runtime.samplers import SAMPLERS, make_plan

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False, "prediction_type": "epsilon"}


def _alphas_cumprod():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def measure(name, steps, shape, repeats):
    alphas = _alphas_cumprod()
    calls = [0]
    half = np.float32(0.5)

    def denoise(x, sigma):
        calls[0] += 1
        return x * half

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    # cost of the denoiser alone, per call
    t0 = time.perf_counter()
    for _ in range(200):
        denoise(x, 1.0)
    denoise_cost = (time.perf_counter() - t0) / 200
    per_call, plan_ms = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = make_plan(name, alphas, SD15, steps)
        plan_ms.append((time.perf_counter() - t0) * 1e3)
        calls[0] = 0
        t0 = time.perf_counter()
        plan.run(denoise, x * np.float32(plan.init_noise_sigma), rng=np.random.default_rng(1))
        elapsed = time.perf_counter() - t0
        per_call.append(max(0.0, elapsed - calls[0] * denoise_cost) / plan.steps * 1e3)
    return float(np.median(per_call)), calls[0], float(np.median(plan_ms))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", default="1,4,64,64")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"sampler overhead, latent {shape}, {args.steps} steps, numpy {np.__version__}, "
          f"python {platform.python_version()}, {platform.machine()}")
    print(f"{'sampler':<18}{'model calls':>12}{'ms/step':>10}{'plan ms':>10}")
    worst = 0.0
    for name in SAMPLERS:
        ms, calls, plan_ms = measure(name, args.steps, shape, args.repeats)
        worst = max(worst, ms)
        print(f"{name:<18}{calls:>12}{ms:>10.3f}{plan_ms:>10.2f}")
    print(f"worst: {worst:.3f} ms per step ({'<' if worst < 1.0 else '>='} 1 ms budget)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
