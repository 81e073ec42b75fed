"""How much memory a generation needs, estimated from the graphs before any work starts.

Per graph, the estimate walks the ONNX nodes in execution order with the request's batch and latent
size: each activation's size follows from the convolution strides and Resize scales met on the way
from the spatial input (its resolution) and the last weight that produced it (its channels). A tensor
is alive from the node that writes it to the last node that reads it, as in ONNX Runtime's sequential
memory plan; fused attention adds its scratch (the QKV buffer and the batch*heads*tokens^2 score
matrix, which dominates at large sizes). The peak of one stage is the weights resident (one graph in
``memory="low"``, all graphs used so far in ``"high"``) plus the activations held then: that stage's
in ``"low"``; in ``"high"`` also every earlier stage's, since each resident session's CPU arena
keeps the chunks of its largest run. The process's own resident memory is added on top.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFolderError, OutOfMemoryError
from .graph_info import GraphInfo, read_graph
from .manifest import GraphEntry
from .vae_tiling import needs_tiling

GB = 1e9
DTYPE_BYTES = {"float32": 4, "float16": 2}
# ONNX Runtime's CPU arena (best-fit with coalescing) splits a freed score matrix for the smaller
# tensors that follow, so the next attention node's matrix takes a new region: the arena ends up
# holding two (measured, full-size SD 1.5 U-Net: +0.54 GB over the walk at 512x512, +8.6 GB at
# 1024x1024, one score matrix each time). Without the arena freed buffers go back to the system,
# but every run faults its activations in again (512x512 batch 2: 12.6 s a step against 8.8 s), so
# a graph whose score matrix reaches this size drops the arena only when the arena would not fit.
ARENA_SCRATCH_LIMIT = 2**30
# The arena is kept while the plan with it needs at most this share of the free memory; the rest is
# headroom for the estimate's error (0.88-0.99 of the measured peak) and for the rest of the machine.
ARENA_SHARE = 0.8
# Passthrough ops whose output holds a handful of numbers (shapes, indices), not an activation.
SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "NonZero"}


def _spatial_input(entry: GraphEntry):
    """The graph's image-like input (batch, channels, height, width), or None."""
    return next((spec for spec in entry.inputs if len(spec.shape) == 4), None)


