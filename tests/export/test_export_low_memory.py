"""Too little memory for the model: one `error:` line up front, exit 1, and no model folder left."""
from __future__ import annotations

import subprocess
import sys
import textwrap

# The export CLI in a child process, after ``PREPARE`` has shrunk the memory it may use.
CHILD = textwrap.dedent("""
    import sys
    import edgediff.exporter.export  # torch, onnxruntime and the exporter: the process's fixed cost
    {prepare}
    from edgediff.cli import main
    main(["export", *sys.argv[1:]], standalone_mode=True)
""")
FAKE_MEMAVAILABLE = """
import edgediff.exporter.memory as memory
memory.available_bytes = lambda: 64 * 1024**2  # what /proc/meminfo says on a machine that is nearly full
"""
ADDRESS_SPACE_LIMIT = """
import resource
import edgediff.exporter.memory as memory
# Room for 256 MiB more than this process already maps: far less than an export needs.
size = memory._status_kib("VmSize") * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 256 * 1024**2, resource.RLIM_INFINITY))
"""


def _export_in_child(prepare: str, source, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD.format(prepare=prepare), str(source), str(out),
                           "--precision", "fp32"], capture_output=True, text=True, timeout=300)


def _assert_refused(result, out):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "not enough memory" in errors[0] and "GiB is available" in errors[0] and "needs about" in errors[0]
    assert not out.exists()
    assert not list(out.parent.rglob("manifest.json"))


def test_low_memavailable_refuses_with_one_line(tiny_sources, tmp_path):
    out = tmp_path / "model"
    _assert_refused(_export_in_child(FAKE_MEMAVAILABLE, tiny_sources["sd1"], out), out)


def test_address_space_limit_refuses_with_one_line(tiny_sources, tmp_path):
    out = tmp_path / "model"
    _assert_refused(_export_in_child(ADDRESS_SPACE_LIMIT, tiny_sources["sd1"], out), out)
