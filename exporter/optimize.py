"""Graph optimization per target and precision conversion (fp16, int8, int4) of exported graphs.

Graphs arrive stripped (weights.py): their big tensors are external data in a work folder.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import onnx


TARGETS = ("cuda", "dml", "cpu", "none")
# Fusions whose kernels exist only in the CUDA execution provider: the CPU provider cannot load a
# graph that uses them (NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, packed q/k/v).
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
    # external-data loader, told here to look in ``folder``.
    with _external_data_in(folder), _spilling_new_initializers(folder, "fused.bin"), _quiet_optimizers():
        optimized = optimize_model(
            model, model_type=optimizer_type, num_heads=0, hidden_size=0, opt_level=0,
            optimization_options=options, use_gpu=target == "cuda",
        )
    model = optimized.model
    declare_contrib_domain(model)
    return model


@contextmanager
def _quiet_optimizers():
    """ONNX Runtime's U-Net and MMDiT optimizers draw their own tqdm bars, the MMDiT one warns that its
    graph needs onnxruntime(-gpu)>=1.21 (pyproject requires it), and their symbolic shape inference
    warns about every dimension it cannot compare: our progress lines replace all of it. The
    optimizers ask ``is_installed("tqdm")`` before drawing."""
    import sys

    # ONNX Runtime imports its model optimizers as top-level modules.
    modules = [m for m in map(sys.modules.get, ("onnx_model_unet", "onnx_model_mmdit")) if m is not None]
    installed = [(m, m.is_installed) for m in modules]
    loggers = [logging.getLogger(name) for name in (*(m.__name__ for m in modules), "symbolic_shape_infer")]
    levels = [(logger, logger.level) for logger in loggers]
    for module, is_installed in installed:
        module.is_installed = lambda package, is_installed=is_installed: package != "tqdm" and is_installed(package)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for module, is_installed in installed:
            module.is_installed = is_installed
        for logger, level in levels:
            logger.setLevel(level)


@contextmanager
def _spilling_new_initializers(folder: Path, name: str):
    """Write each weight a fusion makes (packed q/k/v, NHWC convolutions) to ``folder/name`` before it
    joins the graph. In the graph's protobuf arena its bytes would stay until the whole graph is
    freed, and every shape inference the fusions run copies them (measured: the SDXL U-Net's CUDA
    fusions peaked at 15.2 GiB with them in memory)."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path)
    # The fusions import ``onnx_model`` as a top-level module: that class, not the package's, is theirs.
    from onnx_model import OnnxModel

    from .weights import spill_tensor

    original = OnnxModel.add_initializer
    with open(folder / name, "ab") as out:
        def add_initializer(self, tensor, graph_name=None):
            spill_tensor(tensor, out, name)
            out.flush()  # a later fusion may read it back through the external-data loader
            return original(self, tensor, graph_name)

        OnnxModel.add_initializer = add_initializer
        try:
            yield
        finally:
            OnnxModel.add_initializer = original


@contextmanager
def _external_data_in(folder: Path):
    """Resolve external tensors against ``folder`` while ONNX Runtime's tools read them.

    ONNX Runtime's fusions and quantizers read weights with ``onnx.numpy_helper.to_array(tensor)``
    (and the int4 quantizer with ``onnx_ir.from_proto(tensor)``), whose base folder defaults to the
    working directory, and take no folder argument. onnx refuses absolute tensor locations, so the
    readers get the folder as their default instead: the process's working directory is never
    changed (changing it broke relative output paths, and it is global state).
    """
    import onnx_ir.serde
    from onnx import numpy_helper

    base = str(Path(folder).resolve())
    to_array, deserialize_tensor = numpy_helper.to_array, onnx_ir.serde.deserialize_tensor

    def to_array_in_folder(tensor, base_dir: str = base):
        return to_array(tensor, base_dir or base)

    def deserialize_in_folder(proto, base_path: str | Path = base):
        return deserialize_tensor(proto, base_path or base)

    numpy_helper.to_array, onnx_ir.serde.deserialize_tensor = to_array_in_folder, deserialize_in_folder
    try:
        yield
    finally:
        numpy_helper.to_array, onnx_ir.serde.deserialize_tensor = to_array, deserialize_tensor


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
    _declare_float_values(model, set(keep_fp32_nodes))
    # The converter reads each converted tensor's data only to learn its shape, which its dims give.
    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = _value_info_from_dims
    try:
        converted = float16.convert_float_to_float16(
            model, keep_io_types=keep_io, node_block_list=keep_fp32_nodes or None, disable_shape_infer=True
        )
    finally:
        float16.make_value_info_from_tensor = original
    _skip_fp16_round_trips(converted)
    return converted


def _skip_fp16_round_trips(model: onnx.ModelProto) -> None:
    """The converter casts each kept node's output to fp16 and back for the next kept node; a value
    passed between two kept nodes (T5's huge residual stream) must not pass through fp16: the fp32
    reader takes the fp32 value directly, and casts left without readers go."""
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producers = {out: node for node in model.graph.node for out in node.output}
    rename = {}
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.input else None
        if cast_to(node) == FLOAT and source is not None and cast_to(source) == FLOAT16:
            rename[node.output[0]] = source.input[0]  # fp32 -> fp16 -> fp32: take the fp32 value
    if not rename:
        return
    for node in model.graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    outputs = {o.name for o in model.graph.output}
    while True:  # drop casts nobody reads any more
        read = {name for node in model.graph.node for name in node.input} | outputs
        unused = [n for n in model.graph.node if n.op_type == "Cast" and not any(o in read for o in n.output)]
        if not unused:
            return
        for node in unused:
            model.graph.node.remove(node)


