"""Jobs files are checked whole before any work: every problem names its line."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from edgediff.batch import JobsFileError, derived_seed, plan_jobs, read_jobs
from edgediff.batch.progress import Progress
from edgediff.models import default_model_dir
from edgediff.runtime.manifest import read_manifest


def write(tmp_path, *lines):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.mark.parametrize("bad, fragment", [
    ('{"prompt": "a cat", ', "not valid JSON"),
    ({"prompt": "a cat", "stepz": 4}, "unknown field 'stepz'"),
    ({"prompt": "a cat", "steps": -3}, "steps must be a whole number >= 1, not -3"),
    ({"prompt": "a cat", "steps": 2.5}, "steps must be a whole number"),
    ({"prompt": "a cat", "steps": True}, "steps must be a whole number"),
    ({"prompt": "a cat", "seed": "42"}, "seed must be a whole number"),
    ({"prompt": 7}, "prompt must be a string"),
    ({"prompt": "a cat", "guidance": "high"}, "guidance must be a finite number"),
    ({"prompt": "a cat", "sampler": "warp drive"}, "unknown sampler 'warp drive'"),
    ({"prompt": "a cat", "id": "../../etc"}, "id must be"),
    ({"negative": "blurry"}, "no 'prompt'"),
    ('["a cat"]', "must be a JSON object"),
])
def test_bad_line_is_reported_with_its_number(tmp_path, bad, fragment):
    path = write(tmp_path, {"prompt": "fine"}, "", bad, {"prompt": "also fine"})
    with pytest.raises(JobsFileError) as caught:
        read_jobs(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: "), message
    assert fragment in message
    assert "\n" not in message


def test_defaults_fill_missing_fields_and_are_checked(tmp_path):
    path = write(tmp_path, {"prompt": "a", "steps": 3}, {"prompt": "b"})
    jobs = read_jobs(path, {"steps": 7, "sampler": "Euler a", "width": 64})
    assert [job["steps"] for job in jobs] == [3, 7]
    assert {job["sampler"] for job in jobs} == {"euler_a"} and {job["width"] for job in jobs} == {64}
    with pytest.raises(JobsFileError, match="default steps: steps must be a whole number >= 1"):
        read_jobs(path, {"steps": 0})


def test_aliases_of_one_sampler_are_one_job(tmp_path):
    a, b, c = read_jobs(write(tmp_path, {"prompt": "x", "sampler": "DPM++ 2M Karras", "seed": 1},
                              {"prompt": "x", "sampler": "k_dpmpp_2m_karras", "schedule": "Karras", "seed": 1},
                              {"prompt": "x", "sampler": "Euler a"}))
    assert a["sampler"] == "dpmpp_2m_karras" and a["schedule"] == "karras" and c["sampler"] == "euler_a"
    assert {k: v for k, v in a.items() if k != "line"} == {k: v for k, v in b.items() if k != "line"}


def test_derived_seeds_are_deterministic_and_distinct_for_repeated_lines(tmp_path):
    path = write(tmp_path, {"prompt": "x"}, {"prompt": "x"}, {"prompt": "y"}, {"prompt": "x", "seed": 5})
    first, again = read_jobs(path), read_jobs(path)
    assert [j["seed"] for j in first] == [j["seed"] for j in again]
    seeds = [j["seed"] for j in first]
    assert len(set(seeds[:3])) == 3 and seeds[3] == 5
    # The seed follows the job, not its line: moving a line does not change what it draws.
    moved = read_jobs(write(tmp_path, {"prompt": "y"}, {"prompt": "x"}))
    assert moved[0]["seed"] == seeds[2] and moved[1]["seed"] == seeds[0]
    assert derived_seed({**first[0], "prompt": "z"}) != seeds[0]


def test_planning_resolves_sizes_keys_outputs_and_rejects_bad_sizes():
    manifest = read_manifest(default_model_dir())
    alphas = np.load(default_model_dir() / manifest.alphas_cumprod)
    jobs = read_jobs([{"prompt": "x", "seed": 1}, {"prompt": "x", "seed": 1}, {"prompt": "x", "seed": 1, "id": "a"},
                      {"prompt": "x", "seed": 1, "width": manifest.default_size}])
    planned = plan_jobs(jobs, manifest, alphas, "model-a")
    # Lines 1, 2 and 4 are the same job once the default size is filled in; the id makes line 3 its own.
    assert [job.line for job in planned] == [1, 3]
    assert planned[0].params["width"] == manifest.default_size
    assert planned[1].filename.startswith("a-") and planned[1].filename.endswith(".png")
    assert plan_jobs(jobs, manifest, alphas, "model-b")[0].key != planned[0].key  # another model: another file
    odd = manifest.size_multiple * 3 + 4
    with pytest.raises(JobsFileError, match=rf"jobs:2: width must be a positive multiple of {manifest.size_multiple} .*{odd}"):
        plan_jobs(read_jobs([{"prompt": "x"}, {"prompt": "x", "width": odd}]), manifest, alphas, "m")


def test_progress_plain_lines_are_throttled_and_the_last_one_always_printed():
    now = [0.0]
    stream = io.StringIO()
    bar = Progress(4, stream, interval=5.0, clock=lambda: now[0])
    for t, ok in ((1.0, True), (2.0, False), (3.0, True), (8.0, True)):
        now[0] = t
        bar.update(ok)
    lines = stream.getvalue().splitlines()
    assert lines == ["batch: 1/4 images, 1.00 images/s, ETA 0:00:03",
                     "batch: 4/4 images, 0.50 images/s, ETA 0:00:00, 1 failed"]
