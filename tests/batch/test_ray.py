"""The Ray runner on a local two-CPU cluster: same bytes as without Ray, survives a killed actor,
skips finished work, ships the model through the object store."""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from click.testing import CliRunner  # noqa: E402

from edgediff.batch import run_batch  # noqa: E402
from edgediff.batch.ray_runner import NAMESPACE  # noqa: E402
from edgediff.cli import main  # noqa: E402

SCENES = [(colour, shape) for colour in ("red", "blue", "green") for shape in ("circle", "square", "triangle", "star")]
# Every third job has no seed: the seed derived from the job must be the same with and without Ray.
JOBS = [{"prompt": f"a {colour} {shape} on a white background", **({"seed": n} if n % 3 else {})}
        for n, (colour, shape) in enumerate(SCENES)]
FAST = {"steps": 3}


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (Ray starts slowly on two cores); its files live outside
    the checkout and go with it."""
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit in 107 bytes
    cache = tempfile.mkdtemp(prefix="edgediff-models-")
    # No usage reports; and no memory monitor: it kills our small workers when other programs fill
    # a shared machine's memory (the test's own processes take well under 1 GB).
    settings = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_monitor_refresh_ms": "0"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING",
             runtime_env={"env_vars": {"EDGEDIFF_MODEL_CACHE": cache}})
    try:
        yield cache
    finally:
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The same jobs rendered without Ray."""
    out = tmp_path_factory.mktemp("plain")
    summary = run_batch(JOBS, out, defaults=FAST, progress=False)
    assert summary.done == len(JOBS)
    return read_images(out)


def read_images(out):
    return {path.name: path.read_bytes() for path in out.glob("*.png")}


def test_two_actors_match_the_plain_run_survive_a_kill_and_skip_on_rerun(cluster, plain, tmp_path):
    killed, entries = [], []

    def kill_one_actor(entry):
        entries.append(entry)
        if not killed:  # it has its next job queued already: that job is cut off mid-run
            killed.append(entry["worker"])
            ray.kill(ray.get_actor(entry["worker"], namespace=NAMESPACE))

    summary = run_batch(JOBS, tmp_path, defaults=FAST, ray="", workers=2, on_result=kill_one_actor,
                        progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (12, 0, 0)
    assert killed and any(entry["attempts"] == 2 for entry in entries), entries
    assert len({entry["worker"] for entry in entries}) >= 2
    assert read_images(tmp_path) == plain  # bit for bit, names included

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(job) + "\n" for job in JOBS))
    rerun = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(tmp_path), "--steps", "3", "--ray",
                                      "--workers", "2"])
    assert rerun.exit_code == 0 and "wrote 0 images" in rerun.stderr and "12 already complete" in rerun.stderr
    assert read_images(tmp_path) == plain
    assert not [actor for actor in ray.util.list_named_actors(all_namespaces=True)
                if actor["namespace"] == NAMESPACE]  # the pool is gone once the batch is done


def test_model_shipped_through_the_object_store(cluster, plain, tmp_path):
    from edgediff.models import default_model_dir

    model = shutil.copytree(default_model_dir(), tmp_path / "private-model")
    summary = run_batch(JOBS[:2], tmp_path / "out", model=model, defaults=FAST, ray="", workers=1,
                        ship_model=True, progress=False)
    assert summary.done == 2
    # The workers read their own copy, written once into the node's cache.
    (copy,) = [path for path in os.scandir(cluster) if not path.name.startswith(".")]
    assert os.path.isfile(os.path.join(copy.path, "manifest.json"))
    shutil.rmtree(model)
    shipped = read_images(tmp_path / "out")
    assert len(shipped) == 2 and set(shipped) <= set(plain)  # a copy of the default model: same jobs
    for name, data in shipped.items():
        with Image.open(io.BytesIO(data)) as image, Image.open(io.BytesIO(plain[name])) as reference:
            assert image.tobytes() == reference.tobytes()
            # The infotext names the model as the driver knows it, not the worker's cache folder.
            assert "Model: private-model" in image.text["parameters"]


@pytest.mark.parametrize("provider, gpus_per_worker, workers, expected", [
    ("auto", None, None, (4, 1.0, True)),  # a GPU per actor where the cluster has them
    ("cpu", None, None, (8, 0.0, False)),  # CPU actors: one per CPU
    ("auto", 0.5, None, (8, 0.5, True)),  # two actors share each GPU
    ("cuda", None, 2, (2, 1.0, True)),
])
def test_pool_size_and_gpus_per_actor_follow_the_cluster(provider, gpus_per_worker, workers, expected):
    from edgediff.batch.ray_runner import RayRunner

    runner = RayRunner("auto", workers=workers, cpus_per_worker=1, gpus_per_worker=gpus_per_worker,
                       ship_model=False, provider=provider, memory="high", retries=0)
    runner._size_pool({"CPU": 8.0, "GPU": 4.0})
    assert (runner.workers, runner.gpus, runner.gpu) == expected


def test_a_pool_that_cannot_fit_a_local_cluster_is_an_error():
    from edgediff.batch.ray_runner import RayRunner
    from edgediff.runtime.errors import EdgediffError

    runner = RayRunner("", workers=3, cpus_per_worker=1, gpus_per_worker=None, ship_model=False,
                       provider="cpu", memory="high", retries=0)
    runner.owns = True
    with pytest.raises(EdgediffError, match=r"3 Ray workers do not fit: 3 x 1 CPU \(the cluster has 2\)"):
        runner._size_pool({"CPU": 2.0})
