"""The client is a light import: an app that embeds through embedserve.Client loads none of
the server (its service, dialects, metrics, HTTP server or backends) and no ML package,
even when it falls back to in-process embeddings, which need the hash encoder alone. And
the client stays split by job: no module of it grows past 500 lines."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, server_env

CLIENT_PACKAGE = Path(ROOT, "embedserve", "client")
# Server-side modules (and what they import) that the client must never load.
SERVER_MODULES = ("embedserve.service", "embedserve.dialects", "embedserve.metrics",
                  "embedserve.metricfiles",
                  "embedserve.server", "embedserve.backends", "embedserve.handler",
                  "embedserve.routes", "embedserve.worker", "embedserve.supervisor",
                  "embedserve.batcher")
ML_PACKAGES = ("torch", "transformers", "sentence_transformers", "numpy")
# All the client may load of embedserve besides itself.
CLIENT_DEPENDENCIES = {"embedserve", "embedserve.config", "embedserve.contracts",
                       "embedserve.encoding", "embedserve.hashing", "embedserve.vectors"}

LOADED = """
import json, sys
{imports}
{use}
print(json.dumps(sorted(sys.modules)))
"""


def loaded_modules(imports: str, use: str = "") -> set[str]:
    """The modules a fresh interpreter holds after `imports` (and `use`)."""
    code = LOADED.format(imports=imports, use=use)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=server_env(), cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    modules: list[str] = json.loads(done.stdout.splitlines()[-1])
    return set(modules)


def assert_client_only(modules: set[str]) -> None:
    server = sorted(m for m in modules
                    if any(m == name or m.startswith(name + ".") for name in SERVER_MODULES))
    assert not server, f"the client loaded server modules: {server}"
    ml = sorted(m for m in modules if m.split(".")[0] in ML_PACKAGES)
    assert not ml, f"the client loaded ML packages: {ml}"
    ours = {m for m in modules if m == "embedserve" or m.startswith("embedserve.")}
    others = sorted(m for m in ours - CLIENT_DEPENDENCIES
                    if not m.startswith("embedserve.client"))
    assert not others, f"the client loaded more of embedserve than it needs: {others}"


@pytest.mark.parametrize("imports", [
    "import embedserve.client",
    "from embedserve import Client",
    "from embedserve.client import Client, EmbedServeError, FallbackPolicy",
    "import embedserve; embedserve.ServerUnavailable, embedserve.Embeddings",
])
def test_importing_the_client_loads_nothing_of_the_server(imports: str) -> None:
    modules = loaded_modules(imports)
    assert "embedserve.client" in modules
    assert_client_only(modules)


def test_the_in_process_fallback_loads_nothing_of_the_server() -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    use = (f"vectors = Client('http://127.0.0.1:{port}', autostart=False).embed(['a text'])\n"
           "assert vectors.source == 'fallback' and len(vectors[0]) == 384, vectors.source")
    assert_client_only(loaded_modules("from embedserve import Client", use))


def test_every_client_module_is_under_500_lines() -> None:
    sizes = {path.name: len(path.read_text(encoding="utf-8").splitlines())
             for path in sorted(CLIENT_PACKAGE.glob("*.py"))}
    assert "__init__.py" in sizes and len(sizes) > 1, sizes
    assert all(lines <= 500 for lines in sizes.values()), sizes


def test_every_name_imported_from_the_client_before_the_split_still_is() -> None:
    import embedserve
    import embedserve.client as client

    # What tests, extras, commands.py and the README import from embedserve.client.
    for name in ("AuthenticationError", "Client", "EmbedServeError", "Embedding",
                 "Embeddings", "ModelMismatch", "ServerError", "ServerStartError",
                 "ServerUnavailable", "ValidationError", "DEFAULT_URL", "URL_ENV",
                 "FallbackPolicy", "EncodingFormat", "Source"):
        assert hasattr(client, name), name
    # Everything a call raises or returns is importable from embedserve itself.
    for name in client.__all__:
        if isinstance(getattr(client, name), type):
            assert getattr(embedserve, name) is getattr(client, name), name
