"""Tensors from ``.safetensors`` files as NumPy arrays (bf16 included); pickled files only on request.

The safetensors format is an 8-byte header length, a JSON header and the raw data, so it is read
here directly: ``safetensors.numpy`` cannot return bfloat16, which many LoRA files use.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import EdgediffError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_tensors(path: str | Path, what: str, *, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, metadata) of a ``what`` file (e.g. "LoRA"); float tensors come back as float32."""
    path = Path(path)
    if not path.is_file():
        raise EdgediffError(f"{what} file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path, what, allow_pickle), {}
    if path.suffix.lower() != ".safetensors":
        raise EdgediffError(f"{path} is not a .safetensors {what} file")
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError("bad header size")
            header = json.loads(handle.read(size))
        start = 8 + size
        data = np.memmap(path, dtype=np.uint8, mode="r")
        tensors = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            begin, end = spec["data_offsets"]
            raw = data[start + begin:start + end].view(_DTYPES[spec["dtype"]]).reshape(spec["shape"])
            if spec["dtype"] == "BF16":  # bfloat16 is the top half of a float32
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = raw.astype(np.float32) if raw.dtype.kind == "f" else np.array(raw)
        return tensors, dict(header.get("__metadata__") or {})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EdgediffError(f"cannot read {what} file {path}: not a valid .safetensors file ({error})") from None


def _read_pickle(path: Path, what: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not allow_pickle:
        raise EdgediffError(f"{path} is a pickled {what} file (loading it can run code): convert it to "
                            ".safetensors, or pass --allow-pickle")
    try:
        import torch  # only here: the runtime itself never needs torch
    except ImportError:
        raise EdgediffError(f"reading the pickled {what} file {path} needs torch (pip install torch); "
                            "or convert it to .safetensors") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad pickles
        raise EdgediffError(f"cannot read {what} file {path}: {str(error).splitlines()[0][:200]}") from None
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value.detach().float().numpy() if value.is_floating_point() else value.numpy()

    walk("", loaded)
    return flat
