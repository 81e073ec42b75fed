"""The peers row: one random-weight model through edgediff, diffusers and the engines a CPU user would
pick instead, each in its own process (benchmarks/peer_worker.py), in one run.

    python -m edgediff.benchmarks.peers [--model sd15] [--resolution 256] [--steps 10] [--peer-python PY]
    edgediff bench --peers ...          (the same, from the bench command)

Peers: optimum-intel's OVStableDiffusion(XL)Pipeline (its own OpenVINO IR export, static shapes; fp32
and 8-bit weights), optimum's ORTStableDiffusion(XL)Pipeline (its own ONNX export, CPU provider) and
stable-diffusion.cpp (stable-diffusion-cpp-python, from a single-file checkpoint written from the same
weights; weights converted at load to q8_0 and f16). Beside them: edgediff's CPU exports (fp32, int8
U-Net MatMuls) and diffusers fp32 and bf16 autocast. Same request everywhere: one prompt with a
negative prompt, ``steps`` Euler steps, guidance 7.5, batch 1. A peer that cannot be imported is
skipped with a one-line reason. The peers often pin other versions of transformers or huggingface-hub
than edgediff's exporter needs: install them in their own virtual environment and name its Python with
``--peer-python`` (or EDGEDIFF_PEER_PYTHON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import hardware

WORKER = Path(__file__).with_name("peer_worker.py")
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    engine: str  # peer_worker.ENGINES
    python: str  # "ours" (this interpreter) or "peer" (--peer-python)
    folder: str  # what it loads: export-<precision>-<target>, diffusers, a peer export, single-file
    extra: dict = field(default_factory=dict)


ROWS = (
    Row("edgediff-fp32", "edgediff ONNX Runtime fp32", "edgediff", "ours", "export-fp32-cpu"),
    Row("edgediff-int8", "edgediff ONNX Runtime int8 U-Net", "edgediff", "ours", "export-int8-cpu"),
    Row("edgediff-int4", "edgediff ONNX Runtime int4 U-Net", "edgediff", "ours", "export-int4-cpu"),
    Row("edgediff-ov-fp32", "edgediff OpenVINO fp32 (--optimize-for none export)", "edgediff", "ours",
        "export-fp32-none", {"provider": "openvino", "env": {"EDGEDIFF_OPENVINO_PRECISION": "FP32"}}),
    # memory="low": one graph loaded at a time, each generation loads its graphs again.
    Row("edgediff-fp32-low", "edgediff ONNX Runtime fp32, memory=low", "edgediff", "ours", "export-fp32-cpu",
        {"memory": "low"}),
    Row("edgediff-int4-low", "edgediff ONNX Runtime int4 U-Net, memory=low", "edgediff", "ours",
        "export-int4-cpu", {"memory": "low"}),
    Row("edgediff-ov-fp32-low", "edgediff OpenVINO fp32, memory=low", "edgediff", "ours", "export-fp32-none",
        {"provider": "openvino", "memory": "low", "env": {"EDGEDIFF_OPENVINO_PRECISION": "FP32"}}),
    # OpenVINO keeps MatMulNBits' 4-bit weights packed in its FullyConnected kernels (convolutions fp32).
    Row("edgediff-ov-int4", "edgediff OpenVINO int4 U-Net (--optimize-for none export)", "edgediff", "ours",
        "export-int4-none", {"provider": "openvino", "env": {"EDGEDIFF_OPENVINO_PRECISION": "FP32"}}),
    Row("edgediff-ov-int4-low", "edgediff OpenVINO int4 U-Net, memory=low", "edgediff", "ours", "export-int4-none",
        {"provider": "openvino", "memory": "low", "env": {"EDGEDIFF_OPENVINO_PRECISION": "FP32"}}),
    Row("diffusers-fp32", "diffusers fp32", "diffusers", "ours", "diffusers"),
    # One generation: without native bf16 (AMX-BF16, AVX512-BF16) it is emulated and slow.
    Row("diffusers-bf16", "diffusers bf16 autocast", "diffusers", "ours", "diffusers",
        {"bf16": True, "generations": 1}),
    Row("ov-fp32", "optimum-intel OpenVINO fp32, static shapes", "optimum-openvino", "peer", "peer-ov-fp32"),
    Row("ov-int8", "optimum-intel OpenVINO int8 weights, static shapes", "optimum-openvino", "peer",
        "peer-ov-int8"),
    Row("ort-fp32", "optimum ONNX Runtime fp32", "optimum-onnxruntime", "peer", "peer-ort-fp32"),
    Row("sdcpp-q8_0", "stable-diffusion.cpp q8_0", "sdcpp", "peer", "single-file", {"wtype": "q8_0"}),
    Row("sdcpp-f16", "stable-diffusion.cpp f16", "sdcpp", "peer", "single-file", {"wtype": "f16"}),
)
LEAN = ("edgediff-fp32-low", "edgediff-int4-low", "edgediff-ov-fp32-low", "edgediff-ov-int4-low")
OURS = ("edgediff-fp32", "edgediff-int8", "edgediff-int4", "edgediff-ov-fp32", "edgediff-ov-int4", *LEAN)
PEERS = ("ov-fp32", "ov-int8", "ort-fp32", "sdcpp-q8_0", "sdcpp-f16")


@dataclass
class PeersParams:
    model: str = "sd15"
    resolution: int = 256
    steps: int = 10
    guidance: float = 7.5
    threads: int | None = None
    cache: Path | None = None
    out: Path = Path("bench-results")
    peer_python: str | None = None  # None: EDGEDIFF_PEER_PYTHON, else this interpreter
    rows: tuple[str, ...] = tuple(row.key for row in ROWS)
    timeout_s: int = 1800
    measure: bool = True  # False: only make the exports (one heavy job), measure in a later run


def peer_python(params: PeersParams) -> str:
    return params.peer_python or os.environ.get("EDGEDIFF_PEER_PYTHON") or sys.executable


def call_worker(python: str, engine: str, spec: dict, log: Path, timeout_s: int, env: dict | None = None) -> dict:
    """Run peer_worker.py; its result, {"skipped": line} (exit 3) or {"error": line}."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as stderr:
            try:
                code = subprocess.run([python, str(WORKER), engine, str(spec_path), str(result_path)],
                                      stdout=stderr, stderr=stderr, timeout=timeout_s, env=env).returncode
            except subprocess.TimeoutExpired:
                return {"error": f"over {timeout_s} s"}
            except OSError as error:
                return {"skipped": f"cannot start {python}: {error.strerror}"}
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        if code == 3:
            return {"skipped": next((l[6:] for l in reversed(lines) if l.startswith("skip: ")), "skipped")}
        if code != 0 or not result_path.is_file():
            why = "killed (out of memory?)" if code in (-9, 137) else f"exit status {code}"
            return {"error": f"{why}: {(lines or ['no output'])[-1][:300]}"}
        return json.loads(result_path.read_text())


