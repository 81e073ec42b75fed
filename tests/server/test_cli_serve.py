"""`edgediff serve`: the command starts the real server; bad flags are one line, not a traceback."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from click.testing import CliRunner

from edgediff.cli import main


def test_bad_flags_are_one_line():
    result = CliRunner().invoke(main, ["serve", "--api-auth", "no-colon-here"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "error: --api-auth wants user:password pairs separated by commas"]
    result = CliRunner().invoke(main, ["serve", "--port", "99999"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_serve_command_answers_with_its_key():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgediff", "serve", "--port", str(port), "--provider", "cpu",
                             "--api-key", "k1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    assert json.load(response)["status"] == "ok"
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "edgediff serve did not come up"
                time.sleep(0.2)
        try:
            urllib.request.urlopen(f"{url}/sdapi/v1/sd-models", timeout=5)
            raise AssertionError("answered without the key")
        except urllib.error.HTTPError as error:
            assert error.code == 401
        request = urllib.request.Request(f"{url}/sdapi/v1/sd-models", headers={"X-API-Key": "k1"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response)[0]["model_name"] == "default"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
