"""Too little memory or disk for the model: one `error:` line up front, exit 1, and no model folder left;
a disk that fills midway: one line, and the same command resumes."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

# The export CLI in a child process, after ``PREPARE`` has shrunk the memory it may use.
CHILD = textwrap.dedent("""
    import sys
    import edgediff.exporter.export  # torch, onnxruntime and the exporter: the process's fixed cost
    {prepare}
    from edgediff.cli import main
    main(["export", *sys.argv[1:]], standalone_mode=True)
""")
FAKE_MEMAVAILABLE = """
import edgediff.exporter.memory as memory
memory.available_bytes = lambda: 64 * 1024**2  # what /proc/meminfo says on a machine that is nearly full
"""
ADDRESS_SPACE_LIMIT = """
import resource
import diffusers, transformers
import edgediff.exporter.memory as memory
# What loading a model's configs imports, then room for 512 MiB more than this process maps:
# enough to read the configs, far less than this model's export needs (about 5 GiB).
diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, diffusers.PNDMScheduler
transformers.CLIPTextModel, transformers.CLIPTokenizer
size = memory._status_kib("VmSize") * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 1024**2, resource.RLIM_INFINITY))
"""


@pytest.fixture
def big_source(tiny_sources, tmp_path):
    """The tiny model with a U-Net weights file that declares 3.2 GB of float32 weights.

    The file is sparse (no disk, no data): the memory check reads only the safetensors header, and
    refuses before any weights are read.
    """
    folder = shutil.copytree(tiny_sources["sd1"], tmp_path / "big")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    count = 800_000_000
    header = json.dumps({"w": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}}).encode()
    with open(weights, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + 4 * count)
    return folder


FULL_DISK = """
import edgediff.exporter.disk as disk
disk.free_bytes = lambda path: 1024**2  # 1 MB free: a laptop disk the user has filled
"""
# The first graph is written, the second finds the disk full (another program took the space).
DISK_FILLS_MIDWAY = """
import errno, os
import edgediff.exporter.export as export
written = export.write_graph
def write_graph(model, path, folder):
    if "text_encoder" not in str(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return written(model, path, folder)
export.write_graph = write_graph
"""


def _export_in_child(prepare: str, source, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD.format(prepare=prepare), str(source), str(out),
                           "--precision", "fp32"], capture_output=True, text=True, timeout=300)


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def _assert_refused(result, out, *said):
    error = _one_error_line(result)
    assert all(words in error for words in said), error
    assert not out.exists()
    assert not list(out.parent.rglob("manifest.json"))


def _assert_refused_for_memory(result, out):
    _assert_refused(result, out, "not enough memory", "GiB is available", "needs about")


def test_low_memavailable_refuses_with_one_line(tiny_sources, tmp_path):
    out = tmp_path / "model"
    _assert_refused_for_memory(_export_in_child(FAKE_MEMAVAILABLE, tiny_sources["sd1"], out), out)


def test_address_space_limit_refuses_with_one_line(big_source, tmp_path):
    out = tmp_path / "model"
    _assert_refused_for_memory(_export_in_child(ADDRESS_SPACE_LIMIT, big_source, out), out)


def test_weights_the_fusions_make_are_written_to_disk_not_kept(tmp_path):
    """CUDA's NHWC fusion rewrites every convolution weight: in memory, those copies took the SDXL U-Net
    export to 15.2 GiB. They must reach the work folder's fused.bin as they are made."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgediff.exporter import optimize as opt
    from edgediff.exporter.weights import INLINE_BYTES, load_stripped, tensor_bytes

    weight = np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "raw.onnx")
    model = opt.optimize(load_stripped(tmp_path / "raw.onnx", "weights.bin"), tmp_path, "unet", "cuda")

    assert [n.op_type for n in model.graph.node if n.op_type.startswith("Nhwc")] == ["NhwcConv"]
    made = [t for t in model.graph.initializer if t.name.endswith("_weight_NHWC")]
    assert len(made) == 1 and weight.nbytes >= INLINE_BYTES
    assert made[0].data_location == TensorProto.EXTERNAL and not made[0].raw_data
    assert dict((e.key, e.value) for e in made[0].external_data)["location"] == "fused.bin"
    stored = np.frombuffer(tensor_bytes(made[0], tmp_path), np.float32).reshape(8, 3, 3, 8)
    np.testing.assert_array_equal(stored, weight.transpose(0, 2, 3, 1))


