"""Run a large ONNX graph a few weights at a time: cut it, in node order, into parts whose weights stay
under a budget, and run each part in its own session, feeding it the values the parts before made.

ONNX Runtime's CPU provider has no fp16 MatMul: a session gives every fp16 weight an fp32 copy as it
loads (T5-XXL in fp16: 9.5 GB of weights, 19 GB more). Disabling optimizations does not prevent it.
A part's session copies only that part's weights. Each part file is a few kilobytes of graph written
beside the original, whose initializers still point into the original's external-data file, so no
weight is copied on disk either.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .memory import release_freed
from .weights import nbytes


def run_in_parts(graph_path: Path, feed: dict[str, np.ndarray], output_names: list[str], providers: list[str],
                 budget: int) -> list[np.ndarray]:
    """The graph's outputs ``output_names``, computed part by part (see :func:`split`)."""
    import onnx

    graph_path = Path(graph_path)
    model = onnx.load(str(graph_path), load_external_data=False)
    parts = split(model, budget, output_names)
    del model
    last_use = {name: index for index, part in enumerate(parts) for name in _input_names(part)}
    values = dict(feed)
    for index, part in enumerate(parts):
        names = [value.name for value in part.graph.output]
        results = _run_part(part, graph_path.with_name(f"{graph_path.stem}.part{index}.onnx"), values, providers)
        values.update(zip(names, results))
        values = {name: value for name, value in values.items()
                  if last_use.get(name, -1) > index or name in output_names}
        release_freed()
    return [values[name] for name in output_names]


def _run_part(part, path: Path, values: dict[str, np.ndarray], providers: list[str]) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    for value in part.graph.input:
        array = values[value.name]
        value.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        value.type.tensor_type.shape.Clear()
        value.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=d) for d in array.shape)
    onnx.save(part, str(path))
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
        return session.run([value.name for value in part.graph.output],
                           {value.name: values[value.name] for value in part.graph.input})
    finally:
        path.unlink(missing_ok=True)


def _input_names(part) -> list[str]:
    return [value.name for value in part.graph.input]


def split(model, budget: int, output_names: list[str]) -> list:
    """``model`` (loaded without its external data) as consecutive parts, each part's weights at most
    ``budget`` bytes (a node whose own weights are larger gets a part to itself). A graph with control
    flow (subgraphs read outer values) stays whole."""
    import onnx

    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return [model]
    sizes = {t.name: nbytes(t) for t in graph.initializer if t.data_type != onnx.TensorProto.STRING}
    groups = _group_nodes(graph, sizes, budget)
    if len(groups) == 1:
        return [model]
    needed_after = [set(output_names)]
    for nodes in reversed(groups[1:]):
        needed_after.insert(0, needed_after[0] | {name for node in nodes for name in node.input if name})
    initializers = {t.name: t for t in graph.initializer}
    return [_part(model, nodes, initializers, needed_after[index], index) for index, nodes in enumerate(groups)]


def _topological(nodes) -> list:
    """``nodes`` so that each comes after the nodes making its inputs, as close to their order as that
    allows. ONNX asks graphs to be sorted, but ONNX Runtime sorts them itself, and the fp16 conversion
    appends the Casts of its fp32 islands at the end of the graph."""
    import heapq

    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    waits_on = [{producer[name] for name in node.input if name in producer} - {index} for index, node in enumerate(nodes)]
    readers: dict[int, list[int]] = {}
    for index, producers in enumerate(waits_on):
        for made_by in producers:
            readers.setdefault(made_by, []).append(index)
    ready = [index for index, producers in enumerate(waits_on) if not producers]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(nodes[index])
        for reader in readers.get(index, ()):
            waits_on[reader].discard(index)
            if not waits_on[reader]:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order


def _group_nodes(graph, weight_bytes: dict[str, int], budget: int) -> list[list]:
    groups, current, held, total = [], [], set(), 0
    for node in _topological(list(graph.node)):
        weights = {name for name in node.input if name in weight_bytes}
        cost = sum(weight_bytes[name] for name in weights - held)
        if current and total + cost > budget:
            groups.append(current)
            current, held, total = [], set(), 0
            cost = sum(weight_bytes[name] for name in weights)
        current.append(node)
        held |= weights
        total += cost
    return [*groups, current]


def _part(model, nodes, initializers, needed_after: set[str], index: int):
    """Its inputs are typed when it runs, from the arrays fed to it; ONNX Runtime types its outputs
    (ONNX's shape inference stops at contrib ops such as the fused attention)."""
    import onnx

    produced = {name for node in nodes for name in node.output if name}
    read = list(dict.fromkeys(name for node in nodes for name in node.input if name and name not in produced))
    inputs = [onnx.helper.make_empty_tensor_value_info(name) for name in read if name not in initializers]
    outputs = [onnx.helper.make_empty_tensor_value_info(name)
               for name in dict.fromkeys(o for node in nodes for o in node.output) if name in needed_after]
    graph = onnx.helper.make_graph(nodes, f"{model.graph.name}_part{index}", inputs, outputs,
                                   initializer=[initializers[name] for name in read if name in initializers])
    part = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    part.functions.extend(model.functions)
    return part

