"""Graph weights kept on disk between export stages and streamed, tensor by tensor, into the result.

Between tracing and the final file a graph is handled "stripped": every tensor of ``INLINE_BYTES``
or more lives in a file in the graph's work folder (ONNX external data), so fusion, fp16 conversion
and their copies of the graph cost kilobytes, not gigabytes. The final file is written one tensor at
a time; fp16 is applied there to tensors the converter retyped but could not reach.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

INLINE_BYTES = 1024  # what stays inside the graph: shapes, scales, small constants
TWO_GB = 2 * 1024**3
# A graph up to this size is one self-contained .onnx; beyond it protobuf cannot hold it.
EMBED_LIMIT = TWO_GB - 64 * 1024**2
DATA_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data")
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9  # protobuf field numbers (onnx.proto)


def load_stripped(path: Path, spill_to: str) -> onnx.ModelProto:
    """Load a graph with its big tensors left on disk; those held inside the file move to ``spill_to``."""
    model = onnx.load(str(path), load_external_data=False)
    _external_constants_to_initializers(model)
    spill(model, path.parent, spill_to)
    return fresh(model)


def _external_constants_to_initializers(model: onnx.ModelProto) -> None:
    """A graph over 2 GB is written by torch's exporter with big Constant-node values as external files
    too (SD3's AdaLayerNorm constants): as initializers they are handled like every other weight,
    where a tool that reads Constant nodes (the int4 quantizer) would not find their files."""
    kept = []
    for node in model.graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if value is not None and node.attribute[0].name == "value" and _is_external(value):
            tensor = TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            kept.append(node)
    if len(kept) < len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def spill(model: onnx.ModelProto, folder: Path, name: str) -> None:
    """Move every big in-memory initializer into ``folder/name`` and leave a reference behind."""
    with open(folder / name, "ab") as out:
        for tensor in model.graph.initializer:
            if _is_external(tensor):
                tensor.ClearField("raw_data")  # a fusion read it; the copy on disk is unchanged
            else:
                spill_tensor(tensor, out, name)


def spill_tensor(tensor: TensorProto, out, name: str) -> None:
    """Append a big in-memory tensor's bytes to the open file ``out`` (``name`` in the graph's folder)
    and leave a reference behind; small and string tensors stay as they are."""
    if not _is_external(tensor) and tensor.data_type != TensorProto.STRING and nbytes(tensor) >= INLINE_BYTES:
        data = _inline_bytes(tensor)
        offset = out.tell()
        out.write(data)
        _point_to(tensor, name, offset, len(data))


def fresh(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in a new protobuf arena: upb frees a cleared field's bytes only with the whole message."""
    return onnx.ModelProto.FromString(model.SerializeToString())


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop the initializers no node reads any more, and the Identity nodes (the tracer's hand-on of a
    shared weight) whose output nobody reads: what a rewrite that replaced weights leaves behind."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {name for node in model.graph.node for name in node.input} | outputs
        unused = [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] not in used]
        if not unused:
            break
        for node in unused:
            model.graph.node.remove(node)
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def nbytes(tensor: TensorProto) -> int:
    count = 1
    for axis in tensor.dims:
        count *= axis
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def write_graph(model: onnx.ModelProto, path: Path, folder: Path) -> list[Path]:
    """Write a stripped graph whose external tensors live under ``folder``; returns the files made.

    Up to ``EMBED_LIMIT`` the result is one .onnx as ``onnx.save`` makes it; beyond, its weights go
    to one ``.onnx.data`` file beside it (never hundreds).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = _data_path(path)
    data_path.unlink(missing_ok=True)
    if sum(nbytes(t) for t in model.graph.initializer if t.data_type != TensorProto.STRING) < EMBED_LIMIT:
        _write_embedded(model, path, folder)
        return [path]
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    with open(data_path, "wb") as out:
        for tensor in shell.graph.initializer:
            if _is_external(tensor) or (tensor.data_type != TensorProto.STRING and nbytes(tensor) >= INLINE_BYTES):
                data = tensor_bytes(tensor, folder)
                offset = out.tell()
                out.write(data)
                _point_to(tensor, data_path.name, offset, len(data))
    onnx.save_model(shell, str(path))
    return [path, data_path]


def remove_graph(path: Path) -> None:
    """Delete a graph written by ``write_graph``, its ``.onnx.data`` too."""
    path.unlink(missing_ok=True)
    _data_path(path).unlink(missing_ok=True)


def _data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def tensor_bytes(tensor: TensorProto, folder: Path) -> bytes:
    """A tensor's data as its declared type, read from disk when external; fp32 data of a tensor
    the fp16 converter retyped is converted here, as the converter would have done."""
    if not _is_external(tensor):
        return _inline_bytes(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    offset = int(info.get("offset", 0))
    file = folder / info["location"]
    length = int(info["length"]) if "length" in info else file.stat().st_size - offset
    with open(file, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    if tensor.data_type == TensorProto.FLOAT16 and length == 2 * nbytes(tensor):
        from onnxruntime.transformers.float16 import convert_np_to_float16

        data = convert_np_to_float16(np.frombuffer(data, dtype=np.float32)).tobytes()
    return data


def _write_embedded(model: onnx.ModelProto, path: Path, folder: Path) -> None:
    """Serialize the graph with its initializers appended field by field, each read when written.

    Protobuf parsers accept a message's fields in any order, so the graph without initializers is
    written first and each initializer follows as one more ``initializer`` field.
    """
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    entries = []  # (serialized tensor without its data, the tensor) per initializer
    for tensor in shell.graph.initializer:
        if _is_external(tensor):
            meta = TensorProto()
            meta.CopyFrom(tensor)
            meta.ClearField("external_data")
            meta.ClearField("data_location")
            for field in DATA_FIELDS:
                meta.ClearField(field)
            entries.append((meta.SerializeToString(), tensor))
        else:
            entries.append((tensor.SerializeToString(), None))
    lengths = []
    for head, tensor in entries:
        size = len(head) + (_field_size(_TENSOR_RAW_DATA, nbytes(tensor)) if tensor is not None else 0)
        lengths.append(size)
    shell.graph.ClearField("initializer")
    graph = shell.graph.SerializeToString()
    shell.ClearField("graph")
    graph_length = len(graph) + sum(_field_size(_GRAPH_INITIALIZER, size) for size in lengths)
    with open(path, "wb") as out:
        out.write(shell.SerializeToString())
        out.write(_key(_MODEL_GRAPH, graph_length))
        out.write(graph)
        for (head, tensor), size in zip(entries, lengths):
            out.write(_key(_GRAPH_INITIALIZER, size))
            out.write(head)
            if tensor is not None:
                data = tensor_bytes(tensor, folder)
                out.write(_key(_TENSOR_RAW_DATA, len(data)))
                out.write(data)


def _key(field: int, length: int) -> bytes:
    """A length-delimited field's tag and length (protobuf wire format)."""
    return _varint(field << 3 | 2) + _varint(length)


def _field_size(field: int, length: int) -> int:
    return len(_key(field, length)) + length


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _inline_bytes(tensor: TensorProto) -> bytes:
    return tensor.raw_data if tensor.raw_data else numpy_helper.to_array(tensor).tobytes()


def _point_to(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    for field in DATA_FIELDS:
        tensor.ClearField(field)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL
