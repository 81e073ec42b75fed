"""`edgediff export` without --precision/--optimize-for exports for this machine's best provider
(exporter/target.py); explicit flags keep their meaning."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgediff.cli import main
from edgediff.exporter import target
from edgediff.exporter.export import default_target

AMX = {"avx512f", "amx_bf16", "amx_tile"}
ZEN4 = {"avx512f", "avx512_bf16"}
OLD = {"avx2", "fma"}


@pytest.mark.parametrize("providers, flags, expected", [
    (["cuda", "cpu"], OLD, ("fp16", "cuda")),
    (["tensorrt", "cuda", "openvino", "cpu"], AMX, ("fp16", "cuda")),
    (["dml", "cpu"], OLD, ("fp16", "dml")),
    (["openvino", "cpu"], AMX, ("fp32", "none")),
    (["openvino", "cpu"], ZEN4, ("fp32", "none")),
    (["openvino", "cpu"], OLD, ("fp32", "cpu")),  # no native bf16: auto would not take OpenVINO
    (["cpu"], AMX, ("fp32", "cpu")),
])
def test_machine_target_follows_the_best_provider(providers, flags, expected):
    chosen = target.machine_target(providers=providers, cpu_flags=flags)
    assert (chosen.precision, chosen.optimize_for) == expected


def test_explicit_flags_keep_their_meaning():
    lines = []
    fake = {"providers": ["cuda"], "cpu_flags": OLD}
    assert target.choose("fp32", None, default_target, lines.append, **fake) == ("fp32", "cpu")
    assert target.choose("fp16", None, default_target, lines.append, **fake) == ("fp16", "cuda")
    assert target.choose(None, "cpu", default_target, lines.append, **fake) == ("fp16", "cpu")
    assert target.choose("int8", "none", default_target, lines.append, **fake) == ("int8", "none")
    assert lines == []  # nothing chosen, nothing announced
    assert target.choose(None, None, default_target, lines.append, **fake) == ("fp16", "cuda")
    assert len(lines) == 1 and "--precision fp16 --optimize-for cuda" in lines[0]
    assert "another machine" in lines[0] and "--optimize-for cpu" in lines[0]


def test_cli_announces_the_choice_first(tiny_sources, tmp_path, monkeypatch):
    """The choice is the first line; the export then runs with it (stopped at loading, to stay fast)."""
    import edgediff.exporter.load as load
    from edgediff.runtime.errors import EdgediffError

    real = target.machine_target
    monkeypatch.setattr(target, "machine_target", lambda: real(providers=["openvino", "cpu"], cpu_flags=ZEN4))

    def stop(source, **kwargs):
        raise EdgediffError("stopped after the choice")

    monkeypatch.setattr(load, "load_components", stop)
    result = CliRunner().invoke(main, ["export", str(tiny_sources["sd1"]), str(tmp_path / "out")])
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("exporting for this machine: --precision fp32 --optimize-for none"), lines
    assert "OpenVINO" in lines[0] and "another machine" in lines[0]
    assert lines[-1] == "error: stopped after the choice"
    # With a flag there is no announcement: the first line is the export's own.
    result = CliRunner().invoke(main, ["export", str(tiny_sources["sd1"]), str(tmp_path / "out"),
                                       "--precision", "fp32"])
    assert result.stderr.strip().splitlines()[0].startswith("loading ")
