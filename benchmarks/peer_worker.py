"""One engine of the peers comparison (benchmarks/peers.py), in its own process so its peak RSS is its own.

    PYTHON peer_worker.py ENGINE SPEC.json RESULT.json

A standalone script, not a module of the package: the peers (optimum-intel, optimum's ONNX Runtime
pipelines, stable-diffusion-cpp-python) may live in another virtual environment whose Python has no
edgediff. Exit status 3 with one line ``skip: <reason>`` on stderr: the engine cannot run here.
Every engine loads, then runs the same request twice (first generation, then with everything
resident): the prompt and negative prompt, ``steps`` Euler steps, guidance, the spec's size.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SKIP = 3


class Skip(Exception):
    pass


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or a version clash raised while importing
        raise Skip(f"{package} cannot be imported here ({type(error).__name__}: {str(error).splitlines()[0][:160]})")


def _pipeline(folder: str) -> str:
    """``StableDiffusionXLPipeline`` or ``StableDiffusionPipeline``, from the folder's model_index.json
    (the diffusers source, or a peer's own export of it, which names its OV/ORT class)."""
    index = Path(folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    return "StableDiffusionXLPipeline" if "XL" in name else "StableDiffusionPipeline"


def _no_safety_checker(name: str) -> dict:
    return {"safety_checker": None, "requires_safety_checker": False} if name == "StableDiffusionPipeline" else {}


def _euler(pipe):
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------- engines
# Each returns a callable running one generation; the loading is what the call itself does.
def edgediff(spec: dict):
    runtime = _need("edgediff.runtime", "edgediff")
    pipe = runtime.Pipeline.load(spec["folder"], provider=spec.get("provider", "cpu"),
                                 memory=spec.get("memory", "high"))
    return lambda: pipe(spec["prompt"], spec["negative"], steps=spec["steps"], guidance=spec["guidance"],
                        sampler="euler", seed=0, width=spec["size"], height=spec["size"])


def diffusers(spec: dict):
    torch = _need("torch", "torch")
    from contextlib import nullcontext

    import diffusers as module

    torch.set_num_threads(spec["threads"])
    name = _pipeline(spec["folder"])
    # fp32 as saved: transformers 5 would load a text encoder in the dtype its config names (SDXL's fp16)
    pipe = _euler(getattr(module, name).from_pretrained(spec["folder"], torch_dtype=torch.float32,
                                                        **_no_safety_checker(name)))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if spec.get("bf16") else nullcontext

    def run():
        with torch.inference_mode(), autocast():
            pipe(spec["prompt"], negative_prompt=spec["negative"], num_inference_steps=spec["steps"],
                 guidance_scale=spec["guidance"], height=spec["size"], width=spec["size"],
                 generator=torch.Generator().manual_seed(0), output_type="np")
    return run


def optimum_openvino(spec: dict):
    """optimum-intel's OVStableDiffusion(XL)Pipeline from its own IR export, reshaped to static shapes
    (its documented fastest CPU setting) and compiled with the latency hint."""
    intel = _need("optimum.intel", "optimum-intel[openvino]")
    pipe = getattr(intel, "OV" + _pipeline(spec["folder"])).from_pretrained(
        spec["folder"], compile=False, ov_config={"PERFORMANCE_HINT": "LATENCY"})
    pipe.reshape(batch_size=1, height=spec["size"], width=spec["size"], num_images_per_prompt=1)
    pipe.compile()
    _euler(pipe)
    return lambda: pipe(spec["prompt"], negative_prompt=spec["negative"], num_inference_steps=spec["steps"],
                        guidance_scale=spec["guidance"], height=spec["size"], width=spec["size"], output_type="np")


def optimum_onnxruntime(spec: dict):
    """optimum's ORTStableDiffusion(XL)Pipeline from its own ONNX export, CPU provider."""
    module = _need("optimum.onnxruntime", "optimum-onnx[onnxruntime]")
    pipe = _euler(getattr(module, "ORT" + _pipeline(spec["folder"])).from_pretrained(
        spec["folder"], provider="CPUExecutionProvider"))
    return lambda: pipe(spec["prompt"], negative_prompt=spec["negative"], num_inference_steps=spec["steps"],
                        guidance_scale=spec["guidance"], height=spec["size"], width=spec["size"], output_type="np")


def sdcpp(spec: dict):
    """stable-diffusion.cpp from the single-file checkpoint, weights converted at load to ``wtype``."""
    module = _need("stable_diffusion_cpp", "stable-diffusion-cpp-python")
    model = module.StableDiffusion(model_path=spec["folder"], wtype=spec.get("wtype", "default"),
                                   n_threads=spec["threads"], verbose=False)
    return lambda: model.generate_image(prompt=spec["prompt"], negative_prompt=spec["negative"],
                                        cfg_scale=spec["guidance"], width=spec["size"], height=spec["size"],
                                        sample_method="euler", sample_steps=spec["steps"], seed=0)


# --------------------------------------------------------------------------------- preparation
# One-time exports into the peers' own formats (not timed with the engines).
def prepare_openvino(spec: dict) -> None:
    intel = _need("optimum.intel", "optimum-intel[openvino]")
    extra = {"load_in_8bit": True} if spec.get("int8") else {"load_in_8bit": False}
    pipe = getattr(intel, "OV" + _pipeline(spec["source"])).from_pretrained(spec["source"], export=True,
                                                                          compile=False, **extra)
    pipe.save_pretrained(spec["folder"])


def prepare_onnxruntime(spec: dict) -> None:
    module = _need("optimum.onnxruntime", "optimum-onnx[onnxruntime]")
    pipeline = getattr(module, "ORT" + _pipeline(spec["source"]))
    pipeline.from_pretrained(spec["source"], export=True).save_pretrained(spec["folder"])


ENGINES = {"edgediff": edgediff, "diffusers": diffusers, "optimum-openvino": optimum_openvino,
           "optimum-onnxruntime": optimum_onnxruntime, "sdcpp": sdcpp}
PREPARE = {"optimum-openvino": prepare_openvino, "optimum-onnxruntime": prepare_onnxruntime}


def measure(engine: str, spec: dict) -> dict:
    clock = time.perf_counter()
    generate = ENGINES[engine](spec)
    load = time.perf_counter() - clock
    times = []
    for _ in range(spec.get("generations", 2)):
        clock = time.perf_counter()
        generate()
        times.append(time.perf_counter() - clock)
    return {"load_s": load, "first_s": times[0], "resident_s": min(times[1:]) if len(times) > 1 else None,
            "peak_rss_bytes": peak_rss_bytes()}


def main(argv: list[str]) -> int:
    engine, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update(spec.get("env", {}))
    try:
        if spec.get("prepare"):
            clock = time.perf_counter()
            PREPARE[engine](spec)
            result = {"prepare_s": time.perf_counter() - clock, "peak_rss_bytes": peak_rss_bytes()}
        else:
            result = measure(engine, spec)
    except Skip as why:
        print(f"skip: {why}", file=sys.stderr)
        return SKIP
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
