"""The shipped default model works from an installed copy, with no model argument and no torch."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from edgediff.models import default_model_dir, shapes
from edgediff.runtime import Pipeline
from torch_blocker import BLOCK_TORCH
from edgediff.runtime.manifest import read_manifest



def test_shipped_models_are_complete_and_validated():
    for precision in ("fp32", "fp16"):
        manifest = read_manifest(default_model_dir(precision))  # raises if anything is missing
        assert set(manifest.graphs) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
        assert all(graph.validation["validated"] for graph in manifest.graphs.values())
        assert manifest.default_size == 128 and manifest.latent_channels == 4 and manifest.vae_scale_factor == 8


def test_generate_without_model_argument_and_without_torch(tmp_path):
    """`edgediff generate PROMPT` with torch unimportable: the CLI finds the packaged model."""
    script = BLOCK_TORCH + textwrap.dedent(f"""
        sys.argv = ["edgediff", "generate", "a red circle on a white background", "--seed", "3",
                    "-o", {str(tmp_path / "red.png")!r}]
        from edgediff.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr
    from PIL import Image

    with Image.open(tmp_path / "red.png") as image:
        assert image.size == (128, 128)


def test_default_model_draws_what_it_is_asked():
    """A few grid prompts, read back by the evaluator: colour and background follow the prompt."""
    pipe = Pipeline.load(provider="cpu")
    hits = []
    for entry in shapes.evaluation_grid()[::12]:
        image = pipe(entry["prompt"], steps=20, seed=entry["seed"]).images[0]
        predicted = shapes.evaluate(image)
        hits.append(predicted["color"] == entry["expected"]["color"]
                    and predicted["background"] == entry["expected"]["background"])
    assert sum(hits) >= len(hits) - 1, json.dumps(hits)
