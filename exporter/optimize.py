"""Graph optimization per target and precision conversion (fp16, int8) of exported graphs.

Graphs arrive stripped (weights.py): their big tensors are external data in a work folder.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import onnx

from .weights import TWO_GB

TARGETS = ("cuda", "dml", "cpu", "none")
# Fusions whose kernels exist only in the CUDA execution provider (DESIGN.md).
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
    "enable_bias_add", "enable_packed_qkv", "enable_packed_kv",
)


def optimize(model: onnx.ModelProto, folder: Path, optimizer_type: str, target: str,
             fuse_attention: bool = True) -> onnx.ModelProto:
    """Fuse attention, LayerNorm, GELU...; the CUDA-only fusions only when targeting CUDA.

    ``model`` is stripped, its external tensors under ``folder``. ``fuse_attention=False`` keeps
    attention as MatMul/Softmax so its scores can stay fp32.
    """
    if target == "none":
        return model
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(optimizer_type)
    options.enable_attention = fuse_attention
    if target != "cuda":
        for flag in CUDA_ONLY_FUSIONS:
            if hasattr(options, flag):
                setattr(options, flag, False)
    # The fusions read the few weights they repack (q/k/v, NHWC convolutions) through onnx's
    # external-data loader, which resolves file names against the working directory.
    with _working_directory(folder):
        optimized = optimize_model(
            model, model_type=optimizer_type, num_heads=0, hidden_size=0, opt_level=0,
            optimization_options=options, use_gpu=target == "cuda",
        )
    model = optimized.model
    declare_contrib_domain(model)
    return model


@contextmanager
def _working_directory(folder: Path):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def declare_contrib_domain(model: onnx.ModelProto) -> None:
    """Fused ops live in ONNX Runtime's com.microsoft domain, which the optimizer leaves undeclared."""
    uses = any(node.domain == "com.microsoft" for node in model.graph.node)
    if uses and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def attention_score_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of unfused attention Softmax nodes and the score MatMuls that feed them.

    These overflow float16 in SD 2.x (diffusers' ``upcast_attention``), so they stay float32.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        names.append(node.name)
        current = producers.get(node.input[0])
        while current is not None and current.op_type in ("Mul", "Div", "Add", "Cast"):
            current = producers.get(current.input[0])
        if current is not None and current.op_type == "MatMul":
            names.append(current.name)
    return names


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn Constant nodes into initializers.

    The fp16 converter keeps initializers that feed fp32-only inputs (Resize scales) in fp32, but
    would convert the same tensor held by a Constant node and make the graph invalid.
    """
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def to_fp16(model: onnx.ModelProto, keep_fp32_nodes: list[str], keep_io: list[str]) -> onnx.ModelProto:
    """ONNX Runtime's converter on a stripped graph: it retypes the external tensors, whose data
    weights.write_graph converts as it writes them."""
    from onnxruntime.transformers import float16

    constants_to_initializers(model)
    # The converter reads each converted tensor's data only to learn its shape, which its dims give.
    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = _value_info_from_dims
    try:
        return float16.convert_float_to_float16(
            model, keep_io_types=keep_io, node_block_list=keep_fp32_nodes or None, disable_shape_infer=True
        )
    finally:
        float16.make_value_info_from_tensor = original


def _value_info_from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes stable names so a node block list can refer to them."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def quantize_int8(model_path: Path, out_path: Path) -> None:
    """Dynamic int8 weights for MatMul/Attention/Gemm (onnxruntime.quantization).

    ``DefaultTensorType`` is needed on fused graphs, whose contrib ops lack type information.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(model_path), str(out_path), weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Attention", "Gemm"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        # Count the external-data file too: a >2 GB graph is saved as a small .onnx beside its weights.
        use_external_data_format=_size_on_disk(model_path) > TWO_GB // 2,
    )


def _size_on_disk(model_path: Path) -> int:
    data = model_path.with_name(model_path.name + ".data")
    return model_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
