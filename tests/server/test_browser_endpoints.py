"""The web page's server side, without a browser: its files load without the key, every API route
(old or added for the page) still wants it, the files ship in the package, and `serve --open`."""
from __future__ import annotations

import re
from importlib import resources

import pytest
import requests
from click.testing import CliRunner

from live_server import running
from edgediff.cli import main
from edgediff.server import create_app, page

KEY = "endpoints-key"
OPEN = {"/health"}


@pytest.fixture(scope="module")
def app(default_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    for name in ("b.safetensors", "a.safetensors", "c.ckpt", "notes.txt"):
        (folder / name).write_bytes(b"x")
    return create_app(default_pipe, api_key=KEY, lora_dir=folder)


@pytest.fixture(scope="module")
def server(app):
    with running(app) as url:
        yield url


def test_every_route_but_health_wants_the_key(app, server):
    routes = [(route.path, method) for route in app.guarded.app.routes for method in getattr(route, "methods", ())
              if method != "HEAD"]
    assert ("/sdapi/v1/loras", "GET") in routes and ("/edgediff/v1/page", "GET") in routes
    for path, method in routes:
        path = re.sub(r"\{[^}]+\}", "x", path)
        answer = requests.request(method, server + path, json={}, timeout=30)
        if path in OPEN:
            assert answer.status_code == 200, path
        else:
            assert answer.status_code == 401, (method, path, answer.status_code)
    for path in ("/page/../page.py", "/page/page.py", "/page/", "/static/app.js", "/page/missing.js"):
        assert requests.get(server + path, timeout=30).status_code == 401, path
    assert requests.post(server + "/", timeout=30).status_code == 401  # only GET/HEAD reach the files


def test_page_files_load_without_the_key(server):
    for path, kind in (("/", "text/html"), ("/page/index.html", "text/html"), ("/page/app.js", "javascript"),
                       ("/page/style.css", "text/css")):
        answer = requests.get(server + path, timeout=30)
        assert answer.status_code == 200 and kind in answer.headers["content-type"], path
        assert "default-src 'self'" in answer.headers["content-security-policy"]
        assert "http://" not in answer.text and "https://" not in answer.text  # nothing from elsewhere
    head = requests.head(server + "/page/app.js", timeout=30)
    assert head.status_code == 200 and int(head.headers["content-length"]) > 1000


def test_page_endpoints_with_the_key(server, default_pipe):
    headers = {"X-API-Key": KEY}
    loras = requests.get(server + "/sdapi/v1/loras", headers=headers, timeout=30).json()
    assert [lora["name"] for lora in loras] == ["a", "b"]
    assert set(loras[0]) == {"name", "alias", "path", "metadata"}  # A1111's fields
    settings = requests.get(server + "/edgediff/v1/page", headers=headers, timeout=30).json()
    assert settings["default_size"] == default_pipe.manifest.default_size == 128
    assert settings["size_multiple"] == default_pipe.manifest.size_multiple and settings["lora_dir"] is True


def test_the_page_ships_in_the_package():
    static = resources.files("edgediff.server") / "static"
    html = (static / "index.html").read_text()
    script = (static / "app.js").read_text()
    assert (static / "style.css").is_file()
    # Every element the script looks up exists, and the hooks tests and scripts rely on are there.
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    wanted = set(re.findall(r'\$\("([^"]+)"\)', script))
    assert wanted and wanted <= ids, wanted - ids
    assert {"prompt", "generate", "progress", "gallery"} <= ids


def test_serve_open_opens_the_page_once_listening(monkeypatch):
    opened = []
    monkeypatch.setattr(page.webbrowser, "open", opened.append)

    class Server:
        started, should_exit = False, False

    server = Server()
    thread = page.open_when_started(server, "0.0.0.0", 7861)
    thread.join(0.3)
    assert opened == []  # not before the server listens
    server.started = True
    thread.join(5)
    assert opened == ["http://127.0.0.1:7861/"]
    assert page.page_url("::", 80) == "http://[::1]:80/" and page.page_url("example.org", 1) == "http://example.org:1/"


def test_serve_bad_lora_dir_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--lora-dir", str(tmp_path / "missing")])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: --lora-dir {tmp_path / 'missing'} is not a folder"]