@dataclass
class GraphProfile:
    """One graph's weights and the node walk that sizes its activations."""

    name: str
    info: GraphInfo
    spatial: str | None  # name of the (batch, channels, height, width) input
    channels: int | None
    outputs: set[str]
    element_bytes: int

    @property
    def weight_bytes(self) -> int:
        return self.info.weight_bytes

    @functools.cached_property
    def producers(self) -> dict:
        return {name: node for node in self.info.nodes for name in node.outputs}

    def heads(self, query: str) -> int:
        """Heads of an unfused attention's query (batch, heads, tokens, dim): the third entry of the
        Reshape shape that split them off (constant, unlike the batch), found walking back through the
        ops between (Transpose, scaling, q/k norms, concatenation with the text tokens); 1 if none."""
        for _ in range(24):
            node = self.producers.get(query)
            if node is None:
                return 1
            if node.op_type == "Reshape":
                shape = self._shape_entries(node.inputs[1])
                return shape[2] if len(shape) == 4 and shape[2] and shape[2] > 0 else 1
            query = node.inputs[0]
        return 1

    def _shape_entries(self, name: str) -> list[int | None]:
        """A shape tensor's entries where they are constants (None where computed, as the batch is)."""
        if name in self.info.integers:
            return list(self.info.integers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Concat":
            return [entry for part in node.inputs for entry in (self._shape_entries(part) or [None])]
        if node is not None and node.op_type == "Unsqueeze" and node.inputs[0] in self.info.integers:
            return list(self.info.integers[node.inputs[0]])
        return []

    def activation_bytes(self, batch: int, height: int, width: int, context_tokens: int) -> tuple[int, str, int]:
        """Peak bytes of live activations at this input size, what the peak is, and the largest
        score matrix one attention takes (fused: its scratch; unfused: the Q.K^T MatMul's output).

        Longer than our ~60 lines on purpose: it is one walk over the nodes whose state (scales,
        channels, live set, last uses) every branch updates; split, each part would take it all."""
        if self.spatial is None:
            return 0, "weights", 0
        info, shapes = self.info, self.info.shapes
        scale = {self.spatial: 1.0}
        chans = {self.spatial: self.channels or 1}
        scores: set[str] = set()

        def pixels(r: float) -> int:
            return math.ceil(height * r) * math.ceil(width * r)

        last_use = {}
        for index, node in enumerate(info.nodes):
            for name in node.inputs:
                last_use[name] = index
        size = lambda name: batch * chans[name] * pixels(scale[name]) * self.element_bytes  # noqa: E731
        live = peak = size(self.spatial)
        what, scratch = "input", 0
        for index, node in enumerate(info.nodes):
            tagged = [name for name in node.inputs if name in scale]
            if not tagged or node.op_type in SHAPE_OPS:
                continue
            r, c = scale[tagged[0]], chans[tagged[0]]
            transient, kind, what_here = 0, None, ""
            op = node.op_type
            if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
                stride = node.ints.get("strides", [1])[0]
                r = r * stride if op == "ConvTranspose" else r / stride
                weight = shapes.get(node.inputs[1]) if len(node.inputs) > 1 else None
                c = weight[0] if weight else c
            elif op in ("Resize", "Upsample"):
                factors = next((info.values[n] for n in node.inputs[1:] if len(info.values.get(n) or ()) == 4), None)
                r *= factors[-1] if factors else 2.0
            elif op == "MatMulNBits":  # int4 weights: the output width is the packed weight's N
                c = node.ints.get("N", [c])[0]
            elif op in ("MatMul", "Gemm"):
                a, b = node.inputs[0], node.inputs[1]
                if a in scale and b in scale:  # unfused attention: Q.K^T makes scores, scores.V their output
                    if a in scores:
                        c = chans[b]
                    else:  # batch x heads x tokens x tokens: heads x tokens values per query token
                        c, kind = pixels(scale[b]) * self.heads(a), "score"
                elif b in shapes:
                    c = shapes[b][0] if op == "Gemm" and node.ints.get("transB", [0])[0] else shapes[b][-1]
            elif op == "Attention":  # fused self-attention: QKV projection, then the score matrix
                heads = node.ints.get("num_heads", [1])[0]
                qkv = shapes.get(node.inputs[1])
                c = qkv[1] // 3 if qkv else c
                tokens = pixels(r)
                transient = batch * tokens * (3 * c + heads * tokens) * self.element_bytes
                what_here = f"self-attention at {math.ceil(height * r)}x{math.ceil(width * r)} latent pixels"
            elif op == "MultiHeadAttention":
                heads = node.ints.get("num_heads", [1])[0]
                key = node.inputs[1] if len(node.inputs) > 1 else ""
                if not key:  # packed QKV
                    c, kv = c // 3, pixels(r)
                else:
                    kv = pixels(scale[key]) if key in scale else context_tokens
                transient = batch * heads * pixels(r) * kv * self.element_bytes
                what_here = f"attention at {math.ceil(height * r)}x{math.ceil(width * r)} latent pixels"
            elif op == "Concat" and len(tagged) == len(node.inputs) > 1 and node.ints.get("axis", [1])[0] == 1:
                c = sum(chans[name] for name in tagged)  # channels (a U-Net's skip connections, NCHW)
            elif op == "Concat":  # tokens: SD3's joint attention joins image and text along (b, heads, tokens, d)'s axis 2
                c = max(chans[name] for name in tagged)
            else:
                c = max(chans[name] for name in tagged)
                if any(name in scores for name in tagged):
                    kind = "score"
            scratch = max(scratch, transient)
            written = 0
            for name in node.outputs:
                if not name:
                    continue
                scale[name], chans[name] = r, c
                if kind == "score":
                    scores.add(name)
                written += size(name)
            if kind == "score" and op == "MatMul":  # an unfused score matrix: the arena keeps two as well
                scratch = max(scratch, written)
            if live + written + transient > peak:
                peak = live + written + transient
                what = what_here if transient else f"{op} at {math.ceil(height * r)}x{math.ceil(width * r)}"
            live += written
            for name in set(node.inputs) | set(node.outputs):
                if name in scale and last_use.get(name, -1) <= index and name not in self.outputs:
                    live -= size(name)
                    del scale[name]
        return peak, what, scratch


def load_profile(model_dir: Path, name: str, entry: GraphEntry) -> GraphProfile:
    try:
        info = read_graph(Path(model_dir) / entry.path)
    except (OSError, ValueError, IndexError, KeyError) as error:
        raise ModelFolderError(f"{name} graph {Path(model_dir) / entry.path} cannot be loaded "
                               f"(corrupt or incomplete?): {error}; re-export the model") from None
    spatial = _spatial_input(entry)
    dtype = spatial.dtype if spatial is not None else "float32"
    channels = spatial.shape[1] if spatial is not None and isinstance(spatial.shape[1], int) else None
    return GraphProfile(name, info, spatial.name if spatial else None, channels,
                        {spec.name for spec in entry.outputs}, DTYPE_BYTES.get(dtype, 4))


@dataclass
class Estimate:
    peak_bytes: int  # the whole process at its peak
    stage: str  # the graph whose stage is the peak
    what: str  # what dominates that stage
    activations: dict[str, int] = field(default_factory=dict)  # each graph's largest run, bytes
    without_arena: frozenset[str] = frozenset()  # graphs planned to run without the CPU arena

    def __str__(self) -> str:
        return f"{self.peak_bytes / GB:.1f} GB (peak in {self.stage}: {self.what})"


def estimate(profiles: dict[str, GraphProfile], stages: list[tuple[str, int, int, int]], memory: str,
             resident: set[str], base_bytes: int, context_tokens: int,
             held: dict[str, int] | None = None, without_arena: frozenset[str] = frozenset(),
             beside: dict[str, str] | None = None) -> Estimate:
    """Peak memory of running ``stages`` [(graph, batch, height, width)] in order.

    ``height``/``width`` are the graph's spatial input size; ``resident`` graphs are already in
    ``base_bytes`` (the process's resident memory now), with the activation bytes ``held`` gives
    for them in their arenas (measured: 512x512 ``high`` ran 2.2 GB over a per-stage maximum).
    ``without_arena`` graphs run without ONNX Runtime's CPU arena: no second score matrix, and
    nothing held after their stage. ``beside``: {graph: the graph it stays loaded beside} (ControlNets
    beside the U-Net): in ``"low"`` such a group's weights are resident together, and the arenas of
    those that ran already hold their activations."""
    beside = beside or {}
    best = Estimate(base_bytes, "none", "nothing")
    loaded = set(resident)
    largest: dict[str, tuple[int, str]] = {}  # graph: (its largest run's activations, what they are)
    no_arena: set[str] = set()
    for graph, batch, height, width in stages:
        profile = profiles[graph]
        loaded.add(graph)
        anchor = beside.get(graph, graph)
        group = {anchor} | {g for g, a in beside.items() if a == anchor}  # resident together (low)
        weights = sum(profiles[g].weight_bytes for g in loaded - resident) if memory == "high" else (
            sum(profiles[g].weight_bytes for g in group - resident))
        activations, what, scratch = profile.activation_bytes(batch, height, width, context_tokens)
        if graph in without_arena:
            no_arena.add(graph)  # its buffers go back to the system after each run
        else:
            activations += scratch  # the arena's second copy (see ARENA_SCRATCH_LIMIT)
        if activations >= largest.get(graph, (-1, ""))[0]:
            largest[graph] = activations, what
        stage, held_now = graph, activations
        if memory == "low":  # the group's arenas that ran already keep their largest run
            held_now += sum(largest[g][0] for g in group - {graph} if g in largest and g not in no_arena)
        if memory == "high":  # arenas keep what they grew to; a resident one only grows past its own
            growth = {g: max(0, size - (held or {}).get(g, 0)) if g in resident else size
                      for g, (size, _) in largest.items() if g == graph or g not in no_arena}
            # the arena that dominates names the stage, so a refusal suggests what would help
            stage = max(growth, key=growth.get)
            held_now, what = sum(growth.values()), largest[stage][1]
        total = base_bytes + weights + held_now
        if total > best.peak_bytes:
            dominant = what if held_now > weights else f"{weights / GB:.1f} GB of weights"
            best = Estimate(total, stage, dominant)
    best.activations = {g: size for g, (size, _) in largest.items() if g not in no_arena}
    return best


def scratch_heavy(profiles: dict[str, GraphProfile], stages: list[tuple[str, int, int, int]],
                  context_tokens: int) -> frozenset[str]:
    """Graphs whose largest scratch buffer at these stages reaches ARENA_SCRATCH_LIMIT."""
    return frozenset(graph for graph, batch, height, width in stages
                     if profiles[graph].activation_bytes(batch, height, width, context_tokens)[2] >= ARENA_SCRATCH_LIMIT)


def available_bytes() -> tuple[int | None, str]:
    """Memory this process could still take: MemAvailable, a cgroup limit or an address-space limit."""
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append((int(limit) - used, "the cgroup memory limit"))
    except (OSError, ValueError):
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        resource = None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0] if resource else -1
    if resource and soft != resource.RLIM_INFINITY:
        found.append((soft - _status_kb("VmSize") * 1024, "the address-space limit (ulimit -v)"))
    if not found:
        return None, "unknown"
    return min(found)


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


