"""Sampler registry and plans: pure NumPy samplers in sigma space (k-diffusion style).

    from edgediff.runtime.samplers import make_plan, list_samplers, resolve_sampler
    plan = make_plan("dpmpp_2m_karras", alphas_cumprod, scheduler_config, steps=20)
    x = plan.run(denoise, noise * plan.init_noise_sigma, rng=rng, on_step=cb)

``denoise(x, sigma) -> denoised`` (float32, the predicted clean latent) is built by the pipeline;
``plan.timestep(sigma)`` is the U-Net timestep it must use for ``sigma``.

Each plan walks the sigmas its diffusers counterpart walks (same timestep spacing, same
``init_noise_sigma`` in sigma space), so a run from the same starting ``latents`` matches the
diffusers scheduler loop.  Sampler functions are pure: ``fn(denoise, x, sigmas, *, rng, on_step)``.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import EdgediffError
from ..schedules import (
    SCHEDULES,
    NoiseSchedule,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    spaced_timesteps,
)
from ._util import clip_x0, dynamic_threshold
from . import ddim as _ddim
from . import deis as _deis
from . import dpmpp as _dpmpp
from . import euler as _euler
from . import lcm as _lcm
from . import lms as _lms
from . import pndm as _pndm
from . import tcd as _tcd
from . import unipc as _unipc

__all__ = ["make_plan", "list_samplers", "resolve_sampler", "SamplerPlan", "SamplerSpec", "SAMPLERS"]


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    family: str  # timestep family of the diffusers counterpart: "k", "dpm" or "ddim" (schedules.py)
    description: str
    aliases: tuple = ()
    schedule: str | None = None  # the sigma schedule the name implies (dpmpp_2m_karras -> karras)
    final: str = "zero"  # "zero": ends at sigma 0; "alpha_to_one": DDIM rule (set_alpha_to_one);
    # "sigma_min": ends at alphas_cumprod[0]'s sigma (DEIS)
    bind: Callable | None = None  # bind(plan_info) -> dict of extra keyword args for fn
    # Every scheduler-config key the plan reads, with the diffusers counterpart's own default.
    # Keys that diffusers marks as defaults of the model's original scheduler
    # (``_use_default_values``) or that are missing take these, exactly as
    # ``Counterpart.from_config(pipe.scheduler.config)`` does.  clip_sample / thresholding keys
    # are listed where the counterpart applies them; fn then takes ``process_x0``.
    defaults: dict = field(default_factory=lambda: dict(_K_DEFAULTS))


SAMPLERS: dict[str, SamplerSpec] = {}
_ALIASES: dict[str, str] = {}


def _normalize(name: str) -> str:
    s = name.strip().lower().replace("++", "pp").replace("+", "p")
    s = re.sub(r"[\s\-./]+", "_", s)
    return re.sub(r"_+", "_", s).strip("_")


def register(spec: SamplerSpec) -> SamplerSpec:
    SAMPLERS[spec.name] = spec
    for alias in (spec.name,) + tuple(spec.aliases):
        _ALIASES[_normalize(alias)] = spec.name
    return spec


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """Canonical (sampler name, implied schedule or None) for a name or alias such as
    ``"DPM++ 2M Karras"``, ``"euler_a"``, ``"euler_karras"``; EdgediffError if unknown."""
    if not isinstance(name, str) or not name.strip():
        raise EdgediffError(f"unknown sampler {name!r}; run `edgediff generate --sampler list` to see the names")
    key = _normalize(name)
    if key in _ALIASES:
        canonical = _ALIASES[key]
        return canonical, SAMPLERS[canonical].schedule
    for sched in SCHEDULES:  # "<sampler>_<schedule>", e.g. euler_a_karras, "DPM++ SDE Karras"
        suffix = "_" + sched
        if key.endswith(suffix) and key[: -len(suffix)] in _ALIASES:
            return _ALIASES[key[: -len(suffix)]], sched
    raise EdgediffError(f"unknown sampler {name!r}; run `edgediff generate --sampler list` to see the names")


# Words every front-end takes for "the sampler's own schedule" (A1111 sends "Automatic").
DEFAULT_SCHEDULE_WORDS = ("", "automatic", "default", "none", "model")


def normalize_schedule(name: str | None) -> str | None:
    """The one reading of a schedule name: "Karras", "sgm-uniform", "SGM Uniform" -> karras,
    sgm_uniform; None or a word of DEFAULT_SCHEDULE_WORDS -> None (the sampler's own)."""
    if name is None:
        return None
    key = _normalize(name) if name.strip() else ""
    if key in DEFAULT_SCHEDULE_WORDS:
        return None
    if key not in SCHEDULES:
        raise EdgediffError(f"unknown scheduler {name!r}; expected automatic or one of {', '.join(SCHEDULES)}")
    return key


def list_samplers() -> list[tuple[str, list[str], str]]:
    """(name, aliases, one-line description) for every sampler, for ``--sampler list``."""
    return [(s.name, list(s.aliases), s.description) for s in SAMPLERS.values()]


class SamplerPlan:
    """Everything one sampling run needs: sigmas, timesteps, start scale and the sampler."""

    def __init__(self, name, fn, sigmas, timesteps, init_noise_sigma, schedule, *, final_scale=1.0, schedule_name=None):
        self.name = name
        self.fn = fn
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        self.timesteps = np.asarray(timesteps, dtype=np.float64)  # model t for sigmas[:-1]
        self.init_noise_sigma = float(init_noise_sigma)
        self.schedule = schedule
        self.schedule_name = schedule_name
        # A walk ending at sigma > 0 (DDIM with set_alpha_to_one=False) returns x_t like diffusers:
        # x_t = x_sigma * sqrt(alpha_bar) = x_sigma / sqrt(1 + sigma^2).
        self.final_scale = float(final_scale)
        self._t_of_sigma = {float(s): float(t) for s, t in zip(self.sigmas[:-1], self.timesteps)}

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep(self, sigma: float) -> float:
        """Model timestep for ``sigma``: the counterpart's own t for the plan's sigmas, log-sigma
        interpolation (``NoiseSchedule.sigma_to_t``) for any other sigma."""
        t = self._t_of_sigma.get(float(sigma))
        if t is None:
            t = float(self.schedule.sigma_to_t(float(sigma)))
        return t

    def run(self, denoise, x, *, rng=None, on_step=None):
        x = np.asarray(x, dtype=np.float32)
        x = self.fn(denoise, x, self.sigmas, rng=rng, on_step=on_step)
        if self.final_scale != 1.0:
            x = x * np.float32(self.final_scale)
        return np.asarray(x, dtype=np.float32)

    def __repr__(self):
        return f"SamplerPlan({self.name!r}, steps={self.steps}, schedule={self.schedule_name!r})"


def _f32(a) -> np.ndarray:
    """Round sigmas through float32, as diffusers stores them, so both sides walk the same values."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _config_value(config: dict, spec: SamplerSpec, key: str):
    """``config[key]`` as the diffusers counterpart created with ``from_config(config)`` sees it."""
    defaults = config.get("_use_default_values") or ()
    if key in config and key not in defaults and config[key] is not None:
        return config[key]
    return spec.defaults[key]


def _x0_processing(config: dict, spec: SamplerSpec):
    """The counterpart's treatment of the predicted clean latent: dynamic thresholding, else
    clipping (diffusers checks ``thresholding`` first), else None."""
    if "thresholding" in spec.defaults and _config_value(config, spec, "thresholding"):
        return dynamic_threshold(float(_config_value(config, spec, "dynamic_thresholding_ratio")),
                                 float(_config_value(config, spec, "sample_max_value")))
    if "clip_sample" in spec.defaults and _config_value(config, spec, "clip_sample"):
        return clip_x0(float(_config_value(config, spec, "clip_sample_range")))
    return None


def _build(spec: SamplerSpec, sched: NoiseSchedule, config: dict, steps: int, schedule: str | None):
    """(sigmas without the final value, timesteps, spacing) for the spec's timestep family."""
    family = spec.family
    T = sched.num_train_timesteps
    spacing = _config_value(config, spec, "timestep_spacing")
    offset = int(_config_value(config, spec, "steps_offset") or 0)
    if schedule in ("leading", "linspace", "trailing"):
        spacing, schedule = schedule, None
    elif schedule == "sgm_uniform":  # diffusers' equivalent of SGM uniform is trailing spacing
        spacing, schedule = "trailing", None
    if family == "lcm":
        original = int(_config_value(config, spec, "original_inference_steps") or 50)
        ts = _lcm.lcm_timesteps(T, steps, original)
        family = "ddim"
    else:
        ts = spaced_timesteps(family, T, steps, spacing, offset)
    if family == "k":
        sigmas = sched.t_to_sigma(ts)
        lo, hi = float(sigmas[-1]), float(sigmas[0])
    else:
        sigmas = sched.sigmas[ts.astype(np.int64)]
        lo, hi = sched.sigma_min, sched.sigma_max
    n = len(ts) if family != "k" else steps
    if schedule is not None:
        if schedule == "karras":
            sigmas = karras_sigmas(n, lo, hi)
        elif schedule == "exponential":
            sigmas = exponential_sigmas(n, lo, hi)
        elif schedule == "beta":
            sigmas = beta_sigmas(n, lo, hi)
        else:
            raise EdgediffError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        ts = sched.sigma_to_t(sigmas)
        if family == "dpm" and schedule == "karras" and _config_value(config, spec, "beta_schedule") != "squaredcos_cap_v2":
            ts = np.round(ts)
        if family == "dpm":
            # DPMSolver-style schedulers hand the model int64 timesteps (truncated).  diffusers
            # truncates float32 round-off too (sigma_max -> t = 998.99994 -> 998); we do not.
            ts = np.floor(ts + 1e-4)
    return _f32(sigmas), ts, spacing


# Over ~60 lines only by its one-argument-a-line signature; the argument guards stay here because tests
# and benchmarks call make_plan directly, without a GenerationRequest.
def make_plan(
    sampler: str,
    alphas_cumprod: np.ndarray,
    scheduler_config: dict,
    steps: int,
    *,
    schedule: str | None = None,
    strength: float = 1.0,
) -> SamplerPlan:
    """Plan a run of ``sampler`` for ``steps`` steps on the model's training schedule.

    ``strength`` < 1 (img2img) starts part-way down the schedule exactly as diffusers' img2img
    pipelines do (``int(steps * strength)`` steps, at least one); start from
    ``x = x0 + noise * plan.sigmas[0]``."""
    name, implied = resolve_sampler(sampler)
    spec = SAMPLERS[name]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise EdgediffError(f"steps must be a whole number >= 1 (got {steps!r})")
    steps = int(steps)
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise EdgediffError(f"strength must be a number in (0, 1] (got {strength!r})") from None
    if not (0.0 < strength <= 1.0):
        raise EdgediffError(f"strength must be in (0, 1] (got {strength!r})")
    schedule = normalize_schedule(schedule) or implied
    config = dict(scheduler_config or {})
    sched = NoiseSchedule(alphas_cumprod)

    sigmas, ts, spacing = _build(spec, sched, config, steps, schedule)
    if spec.final == "alpha_to_one":
        final = 0.0 if _config_value(config, spec, "set_alpha_to_one") else float(_f32(sched.sigmas[0]))
    elif spec.final == "sigma_min":
        final = float(_f32(sched.sigmas[0]))
    else:
        final = 0.0
    if spec.family == "k":
        # diffusers' Euler-family init_noise_sigma, already in sigma space
        init = float(sigmas.max()) if spacing in ("linspace", "trailing") else math.sqrt(float(sigmas.max()) ** 2 + 1)
    else:
        # VP-space schedulers start from latents * 1.0, i.e. x_sigma = latents * sqrt(1 + sigma_0^2)
        init = math.sqrt(float(sigmas[0]) ** 2 + 1)
    final_scale = 1.0 / math.sqrt(1.0 + final * final)
    sigmas = np.append(sigmas, final)

    n = len(sigmas) - 1
    if strength < 1.0:
        init_timestep = max(1, min(int(n * strength), n))
        t_start = n - init_timestep
        sigmas, ts = sigmas[t_start:], ts[t_start:]

    fn = spec.fn
    extra = {}
    if spec.bind is not None:
        extra.update(spec.bind(dict(schedule=sched, config=config, sigmas=sigmas, timesteps=ts, steps=steps)) or {})
    process_x0 = _x0_processing(config, spec)
    if process_x0 is not None:
        extra["process_x0"] = process_x0
    if extra:
        fn = functools.partial(fn, **extra)
    return SamplerPlan(name, fn, sigmas, ts, init, sched, final_scale=final_scale, schedule_name=schedule)


# ---------------------------------------------------------------------------------------------
# The diffusers counterparts' defaults for the keys each plan reads (``__init__`` signatures;
# tests/export/test_sampler_parity.py checks them against diffusers).

_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
# Euler, EulerAncestral, KDPM2(Ancestral), LMS, DPMSolverSDE
_K_DEFAULTS = {"timestep_spacing": "linspace", "steps_offset": 0, "beta_schedule": "linear"}
_HEUN = {**_K_DEFAULTS, "clip_sample": False, "clip_sample_range": 1.0}
_DPM = {**_K_DEFAULTS, **_THRESHOLD}  # DPMSolverMultistep, UniPCMultistep, DEISMultistep
_DDIM = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True, "beta_schedule": "linear",
         "clip_sample": True, "clip_sample_range": 1.0, **_THRESHOLD}
