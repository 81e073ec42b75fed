"""Single-file ControlNets (exporter/controlnet_file.py): the original lllyasviel layout
(``input_blocks``, ``zero_convs``, ``input_hint_block``, ``middle_block_out``, with or without
``control_model.``) and diffusers' names in one file, exported to the graph a folder export makes.

The files are written here from tiny random ControlNets with ``original_names``, this test's own
inverse of the layout (checked against diffusers' ``convert_controlnet_checkpoint`` on full-size
shapes). Full-size configs are checked on the meta device: their shapes give back their configs.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tiny_models import build_pipeline, build_sdxl_pipeline, export_with_cli

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def export_error(result, *fragments):
    """An export refused: progress lines may come first, then one ``error:`` line, no traceback."""
    stderr = result.stderr.strip()
    assert result.exit_code != 0 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == stderr.splitlines()[-1], stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def original_names(state: dict, layers: int, prefix: str = "control_model.") -> dict:
    """diffusers' ControlNet names -> the original ControlNet's (cldm.py's ControlNet module)."""
    hint_blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    out = {}
    for key, value in state.items():
        name = key
        rules = [
            (r"time_embedding\.linear_1\.", "time_embed.0."), (r"time_embedding\.linear_2\.", "time_embed.2."),
            (r"add_embedding\.linear_1\.", "label_emb.0.0."), (r"add_embedding\.linear_2\.", "label_emb.0.2."),
            (r"conv_in\.", "input_blocks.0.0."), (r"controlnet_mid_block\.", "middle_block_out.0."),
            (r"controlnet_down_blocks\.(\d+)\.", r"zero_convs.\1.0."),
            (r"controlnet_cond_embedding\.conv_in\.", "input_hint_block.0."),
            (r"controlnet_cond_embedding\.conv_out\.", f"input_hint_block.{2 * (hint_blocks + 1)}."),
            (r"mid_block\.attentions\.0\.", "middle_block.1."),
        ]
        for pattern, repl in rules:
            if re.match(pattern, name):
                name = re.sub(pattern, repl, name, count=1)
                break
        if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", name):
            name = f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{m.group(2)}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", name):
            level, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = 1 + level * (layers + 1) + (layers if kind == "downsamplers" else layer)
            name = (f"input_blocks.{index}.0.op.{rest.split('.', 1)[1]}" if kind == "downsamplers" else
                    f"input_blocks.{index}.1.{rest}" if kind == "attentions" else
                    f"input_blocks.{index}.0.{_resnet(rest)}")
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", name):
            name = f"middle_block.{2 * int(m.group(1))}.{_resnet(m.group(2))}"
        out[prefix + name] = value
    return out


def _resnet(rest: str) -> str:
    part, _, tail = rest.partition(".")
    return f"{RESNET[part]}.{tail}"


def sd1_controlnet(seed: int = 21):
    """Fits the tiny SD 1.x base and follows SD 1.x's conventions (8 heads, 32 groups), which a
    single file must (a file carries no config); output convolutions re-drawn (not zero)."""
    from diffusers import ControlNetModel

    unet = build_pipeline("sd1").unet.config
    torch.manual_seed(seed)
    controlnet = ControlNetModel(block_out_channels=unet.block_out_channels, layers_per_block=unet.layers_per_block,
                                 down_block_types=unet.down_block_types, cross_attention_dim=unet.cross_attention_dim,
                                 attention_head_dim=8, norm_num_groups=32, conditioning_embedding_out_channels=(16, 32))
    return _redraw(controlnet)


def _redraw(controlnet):
    with torch.no_grad():
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out):
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.1)
    return controlnet.eval()


