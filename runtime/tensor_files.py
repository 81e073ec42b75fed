"""Tensors from ``.safetensors`` files as NumPy arrays (bf16 included); pickled torch files only on request.

The safetensors format is an 8-byte header length, a JSON header and the raw data, so it is read
here directly: ``safetensors.numpy`` cannot return bfloat16, which many LoRA files use.
"""
from __future__ import annotations

import collections
import json
import pickle
import zipfile
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


# torch's storage classes as its zip checkpoints name them -> NumPy dtypes (bf16 as raw uint16).
_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
             "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def _read_pickle(path: Path, what: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """A torch zip checkpoint read without torch: its pickle may only name tensors, storages and
    dicts (any other class is refused, so nothing in the file runs), its storages become arrays."""
    if not allow_pickle:
        raise EdgediffError(f"{path} is a pickled {what} file (loading it can run code): convert it to "
                            ".safetensors, or pass --allow-pickle")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if not pickles:
                raise ValueError("no data.pkl (only torch's zip format is read)")
            root = pickles[0][: -len("data.pkl")]
            loaded = _TorchUnpickler(archive, root).load()
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as error:
        raise EdgediffError(f"cannot read {what} file {path}: {str(error).splitlines()[0][:200]}") from None
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, _Tensor):
            flat[prefix] = value.array

    walk("", loaded)
    return flat


class _Tensor:
    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied; floats as float32."""
    raw, bf16 = storage
    view = np.lib.stride_tricks.as_strided(raw[offset:], tuple(size), tuple(s * raw.itemsize for s in stride))
    array = np.array(view)
    if bf16:
        return _Tensor((array.astype(np.uint32) << 16).view(np.float32))
    return _Tensor(array.astype(np.float32) if array.dtype.kind == "f" else array)


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(archive.open(root + "data.pkl"))
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"the file names {module}.{name}, which a tensor file does not need")

    def persistent_load(self, pid):
        kind, storage, key = pid[0], pid[1], pid[2]
        if kind != "storage" or storage not in _STORAGES:
            raise pickle.UnpicklingError(f"unknown storage {pid[:2]}")
        data = self.archive.read(f"{self.root}data/{key}")
        return np.frombuffer(data, dtype=_STORAGES[storage]), storage == "BFloat16Storage"