_DDPM = {"timestep_spacing": "leading", "steps_offset": 0, "beta_schedule": "linear",
         "clip_sample": True, "clip_sample_range": 1.0, **_THRESHOLD}
_LCM = {"timestep_spacing": "leading", "steps_offset": 0, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, "timestep_scaling": 10.0, "clip_sample": False, "clip_sample_range": 1.0,
        **_THRESHOLD}
# TCDScheduler takes clip_sample and thresholding but its step never applies them; neither do we.
_TCD = {"timestep_spacing": "leading", "steps_offset": 0, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50}
_PNDM = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": False, "beta_schedule": "linear",
         "prediction_type": "epsilon"}

# ---------------------------------------------------------------------------------------------
# The registry.  Aliases: A1111/ComfyUI display names, k-diffusion names, diffusers class names.

register(SamplerSpec("euler", _euler.sample_euler, "k", "Euler (Karras et al. 2022), deterministic",
                     ("Euler", "k_euler", "EulerDiscreteScheduler")))
register(SamplerSpec("euler_a", _euler.sample_euler_ancestral, "k", "Euler ancestral, stochastic",
                     ("Euler a", "euler_ancestral", "k_euler_a", "k_euler_ancestral",
                      "EulerAncestralDiscreteScheduler")))
register(SamplerSpec("ddim", _ddim.sample_ddim, "ddim", "DDIM, eta 0 (Song et al. 2021), deterministic",
                     ("DDIM", "DDIMScheduler"), final="alpha_to_one", defaults=_DDIM))
