"""Noise sources: NumPy's generator, or torch's CPU generator reproduced without torch.

``noise="torch-cpu"`` gives, for a seed, exactly the float32 values of
``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``, and keeps drawing from the
same stream afterwards as diffusers' schedulers do (``randn_tensor`` on the pipeline's generator),
so a seed from diffusers or ComfyUI on the CPU means the same starting noise here.

How torch draws (ATen: ``CPUGeneratorImpl``, ``MT19937RNGEngine.h``, ``DistributionsHelper.h``,
``TransformationHelper.h``, ``native/cpu/DistributionTemplates.h``, ``avx_mathfun.h``):

- The engine is MT19937 seeded by ``init_genrand`` with the low 32 bits of the 64-bit seed.
- A float32 uniform is one 32-bit word: ``(w & (2**24 - 1)) * 2**-24``.
- Tensors of 16 or more elements: one uniform per element, then Box-Muller on blocks of 16
  (``u1 = 1 - data[j]``, ``u2 = data[j + 8]``, ``data[j] = r cos(theta)``, ``data[j + 8] = r sin(theta)``);
  when the size is not a multiple of 16 the last 16 elements are redrawn from 16 fresh uniforms.
  On x86-64 CPUs with AVX2 torch runs this in float32 with the Cephes polynomials of
  ``avx_mathfun.h`` (``log256_ps``, ``sincos256_ps``); the compiler fuses some multiply-adds into
  FMAs, reproduced here exactly (bit for bit against torch 2.13; CPUs without AVX2, ARM, or
  ``ATEN_CPU_CAPABILITY=default`` use the C library's ``logf``/``cosf`` and differ in the last bit).
- Smaller tensors: per element, double-precision Box-Muller from two 53-bit uniforms (two words
  each, the first the high half), the second value of each pair kept for the next element or the
  next small draw (torch's ``next_double_normal_sample``), cast to float32.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import EdgediffError

NOISE_SOURCES = ("numpy", "torch-cpu")
_F = np.float32


def make_rng(noise: str, seed: int | None):
    """The generator for ``noise`` seeded with ``seed`` (an int in [0, 2**64 - 1]; None: fresh)."""
    if noise == "numpy":
        return np.random.default_rng(seed)
    if noise == "torch-cpu":
        return TorchCpuGenerator(int(np.random.SeedSequence().entropy % 2**64) if seed is None else seed)
    raise EdgediffError(f"unknown noise source {noise!r}; expected one of {', '.join(NOISE_SOURCES)}")


class TorchCpuGenerator:
    """``torch.Generator().manual_seed(seed)`` for ``torch.randn`` in float32, without torch.

    ``standard_normal(shape, dtype=np.float32)`` is one ``torch.randn(shape, generator=g)`` call."""

    def __init__(self, seed: int):
        seed = int(seed)
        if not 0 <= seed < 2**64:
            raise EdgediffError(f"seed must be in [0, 2**64 - 1] (got {seed})")
        self.seed = seed
        self._mt = np.random.MT19937(0)
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": _init_genrand(seed & 0xFFFFFFFF), "pos": 624}}
        self._next_normal = None  # torch's cached second Box-Muller value of the scalar path

    def _words(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n).astype(np.uint32)

    def standard_normal(self, size=None, dtype=np.float32) -> np.ndarray:
        if np.dtype(dtype) != np.float32:
            raise EdgediffError("torch-cpu noise is float32 (torch.randn's default dtype)")
        shape = () if size is None else (tuple(size) if np.iterable(size) else (int(size),))
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 16:
            out = _uniform24(self._words(n))
            full = n // 16 * 16
            out[:full] = _box_muller_16(out[:full].reshape(-1, 16)).reshape(-1)
            if n % 16:
                out[n - 16:] = _box_muller_16(_uniform24(self._words(16)).reshape(1, 16)).reshape(-1)
        else:
            out = np.array([self._scalar_normal() for _ in range(n)], dtype=np.float32)
        return out.reshape(shape)

    def _scalar_normal(self) -> float:
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        w = self._words(4).astype(np.uint64)
        u1, u2 = (float(((hi << np.uint64(32)) | lo) & np.uint64(2**53 - 1)) * 2.0**-53 for hi, lo in (w[:2], w[2:]))
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = r * math.sin(theta)
        return r * math.cos(theta)


def _init_genrand(seed32: int) -> np.ndarray:
    """MT19937 ``init_genrand`` (Matsumoto & Nishimura 1998) state for a 32-bit seed."""
    key = np.empty(624, dtype=np.uint32)
    s = key[0] = seed32
    for j in range(1, 624):
        s = key[j] = (1812433253 * (s ^ (s >> 30)) + j) & 0xFFFFFFFF
    return key


def _uniform24(words: np.ndarray) -> np.ndarray:
    return (words & np.uint32(0xFFFFFF)).astype(np.float32) * _F(2.0**-24)


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add, rounded once: the float64 product is exact; the sum is rounded
    to odd (TwoSum error sets the last bit) so the final rounding to float32 is the only one."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = p + c
    bp = s - p
    err = (p - (s - bp)) + (c - bp)
    inexact_even = (err != 0) & ((s.view(np.uint64) & np.uint64(1)) == 0)
    s = np.where(inexact_even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


_LOG_P = [_F(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]


def _log256(x: np.ndarray) -> np.ndarray:
    """avx_mathfun ``log256_ps`` for x in (0, 1] (Cephes logf)."""
    bits = np.maximum(x, np.array(0x00800000, np.uint32).view(np.float32)).view(np.uint32)
    e = ((bits >> np.uint32(23)).astype(np.int32) - 0x7F).astype(np.float32) + _F(1)
    x = ((bits & np.uint32(0x807FFFFF)) | np.float32(0.5).view(np.uint32)).view(np.float32)
    below = x < _F(0.707106781186547524)
    e = e - below.astype(np.float32)
    x = (x - _F(1)) + np.where(below, x, _F(0))
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, x, p)
    y = _fma(y * x, z, e * _F(-2.12194440e-4))
    y = y - z * _F(0.5)
    return _fma(e, _F(0.693359375), x + y)


def _sincos256(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun ``sincos256_ps`` for x >= 0 (Cephes sinf/cosf)."""
    j = (x * _F(1.27323954473516)).astype(np.int32)  # truncation, as cvttps
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    sin_sign = ((j & 4) << 29).astype(np.uint32)
    cos_sign = ((~(j - 2) & 4) << 29).astype(np.uint32)
    use_sin_poly = (j & 2) == 0
    for dp in (_F(-0.78515625), _F(-2.4187564849853515625e-4), _F(-3.77489497744594108e-8)):
        x = _fma(y, dp, x)
    z = x * x
    c = _fma(_fma(np.full_like(x, _F(2.443315711809948e-005)), z, _F(-1.388731625493765e-003)), z,
             _F(4.166664568298827e-002))
    c = _fma(c * z, z, -(z * _F(0.5))) + _F(1)
    s = _fma(_fma(np.full_like(x, _F(-1.9515295891e-4)), z, _F(8.3321608736e-3)), z, _F(-1.6666654611e-1))
    s = _fma(s * z, x, x)
    sin = np.where(use_sin_poly, s, c).view(np.uint32) ^ sin_sign
    cos = np.where(use_sin_poly, c, s).view(np.uint32) ^ cos_sign
    return sin.view(np.float32), cos.view(np.float32)


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """torch's ``NormalFill16`` (AVX2) on rows of 16 uniforms."""
    radius = np.sqrt(_F(-2) * _log256(_F(1) - u[:, :8]))
    sin, cos = _sincos256(_F(2 * math.pi) * u[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1)
