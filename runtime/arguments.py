"""Checks of a generation's arguments: each bad value is one InputError that names it."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from .errors import InputError

MAX_SEED = 2**64 - 1  # torch-compatible noise seeds a 64-bit generator
MAX_SIDE = 65536  # beyond any memory today; keeps sizes inside the ints ONNX Runtime indexes with


def is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def random_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


def check_seed(seed) -> None:
    """A seed is None, a whole number up to 2**64 - 1, or negative (both: a fresh one)."""
    if seed is None:
        return
    if not is_whole(seed):
        raise InputError(f"seed must be a whole number (negative: random), not {short(seed)}")
    if int(seed) > MAX_SEED:
        raise InputError(f"seed must be at most 2**64 - 1 = {MAX_SEED}, not {seed}")


def resolve_seed(seed) -> int:
    """The seed to use: ``seed`` itself in [0, 2**64 - 1]; None or any negative number: a fresh one."""
    check_seed(seed)
    return random_seed() if seed is None or int(seed) < 0 else int(seed)


def prompt_list(value, label: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence) or \
            not all(isinstance(text, str) for text in texts):
        raise InputError(f"{label} must be text or a list of texts, not {short(value)}")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{label} is not valid Unicode text (it holds a lone surrogate)") from None
    return list(texts)


def check_guidance(guidance) -> float:
    if not is_real(guidance) or not math.isfinite(guidance) or guidance < 0:
        raise InputError(f"guidance must be a finite number >= 0, not {short(guidance)}")
    return float(guidance)


def check_name(value, label: str):
    if value is not None and not isinstance(value, str):
        raise InputError(f"{label} must be a name, not {short(value)}")
    return value


def check_side(label: str, value, multiple: int) -> int:
    if not is_whole(value) or value <= 0 or value % multiple:
        raise InputError(f"{label} must be a positive multiple of {multiple} for this model, not {short(value)}")
    if value > MAX_SIDE:
        raise InputError(f"{label} must be at most {MAX_SIDE}, not {value}")
    return int(value)


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
