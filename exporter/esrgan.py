"""``edgediff export ESRGAN.safetensors OUT``: an ESRGAN-family pixel upscaler (RRDBNet) to one
validated ONNX graph and a ``"kind": "pixel_upscaler"`` manifest (runtime/pixel_upscaler.py).

The network is written here from its publications (Wang et al. 2018, "ESRGAN: Enhanced
Super-Resolution Generative Adversarial Networks"; Wang et al. 2021, "Real-ESRGAN"), as
Real-ESRGAN's ``basicsr/archs/rrdbnet_arch.py`` lays out its weights: ``conv_first``,
``body.N.rdb1..3.conv1..5``, ``conv_body``, ``conv_up1..``, ``conv_hr``, ``conv_last``. The
original ESRGAN layout (``model.0``, ``model.1.sub.N.RDB1.conv1.0``, ... ``model.10``) and the
ESRGAN repository's names (``RRDB_trunk``, ``trunk_conv``, ``upconv1``, ``HRconv``) are renamed to it.
Every hyperparameter is read from the weights' shapes. Pickled ``.pth`` files need
``--allow-pickle`` and are read without unpickling code (runtime/tensor_files.py).
"""
from __future__ import annotations

import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.manifest import GraphEntry, TensorSpec, sha256_file
from edgediff.runtime.pixel_upscaler import GRAPH, PixelUpscalerManifest, write_upscaler_manifest

TOLERANCE = 1e-4  # fp32: max abs difference relative to the reference's peak, as the VAE's
OLD_BODY = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
NEW_NAMES = [(re.compile(r"^RRDB_trunk\."), "body."), (re.compile(r"\.RDB(\d)\."), r".rdb\1."),
             (re.compile(r"^trunk_conv\."), "conv_body."), (re.compile(r"^upconv(\d)\."), r"conv_up\1."),
             (re.compile(r"^HRconv\."), "conv_hr.")]


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing the block input and every earlier output (dense
    connections), the last scaled by 0.2 and added to the input (ESRGAN, section 3.1)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(num_feat + (i - 1) * num_grow_ch, num_grow_ch, 3, 1, 1))
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x):
        features = [x]
        for i in range(1, 5):
            features.append(self.lrelu(getattr(self, f"conv{i}")(torch.cat(features, 1))))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled by 0.2, plus the input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(num_feat, num_grow_ch) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: a trunk of RRDBs at the input size, then ``num_up`` nearest x2
    upsamplings each followed by a convolution. Real-ESRGAN's x2/x1 models first pixel-unshuffle
    the picture by ``unshuffle`` (so they scale by 2**num_up / unshuffle)."""

    def __init__(self, in_channels=3, out_channels=3, num_feat=64, num_block=23, num_grow_ch=32, num_up=2,
                 unshuffle=1):
        super().__init__()
        self.num_up, self.unshuffle = num_up, unshuffle
        self.conv_first = nn.Conv2d(in_channels * unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        for i in range(1, num_up + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, out_channels, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x):
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.num_up + 1):
            feat = self.lrelu(getattr(self, f"conv_up{i}")(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


MARKERS = (b"rdb1.conv1.weight", b"RDB1.conv1.weight", b"RDB1.conv1.0.weight")  # one per key layout


def is_esrgan(source) -> bool:
    """An RRDBNet weights file, in any key layout: found in a .safetensors header, or among the
    bytes of a torch zip checkpoint's pickle (read as bytes: nothing is unpickled here)."""
    path = Path(str(source))
    try:
        if not path.is_file():
            return False
        if path.suffix.lower() == ".safetensors":
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                raw = handle.read(size) if 2 <= size <= 100_000_000 else b""
        else:
            with zipfile.ZipFile(path) as archive:
                pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
                raw = archive.read(pickles[0]) if pickles else b""
    except (OSError, zipfile.BadZipFile):
        return False
    return any(marker in raw for marker in MARKERS)


def new_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Real-ESRGAN's key names, from any of the three layouts (BasicSR's ``params_ema`` prefix dropped)."""
    for prefix in ("params_ema.", "params."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if "model.0.weight" not in state:
        for pattern, replacement in NEW_NAMES:
            state = {pattern.sub(replacement, k): v for k, v in state.items()}
        return state
    blocks = {int(m.group(1)) for k in state if (m := OLD_BODY.fullmatch(k))}
    tail = sorted({int(k.split(".")[1]) for k in state if re.fullmatch(r"model\.\d+\.(weight|bias)", k)} - {0})
    names = {0: "conv_first", **{n: f"conv_up{i}" for i, n in enumerate(tail[:-2], 1)},
             **dict(zip(tail[-2:], ("conv_hr", "conv_last")))}
    out = {}
    for key, value in state.items():
        if m := OLD_BODY.fullmatch(key):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        elif key.startswith(f"model.1.sub.{len(blocks)}."):
            out["conv_body." + key.rsplit(".", 1)[1]] = value
        elif re.fullmatch(r"model\.\d+\.(weight|bias)", key) and int(key.split(".")[1]) in names:
            out[f"{names[int(key.split('.')[1])]}.{key.rsplit('.', 1)[1]}"] = value
        else:
            out[key] = value  # unknown: load_state_dict names it
    return out


def hyperparameters(state: dict[str, np.ndarray]) -> dict[str, int]:
    """RRDBNet's arguments from the weights' shapes; one line for another architecture."""
    try:
        first, last = state["conv_first.weight"], state["conv_last.weight"]
        blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
        num_up = sum(1 for k in state if re.fullmatch(r"conv_up\d+\.weight", k))
        grow = int(state["body.0.rdb1.conv1.weight"].shape[0])
    except (KeyError, ValueError):
        raise EdgediffError("this file is not an RRDBNet (ESRGAN / Real-ESRGAN) upscaler edgediff can export: "
                            "conv_first, body.N.rdb1..3, conv_body, conv_up1.., conv_hr, conv_last expected") from None
    out_channels = int(last.shape[0])
    unshuffle = int(round((first.shape[1] / out_channels) ** 0.5))  # Real-ESRGAN x2: 12 = 3 * 2**2 inputs
    if unshuffle**2 * out_channels != first.shape[1] or not 1 <= num_up <= 3:
        raise EdgediffError(f"unsupported RRDBNet variant ({first.shape[1]} input channels, {num_up} upsamplings)")
    return dict(in_channels=out_channels, out_channels=out_channels, num_feat=int(first.shape[0]), num_block=blocks,
                num_grow_ch=grow, num_up=num_up, unshuffle=unshuffle)


def load_rrdbnet(source: str | Path, allow_pickle: bool = False) -> tuple[RRDBNet, dict[str, int]]:
    """The torch module with the file's weights (float32), and its hyperparameters."""
    from edgediff.runtime.tensor_files import read_tensors

    tensors, _ = read_tensors(source, "ESRGAN", allow_pickle=allow_pickle)
    state = new_layout(tensors)
    hp = hyperparameters(state)
    module = RRDBNet(**hp).eval()
    try:
        module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()})
    except RuntimeError as error:
        raise EdgediffError(f"{source}: the weights do not fit an RRDBNet ({str(error).splitlines()[1][:160]})") from None
    return module, hp


