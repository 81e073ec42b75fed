"""Property tests: a damaged manifest either loads (and then generates or fails with one line) or is
refused with one ModelFolderError line when it is read — never any other exception."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgediff.models import default_model_dir
from edgediff.runtime import EdgediffError, ModelFolderError, Pipeline
from edgediff.runtime.manifest import read_manifest

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
JUNK = [None, "", "x", -1, 0, 1, 3, 1.5, float("nan"), float("inf"), True, [], {}, [1, 2], {"a": 1}, 2**70,
        "float64", "batch", [None], ["batch", -4]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A copy of the shipped default model whose manifest each example rewrites."""
    return shutil.copytree(default_model_dir(), tmp_path_factory.mktemp("model") / "default")


@pytest.fixture(scope="module")
def original():
    return json.loads((default_model_dir() / "manifest.json").read_text())


def paths(tree, prefix=()):
    """Every key path in the JSON tree."""
    found = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths(value, prefix + (index,))
    return found


def mutate(tree, path, operation, value):
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if operation == "delete":
        del parent[key]
    elif operation == "replace":
        parent[key] = value
    elif operation == "wrap":  # the same value, one level deeper
        parent[key] = [parent[key]]
    elif operation == "shape" and isinstance(parent[key], list):
        parent[key] = parent[key][:-1] if value is None else parent[key] + [value]


def mutations(original, only=None):
    keys = [p for p in paths(original) if only is None or any(part in only for part in p if isinstance(part, str))]
    one = st.tuples(st.sampled_from(keys), st.sampled_from(["delete", "replace", "replace", "wrap", "shape"]),
                    st.sampled_from(JUNK))
    return st.lists(one, min_size=1, max_size=3)


def write(folder, original, changes, version=None):
    data = copy.deepcopy(original)
    for path, operation, value in changes:
        try:
            mutate(data, path, operation, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed this path
    if version is not None:
        data["schema_version"] = version
    (folder / "manifest.json").write_text(json.dumps(data))


def read(folder):
    try:
        return read_manifest(folder)
    except ModelFolderError as error:
        assert str(error) and "\n" not in str(error), str(error)
        return None


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_damaged_manifest_is_read_or_refused_in_one_line(data, folder, original):
    changes = data.draw(mutations(original))
    version = data.draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from([0, 2, 99, "1", 1.0, None, -1])))
    write(folder, original, changes, version)
    event("refused" if read(folder) is None else "loaded")


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_damaged_graph_contract_generates_or_fails_in_one_line(data, folder, original):
    """Manifests whose graph specs or constants disagree with the graphs: caught by the reader, at
    session creation, or at the session boundary — always one EdgediffError line."""
    only = {"inputs", "outputs", "latent_channels", "vae_scale_factor", "latent_multiple", "default_size",
            "scaling_factor", "tokenizer", "scheduler", "prediction_type", "alphas_cumprod"}
    write(folder, original, data.draw(mutations(original, only)))
    if read(folder) is None:
        event("refused when read")
        return
    try:
        result = Pipeline.load(folder, provider="cpu", memory="low")("a red circle", steps=1, width=32, height=32)
        assert result.images[0].size == (32, 32)
        event("generated")
    except EdgediffError as error:
        assert str(error) and "\n" not in str(error), str(error)
        event("refused later")


@pytest.mark.parametrize("change", [
    (("text_encoders",), "replace", {"a": 1}),
    (("text_encoders", 0, "graph"), "replace", "nope"),
    (("text_encoders", 0, "tokenizer"), "replace", None),
    (("graphs", "unet", "weights"), "replace", None),
    (("graphs", "text_encoder", "weights"), "replace", [1, 2]),
    (("conditioning",), "replace", "x"),
])
def test_damaged_fields_of_the_current_exporter_are_one_line(change, folder, original):
    """Fields the re-exported default model carries (text encoders, weight maps, conditioning)."""
    write(folder, original, [change])
    with pytest.raises(ModelFolderError, match="manifest field"):
        read_manifest(folder)
