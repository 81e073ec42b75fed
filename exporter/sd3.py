"""Stable Diffusion 3/3.5 as graph data: the MMDiT transformer's boundary, T5's, and the manifest
facts the runtime reads (flow matching, how three text encoders make one context, skip-layer
guidance). Which family a pipeline is comes from its components (a ``transformer``), never a name.

SD 3.5 Medium's MMDiT-X (dual attention layers, RMS q/k norm) needs nothing here: diffusers'
``SD3Transformer2DModel`` builds it from its config and the trace follows.
"""
from __future__ import annotations

import re

import torch
from torch import nn

# diffusers' StableDiffusion3Pipeline defaults for skip-layer guidance, recommended there for SD 3.5
# Medium (``skip_guidance_layers=[7, 8, 9]``); off unless a call asks for it, as in diffusers.
SKIP_LAYER_GUIDANCE = {"layers": [7, 8, 9], "scale": 2.8, "start": 0.01, "stop": 0.2}
# diffusers' ``max_sequence_length``: T5 reads one window of this many tokens.
T5_TOKENS = 256
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
# T5 v1.1 overflows fp16 (its feed-forward outputs grow past 65504 in trained weights). ONNX Runtime's
# SD 3.x / Flux tooling (onnxruntime/python/tools/transformers/models/stable_diffusion/
# optimize_pipeline.py, ``flux_node_block_list["text_encoder_2"]``, reused for SD3's text_encoder_3)
# keeps, from node statistics of the trained t5-v1_1-xxl, these nodes fp32: the feed-forward output
# MatMuls (``DenseReluDense/wo``) of blocks 10 and 23, and SkipLayerNorm_20 to _46, which in its
# numbering (one per residual add after the first) are the residual adds, with the RMS norms that read
# them, from block 10's feed-forward to the last. Stated here by structure, not by the fusion's node
# numbers (which change with export settings); a T5 with fewer blocks clamps the block numbers.
T5_FP16_ISLANDS = {"residual_from": (10, 1), "feed_forward_out": (10, 23), "blocks": 24}
_BLOCK = re.compile(r"block\.(\d+)/layer\.(\d+)/")