def export_esrgan(source, out, *, precision: str | None, allow_pickle: bool = False, overwrite: bool = False,
                  log: Callable[[str], None] | None = None) -> PixelUpscalerManifest:
    """Trace, validate against torch on ONNX Runtime's CPU provider, then move into OUT with the
    manifest written last (a folder with a manifest is complete)."""
    from . import export as ex
    from .memory import GIB, peak_rss_bytes

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if precision not in (None, "fp32"):
        raise EdgediffError(f"an ESRGAN upscaler exports at fp32 (its convolutions gain nothing from {precision} "
                            "on ONNX Runtime's CPU provider); drop --precision or pass fp32")
    started, out = time.perf_counter(), Path(out)
    ex._check_output(out, overwrite)
    module, hp = load_rrdbnet(source, allow_pickle)  # a file that is no RRDBNet fails here, before any output
    scale = 2 ** hp["num_up"] // hp["unshuffle"]
    log(f"loaded {source}: x{scale} RRDBNet, {hp['num_block']} blocks of {hp['num_feat']} features")
    staging = ex._prepare_folders(out, overwrite)
    shutil.rmtree(staging / GRAPH, ignore_errors=True)
    (staging / GRAPH).mkdir()
    entry = _trace_and_validate(module, hp, staging / GRAPH / "model.onnx", log)
    manifest = PixelUpscalerManifest(
        name=Path(str(source)).stem, architecture="RRDBNet", scale=scale, in_channels=hp["in_channels"],
        out_channels=hp["out_channels"], multiple=hp["unshuffle"], hyperparameters=hp, graphs={GRAPH: entry},
        source=_origin(source))
    if out.exists():
        shutil.rmtree(out)  # empty, or complete and --overwrite given (checked in _check_output)
    staging.rename(out)
    write_upscaler_manifest(out, manifest)
    log(f"done: {out} ({ex._folder_mb(out):.1f} MB) in "
        f"{time.perf_counter() - started:.0f} s, peak RAM {peak_rss_bytes() / GIB:.1f} GiB")
    return manifest


def _trace_and_validate(module: RRDBNet, hp: dict, path: Path, log) -> GraphEntry:
    from .validate import reference_outputs, validate

    m = hp["unshuffle"]
    example = torch.rand(1, hp["in_channels"], 12 * m, 10 * m, generator=torch.Generator().manual_seed(0))
    inputs = [TensorSpec("image", "float32", ("batch", hp["in_channels"], "height", "width"))]
    outputs = [TensorSpec("upscaled", "float32", ("batch", hp["out_channels"], "out_height", "out_width"))]
    log(f"[1/1] {GRAPH}: tracing")
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=["upscaled"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "upscaled": {0: "batch", 2: "out_height", 3: "out_width"}},
                          opset_version=17, dynamo=False)
    expected = reference_outputs(module, (example,))
    report = validate(expected, path, (example,), inputs, outputs, ["CPUExecutionProvider"])
    worst = max(item["relative"] for item in report.values())
    if not all(item["finite"] for item in report.values()) or worst > TOLERANCE:
        raise EdgediffError(f"{GRAPH} graph differs from torch by {worst:.2e} (relative), over the tolerance "
                            f"{TOLERANCE:g}: not written")
    log(f"[1/1] {GRAPH}: validated on cpu, max relative difference {worst:.2e} (tolerance {TOLERANCE:g})")
    return GraphEntry(path=f"{GRAPH}/model.onnx", sha256=sha256_file(path), precision="fp32", inputs=inputs,
                      outputs=outputs, validation={"validated": True, "where": "cpu", "tolerance": TOLERANCE,
                                                   "max_relative": worst, "outputs": report})


def _origin(source) -> dict:
    import onnxruntime

    from . import export as ex

    return {"kind": "esrgan-file", "path": str(Path(str(source)).resolve()), "opset": ex.OPSET,
            "exporter": "torch.onnx (TorchScript)",
            "libraries": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
