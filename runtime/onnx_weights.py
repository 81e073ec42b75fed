"""Read single initializers of an ``.onnx`` file without the onnx package and without loading it whole.

LoRA merging needs only the few weights it touches. ONNX files are protobuf, so this walks the
wire format just far enough (ModelProto.graph -> GraphProto.initializer -> TensorProto) to record
where each tensor's bytes lie, in the ``.onnx`` itself or in its external-data file, and reads them
on demand with ``numpy.fromfile``.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelFolderError

# TensorProto.DataType codes -> NumPy dtypes (the float and integer types weights use).
ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_DATA_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14


@dataclass(frozen=True)
class TensorLocation:
    file: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def read(self, count: int | None = None) -> np.ndarray:
        """The tensor (or its first ``count`` elements, flat) as a fresh array."""
        total = int(np.prod(self.shape, dtype=np.int64))
        data = np.fromfile(self.file, dtype=self.dtype, count=total if count is None else min(count, total),
                           offset=self.offset)
        return data if count is not None else data.reshape(self.shape)


def initializer_index(path: str | Path) -> dict[str, TensorLocation]:
    """Where every raw-data initializer of the graph file ``path`` lies. Others (rare) are left out."""
    path = Path(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            index = {}
            for field, start, end in _fields(buf, 0, len(buf)):
                if field == _MODEL_GRAPH:
                    for sub, s, e in _fields(buf, start, end):
                        if sub == _GRAPH_INITIALIZER:
                            entry = _tensor(buf, s, e, path)
                            if entry is not None:
                                index[entry[0]] = entry[1]
            return index
    except (OSError, ValueError, IndexError) as error:
        raise ModelFolderError(f"cannot read the weights of {path}: {error}") from None


def _tensor(buf, start: int, end: int, path: Path):
    dims, dtype, name, raw, external, location = [], None, None, None, {}, 0
    for field, s, e in _fields(buf, start, end):
        if field == _T_DIMS:
            dims.extend(_packed_varints(buf, s, e) if e is not None else [s])
        elif field == _T_DATA_TYPE:
            dtype = s
        elif field == _T_NAME:
            name = bytes(buf[s:e]).decode()
        elif field == _T_RAW:
            raw = s
        elif field == _T_EXTERNAL:
            entry = {k: bytes(buf[a:b]).decode() for k, a, b in _fields(buf, s, e)}
            external[entry.get(1, "")] = entry.get(2, "")
        elif field == _T_LOCATION:
            location = s
    if name is None or dtype not in ONNX_DTYPES:
        return None
    if location == 1:  # EXTERNAL
        file = path.parent / external["location"]
        return name, TensorLocation(file, int(external.get("offset", 0)), np.dtype(ONNX_DTYPES[dtype]), tuple(dims))
    if raw is None:
        return None
    return name, TensorLocation(path, raw, np.dtype(ONNX_DTYPES[dtype]), tuple(dims))


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _packed_varints(buf, start: int, end: int) -> list[int]:
    values, pos = [], start
    while pos < end:
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def _fields(buf, start: int, end: int):
    """(field number, a, b) per field: a varint's (value, None), a length-delimited field's byte span."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, value, None
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield field, pos, pos + length
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