def prepare(row: Row, source: Path, params: PeersParams, log_dir: Path, log) -> tuple[Path | None, str | None]:
    """(what the row loads, or None with the reason): exports are made once and cached beside the model."""
    from .models import ensure_export

    if row.folder == "diffusers":
        return source, None
    if row.folder.startswith("export-"):
        _, precision, target = row.folder.split("-")
        return ensure_export(source, precision, target, log=log), None
    folder = source.parent / row.folder
    if not (folder / ".complete").is_file() and not (folder / "model.safetensors").is_file():
        why = _disk_short(source)
        if why:
            return None, why
    if row.folder == "single-file":
        return single_file(source, folder / "model.safetensors", log), None
    if (folder / ".complete").is_file():
        return folder, None
    _legacy_tokenizer_files(source)
    log(f"preparing {row.folder} (the peer's own export) into {folder}")
    spec = {"prepare": True, "source": str(source), "folder": str(folder), "int8": row.folder.endswith("int8")}
    # The peers' exporters write GBs of temporary files: in a folder deleted even when the worker is killed.
    with tempfile.TemporaryDirectory(dir=source.parent, prefix="peer-tmp-") as tmp:
        result = call_worker(peer_python(params), row.engine, spec, log_dir / f"prepare-{row.folder}.log",
                             params.timeout_s, env={**os.environ, "TMPDIR": tmp})
    if "prepare_s" not in result:
        return None, result.get("skipped") or f"its export failed: {result.get('error')}"
    (folder / ".complete").write_text(json.dumps(result))
    return folder, None