def run_graph(folder, seed: int = 0) -> list[np.ndarray]:
    """The exported graph's outputs on fixed random inputs (at the manifest's fixed sizes)."""
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["graphs"]["controlnet"]
    sizes = {"batch": 1, "latent_height": 16, "latent_width": 16, "height": 32, "width": 32, "context": 77}
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in entry["inputs"]:
        shape = [sizes.get(a, a) for a in spec["shape"]]
        feed[spec["name"]] = (np.full(shape, 500.0, np.float32) if spec["name"] == "timestep" else
                              rng.standard_normal(shape).astype(np.float32))
    session = ort.InferenceSession(str(folder / entry["path"]), providers=["CPUExecutionProvider"])
    return session.run(None, feed), feed


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """(folder export, {variant: single-file export}) of one tiny SD 1.x ControlNet."""
    root = tmp_path_factory.mktemp("cn-single")
    controlnet = sd1_controlnet()
    controlnet.save_pretrained(root / "folder")
    state = {k: v.contiguous() for k, v in controlnet.state_dict().items()}
    layers = controlnet.config.layers_per_block
    save_file(original_names(state, layers), root / "control_sd1_tiny.safetensors")
    torch.save(original_names(state, layers, prefix=""), root / "control_sd1_tiny.pth")
    exports = {"folder": export_with_cli(root / "folder", root / "out-folder", "--precision", "fp32")}
    exports["original, control_model. prefix"] = export_with_cli(root / "control_sd1_tiny.safetensors",
                                                                 root / "out-file", "--precision", "fp32")
    exports["original, .pth, no prefix"] = export_with_cli(root / "control_sd1_tiny.pth", root / "out-pth",
                                                           "--precision", "fp32", "--allow-pickle")
    return root, state, exports


@pytest.mark.parametrize("variant", ["original, control_model. prefix", "original, .pth, no prefix"])
def test_original_layout_file_gives_the_folder_graph(sd1_files, variant):
    _, _, exports = sd1_files
    expected, _ = run_graph(exports["folder"])
    actual, _ = run_graph(exports[variant])
    assert len(actual) == len(expected) == 5
    for got, want in zip(actual, expected):
        assert np.abs(got - want).max() <= 1e-6 * max(1.0, np.abs(want).max())
    folder_manifest = json.loads((exports["folder"] / "manifest.json").read_text())
    file_manifest = json.loads((exports[variant] / "manifest.json").read_text())
    for key in ("family", "cross_attention_dim", "hint_scale_factor", "residuals", "conditioning_channels"):
        assert file_manifest[key] == folder_manifest[key]
    assert file_manifest["source"]["kind"] == "single-file-controlnet"
    assert file_manifest["source"]["config"] == "inferred from its shapes"


def test_the_comparison_sees_a_misplaced_weight(sd1_files, tmp_path):
    """Two same-shaped zero convolutions swapped in the file: it loads, and its graph differs."""
    root, state, exports = sd1_files
    swapped = dict(state)
    swapped["controlnet_down_blocks.0.weight"], swapped["controlnet_down_blocks.1.weight"] = (
        state["controlnet_down_blocks.1.weight"], state["controlnet_down_blocks.0.weight"])
    save_file(original_names(swapped, 1), tmp_path / "swapped.safetensors")
    out = export_with_cli(tmp_path / "swapped.safetensors", tmp_path / "out", "--precision", "fp32")
    expected, _ = run_graph(exports["folder"])
    actual, _ = run_graph(out)
    assert np.abs(actual[0] - expected[0]).max() > 1e-2