# ---- The plan: which graphs one generation runs, and whether it fits ------------------------------

Stage = tuple[str, int, int, int]  # (graph, batch, height, width) at the graph's input


def tiling(manifest, vae_tiling: bool | None, width: int, height: int) -> bool:
    """Whether the VAE runs in tiles: forced on or off, or automatic (None) per the manifest."""
    t = manifest.vae_tiling
    if vae_tiling is None:
        return needs_tiling(height, width, t["tile_pixels"], t["auto_above_pixels"])
    return bool(vae_tiling)


def tile_plan(manifest, width: int, height: int) -> dict:
    """The manifest's tiles, halved while one would cover the whole image: a forced tiling then
    still tiles (an SDXL VAE's 1024-pixel tile would decode 1024x1024 whole)."""
    t = dict(manifest.vae_tiling)
    while not needs_tiling(height, width, t["tile_pixels"], None) and t["tile_latent"] >= 32:
        t["tile_pixels"] //= 2
        t["tile_latent"] //= 2
    return t


@dataclass
class Shape:
    """What the plan needs to know of one generation; ``graphs``: the graphs it runs, in order
    (from the mode's stage list, runtime/modes.py), each with the input it sees:
    "text" (the prompts), "pixels" (the picture) or "latent"."""

    batch: int
    width: int
    height: int
    guided: bool
    graphs: list[tuple[str, str]]
    vae_tiling: bool | None = None
    # ControlNets (name, folder, graph entry): they run before each U-Net call, on its input, and
    # stay loaded beside it while it samples (runtime/controlnet.py), in both memory modes
    controlnets: tuple = ()
    groups: int = 0  # guidance groups in one U-Net batch (InstructPix2Pix: 3); 0: 2 when guided, else 1
    latent_tile: int | None = None  # the U-Net runs on tiles of at most this side (runtime/upscale.py)


