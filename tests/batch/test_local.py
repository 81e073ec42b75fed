"""`edgediff batch` without Ray: one line for a bad jobs file, resumable output, bounded retries."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from PIL import Image

import edgediff.batch.runner as runner_module
from edgediff.batch import run_batch
from edgediff.batch.output import JOB_CHUNK, OutputFolder
from edgediff.cli import main
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.metadata import generation_kwargs, parse_infotext, read_infotext
from edgediff.runtime.samplers import resolve_sampler

FAST = ["--steps", "2", "--width", "64", "--height", "64"]


def cli(*args):
    result = CliRunner().invoke(main, ["batch", *map(str, args)])
    return result.exit_code, result.stderr


def jobs_file(tmp_path, *lines):
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad, fragment", [
    ('{"prompt": "a cat" "seed": 1}', "not valid JSON"),
    ('{"prompt": "a cat", "colour": "red"}', "unknown field 'colour'"),
    ('{"prompt": "a cat", "steps": -4}', "steps must be a whole number >= 1, not -4"),
])
def test_bad_jobs_file_is_one_line_and_generates_nothing(tmp_path, bad, fragment):
    path = jobs_file(tmp_path, {"prompt": "a dog"}, {"prompt": "a fish"}, bad)
    code, stderr = cli(path, "--out", tmp_path / "out", *FAST)
    assert code == 1
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: {path}:3: "), stderr
    assert fragment in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--workers", "2"], "--workers and --ship-model need --ray"),
    (["--steps", "0"], "default steps: steps must be a whole number >= 1"),
    (["--retries", "-1"], "retries must be a whole number >= 0"),
])
def test_bad_options_are_one_line(tmp_path, args, fragment):
    code, stderr = cli(jobs_file(tmp_path, {"prompt": "a dog"}), "--out", tmp_path / "out", *args)
    assert code == 1 and stderr.count("\n") == 1 and fragment in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_ray_missing_names_the_extra(tmp_path):
    path = jobs_file(tmp_path, {"prompt": "a dog"})
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        sys.argv = ["edgediff", "batch", {str(path)!r}, "--out", {str(tmp_path / "out")!r}, "--ray"]
        from edgediff.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == "error: --ray needs Ray, which is not installed: pip install 'edgediff[ray]'\n"
    assert not (tmp_path / "out").exists()


def test_rerun_skips_complete_jobs_and_redoes_torn_or_foreign_files(tmp_path):
    path = jobs_file(tmp_path, {"prompt": "a red circle", "seed": 1}, {"prompt": "a blue square", "id": "sq"},
                     {"prompt": "a green triangle", "sampler": "Euler a"})
    out = tmp_path / "out"
    code, stderr = cli(path, "--out", out, *FAST)
    assert code == 0, stderr
    first = results(out)
    assert [entry["status"] for entry in first] == ["ok"] * 3 and [e["line"] for e in first] == [1, 2, 3]
    assert first[1]["file"].startswith("sq-") and first[0]["seed"] == 1
    files = {entry["file"]: (out / entry["file"]).read_bytes() for entry in first}
    with Image.open(out / first[2]["file"]) as image:
        recorded = json.loads(image.text[JOB_CHUNK])
        assert image.size == (64, 64)
    assert recorded["key"] == first[2]["key"] and recorded["params"]["sampler"] == "euler_a"
    # A1111's infotext too, which reads back as the job's own settings.
    settings = generation_kwargs(parse_infotext(read_infotext(out / first[2]["file"])))
    assert {k: settings[k] for k in ("prompt", "steps", "seed", "width", "height")} == \
        {k: first[2]["job"][k] for k in ("prompt", "steps", "seed", "width", "height")}
    assert resolve_sampler(settings["sampler"])[0] == "euler_a"
    assert "wrote 3 images" in stderr

    code, stderr = cli(path, "--out", out, *FAST)
    assert code == 0 and "wrote 0 images" in stderr and "3 already complete" in stderr
    assert len(results(out)) == 3

    torn, foreign = out / first[0]["file"], out / first[1]["file"]
    torn.write_bytes(files[first[0]["file"]][:-200])
    foreign.write_bytes(files[first[2]["file"]])  # a whole PNG, but of another job
    code, stderr = cli(path, "--out", out, *FAST)
    assert code == 0 and "wrote 2 images" in stderr and "1 already complete" in stderr
    assert [entry["line"] for entry in results(out)[3:]] == [1, 2]
    assert {name: (out / name).read_bytes() for name in files} == files  # same job, same bytes
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "results.jsonl", ".lock"])


def test_failing_jobs_are_retried_then_recorded_and_the_batch_goes_on(tmp_path, monkeypatch):
    calls = {}
    real_render = runner_module.render

    def render(pipe, job, model):
        prompt = job.params["prompt"]
        calls[prompt] = calls.get(prompt, 0) + 1
        if prompt == "always broken" or (prompt == "flaky" and calls[prompt] == 1):
            raise RuntimeError(f"boom {calls[prompt]}")
        return real_render(pipe, job, model)

    monkeypatch.setattr(runner_module, "render", render)
    path = jobs_file(tmp_path, {"prompt": "flaky"}, {"prompt": "always broken"}, {"prompt": "fine"})
    code, stderr = cli(path, "--out", tmp_path / "out", *FAST, "--retries", "2")
    assert code == 1 and "2 images" in stderr and "1 failed" in stderr, stderr
    entries = {entry["job"]["prompt"]: entry for entry in results(tmp_path / "out")}
    assert entries["flaky"]["status"] == "ok" and entries["flaky"]["attempts"] == 2
    broken = entries["always broken"]
    assert broken["status"] == "failed" and broken["attempts"] == 3 and calls["always broken"] == 3
    assert broken["error"].startswith("RuntimeError: boom 3")
    assert entries["fine"]["status"] == "ok"
    assert not (tmp_path / "out" / broken["file"]).exists()
    # A re-run tries only the failed job again.
    calls.clear()
    run_batch(path, tmp_path / "out", defaults={"steps": 2, "width": 64, "height": 64}, progress=False)
    assert calls == {"always broken": 3}


def test_one_batch_per_output_folder_and_no_stale_temporary_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".x.png.123.tmp").write_bytes(b"half")
    with OutputFolder(out):
        assert not (out / ".x.png.123.tmp").exists()
        with pytest.raises(EdgediffError, match="another batch is writing to"):
            OutputFolder(out)


def test_a_workers_thread_share_reaches_onnx_runtime():
    """A 1-CPU Ray actor runs its sessions with one intra-op thread (Pipeline.load(threads=...))."""
    from edgediff.runtime import Pipeline
    from edgediff.runtime.sessions import default_threads

    for threads, expected in ((1, 1), (None, default_threads())):  # default: one per physical core
        pipe = Pipeline.load(None, provider="cpu", memory="high", threads=threads)
        pipe("a dot", steps=1, seed=0, width=64, height=64)
        used = {name: session.session.get_session_options().intra_op_num_threads
                for name, session in pipe.sessions._resident.items()}
        assert used and set(used.values()) == {expected}, used