def test_a_dropped_weight_is_one_line(sd1_files, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    _, state, _ = sd1_files
    names = original_names(state, 1)
    names.pop("control_model.zero_convs.3.0.weight")
    save_file(names, tmp_path / "broken.safetensors")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "broken.safetensors"), str(tmp_path / "out"),
                                       "--precision", "fp32"])
    export_error(result, "does not have a ControlNet layout edgediff knows",
                 "missing 1 weights (controlnet_down_blocks.3.weight...)")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("case,message", [
    ("lora", "is neither a Stable Diffusion checkpoint nor a ControlNet"),
    ("pickle", "is a pickled checkpoint: loading it runs code"),
    ("garbage", "is not a readable .safetensors file"),
])
def test_files_that_are_not_controlnets_are_one_line(tmp_path, case, message):
    from click.testing import CliRunner

    from edgediff.cli import main

    path = tmp_path / ("x.pth" if case == "pickle" else "x.safetensors")
    if case == "lora":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, path)
    elif case == "pickle":
        torch.save({"control_model.input_hint_block.0.weight": torch.zeros(1)}, path)
    else:
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    result = CliRunner().invoke(main, ["export", str(path), str(tmp_path / "out"), "--precision", "fp32"])
    export_error(result, message)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_sdxl_file_with_its_config_matches_torch(tmp_path, layout):
    """A tiny SDXL ControlNet (added text/size embedding: ``label_emb`` in the original layout) in one
    file; its heads follow no family convention, so --config gives its config.json."""
    from click.testing import CliRunner
    from diffusers import ControlNetModel

    from edgediff.cli import main

    torch.manual_seed(31)
    controlnet = _redraw(ControlNetModel.from_unet(build_sdxl_pipeline("sdxl").unet,
                                                   conditioning_embedding_out_channels=(16, 32)))
    controlnet.save_pretrained(tmp_path / "config")  # its config.json is what --config reads
    state = {k: v.contiguous() for k, v in controlnet.state_dict().items()}
    save_file(original_names(state, 1) if layout == "original" else state, tmp_path / "cn.safetensors")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "cn.safetensors"), str(tmp_path / "no-config"),
                                       "--precision", "fp32"])
    export_error(result, "not whole 64-channel attention heads", "pass --config")
    out = export_with_cli(tmp_path / "cn.safetensors", tmp_path / "out", "--precision", "fp32",
                          "--config", tmp_path / "config" / "config.json")
    assert json.loads((out / "manifest.json").read_text())["family"] == "sdxl"
    actual, feed = run_graph(out)
    with torch.no_grad():
        down, mid = controlnet(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]),
                               torch.from_numpy(feed["encoder_hidden_states"]), torch.from_numpy(feed["controlnet_cond"]),
                               added_cond_kwargs={"text_embeds": torch.from_numpy(feed["text_embeds"]),
                                                  "time_ids": torch.from_numpy(feed["time_ids"])}, return_dict=False)
    for got, want in zip(actual, [*down, mid]):
        assert np.abs(got - want.numpy()).max() < 1e-4 * max(1.0, float(want.abs().max()))


def _meta_controlnet(name: str):
    """A full-size ControlNet without weights: the shipped SD 1.5 / SDXL ControlNet config, or SD 2.1's
    made from its U-Net as diffusers' training script makes it."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from edgediff.models import configs_dir

    with torch.device("meta"):
        if name == "sd21":
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs_dir() / "sd21" / "unet"))
            return ControlNetModel.from_unet(unet)
        return ControlNetModel.from_config(ControlNetModel.load_config(configs_dir() / f"controlnet-{name}"))


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_full_size_shapes_give_back_their_config(name):
    """What a single file's shapes say, read as the families' conventions, is the real config."""
    from edgediff.exporter.controlnet_file import infer_config, layout, to_diffusers

    controlnet = _meta_controlnet(name)
    state = controlnet.state_dict()
    original = original_names(state, controlnet.config.layers_per_block)
    assert layout(original) == "original" and layout(state) == "diffusers"
    converted = to_diffusers(original)
    assert set(converted) == set(state)
    for shapes in ({k: tuple(v.shape) for k, v in converted.items()}, {k: tuple(v.shape) for k, v in state.items()}):
        inferred = infer_config(shapes)
        for key, value in inferred.items():
            real = controlnet.config[key]
            real = list(real) if isinstance(real, tuple) else real
            if key == "attention_head_dim" and isinstance(real, int):
                real = real if isinstance(value, int) else [real] * len(value)
            if key == "transformer_layers_per_block" and isinstance(real, int):
                real = [real] * len(value)
            if key == "mid_block_type" and real is None:
                continue
            assert value == real, (key, value, real)


def test_original_names_are_diffusers_own_conversion():
    """This test's inverse map agrees with diffusers' converter on a full-size SD 1.5 ControlNet."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    controlnet = _meta_controlnet("sd15")
    state = controlnet.state_dict()
    original = original_names(state, controlnet.config.layers_per_block)
    converted = convert_controlnet_checkpoint(original, dict(controlnet.config))
    assert set(converted) == set(state)
    assert all(converted[k].shape == state[k].shape for k in state)