class MemoryPlanner:
    """Refuses up front a generation that would not fit, and decides which graphs run without
    ONNX Runtime's CPU arena. ``held``: activation bytes the resident sessions' arenas grew to."""

    def __init__(self, model_dir: Path, manifest, memory: str):
        self.model_dir, self.manifest, self.memory = model_dir, manifest, memory
        self.profiles: dict[str, GraphProfile] = {}  # read on the first check
        self.held: dict[str, int] = {}
        self._folders: dict[str, Path] = {}  # ControlNet profile name: the folder it was read from

    def stages(self, shape: Shape) -> tuple[list[Stage], int]:
        """The graphs one generation runs at their input sizes; and the context length."""
        m = self.manifest
        if not self.profiles:
            self.profiles = {name: load_profile(self.model_dir, name, entry) for name, entry in m.graphs.items()}
        f, (w, h) = m.vae_scale_factor, (shape.width, shape.height)
        tile = tile_plan(m, w, h)["tile_pixels"]
        vae_h, vae_w = (min(h, tile), min(w, tile)) if tiling(m, shape.vae_tiling, w, h) else (h, w)
        split = self.memory == "low"  # the guidance halves run one at a time (make_denoiser)
        doubled = 2 * shape.batch if shape.guided else shape.batch  # the prompts and the negatives
        groups = shape.groups or (2 if shape.guided else 1)
        sizes = {"text": (doubled, 0, 0), "pixels": (shape.batch, vae_h, vae_w),
                 "latent": (shape.batch if split else groups * shape.batch, *(min(side // f, shape.latent_tile or side)
                                                                          for side in (h, w))),
                 "decode": (shape.batch, vae_h // f, vae_w // f)}
        stages = []
        for graph, kind in shape.graphs:
            if graph == "unet":  # each call runs the ControlNets first
                stages += [(name, *sizes["latent"]) for name in self._controlnets(shape)]
            stages.append((graph, *sizes[kind]))
        context = next((s.shape[1] for s in m.graphs["unet"].inputs if len(s.shape) == 3 and isinstance(s.shape[1], int)),
                       m.tokenizer["max_length"])
        if m.conditioning.get("text"):  # several encoders stacked on the sequence axis (SD 3: 77 + 256)
            from .text_conditioning import context_tokens

            context = context_tokens(m.conditioning["text"], m.text_encoders)
        return stages, context

    def _controlnets(self, shape: Shape) -> list[str]:
        """The ControlNet graphs' names, their profiles read once per folder."""
        for name, folder, entry in shape.controlnets:
            if self._folders.get(name) != Path(folder):
                self.profiles[name], self._folders[name] = load_profile(Path(folder), name, entry), Path(folder)
        return [name for name, _, _ in shape.controlnets]

    def estimate(self, shape: Shape, resident: set[str], arena: bool = True) -> Estimate:
        stages, context = self.stages(shape)
        without = frozenset() if arena else scratch_heavy(self.profiles, stages, context)
        found = estimate(self.profiles, stages, self.memory, resident, resident_bytes(), context, self.held, without,
                         beside={name: "unet" for name, _, _ in shape.controlnets})
        found.without_arena = without
        return found

    def hold(self, need: Estimate, resident: set[str]) -> Estimate:
        """Book what the resident sessions' arenas grow to when ``need`` runs (high memory)."""
        if self.memory == "high":
            for graph, size in need.activations.items():
                self.held[graph] = max(size, self.held.get(graph, 0) if graph in resident else 0)
        return need

    def check(self, shape: Shape, resident: set[str]) -> tuple[bool, Estimate | None]:
        """(whether the VAE runs in tiles, the plan accepted); OutOfMemoryError when nothing fits.
        With ``vae_tiling=None`` the VAE is also tiled when only a tiled VAE fits."""
        tile = tiling(self.manifest, shape.vae_tiling, shape.width, shape.height)
        available, source = available_bytes()
        if available is None:
            return tile, None
        fixed = dataclasses.replace(shape, vae_tiling=tile)
        need = self.estimate(fixed, resident)
        fits = lambda plan, share=1.0: plan.peak_bytes - resident_bytes() <= share * available  # noqa: E731
        if fits(need, ARENA_SHARE):
            return tile, self.hold(need, resident)
        lean = self.estimate(fixed, resident, arena=False)
        if fits(lean):  # (the same plan as ``need`` where no graph has a score matrix that large)
            return tile, self.hold(lean, resident)
        if shape.vae_tiling is None and not tile and lean.stage.startswith("vae"):
            tiled = self.estimate(dataclasses.replace(shape, vae_tiling=True), resident, arena=False)
            if fits(tiled):
                return True, self.hold(tiled, resident)
        raise OutOfMemoryError(self._refusal(fixed, lean, resident, fits, available, source))

    def _refusal(self, shape: Shape, need: Estimate, resident, fits, available: int, source: str) -> str:
        """The message: what it needs, what is free, and a size that would fit."""
        scale, multiple = 1.0, self.manifest.size_multiple
        while scale > 0.05:
            scale *= 0.9
            w, h = (max(multiple, int(side * scale) // multiple * multiple) for side in (shape.width, shape.height))
            if fits(self.estimate(dataclasses.replace(shape, width=w, height=h), resident, arena=False)):
                break
        tiles = need.stage.startswith("vae") and not shape.vae_tiling
        return (f"a {shape.width}x{shape.height} generation needs about {need} but {available / GB:.1f} GB is free "
                f"({source}); try {'--vae-tiling (vae_tiling=True), or ' if tiles else ''}a smaller size such as "
                f"{w}x{h}, or turn the check off (--no-memory-check, check_memory=False) if you know better")
