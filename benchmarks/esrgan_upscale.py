"""Full-size ESRGAN (RRDBNet as Real-ESRGAN x4plus: 23 blocks, 64 features, growth 32; random
weights): `edgediff export` time and peak RSS, then a 512x512 -> 2048x2048 upscale with the
torch-free tiled runtime, each in a fresh process (peak RSS from wait4's ru_maxrss).

    python -m edgediff.benchmarks.esrgan_upscale [--size 512] [--tile 128] [--overlap 16] [--torch]

``--torch``: also the same upscale in one run of the torch module (untiled, fp32), for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
UPSCALE = """
import sys, time, json, numpy as np
from PIL import Image
from edgediff.runtime.pixel_upscaler import PixelUpscaler
started = time.perf_counter()
up = PixelUpscaler.load(sys.argv[1], provider="cpu")
loaded = time.perf_counter()
picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (int(sys.argv[2]),) * 2 + (3,), dtype=np.uint8))
out = up(picture, tile=int(sys.argv[3]), overlap=int(sys.argv[4]))
print(json.dumps({"load_s": loaded - started, "upscale_s": time.perf_counter() - loaded, "size": out.size}))
"""
TORCH = """
import sys, time, json, torch
from safetensors.torch import load_file
from edgediff.exporter.esrgan import load_rrdbnet
module, _ = load_rrdbnet(sys.argv[1])
x = torch.rand(1, 3, int(sys.argv[2]), int(sys.argv[2]))
started = time.perf_counter()
with torch.no_grad():
    y = module(x)
print(json.dumps({"upscale_s": time.perf_counter() - started, "size": list(y.shape)}))
"""


def run(command: list[str]) -> tuple[dict | str, float, float, float]:
    """(the last stdout line, parsed when JSON; wall seconds; peak RSS GiB; CPU seconds, user +
    system: on a loaded shared machine the steadier figure) of a fresh process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    output = process.stdout.read().strip().splitlines()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("\n".join(output[-20:]))
    last = output[-1] if output else ""
    try:
        last = json.loads(last)
    except ValueError:
        pass
    return last, time.perf_counter() - started, usage.ru_maxrss * 1024 / GIB, usage.ru_utime + usage.ru_stime


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--torch", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    a = parser.parse_args(argv)
    import torch
    from safetensors.torch import save_file

    from edgediff.exporter.esrgan import RRDBNet

    work = a.work or Path(tempfile.mkdtemp(prefix="esrgan-"))
    work.mkdir(parents=True, exist_ok=True)
    weights, folder = work / "RealESRGAN_x4plus-random.safetensors", work / "esrgan-x4"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in RRDBNet().state_dict().items()}, str(weights))
    rows = {"cpu": platform.processor() or platform.machine(), "loadavg_before": os.getloadavg()}
    _, rows["export_s"], rows["export_peak_gib"], rows["export_cpu_s"] = run(
        [sys.executable, "-m", "edgediff", "export", str(weights), str(folder), "--overwrite"])
    result, wall, peak, cpu = run([sys.executable, "-c", UPSCALE, str(folder), str(a.size), str(a.tile),
                                   str(a.overlap)])
    rows.update(upscale=result, upscale_wall_s=wall, upscale_peak_gib=peak, upscale_cpu_s=cpu)
    if a.torch:
        result, _, peak, cpu = run([sys.executable, "-c", TORCH, str(weights), str(a.size)])
        rows.update(torch_upscale=result, torch_peak_gib=peak, torch_cpu_s=cpu)
    rows["loadavg_after"] = os.getloadavg()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
