"""FLOPs of an ONNX graph at concrete input shapes, counted from the graph itself.

Counted: Conv/ConvTranspose, MatMul (and the int8 MatMul forms), Gemm, and the attention products
of fused attention ops (QK^T and softmax(QK^T)V, plus the packed projection of ``Attention``). A
multiply-add is 2 FLOPs. Norms, activations and elementwise ops are not counted: they are a few
percent of a diffusion U-Net's arithmetic, so the count is a slight underestimate.
"""
from __future__ import annotations

from math import prod
from pathlib import Path

import onnx

MATMUL_OPS = {"MatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul",
              "FusedMatMul", "MatMulNBits"}
ATTENTION_OPS = {"Attention", "MultiHeadAttention"}


def _with_concrete_inputs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    # Weights stored as external data (not loaded) become shaped graph inputs: shape inference needs
    # their shapes, never their values.
    external = [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        copy.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    if external:
        kept = [t for t in copy.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        del copy.graph.initializer[:]
        copy.graph.initializer.extend(kept)
    for value in copy.graph.input:
        if value.name not in input_shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = input_shapes[value.name]
        if len(dims) != len(shape):
            raise ValueError(f"input {value.name!r} has rank {len(dims)}, got shape {shape}")
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    return copy


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Shape of every tensor: ONNX shape inference, with ONNX Runtime's symbolic inference first

    (it knows the fused ``com.microsoft`` ops that ONNX's own inference leaves unshaped)."""
    model = _with_concrete_inputs(model, input_shapes)
    inferred = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # On an incomplete inference it writes sym_shape_infer_temp.onnx into the working directory.
        import os
        import tempfile

        here = os.getcwd()
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)
            try:
                inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
            finally:
                os.chdir(here)
    except Exception:
        inferred = None
    if inferred is None:
        inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def count_flops(model: onnx.ModelProto | str | Path, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """{"total": FLOPs, "by_op": {op: FLOPs}, "uncounted": [nodes whose shapes were unknown]}."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    shapes = infer_shapes(model, input_shapes)
    by_op: dict[str, int] = {}
    uncounted: list[str] = []
    for node in model.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            if node.op_type in MATMUL_OPS | ATTENTION_OPS | {"Conv", "ConvTranspose", "Gemm"}:
                uncounted.append(node.name or node.op_type)
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + 2 * macs
    return {"total": sum(by_op.values()), "by_op": by_op, "uncounted": uncounted}


def _attr(node, name, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _node_macs(node, shapes) -> int | None:
    get = lambda i: shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None  # noqa: E731
    out = shapes.get(node.output[0]) if node.output else None
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        weight = get(1)
        if weight is None or out is None:
            return None
        if op == "Conv":  # W: (M, C/group, k...) ; every output element costs C/group * prod(k)
            return prod(out) * prod(weight[1:])
        x = get(0)  # ConvTranspose W: (C, M/group, k...): every input element spreads over M/group * prod(k)
        return None if x is None else prod(x) * prod(weight[1:])
    if op in MATMUL_OPS:
        a = get(0)
        if a is None or out is None:
            return None
        return prod(out) * a[-1]
    if op == "Gemm":
        a = get(0)
        if a is None or out is None:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return prod(out) * k
    if op == "Attention":  # packed: input (B, S, Hin), weights (Hin, 3H)
        x, weight = get(0), get(1)
        if x is None or weight is None:
            return None
        batch, seq, hidden_in = x
        qk_hidden = weight[1] // 3
        return batch * seq * hidden_in * weight[1] + 2 * batch * seq * seq * qk_hidden
    if op == "MultiHeadAttention":
        q, k = get(0), get(1)
        if q is None or out is None:
            return None
        batch, seq_q = q[0], q[1]
        if k is None:  # packed QKV in query (B, S, N, 3, h)
            return 2 * batch * seq_q * seq_q * prod(q[2:]) // 3
        if len(k) == 3:  # (B, S_kv, H)
            seq_kv, hidden_k = k[1], k[2]
        elif len(k) == 5:  # packed KV (B, S_kv, N, 2, h)
            seq_kv, hidden_k = k[1], k[2] * k[4]
        else:  # (B, N, S_kv, h)
            seq_kv, hidden_k = k[2], k[1] * k[3]
        hidden_v = out[-1]
        return batch * seq_q * seq_kv * (hidden_k + hidden_v)
    return None


def unet_input_shapes(manifest, batch: int, latent_height: int, latent_width: int) -> dict[str, tuple]:
    """Concrete U-Net input shapes from the manifest's specs (symbolic axes filled in)."""
    # "context": one prompt chunk of max_length tokens (exports with long-prompt support name the axis)
    sizes = {"batch": batch, "latent_height": latent_height, "latent_width": latent_width,
             "context": manifest.tokenizer["max_length"]}
    entry = manifest.graphs["unet"]
    return {spec.name: tuple(sizes[a] if isinstance(a, str) else a for a in spec.shape) for spec in entry.inputs}


def unet_step_flops(model_dir: Path, batch: int, latent_height: int, latent_width: int) -> dict:
    """FLOPs of one U-Net call of an exported model at a batch (2 x images with guidance) and size."""
    from edgediff.runtime.manifest import read_manifest

    manifest = read_manifest(Path(model_dir))
    path = Path(model_dir) / manifest.graphs["unet"].path
    return count_flops(path, unet_input_shapes(manifest, batch, latent_height, latent_width))


__all__ = ["count_flops", "infer_shapes", "unet_step_flops", "unet_input_shapes"]