class T5Encoder(nn.Module):
    """Token ids in, T5's last hidden state out (diffusers' ``_get_t5_prompt_embeds``)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]


class MMDiT(nn.Module):
    """One transformer call; ``skip_layers`` (batch, layers), where exported, blends each block's
    output back to its input row by row: 1 skips the block (diffusers' ``skip_layers``), 0 runs it.
    A block's output plus 0 * (input - output) is the output exactly, so an all-zero mask gives the
    unskipped result, and one graph serves both guidance runs."""

    def __init__(self, transformer, names: tuple[str, ...]):
        super().__init__()
        self.transformer = transformer
        self.skips = "skip_layers" in names
        if self.skips and not getattr(transformer, "_edgediff_skip_hooks", False):
            for index, block in enumerate(transformer.transformer_blocks):
                block.register_forward_hook(_skip_hook(transformer, index), with_kwargs=True)
            transformer._edgediff_skip_hooks = True

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, skip_layers=None):
        self.transformer._edgediff_skip_mask = skip_layers
        try:
            return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, return_dict=False)[0]
        finally:
            self.transformer._edgediff_skip_mask = None


def _skip_hook(transformer, index: int):
    def hook(block, args, kwargs, output):
        mask = getattr(transformer, "_edgediff_skip_mask", None)
        if mask is None:
            return output
        keep = mask[:, index].reshape(-1, 1, 1).to(kwargs["hidden_states"].dtype)
        context_out, hidden_out = output
        hidden_out = hidden_out + keep * (kwargs["hidden_states"] - hidden_out)
        if context_out is not None:
            context_out = context_out + keep * (kwargs["encoder_hidden_states"] - context_out)
        return context_out, hidden_out
    return hook


def t5_fp16_islands(model) -> tuple[list[str], str]:
    """The T5 graph's nodes that stay fp32 in an fp16 export (``T5_FP16_ISLANDS``), and why.

    A node's place is (block, layer) from its name (``.../block.B/layer.L/...``); a fused
    SkipSimplifiedLayerNormalization is placed by its skip input, the sublayer output it adds.
    """
    producers = {out: node.name for node in model.graph.node for out in node.output}
    places = [_place(n.input[1] if n.op_type.startswith("Skip") and len(n.input) > 1 else n.name, producers)
              for n in model.graph.node]
    last = max((p[0] for p in places if p is not None), default=0)
    start = (min(T5_FP16_ISLANDS["residual_from"][0], last), T5_FP16_ISLANDS["residual_from"][1])
    ff_blocks = {min(b, last) for b in T5_FP16_ISLANDS["feed_forward_out"]}
    kept = []
    for node, place in zip(model.graph.node, places):
        residual = place is not None and place >= start and _is_residual(node)
        final = "final_layer_norm" in node.name or (node.op_type.startswith("Skip") and place == (last, 1))
        ff_out = place is not None and place[0] in ff_blocks and node.name.endswith("DenseReluDense/wo/MatMul")
        if residual or final or ff_out:
            kept.append(node.name)
    why = (f"T5 residual stream from block {start[0]}'s feed-forward and the feed-forward outputs of blocks "
           f"{', '.join(map(str, sorted(ff_blocks)))} (ONNX Runtime's SD3 list)")
    return kept, why


def _place(name: str, producers: dict) -> tuple[int, int] | None:
    match = _BLOCK.search(producers.get(name, name))
    return (int(match[1]), int(match[2])) if match else None


def _is_residual(node) -> bool:
    """A residual add (``.../layer.L/Add``), fused or not, or a norm reading the residual stream."""
    return (node.op_type in ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")
            or (node.op_type == "Add" and re.search(r"layer\.\d+/Add$", node.name) is not None)
            or "/layer_norm/" in node.name)


def model_dims(pipe) -> dict:
    """The fixed axes of every SD3 graph, from the component configs."""
    transformer, vae = pipe.transformer.config, pipe.vae.config
    clip_l, clip_g = pipe.text_encoder.config, pipe.text_encoder_2.config
    t5 = getattr(pipe, "text_encoder_3", None)
    vocabs = [clip_l.vocab_size, clip_g.vocab_size] + ([t5.config.vocab_size] if t5 is not None else [])
    return {
        "sequence": pipe.tokenizer.model_max_length,
        "hidden": clip_l.hidden_size, "hidden_2": clip_g.hidden_size,
        "projection": clip_l.projection_dim, "projection_2": clip_g.projection_dim,
        "t5_sequence": T5_TOKENS, "t5_hidden": t5.config.d_model if t5 is not None else None,
        "vocab": min(vocabs),  # example ids valid for every encoder
        "channels": transformer.in_channels, "out_channels": transformer.out_channels,
        "latent_channels": vae.latent_channels, "rgb": vae.in_channels,
        "joint_attention": transformer.joint_attention_dim, "pooled": transformer.pooled_projection_dim,
        "layers": transformer.num_layers,
    }


def size_rule(pipe) -> tuple[int, int]:
    """(vae_scale_factor, latent_multiple): the transformer cuts the latent into patches."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1), int(pipe.transformer.config.patch_size)


def default_size(pipe) -> int:
    return int(pipe.transformer.config.sample_size) * size_rule(pipe)[0]


def manifest_fields(pipe) -> dict:
    """What the runtime needs beyond the graphs: flow matching, the text layout, patching, SLG."""
    flow = type(pipe.scheduler).__name__ in FLOW_SCHEDULERS
    transformer = pipe.transformer.config
    layers = [i for i in SKIP_LAYER_GUIDANCE["layers"] if i < transformer.num_layers]
    conditioning = {
        "force_zeros_for_empty_prompt": False,
        "patch_size": int(transformer.patch_size),
        "text": {
            "width": int(transformer.joint_attention_dim),
            "context": [{"encoders": ["text_encoder", "text_encoder_2"]},
                        {"encoders": ["text_encoder_3"], "absent_tokens": T5_TOKENS}],
            "pooled": {"input": "pooled_projections", "encoders": ["text_encoder", "text_encoder_2"]},
            # pipe(t5="on"|"off"): T5 may be switched off, or missing from the export (zeros instead)
            "switches": {"t5": "text_encoder_3"},
        },
        # diffusers' defaults, with the layers this transformer has (tiny test models have fewer)
        "skip_layer_guidance": {**SKIP_LAYER_GUIDANCE, "layers": layers} if layers else {},
    }
    return {"prediction_type": "flow" if flow else pipe.scheduler.config.get("prediction_type", "epsilon"),
            "conditioning": conditioning, "alphas_cumprod": "" if flow else "alphas_cumprod.npy"}


def t5_tokenizer_spec(tokenizer, folder: str) -> dict:
    return {"path": f"{folder}/tokenizer.json", "kind": "t5", "max_length": T5_TOKENS,
            "pad_token_id": int(tokenizer.pad_token_id), "eos_token_id": int(tokenizer.eos_token_id)}


class StreamedT5:
    """T5-XXL's encoder traced and checked without ever holding it whole (19 GB in fp32).

    The traced module is the real T5EncoderModel whose blocks all share block 0's parameters
    (one block of fp32 weights in memory): the tracer writes each shared weight once, and
    ``unshare`` then gives every node of a later block its own block's weight, read one tensor at a
    time from the checkpoint and appended to the graph's work folder. The reference outputs run the
    same module with each block's own weights swapped in just before it runs and out after.
    """

    def __init__(self, config, tensors):
        from transformers import T5EncoderModel

        self.tensors = tensors  # checkpoint name -> tensor, read on demand
        with torch.device("meta"):
            model = T5EncoderModel(config)
        embedding = nn.Parameter(self._read("encoder.embed_tokens.weight", "shared.weight"), requires_grad=False)
        model.shared.weight = model.encoder.embed_tokens.weight = embedding
        model.encoder.final_layer_norm.weight = self._param("encoder.final_layer_norm.weight")
        blocks = model.encoder.block
        self.shared = {name: self._param(f"encoder.block.0.{name}") for name, _ in blocks[0].named_parameters()}
        for block in blocks:
            _assign(block, {name: p for name, p in self.shared.items() if _has(block, name)})
        self.model = model.eval()

    @staticmethod
    def resident_bytes(config) -> int:
        """fp32 bytes held while traced: the token embedding, one block (T5 v1.1's gated FFN, two RMS
        norms) and the final norm."""
        attention = 4 * config.d_model * config.num_heads * config.d_kv
        feed_forward = (3 if config.is_gated_act else 2) * config.d_model * config.d_ff
        return 4 * (config.vocab_size * config.d_model + attention + feed_forward + 3 * config.d_model)

    def module(self) -> nn.Module:
        return T5Encoder(self.model)

    def reference(self, inputs) -> list:
        """The encoder's output on ``inputs`` with every block's own weights, one block at a time."""
        hooks = []
        for index, block in enumerate(self.model.encoder.block[1:], 1):
            hooks.append(block.register_forward_pre_hook(lambda b, args, i=index: _assign(b, self._block(i, b))))
            hooks.append(block.register_forward_hook(lambda b, args, out: _assign(b, {
                name: p for name, p in self.shared.items() if _has(b, name)})))
        try:
            with torch.no_grad():
                out = T5Encoder(self.model)(*inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return [out.numpy().astype("float64")]

    def unshare(self, model, folder, spill_name: str) -> int:
        """Point every node of blocks 1.. at its own block's weights (appended to ``folder/spill_name``);
        returns how many tensors were written. A node's scope names its module (``/block.3/layer.1/
        DenseReluDense/wo/MatMul`` reads ``encoder.block.3.layer.1.DenseReluDense.wo.weight``)."""
        import numpy as np
        from onnx import numpy_helper

        from .weights import drop_unused_initializers, spill_tensor

        shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        for node in model.graph.node:  # the tracer hands a shared weight on through Identity nodes
            if node.op_type == "Identity" and node.input[0] in shapes:
                shapes[node.output[0]] = shapes[node.input[0]]
        written = 0
        with open(folder / spill_name, "ab") as out:
            for node in model.graph.node:
                match = re.search(r"/encoder/block\.(\d+)/(.+)/[^/]+$", node.name)
                if match is None or match[1] == "0":
                    continue
                name = f"encoder.block.{match[1]}.{match[2].replace('/', '.')}.weight"
                if name not in self.tensors:
                    continue
                weight = self.tensors[name].float()
                if node.op_type == "MatMul" and weight.dim() == 2:
                    weight = weight.t()  # the tracer folded Linear's transpose into the MatMul's weight
                for slot, source in enumerate(node.input):
                    if shapes.get(source) != tuple(weight.shape):
                        continue
                    tensor = numpy_helper.from_array(np.ascontiguousarray(weight.numpy()), f"{name}:{node.name}")
                    spill_tensor(tensor, out, spill_name)
                    model.graph.initializer.append(tensor)
                    node.input[slot] = tensor.name
                    written += 1
                    break
        drop_unused_initializers(model)
        return written

    def _read(self, *names):
        for name in names:
            if name in self.tensors:
                return self.tensors[name].float()
        raise KeyError(f"none of {names} in the T5 checkpoint")

    def _param(self, name):
        return nn.Parameter(self._read(name), requires_grad=False)

    def _block(self, index, block):
        return {name: self._param(f"encoder.block.{index}.{name}") for name in self.shared if _has(block, name)}


def _has(module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def _assign(module, params: dict) -> None:
    for name, param in params.items():
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, leaf, param)