def test_external_constant_values_become_initializers(tmp_path):
    """torch's exporter writes a graph over 2 GB with big Constant-node values as external files too
    (SD 3.5's AdaLayerNorm constants); loaded stripped, they become initializers in the work folder, as
    every other weight, so the int4 quantizer and the writer find them. (Tiny graphs never reach 2 GB.)"""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgediff.exporter.weights import load_stripped, write_graph

    value = np.arange(512, dtype=np.float32)
    tensor = numpy_helper.from_array(value, "c")
    (tmp_path / "c.bin").write_bytes(value.tobytes())
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, item in (("location", "c.bin"), ("offset", "0"), ("length", str(value.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, item
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=tensor), helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "model.onnx"))
    model = load_stripped(tmp_path / "model.onnx", "weights.bin")
    assert [n.op_type for n in model.graph.node] == ["Add"] and [t.name for t in model.graph.initializer] == ["c"]
    write_graph(model, tmp_path / "out" / "model.onnx", tmp_path)
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": np.ones(512, np.float32)})[0], value + 1)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_checkpoint_reads_tensors_without_mapping_the_file(tmp_path, monkeypatch):
    """A streamed export (T5-XXL, 9.5 GB in fp16) reads its checkpoint one tensor at a time: the same
    tensors safetensors gives, by plain reads. Through safetensors' memory map, the full-size export's
    resident set counted every shard page it had read (RssFile 9.4 GB of T5's 1 GB shards, measured):
    a peak nothing held."""
    import safetensors
    import torch
    from safetensors.torch import save_file

    from edgediff.exporter.components import Checkpoint

    generator = torch.Generator().manual_seed(0)
    tensors = {f"big.{i}": torch.randn(1024, 4096, generator=generator).half() for i in range(8)}  # 64 MiB
    tensors |= {"bf16": torch.randn(3, 5, generator=generator).bfloat16(), "f32": torch.randn(7),
                "ids": torch.arange(6).reshape(2, 3), "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "model.safetensors")

    def mapped(*args, **kwargs):
        raise AssertionError("the checkpoint was opened through safetensors' memory map")

    monkeypatch.setattr(safetensors, "safe_open", mapped)
    checkpoint = Checkpoint.find(tmp_path)
    before = _rss_file_kib()
    for name, tensor in tensors.items():
        read = checkpoint[name]
        assert read.dtype == tensor.dtype and read.shape == tensor.shape and torch.equal(read, tensor), name
    assert _rss_file_kib() - before < 8 * 1024


def test_full_disk_refuses_with_one_line_before_writing(tiny_sources, tmp_path):
    out = tmp_path / "model"
    _assert_refused(_export_in_child(FULL_DISK, tiny_sources["sd1"], out), out,
                    "not enough disk", "GB free beside", "GB is free")
    assert list(tmp_path.iterdir()) == []  # not even the staging folder


def test_disk_full_midway_says_so_and_the_same_command_resumes(tiny_sources, tmp_path):
    out = tmp_path / "model"
    error = _one_error_line(_export_in_child(DISK_FILLS_MIDWAY, tiny_sources["sd1"], out))
    assert "the disk filled while exporting unet" in error and "run the same command again" in error, error
    assert not out.exists()
    again = _export_in_child("", tiny_sources["sd1"], out)
    assert again.returncode == 0, again.stderr
    assert "text_encoder: already exported, skipping" in again.stderr
    assert (out / "manifest.json").is_file()
