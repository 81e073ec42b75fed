"""The estimate's bookkeeping of weights and arenas per memory mode, on profiles of known sizes."""
from __future__ import annotations

from dataclasses import dataclass

from edgediff.runtime import Pipeline
from edgediff.runtime import memory

GB = memory.GB


@dataclass
class Profile:
    weight_bytes: int
    per_pixel: int
    scratch: int = 0  # the largest fused-attention scratch buffer, bytes

    def activation_bytes(self, batch, height, width, context_tokens):
        return batch * height * width * self.per_pixel, "activations", self.scratch


PROFILES = {"text_encoder": Profile(int(0.5 * GB), 0), "unet": Profile(int(3 * GB), int(GB) // 64 ** 2),
            "vae_decoder": Profile(int(0.2 * GB), int(1.5 * GB) // 512 ** 2)}
STAGES = [("text_encoder", 2, 0, 0), ("unet", 2, 64, 64), ("vae_decoder", 1, 512, 512)]


def test_low_memory_holds_one_graph_and_its_activations():
    found = memory.estimate(PROFILES, STAGES, "low", set(), 0, 77)
    assert found.peak_bytes == int(3 * GB) + 2 * (int(GB) // 64 ** 2) * 64 ** 2
    assert found.stage == "unet"


def test_high_memory_keeps_every_arena_until_the_end():
    found = memory.estimate(PROFILES, STAGES, "high", set(), 0, 77)
    unet, vae = 2 * (int(GB) // 64 ** 2) * 64 ** 2, (int(1.5 * GB) // 512 ** 2) * 512 ** 2
    assert found.peak_bytes == int(3.7 * GB) + unet + vae
    assert found.stage == "unet" and found.activations == {"text_encoder": 0, "unet": unet, "vae_decoder": vae}


def test_resident_sessions_grow_only_past_the_arena_they_hold():
    found = memory.estimate(PROFILES, STAGES, "high", set(PROFILES), 0, 77)
    again = memory.estimate(PROFILES, STAGES, "high", set(PROFILES), 0, 77, found.activations)
    assert again.peak_bytes == 0  # everything is in base_bytes already
    bigger = [(g, b, h * 2, w * 2) for g, b, h, w in STAGES]
    grown = memory.estimate(PROFILES, bigger, "high", set(PROFILES), 0, 77, found.activations)
    assert grown.peak_bytes == 3 * sum(found.activations.values())
    # a graph held by an arena the pipeline never booked counts whole
    fresh = memory.estimate(PROFILES, STAGES, "high", set(), 0, 77)
    assert memory.estimate(PROFILES, STAGES, "high", {"unet"}, 0, 77, {}).peak_bytes == fresh.peak_bytes - int(3 * GB)


def test_a_high_memory_pipeline_books_its_arenas_once():
    pipe = Pipeline.load(provider="cpu", memory="high")
    base = memory.resident_bytes()
    first = pipe.estimate_memory(1, 256, 256).peak_bytes - base
    pipe("a red circle", steps=1, width=256, height=256, seed=0)
    base = memory.resident_bytes()
    again = pipe.estimate_memory(1, 256, 256).peak_bytes - base
    # now resident: neither the weights nor the arenas of this size come on top of the process again
    assert first > 0 and again < 0.1 * first


def test_the_arena_holds_a_second_score_matrix_unless_the_session_runs_without_it():
    small, huge = int(0.5 * GB), 2 * memory.ARENA_SCRATCH_LIMIT
    profiles = {**PROFILES, "unet": Profile(int(3 * GB), int(GB) // 64 ** 2, small)}
    base = memory.estimate(PROFILES, STAGES, "low", set(), 0, 77)
    assert memory.estimate(profiles, STAGES, "low", set(), 0, 77).peak_bytes == base.peak_bytes + small
    assert memory.scratch_heavy(profiles, STAGES, 77) == set()
    profiles["unet"] = Profile(int(3 * GB), int(GB) // 64 ** 2, huge)
    assert memory.scratch_heavy(profiles, STAGES, 77) == {"unet"}
    lean = memory.estimate(profiles, STAGES, "low", set(), 0, 77, without_arena=frozenset({"unet"}))
    assert lean.peak_bytes == base.peak_bytes


def test_the_arena_is_dropped_only_where_it_would_not_fit(monkeypatch):
    pipe = Pipeline.load(provider="cpu", memory="low")  # a new session for every stage
    real = memory.GraphProfile.activation_bytes

    def heavier(self, batch, height, width, context_tokens):  # the shipped model's scores are small
        peak, what, scratch = real(self, batch, height, width, context_tokens)
        return peak, what, int(GB) if self.name == "unet" and height >= 32 else scratch

    monkeypatch.setattr(memory.GraphProfile, "activation_bytes", heavier)
    monkeypatch.setattr(memory, "ARENA_SCRATCH_LIMIT", int(GB))
    opened = []
    from edgediff.runtime import sessions
    real_init = sessions.GraphSession.__init__

    def record(self, name, *args, arena=True, **kwargs):
        opened.append((name, arena))
        real_init(self, name, *args, arena=arena, **kwargs)

    monkeypatch.setattr(sessions.GraphSession, "__init__", record)
    pipe("a red circle", steps=1, width=128, height=128, seed=0)
    with_arena = pipe.estimate_memory(1, 256, 256).peak_bytes - memory.resident_bytes()
    lean = pipe.estimate_memory(1, 256, 256, arena=False)
    assert lean.without_arena == {"unet"} and with_arena - (lean.peak_bytes - memory.resident_bytes()) > 0.9 * GB
    pipe("a red circle", steps=1, width=256, height=256, seed=0)  # plenty free: the arena stays
    # free memory between the two plans: only the plan without the arena fits
    free = int(with_arena * 0.95)
    monkeypatch.setattr(memory, "available_bytes", lambda: (free, "a test"))
    pipe("a red circle", steps=1, width=256, height=256, seed=0)
    assert pipe.memory_plan.without_arena == {"unet"}
    assert [a for n, a in opened if n == "unet"] == [True, True, False]
    assert all(a for n, a in opened if n != "unet")


def test_a_session_without_the_arena_holds_nothing_after_its_stage():
    heavy = {**PROFILES, "unet": Profile(int(3 * GB), int(GB) // 64 ** 2, memory.ARENA_SCRATCH_LIMIT)}
    unet, vae = 2 * (int(GB) // 64 ** 2) * 64 ** 2, (int(1.5 * GB) // 512 ** 2) * 512 ** 2
    found = memory.estimate(heavy, STAGES, "high", set(), 0, 77, without_arena=frozenset({"unet"}))
    # the U-Net stage (text encoder and U-Net loaded) tops the VAE stage, whose arena alone is held
    assert found.peak_bytes == int(3.5 * GB) + unet > int(3.7 * GB) + vae and found.stage == "unet"
    assert "unet" not in found.activations  # nothing for the pipeline to book as held


def test_concat_adds_channels_on_axis_1_only():
    """A U-Net's skip connections join channels (NCHW axis 1); SD3's joint attention joins image and
    text tokens along axis 2 of (batch, heads, tokens, dim), which keeps the width. Summed as channels,
    the estimate doubled at each of SD 3.5 Medium's 24 joint blocks (1.2 million GB at 1024x1024)."""
    from edgediff.runtime.graph_info import GraphInfo, Node
    from edgediff.runtime.memory import GraphProfile

    def walk(axis: int) -> int:
        nodes = [Node("Concat", ["x", "x"], ["joined"], {"axis": [axis]}), Node("Relu", ["joined"], ["y"])]
        profile = GraphProfile("g", GraphInfo(nodes, {}, {}, 0), "x", 8, {"y"}, 4)
        return profile.activation_bytes(1, 4, 4, 77)[0]

    x = 8 * 4 * 4 * 4  # the input, 8 channels at 4x4, fp32
    assert walk(1) == 2 * x + 2 * x  # the joined channels and their ReLU (the input is freed by then)
    assert walk(2) == walk(-1) == x + x
