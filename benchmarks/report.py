"""Summaries, ratios against diffusers, targets; written out as JSON, a markdown table and a PNG chart."""
from __future__ import annotations

import json
from pathlib import Path

from . import hardware

STAGES = ("text_encoder", "unet", "vae_decoder")
CPU_PROVIDERS = ("cpu", "openvino")  # both run on the processor: compared with diffusers on the CPU


def _get(data, *keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data or data[key] is None:
            return None
        data = data[key]
    return data


def _row_summary(row: dict, document: dict) -> dict:
    summary = {"label": row["label"], "engine": row["engine"], "provider": row["provider"],
               "precision": row["precision"], "memory": row.get("memory"), "unmeasured": row.get("unmeasured")}
    errors = [row[p]["error"] for p in ("stages", "e2e") if _get(row, p, "error")]
    if errors:
        summary["error"] = "; ".join(errors)
    stages = _get(row, "stages", "stages") or {}
    for stage in STAGES:
        # "text_encoder": every text encoder the model has (SDXL's two run one after the other).
        measured = [value for name, value in stages.items() if name == stage or
                    (stage == "text_encoder" and name.startswith("text_encoder_"))]
        for key, field in (("_s", "median_s"), ("_load_s", "load_s"), ("_first_run_s", "first_run_s")):
            values = [value.get(field) for value in measured]
            summary[f"{stage}{key}"] = sum(values) if values and None not in values else None
    runs = _get(row, "e2e", "runs") or []
    summary["e2e_s"] = runs[0]["total"] if runs else None
    summary["e2e_warm_s"] = runs[1]["total"] if len(runs) > 1 else None
    summary["e2e_unet_per_step_s"] = runs[-1].get("unet_per_step") if runs else None
    peak = _get(row, "e2e", "peak_rss_bytes")
    summary["peak_rss_gb"] = peak / 1e9 if peak else None
    gpu = _get(row, "e2e", "peak_gpu_bytes")
    summary["peak_gpu_gb"] = gpu / 1e9 if gpu is not None else None
    # Achieved throughput: FLOPs counted from the U-Net graph / measured step time.
    count = _get(best_flop_count(document), "total")
    step = summary["unet_s"]
    if count and step:
        summary["unet_tflops"] = count / step / 1e12
        if row["provider"] in CPU_PROVIDERS:
            peak_flops = _get(document, "cpu_peak", "flops")
        else:
            gpus = _get(document, "machine", "gpus") or []
            peak_flops = hardware.gpu_peak(gpus[0]["name"], row["precision"]) if gpus else None
        summary["unet_peak_fraction"] = count / step / peak_flops if peak_flops else None
    return summary


def best_flop_count(document: dict) -> dict | None:
    """The most complete count: every export of one architecture does the same arithmetic per step
    (int8 MatMuls multiply-add as often as fp32 ones), but shape inference may not see through every
    graph's ops (the quantized one's, say), so take the count that left the fewest nodes out."""
    counts = [(key, c) for key, c in document.get("unet_flops", {}).items() if c.get("total")]
    if not counts:
        return None
    key, count = min(counts, key=lambda kc: (len(kc[1].get("uncounted", [])), kc[0] != "fp32-cpu"))
    return {**count, "graph": key}


def summarize(document: dict) -> dict:
    rows = [_row_summary(row, document) for row in document["rows"]]
    measured = [r for r in rows if not r["unmeasured"] and not r.get("error")]

    def baseline(provider: str):
        device, precision = ("cpu", "fp32") if provider in CPU_PROVIDERS else ("cuda", "fp16")
        return next((r for r in measured if r["engine"] == "diffusers" and r["provider"] == device
                     and r["precision"] == precision and r["memory"] != "offload"), None)

    for row in rows:
        if row["engine"] != "edgediff":
            continue
        base = baseline(row["provider"])
        if base is None:
            continue
        for name, key in (("unet_ratio", "unet_s"), ("text_encoder_ratio", "text_encoder_s"),
                          ("vae_decoder_ratio", "vae_decoder_s"), ("e2e_ratio", "e2e_s"),
                          ("peak_rss_ratio", "peak_rss_gb"), ("peak_gpu_ratio", "peak_gpu_gb")):
            if row.get(key) and base.get(key):
                row[name] = row[key] / base[key]
        row["baseline"] = base["label"]

    targets = {}
    cpu_ed = [r for r in measured if r["engine"] == "edgediff" and r["provider"] in CPU_PROVIDERS and r["unet_s"]]
    cpu_pt = [r for r in measured if r["engine"] == "diffusers" and r["provider"] == "cpu" and r["unet_s"]]
    base = baseline("cpu")
    fp32 = sorted((r for r in cpu_ed if r["precision"] == "fp32"), key=lambda r: r["unet_s"])
    if fp32 and base and base.get("unet_s"):
        ratio = fp32[0]["unet_s"] / base["unet_s"]
        targets["unet_fp32_vs_diffusers_fp32"] = {
            "edgediff": fp32[0]["label"], "diffusers": base["label"], "ratio": ratio, "target": 0.8,
            "met": ratio <= 0.8}
    if cpu_ed and cpu_pt:
        best_ed = min(cpu_ed, key=lambda r: r["unet_s"])
        best_pt = min(cpu_pt, key=lambda r: r["unet_s"])
        ratio = best_ed["unet_s"] / best_pt["unet_s"]
        targets["unet_best_cpu_vs_best_diffusers_cpu"] = {
            "edgediff": best_ed["label"], "diffusers": best_pt["label"], "ratio": ratio, "target": 0.7,
            "met": ratio <= 0.7}
    low = [r for r in cpu_ed if r["memory"] == "low" and r.get("peak_rss_gb")]
    if low and base and base.get("peak_rss_gb"):
        best = min(low, key=lambda r: r["peak_rss_gb"])
        ratio = best["peak_rss_gb"] / base["peak_rss_gb"]
        targets["e2e_peak_rss_low_vs_diffusers"] = {
            "edgediff": best["label"], "diffusers": base["label"], "ratio": ratio, "target": 0.6,
            "met": ratio <= 0.6}
    # issue 9: the weight-only int4 U-Net in low memory within a 4 GB GPU (NVML's peak).
    small = [r for r in measured if r["engine"] == "edgediff" and r["provider"] not in CPU_PROVIDERS
             and r["precision"] == "int4" and r["memory"] == "low" and r.get("peak_gpu_gb")]
    if small:
        best = min(small, key=lambda r: r["peak_gpu_gb"])
        offload = next((r for r in measured if r["engine"] == "diffusers" and r["memory"] == "offload"
                        and r.get("peak_gpu_gb")), None)
        targets["gpu_peak_int4_low_within_4gb"] = {
            "edgediff": best["label"], "diffusers": offload["label"] if offload else "–",
            "ratio": best["peak_gpu_gb"] / offload["peak_gpu_gb"] if offload else float("nan"),
            "target": 4.0, "value_gb": best["peak_gpu_gb"], "met": best["peak_gpu_gb"] <= 4.0}
    targets.update(_oneshot_targets(document.get("oneshot")))
    return {"rows": rows, "targets": targets}


def _oneshot_targets(oneshot: dict | None) -> dict:
    """A fresh `edgediff generate` (cached graphs) against diffusers' fastest fresh process; and memory."""
    rows = (oneshot or {}).get("rows", {})
    ours = {k: r for k, r in rows.items() if k.startswith("edgediff") and k.endswith("cached") and r["median_wall_s"]}
    theirs = {k: r for k, r in rows.items() if k.startswith("diffusers") and r["median_wall_s"]}
    if not ours or not theirs:
        return {}
    label, best = min(ours.items(), key=lambda kv: kv[1]["median_wall_s"])
    base_label, base = min(theirs.items(), key=lambda kv: kv[1]["median_wall_s"])
    ratio = best.get("paired_ratio") or best["median_wall_s"] / base["median_wall_s"]  # paired: same rounds
    targets = {"oneshot_cached_vs_diffusers": {"edgediff": label, "diffusers": base_label, "ratio": ratio,
                                               "target": 0.8, "met": ratio <= 0.8}}
    fp32 = rows.get("diffusers cpu fp32")
    if fp32 and fp32["median_peak_rss_gb"]:
        label, small = min(ours.items(), key=lambda kv: kv[1]["median_peak_rss_gb"])
        ratio = small["median_peak_rss_gb"] / fp32["median_peak_rss_gb"]
        targets["oneshot_peak_rss_low_vs_diffusers"] = {"edgediff": label, "diffusers": "diffusers cpu fp32",
                                                        "ratio": ratio, "target": 0.6, "met": ratio <= 0.6}
    return targets


# ------------------------------------------------------------------------------------------ output
def _fmt(value, digits=2, suffix=""):
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(document: dict) -> str:
    s = document["summary"]
    p = document["params"]
    m = document["machine"]
    lines = [
        f"### {p['model']}, {p['resolution']}x{p['resolution']}, batch {p['batch']} with guidance "
        f"(U-Net batch {2 * p['batch']}), {p['steps']} steps",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']:.1f} GB RAM, "
        f"GPUs: {', '.join(g['name'] for g in m['gpus']) or 'none'}. bf16: {document['bf16']}. "
        f"Threads: torch {document['threads']['torch']}, ONNX Runtime {document['threads']['onnxruntime_intra_op']}.",
        "",
        "| configuration | text encoder s | U-Net s/step | VAE decode s | end to end s (cold / warm) | "
        "session load s (text / U-Net / VAE) | U-Net first run s | peak RSS GB | peak GPU GB | "
        "U-Net TFLOP/s (% peak) | U-Net vs diffusers | e2e vs diffusers | RSS vs diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        if r["unmeasured"] or r.get("error"):
            lines.append(f"| {r['label']} | {r['unmeasured'] or 'failed: ' + r['error']} |" + " |" * 11)
            continue
        tflops = (f"{r['unet_tflops']:.3f} ({100 * r['unet_peak_fraction']:.0f}%)"
                  if r.get("unet_peak_fraction") else _fmt(r.get("unet_tflops"), 3))
        warm = f" / {r['e2e_warm_s']:.1f}" if r.get("e2e_warm_s") else ""
        lines.append(
            f"| {r['label']} | {_fmt(r['text_encoder_s'], 3)} | {_fmt(r['unet_s'], 3)} | {_fmt(r['vae_decoder_s'])} "
            f"| {_fmt(r['e2e_s'], 1)}{warm} | {_fmt(r['text_encoder_load_s'])} / {_fmt(r['unet_load_s'])} / "
            f"{_fmt(r['vae_decoder_load_s'])} | {_fmt(r['unet_first_run_s'])} | {_fmt(r['peak_rss_gb'])} | "
            f"{_fmt(r['peak_gpu_gb'])} | {tflops} | {_fmt(r.get('unet_ratio'), 2, 'x')} | "
            f"{_fmt(r.get('e2e_ratio'), 2, 'x')} | {_fmt(r.get('peak_rss_ratio'), 2, 'x')} |")
    lines += ["", "Ratios are edgediff / diffusers on the same device (CPU: diffusers fp32; GPU: diffusers fp16 "
              "with SDPA); below 1 means edgediff is faster or smaller. Stage times are medians of "
              f"{p['repeats']} runs after a first run; end to end includes session creation (cold) and, with "
              "memory=high, a second generation with sessions resident (warm). Peak RSS is the process peak of "
              "the end-to-end job, loading included.", ""]
    count = best_flop_count(document)
    if count:
        lines.append(f"U-Net FLOPs per step at this size and batch, counted from the {count['graph']} graph "
                     f"(Conv, MatMul, Gemm, attention; 2 x MACs): {count['total'] / 1e9:.1f} GFLOP"
                     + (f" ({len(count['uncounted'])} nodes without shapes not counted)" if count.get("uncounted")
                        else "") + ". TFLOP/s = this count / measured U-Net step time, for every row.")
    peak = document.get("cpu_peak", {})
    if peak.get("flops"):
        lines.append(f"CPU peak: {peak['flops'] / 1e9:.0f} GFLOP/s = {peak['assumption']}.")
    if document.get("oneshot"):
        from .oneshot import markdown as oneshot_markdown

        lines += ["", oneshot_markdown(document["oneshot"])]
    if s["targets"]:
        lines += ["", "| target | edgediff | diffusers | value | target | met |", "|---|---|---|---|---|---|"]
        for name, t in s["targets"].items():
            value, bound = ((f"{t['value_gb']:.2f} GB", f"≤ {t['target']} GB") if "value_gb" in t
                            else (f"{t['ratio']:.2f}x", f"≤ {t['target']}x"))
            lines.append(f"| {name} | {t['edgediff']} | {t['diffusers']} | {value} | {bound} | "
                         f"{'yes' if t['met'] else 'NO'} |")
    if document.get("warnings"):
        lines += [""] + [f"Warning: {w}" for w in document["warnings"]]
    return "\n".join(lines) + "\n"


def chart(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in document["summary"]["rows"] if not r["unmeasured"] and not r.get("error")]
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.5 * max(4, len(rows)) + 1.5))
    panels = (("U-Net s/step", [r["unet_s"] or 0 for r in rows]),
              ("end to end s (cold)", [r["e2e_s"] or 0 for r in rows]),
              ("peak RSS GB", [r["peak_rss_gb"] or 0 for r in rows]))
    colors = ["tab:blue" if r["engine"] == "edgediff" else "tab:orange" for r in rows]
    for axis, (title, values) in zip(axes, panels):
        axis.barh(range(len(rows)), values, color=colors)
        axis.set_yticks(range(len(rows)))
        axis.set_yticklabels(labels if axis is axes[0] else [], fontsize=8)
        axis.invert_yaxis()
        axis.set_title(title)
        for index, value in enumerate(values):
            axis.text(value, index, f" {value:.2f}", va="center", fontsize=7)
    p = document["params"]
    fig.suptitle(f"{p['model']} {p['resolution']}x{p['resolution']}, batch {p['batch']} (+guidance), "
                 f"{p['steps']} steps — {document['machine']['cpu']}, {document['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(document: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(document, indent=2, default=str))
    paths["markdown"].write_text(markdown(document))
    chart(document, paths["png"])
    return paths