register(SamplerSpec("dpmpp_2m", _dpmpp.sample_dpmpp_2m, "dpm", "DPM-Solver++(2M) multistep (Lu et al. 2022)",
                     ("DPM++ 2M", "k_dpmpp_2m", "DPMSolverMultistepScheduler"), defaults=_DPM))
register(SamplerSpec("dpmpp_2m_karras", _dpmpp.sample_dpmpp_2m, "dpm", "DPM-Solver++(2M) on the Karras schedule",
                     ("DPM++ 2M Karras", "k_dpmpp_2m_karras"), schedule="karras", defaults=_DPM))
register(SamplerSpec("heun", _euler.sample_heun, "k", "Heun, 2nd order, 2 model calls per step (Karras et al. 2022)",
                     ("Heun", "k_heun", "HeunDiscreteScheduler"), defaults=_HEUN))
register(SamplerSpec("dpm2", _euler.sample_dpm_2, "k", "DPM-Solver-2 (Lu et al. 2022), 2 model calls per step",
                     ("DPM2", "dpm_2", "k_dpm_2", "KDPM2DiscreteScheduler")))
register(SamplerSpec("dpm2_a", _euler.sample_dpm_2_ancestral, "k", "DPM-Solver-2 ancestral, stochastic",
                     ("DPM2 a", "dpm_2_ancestral", "dpm2_ancestral", "k_dpm_2_a", "KDPM2AncestralDiscreteScheduler")))