def _disk_short(source: Path) -> str | None:
    """A peer's export is about as large as the model's weights: refuse up front, never fill the disk."""
    import shutil

    weights = sum(f.stat().st_size for f in source.rglob("*.safetensors"))
    free = shutil.disk_usage(source.parent).free
    need = int(weights * 1.1) + 2 * 2**30  # the export plus a margin for everyone else on the disk
    return None if free >= need else f"not enough disk for its export ({free / 2**30:.1f} GiB free, needs {need / 2**30:.1f})"


def _legacy_tokenizer_files(source: Path) -> None:
    """The peers' older transformers read CLIP's tokenizer from vocab.json and merges.txt, which
    transformers 5 no longer writes beside tokenizer.json: put the shipped BPE files there."""
    import shutil

    from edgediff.models import clip_tokenizer_dir

    for tokenizer in source.glob("tokenizer*"):
        for name in ("vocab.json", "merges.txt"):
            if not (tokenizer / name).exists():
                shutil.copy(clip_tokenizer_dir() / name, tokenizer / name)


def single_file(source: Path, path: Path, log) -> Path:
    """The diffusers folder as an original (LDM) single-file checkpoint, for stable-diffusion.cpp: written
    with the tests' converter (tests/export/original_format.py), the reverse of diffusers' loader."""
    if path.is_file():
        return path
    from diffusers import DiffusionPipeline

    try:  # the tests put tests/export on the path; a source checkout has it beside the package
        from original_format import save_original
    except ImportError:
        root = Path(__file__).resolve().parents[1] / "tests" / "export"
        if not (root / "original_format.py").is_file():
            raise RuntimeError("tests/export/original_format.py is not beside this install: run from a source checkout")
        sys.path.insert(0, str(root))
        from original_format import save_original

    log(f"writing the single-file checkpoint {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    pipe = DiffusionPipeline.from_pretrained(source)  # SD 1.x/2.x or SDXL, as model_index.json says
    save_original(pipe, path.with_suffix(".partial.safetensors"))
    path.with_suffix(".partial.safetensors").rename(path)
    return path


def run(params: PeersParams, log=None) -> dict:
    from .models import default_cache, ensure_model

    log = log or (lambda line: print(f"peers: {line}", file=sys.stderr, flush=True))
    threads = params.threads or hardware.usable_cores()
    source = ensure_model(params.model, Path(params.cache or default_cache()), 0, log=log)
    out = Path(params.out)
    results = []
    for row in (r for key in params.rows for r in ROWS if r.key == key):  # in the order asked for
        entry = {"key": row.key, "label": row.label}
        try:
            folder, why = prepare(row, source, params, out / "logs", log)
        except Exception as error:  # one engine's preparation failing must not lose the others
            folder, why = None, f"preparation failed: {str(error).splitlines()[0][:200]}"
        if folder is None:
            results.append({**entry, "skipped": why})
            log(f"{row.key}: skipped: {why}")
            continue
        if not params.measure:
            results.append({**entry, "prepared": str(folder)})
            continue
        python = sys.executable if row.python == "ours" else peer_python(params)
        spec = {"folder": str(folder), "prompt": PROMPT, "negative": NEGATIVE, "steps": params.steps,
                "guidance": params.guidance, "size": params.resolution, "threads": threads, **row.extra}
        log(f"{row.key}: measuring")
        result = call_worker(python, row.engine, spec, out / "logs" / f"{row.key}.log", params.timeout_s)
        results.append({**entry, **result, "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())})
        log(f"{row.key}: {result}")
        out.mkdir(parents=True, exist_ok=True)  # what is measured so far survives an interrupted run
        (out / "peers.partial.json").write_text(json.dumps(results, indent=1, default=str))
    return {"params": {**asdict(params), "cache": str(params.cache), "out": str(params.out),
                       "peer_python": "separate" if peer_python(params) != sys.executable else "this"},
            "machine": hardware.machine(), "versions": hardware.versions(), "threads": threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": results}


def _best(rows: list[dict], keys, metric: str = "resident_s") -> dict | None:
    measured = [row for row in rows if row["key"] in keys and row.get(metric)]
    return min(measured, key=lambda row: row[metric]) if measured else None


def summary(document: dict) -> list[str]:
    """Our fastest against each reference; resident generations where both have one, else first ones."""
    rows = document["rows"]
    lines = []
    for name, keys in (("the fastest peer", PEERS), ("diffusers bf16 autocast", ("diffusers-bf16",)),
                       ("diffusers fp32", ("diffusers-fp32",))):
        metric = "resident_s" if _best(rows, keys) else "first_s"
        ours, other = _best(rows, OURS, metric), _best(rows, keys, metric)
        if ours and other:
            ratio = ours[metric] / other[metric]
            what = "resident generation" if metric == "resident_s" else "first generation"
            lines.append(f"{what}: edgediff's best ({ours['label']}, {ours[metric]:.1f} s) against {name} "
                         f"({other['label']}, {other[metric]:.1f} s): {ratio:.2f}x "
                         f"({'we are faster' if ratio < 1 else 'they are faster'})")
    return lines + _lean_line(rows)


def _lean_line(rows: list[dict]) -> list[str]:
    """Fast and lean as one configuration: our fastest memory=low row, its peak RSS against diffusers'
    and its time against our fastest row of any memory mode."""
    lean, fastest, reference = _best(rows, LEAN), _best(rows, OURS), _best(rows, ("diffusers-fp32", "diffusers-bf16"))
    if not (lean and fastest and reference and reference.get("peak_rss_bytes")):
        return []
    return [f"memory=low: edgediff's fastest lean row ({lean['label']}, {lean['resident_s']:.1f} s, "
            f"{fastest['resident_s'] / lean['resident_s']:.2f}x the speed of our fastest row) peaks at "
            f"{lean['peak_rss_bytes'] / 2**30:.2f} GiB, {lean['peak_rss_bytes'] / reference['peak_rss_bytes']:.2f}x "
            f"{reference['label']}'s {reference['peak_rss_bytes'] / 2**30:.2f} GiB"]


def table(document: dict) -> str:
    p, m = document["params"], document["machine"]
    lines = [f"## Peers ({document['date']}): {p['model']} architecture, {p['resolution']}x{p['resolution']}, "
             f"{p['steps']} Euler steps, guidance {p['guidance']}, batch 1", "",
             f"CPU {m['cpu']} ({m['cores']} cores, {document['threads']} threads; {m['bf16']}); random weights, "
             "each engine in its own process (peak RSS is that process's VmHWM); `resident`: the second "
             "generation with everything loaded. Load average when each row finished is beside it.", "",
             "| engine | load | first generation | resident generation | peak RSS | load average |",
             "|---|---|---|---|---|---|"]
    for row in document["rows"]:
        note = row.get("skipped") and f"skipped: {row['skipped']}" or row.get("error")
        if note:
            lines.append(f"| {row['label']} | {note} | | | | |")
            continue
        resident = f"{row['resident_s']:.1f} s" if row.get("resident_s") else "— (one generation)"
        lines.append(f"| {row['label']} | {row['load_s']:.1f} s | {row['first_s']:.1f} s | {resident} | "
                     f"{row['peak_rss_bytes'] / 2**30:.2f} GiB | {row['load_average']} |")
    lines += [""] + [f"- {line}" for line in summary(document)]
    return "\n".join(lines) + "\n"


def write_outputs(document: dict, out: Path, results: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "peers.json", "markdown": out / "peers.md"}
    paths["json"].write_text(json.dumps(document, indent=2, default=str))
    paths["markdown"].write_text(table(document))
    if results is not None:
        with open(results, "a") as handle:
            handle.write("\n" + table(document))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--results", default=None, help="markdown file the table is appended to")
    parser.add_argument("--peer-python", default=None, help="the Python that has the peers installed")
    parser.add_argument("--prepare-only", action="store_true", help="make the exports only; measure later")
    parser.add_argument("--rows", default=None, help=f"comma-separated, of: {','.join(r.key for r in ROWS)}")
    args = parser.parse_args(argv)
    keys = tuple(args.rows.split(",")) if args.rows else tuple(row.key for row in ROWS)
    unknown = [key for key in keys if key not in {row.key for row in ROWS}]
    if unknown:
        print(f"peers: unknown --rows {', '.join(unknown)}", file=sys.stderr)
        return 2
    params = PeersParams(model=args.model, resolution=args.resolution, steps=args.steps, threads=args.threads,
                         cache=Path(args.cache) if args.cache else None, out=Path(args.out),
                         peer_python=args.peer_python, rows=keys, measure=not args.prepare_only)
    document = run(params)
    if not params.measure:
        print(json.dumps(document["rows"], indent=1))
        return 0
    paths = write_outputs(document, params.out, Path(args.results) if args.results else None)
    print(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
