"""What ``edgediff info`` prints: a model's graphs and the providers this machine offers."""
from __future__ import annotations

from pathlib import Path

from .errors import ModelFolderError
from .manifest import read_manifest, sha256_file
from .sessions import available_providers


def describe(model_dir: Path | None, verify: bool = False) -> str:
    """A summary of the model; ``verify`` also checks each graph file against its sha256."""
    if model_dir is None:
        from edgediff.models import default_model_dir

        model_dir = default_model_dir()
    m = read_manifest(model_dir)
    lines = [
        f"model      {model_dir}",
        f"family     {m.family}, {m.prediction_type}, scheduler {m.scheduler.get('_class_name', '?')}",
        f"precision  {m.precision}, optimized for {m.optimized_for}",
        f"size       default {m.default_size}x{m.default_size}, sides a multiple of {m.size_multiple}",
        "graphs",
    ]
    for name, g in m.graphs.items():
        if verify and sha256_file(Path(model_dir) / g.path) != g.sha256:
            raise ModelFolderError(f"{name} graph {Path(model_dir) / g.path} does not match the sha256 in "
                                   "the manifest (corrupt or replaced); export the model again")
        megabytes = sum(p.stat().st_size for p in (Path(model_dir) / g.path).parent.glob("model.onnx*")) / 1e6
        v = g.validation
        where = v.get("where") or ", ".join(v.get("providers", []))  # manifests before "where": the provider
        check = (f"max rel diff {max(o['relative'] for o in v['outputs'].values()):.1e} (tol {v['tolerance']:.0e}"
                 f"{', on ' + where if where else ''})" if v.get("validated")
                 else f"not validated ({v.get('reason', 'unknown')})")
        kept = f"; fp32 kept: {', '.join(g.kept_fp32)}" if g.kept_fp32 else ""
        lines.append(f"  {name:13} {g.precision:5} {megabytes:8.1f} MB  {check}{kept}")
        if g.quantization:
            q = g.quantization
            lines.append(f"  {'':13} {q.get('bits', '?')}-bit {q.get('op', '')} weights, blocks of "
                         f"{q.get('block_size', '?')} ({q.get('packed_bytes', 0) / 1e6:.1f} MB packed, from "
                         f"{q.get('matmul_float_bytes', 0) / 1e6:.1f} MB float); float: {q.get('float', '?')}")
    lines.append(f"providers  {', '.join(available_providers())}")
    if verify:
        lines.append("verified   every graph matches its sha256")
    return "\n".join(lines)
