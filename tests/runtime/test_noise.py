"""Noise sources without torch: choices, seed range, and the pieces of torch's generator."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.noise import NOISE_SOURCES, TorchCpuGenerator, _fma, _init_genrand, make_rng


def test_unknown_noise_source_names_the_choices():
    with pytest.raises(EdgediffError, match="numpy, torch-cpu"):
        make_rng("cuda", 1)
    assert NOISE_SOURCES == ("numpy", "torch-cpu")


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_outside_64_bits_is_a_user_error(seed):
    with pytest.raises(EdgediffError, match="seed"):
        TorchCpuGenerator(seed)


def test_init_genrand_is_the_reference_mersenne_twister_seeding():
    """numpy's legacy RandomState seeds MT19937 with init_genrand too."""
    for seed in (0, 1, 5489, 2**32 - 1):
        assert np.array_equal(_init_genrand(seed), np.random.RandomState(seed).get_state()[1])


def test_fma_rounds_once():
    a = np.float32(1 + 2**-12)
    # a * a = 1 + 2**-11 + 2**-24: rounded first it loses the 2**-24, fused it decides the rounding
    assert _fma(a, a, np.float32(-1)) == np.float32(2**-11 + 2**-24)
    assert np.float32(a * a) - np.float32(1) == np.float32(2**-11)


@pytest.mark.parametrize("shape", [(), (1,), (15,), (16,), (33,), (1, 4, 64, 64)])
def test_shapes_dtype_and_reproducibility(shape):
    a = TorchCpuGenerator(3).standard_normal(shape, dtype=np.float32)
    b = TorchCpuGenerator(3).standard_normal(shape, dtype=np.float32)
    assert a.shape == shape and a.dtype == np.float32 and np.array_equal(a, b) and np.all(np.isfinite(a))


def test_draws_look_standard_normal():
    z = TorchCpuGenerator(11).standard_normal((4, 128, 128))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    small = np.concatenate([TorchCpuGenerator(s).standard_normal((7,)) for s in range(2000)])
    assert abs(float(small.mean())) < 0.05 and abs(float(small.std()) - 1) < 0.05


def test_only_float32():
    with pytest.raises(EdgediffError, match="float32"):
        TorchCpuGenerator(0).standard_normal((4,), dtype=np.float64)
