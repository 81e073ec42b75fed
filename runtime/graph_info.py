"""Just enough of an ONNX file to size a run: nodes, their attributes, initializer shapes.

The runtime does not depend on the ``onnx`` package, so this reads the protobuf wire format itself
(ModelProto.graph = 7; GraphProto node = 1, initializer = 5; NodeProto input = 1, output = 2,
op_type = 4, attribute = 5; AttributeProto name = 1, f = 2, i = 3, t = 5, floats = 7, ints = 8;
TensorProto dims = 1, data_type = 2, float_data = 4, int64_data = 7, name = 8, raw_data = 9). The file is memory
mapped and weights are skipped by offset, so a graph with embedded weights costs no more to read.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

# TensorProto.DataType -> bytes per element (float, uint8, int8, uint16, int16, int32, int64, ...)
ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
SMALL = 16  # float and int64 tensors up to this many values are kept (Resize scales, Reshape shapes)
INT64 = 7


@dataclass
class Node:
    op_type: str
    inputs: list[str]
    outputs: list[str]
    ints: dict[str, list[int]] = field(default_factory=dict)  # int and ints attributes
    tensors: dict[str, list[float]] = field(default_factory=dict)  # small float tensor attributes
    integers: dict[str, list[int]] = field(default_factory=dict)  # small int64 tensor attributes


@dataclass
class GraphInfo:
    nodes: list[Node]
    shapes: dict[str, tuple[int, ...]]  # initializer name -> dims
    values: dict[str, list[float]]  # small float initializers and Constant outputs -> values
    weight_bytes: int
    integers: dict[str, list[int]] = field(default_factory=dict)  # small int64 ones (Reshape shapes)


def _varint(buf, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result - (1 << 64) if result >= 1 << 63 else result), i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) for each field; length-delimited values are (start, end)."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = (i, i + size), i + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = (i, i + width), i + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _ints(buf, wire, value) -> list[int]:
    if wire == 0:
        return [value]
    out, i = [], value[0]
    while i < value[1]:
        v, i = _varint(buf, i)
        out.append(v)
    return out


def _tensor(buf, span) -> tuple[str, tuple[int, ...], int, list[float] | None]:
    """(name, dims, data type, values for small float or int64 tensors else None)."""
    name, dims, dtype, raw, floats, int64s = "", [], 1, None, [], []
    for number, wire, value in _fields(buf, *span):
        if number == 1:
            dims += _ints(buf, wire, value)
        elif number == 7:
            int64s += _ints(buf, wire, value)
        elif number == 2:
            dtype = value
        elif number == 8:
            name = _text(buf, value)
        elif number == 9:
            raw = value
        elif number == 4:
            floats += (struct.unpack("<f", bytes(buf[value[0]:value[1]])) if wire == 5 else
                       struct.unpack(f"<{(value[1] - value[0]) // 4}f", bytes(buf[value[0]:value[1]])))
    count = 1
    for d in dims:
        count *= d
    values = None
    if dtype == 1 and count <= SMALL:
        values = list(struct.unpack(f"<{count}f", bytes(buf[raw[0]:raw[1]]))) if raw else floats or None
    elif dtype == INT64 and count <= SMALL:
        values = list(struct.unpack(f"<{count}q", bytes(buf[raw[0]:raw[1]]))) if raw else int64s or None
    return name, tuple(dims), dtype, values


def _node(buf, span) -> Node:
    node = Node("", [], [])
    for number, wire, value in _fields(buf, *span):
        if number == 1:
            node.inputs.append(_text(buf, value))
        elif number == 2:
            node.outputs.append(_text(buf, value))
        elif number == 4:
            node.op_type = _text(buf, value)
        elif number == 5:
            name, ints, tensor = "", [], None
            for n2, w2, v2 in _fields(buf, *value):
                if n2 == 1:
                    name = _text(buf, v2)
                elif n2 in (3, 8):
                    ints += _ints(buf, w2, v2)
                elif n2 == 5:
                    tensor = _tensor(buf, v2)[2:]
            if ints:
                node.ints[name] = ints
            if tensor is not None and tensor[1] is not None:
                (node.integers if tensor[0] == INT64 else node.tensors)[name] = tensor[1]
    return node


def read_graph(path: str | Path) -> GraphInfo:
    """Parse ``path`` (external data files are never opened; their sizes come from the dims)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graph = next((v for n, w, v in _fields(buf, 0, len(buf)) if n == 7 and w == 2), None)
        if graph is None:
            raise ValueError("no graph in this ONNX file")
        nodes, shapes, values, integers, weight_bytes = [], {}, {}, {}, 0
        for number, wire, value in _fields(buf, *graph):
            if number == 1:
                node = _node(buf, value)
                nodes.append(node)
                if node.op_type == "Constant" and "value" in node.tensors:
                    values[node.outputs[0]] = node.tensors["value"]
                elif node.op_type == "Constant" and "value" in node.integers:
                    integers[node.outputs[0]] = node.integers["value"]
            elif number == 5:
                name, dims, dtype, small = _tensor(buf, value)
                shapes[name] = dims
                count = 1
                for d in dims:
                    count *= d
                weight_bytes += count * ELEMENT_BYTES.get(dtype, 4)
                if small is not None:
                    (integers if dtype == INT64 else values)[name] = small
    return GraphInfo(nodes, shapes, values, weight_bytes, integers)