register(SamplerSpec("lms", _lms.sample_lms, "k", "Linear multistep, order 4",
                     ("LMS", "k_lms", "LMSDiscreteScheduler")))
register(SamplerSpec("ddpm", _ddim.sample_ddpm, "ddim", "DDPM ancestral (Ho et al. 2020), stochastic",
                     ("DDPM", "DDPMScheduler"), defaults=_DDPM))
register(SamplerSpec("dpmpp_2m_sde", _dpmpp.sample_dpmpp_2m_sde, "dpm", "DPM-Solver++(2M) SDE, stochastic",
                     ("DPM++ 2M SDE", "k_dpmpp_2m_sde"), defaults=_DPM))
register(SamplerSpec("dpmpp_3m", _dpmpp.sample_dpmpp_3m, "dpm", "DPM-Solver++(3M) multistep, deterministic",
                     ("DPM++ 3M",), defaults=_DPM))
register(SamplerSpec("dpmpp_3m_sde", _dpmpp.sample_dpmpp_3m_sde, "dpm", "DPM-Solver++(3M) SDE, stochastic",
                     ("DPM++ 3M SDE", "k_dpmpp_3m_sde")))
register(SamplerSpec("dpmpp_2s_a", _dpmpp.sample_dpmpp_2s_ancestral, "k",
                     "DPM-Solver++(2S) ancestral, stochastic, 2 model calls per step",
                     ("DPM++ 2S a", "dpmpp_2s_ancestral", "k_dpmpp_2s_ancestral", "k_dpmpp_2s_a")))
