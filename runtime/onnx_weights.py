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
from .graph_info import _fields, _ints, _text  # the one protobuf wire reader of the runtime

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
            for field, wire, graph in _fields(buf, 0, len(buf)):
                if field == _MODEL_GRAPH and wire == 2:
                    for sub, sub_wire, span in _fields(buf, *graph):
                        if sub == _GRAPH_INITIALIZER and sub_wire == 2:
                            entry = _tensor(buf, span, path)
                            if entry is not None:
                                index[entry[0]] = entry[1]
            return index
    except (OSError, ValueError, IndexError) as error:
        raise ModelFolderError(f"cannot read the weights of {path}: {error}") from None


def _tensor(buf, span: tuple[int, int], path: Path):
    dims, dtype, name, raw, external, location = [], None, None, None, {}, 0
    for field, wire, value in _fields(buf, *span):
        if field == _T_DIMS:
            dims.extend(_ints(buf, wire, value))
        elif field == _T_DATA_TYPE:
            dtype = value
        elif field == _T_NAME:
            name = _text(buf, value)
        elif field == _T_RAW:
            raw = value[0]
        elif field == _T_EXTERNAL:
            entry = {k: _text(buf, v) for k, w, v in _fields(buf, *value) if w == 2}
            external[entry.get(1, "")] = entry.get(2, "")
        elif field == _T_LOCATION:
            location = value
    if name is None or dtype not in ONNX_DTYPES:
        return None
    if location == 1:  # EXTERNAL
        file = path.parent / external["location"]
        return name, TensorLocation(file, int(external.get("offset", 0)), np.dtype(ONNX_DTYPES[dtype]), tuple(dims))
    if raw is None:
        return None
    return name, TensorLocation(path, raw, np.dtype(ONNX_DTYPES[dtype]), tuple(dims))