def _declare_float_values(model: onnx.ModelProto, kept: set[str]) -> None:
    """Type the activations around nodes kept fp32 as float where nothing typed them: the converter puts
    its fp16<->fp32 casts only around values it has a type for, and a stripped graph (no shape
    inference, fused contrib ops) types few. Kept nodes compute in float (attention scores, T5's
    residual adds and RMS norms, MatMuls), so their non-weight inputs and outputs are float."""
    typed = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    typed |= {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in kept:
            continue
        for name in (*node.input, *node.output):
            if name and name not in typed:
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                typed.add(name)


def _value_info_from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes stable names so a node block list can refer to them."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def quantize_int8(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """Dynamic int8 weights for MatMul/Attention/Gemm: what ``quantize_dynamic`` does, on a stripped graph.

    ``quantize_dynamic`` would load and copy the whole fp32 graph; its quantizer reads only the
    weights it quantizes (from ``folder``, as the fusions do) and leaves the rest
    external. ``DefaultTensorType`` is needed on fused graphs, whose contrib ops lack type information.
    Gemms become MatMuls first, their weights transposed on disk: the quantizer would transpose them
    into the graph itself and then serialize it for shape inference, which fails past protobuf's 2 GB
    (SD 3.5 Medium's adaLN Gemms hold 3.1 GB).
    """
    from onnxruntime.quantization import QuantType, onnx_quantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, update_opset_version

    model = gemm_to_matmul(model, folder)

    # The quantizer refreshes shapes by saving the graph with its weights and loading it back;
    # for a stripped graph shape inference needs neither.
    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    onnx_quantizer.save_and_reload_model_with_shape_infer = _infer_shapes
    try:
        with _external_data_in(folder):
            model = update_opset_version(_infer_shapes(model), QuantType.QInt8)
            quantizer = onnx_quantizer.ONNXQuantizer(
                model, False, False, QuantizationMode.IntegerOps, False, QuantType.QInt8, QuantType.QUInt8, None,
                [], [], ["MatMul", "Attention", "Gemm"],
                {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
            )
            quantizer.quantize_model()
            quantizer.model.topological_sort()  # as its save_model_to_file
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original
    return quantizer.model.model


def quantize_nbits(model: onnx.ModelProto, folder: Path, bits: int, block_size: int,
                   accuracy_level: int | None = None) -> onnx.ModelProto:
    """Weight-only blockwise quantization of every MatMul with a constant weight into ``MatMulNBits``
    (symmetric, ``block_size`` weights along K share one scale), on a stripped graph.

    The quantizer reads each weight as it quantizes it (onnx-ir resolves external data against
    ``folder``) and keeps only the packed result in memory; the float weights it replaced
    are dropped from the graph, never loaded. Activations stay float (fp32 or, after fp16
    conversion, fp16); ``accuracy_level`` 4 lets ONNX Runtime's CPU kernel quantize them to int8 per block.
    """
    quantizer_class = _nbits_quantizer()
    with _external_data_in(folder):
        quantizer = quantizer_class(model, bits=bits, block_size=block_size, is_symmetric=True,
                                    accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
        quantizer.process()
    return quantizer.model.model


def gemm_to_matmul(model: onnx.ModelProto, folder: Path, spill_name: str = "transposed.bin") -> onnx.ModelProto:
    """Gemm nodes with a constant weight (``nn.Linear`` on 2-D input) rewritten as MatMul + Add, so that
    weight-only quantization, which takes MatMuls only, covers them: SD 3.5 Medium's adaLN modulations
    are Gemms holding 3.1 GB, as much as all its other linears. Transposed weights are appended to
    ``folder/spill_name``, one at a time."""
    import numpy as np
    from onnx import helper, numpy_helper

    from .weights import drop_unused_initializers, spill_tensor

    initializers = {t.name: t for t in model.graph.initializer}
    nodes = []
    with open(folder / spill_name, "ab") as out:
        for node in model.graph.node:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if (node.op_type != "Gemm" or node.input[1] not in initializers or attributes.get("transA", 0)
                    or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0):
                nodes.append(node)
                continue
            weight = initializers[node.input[1]]
            if attributes.get("transB", 0):
                array = numpy_helper.to_array(weight, base_dir=str(folder))
                weight = numpy_helper.from_array(np.ascontiguousarray(array.T), f"{weight.name}_transposed")
                spill_tensor(weight, out, spill_name)
                model.graph.initializer.append(weight)
            product = f"{node.output[0]}_matmul" if len(node.input) > 2 and node.input[2] else node.output[0]
            nodes.append(helper.make_node("MatMul", [node.input[0], weight.name], [product], name=f"{node.name}_matmul"))
            if product != node.output[0]:
                nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model)
    return model


def _nbits_quantizer():
    """MatMulNBitsQuantizer, imported without the INFO-level root logging its module sets up on import
    (one line per node quantized)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    matmul_nbits_quantizer.logger.setLevel(logging.WARNING)
    return matmul_nbits_quantizer.MatMulNBitsQuantizer


def weight_bytes_by_op(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the initializers each op type consumes (a weight shared by two op types counts once)."""
    from .weights import nbytes

    sizes = {t.name: nbytes(t) for t in model.graph.initializer if t.data_type != onnx.TensorProto.STRING}
    totals: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in sizes:
                totals[node.op_type] = totals.get(node.op_type, 0) + sizes.pop(name)
    return totals


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """What quantize_dynamic's load_model_with_shape_infer does to the graph, without the file round trip."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    model = onnx.shape_inference.infer_shapes(model)
    add_infer_metadata(model)
    return model