register(SamplerSpec("dpmpp_sde", _dpmpp.sample_dpmpp_sde, "k",
                     "DPM-Solver++ SDE singlestep, stochastic, 2 model calls per step",
                     ("DPM++ SDE", "k_dpmpp_sde", "DPMSolverSDEScheduler")))


def _bind_lcm(info):
    scaling = float(_config_value(info["config"], SAMPLERS["lcm"], "timestep_scaling") or 10.0)
    c_skip, c_out = _lcm.lcm_boundary_scalings(info["timesteps"], scaling)
    return {"c_skip": c_skip, "c_out": c_out}


register(SamplerSpec("lcm", _lcm.sample_lcm, "lcm", "Latent Consistency Model sampling (Luo et al. 2023), 2-8 steps",
                     ("LCM", "LCMScheduler"), bind=_bind_lcm, defaults=_LCM))
register(SamplerSpec("unipc", _unipc.sample_unipc, "dpm",
                     "UniPC multistep predictor-corrector (Zhao et al. 2023), bh2, order 2",
                     ("UniPC", "uni_pc", "uni_pc_bh2", "UniPCMultistepScheduler"), defaults=_DPM))
register(SamplerSpec("deis", _deis.sample_deis, "dpm",
                     "DEIS multistep, logrho, order 2 (Zhang & Chen 2023), ends at sigma_min",
                     ("DEIS", "deis_2m", "DEISMultistepScheduler"), final="sigma_min", defaults=_DPM))


def _bind_tcd(info):
    return {"sigmas_s": _tcd.tcd_tables(info["timesteps"], info["schedule"].sigmas, gamma=0.3)}


register(SamplerSpec("tcd", _tcd.sample_tcd, "lcm",
                     "Trajectory Consistency Distillation sampling (Zheng et al. 2024), gamma 0.3, stochastic",
                     ("TCD", "TCDScheduler"), final="sigma_min", bind=_bind_tcd, defaults=_TCD))
def _bind_pndm(info):
    return {"prediction_type": _config_value(info["config"], SAMPLERS["pndm"], "prediction_type")}


register(SamplerSpec("pndm", _pndm.sample_pndm, "ddim",
                     "PLMS: pseudo linear multistep, order 4 (Liu et al. 2022), first step 2 model calls",
                     ("PLMS", "PNDM", "k_plms", "PNDMScheduler"), final="alpha_to_one", bind=_bind_pndm,
                     defaults=_PNDM))
