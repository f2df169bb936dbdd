"""The core must install and serve with nothing but the standard library."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import ROOT, server_env, start_server

CHECK_IMPORTS = """
import sys, pkgutil, importlib
import embedserve
names = [m.name for m in pkgutil.walk_packages(embedserve.__path__, "embedserve.")
         if not m.name.endswith("__main__")]  # importing __main__ would start a server
for name in names:
    importlib.import_module(name)
foreign = sorted({m.split(".")[0] for m in sys.modules}
                 - set(sys.stdlib_module_names) - {"embedserve", "__main__", "__mp_main__"})
assert not foreign, foreign
print("imported", len(names), "modules; only the standard library")
"""


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A virtual environment with no packages at all (not even pip)."""
    where = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(where)
    python = str(where / "bin" / "python")
    probe = subprocess.run([python, "-c", "import numpy"], capture_output=True, text=True)
    assert probe.returncode != 0, "the bare venv must not see numpy"
    return python


def test_every_module_imports_with_the_standard_library_only(bare_python: str) -> None:
    done = subprocess.run([bare_python, "-c", CHECK_IMPORTS], capture_output=True, text=True,
                          env=server_env(), cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "only the standard library" in done.stdout


def test_serves_embeddings_with_the_standard_library_only(bare_python: str) -> None:
    srv = start_server(python=bare_python, env=server_env(EMBEDSERVE_BACKEND="auto"))
    try:
        info = srv.request("GET", "/info")[2]
        # auto found no ML packages and says so, instead of failing.
        assert info["backend"] == "hash"
        assert all(reason.startswith("not installed")
                   for reason in info["skipped_backends"].values())
        assert set(info["skipped_backends"]) == {"sentence-transformers", "transformers"}
        status, _, body = srv.request("POST", "/v1/embeddings",
                                      {"input": ["zero", "dependencies"],
                                       "encoding_format": "base64"})
        assert status == 200 and len(body["data"]) == 2
        from embedserve.hashing import HashEmbedder
        status, _, body = srv.request("POST", "/embed", {"inputs": "zero dependencies"})
        assert body == [HashEmbedder().embed_one("zero dependencies")]
        # Compact codes (Cohere's /v2/embed) are computed in pure Python too.
        status, _, body = srv.request("POST", "/v2/embed", {
            "texts": ["zero dependencies"], "embedding_types": ["int8", "ubinary"]})
        assert status == 200 and len(body["embeddings"]["ubinary"][0]) == 384 // 8
        assert all(-128 <= code <= 127 for code in body["embeddings"]["int8"][0])
    finally:
        assert srv.stop() == 0


def test_reranks_by_hash_embeddings_with_the_standard_library_only(bare_python: str) -> None:
    # No reranker and nothing installed: rerank and similarity by cosine similarity of the
    # hash tier's embeddings.
    srv = start_server(python=bare_python, env=server_env(EMBEDSERVE_BACKEND="auto"))
    try:
        from embedserve.hashing import HashEmbedder
        from embedserve.vectors import cosine
        embedder, query = HashEmbedder(), "cats sleep"
        documents = ["stock prices", "a cat sleeps all day", "cats sleep"]
        scores = [cosine(embedder.embed_one(query), embedder.embed_one(d)) for d in documents]
        status, _, body = srv.request("POST", "/v2/rerank", {
            "model": "hash-v1-384", "query": query, "documents": documents, "top_n": 2})
        assert status == 200, body
        assert [r["index"] for r in body["results"]] == [2, 1]
        assert [r["relevance_score"] for r in body["results"]] == [scores[2], scores[1]]
        status, _, body = srv.request("POST", "/rerank", {"query": query, "texts": documents})
        assert status == 200 and [r["index"] for r in body] == [2, 1, 0]
        status, _, body = srv.request("POST", "/similarity", {
            "inputs": {"source_sentence": query, "sentences": documents}})
        assert status == 200 and body == scores
    finally:
        assert srv.stop() == 0


def test_package_metadata_declares_no_runtime_dependencies() -> None:
    import configparser
    parser = configparser.ConfigParser()
    parser.read(Path(ROOT, "setup.cfg"))
    assert parser["options"]["install_requires"].strip() == ""
    assert sys.version_info >= (3, 10)


def test_a_model_asked_for_without_the_ml_packages_is_a_warning(bare_python: str) -> None:
    srv = start_server("--model", "BAAI/bge-small-en-v1.5", python=bare_python,
                       env=server_env(EMBEDSERVE_BACKEND="auto"))
    try:
        assert srv.request("GET", "/info")[2]["backend"] == "hash"
    finally:
        assert srv.stop() == 0
    warnings = [line for line in srv.log if " WARNING " in line and "bge-small" in line]
    assert warnings, "".join(srv.log)
    assert "ignored" in warnings[0] and "hash" in warnings[0]
    assert "pip install 'embedserve[ml]'" in warnings[0]


def test_without_the_ml_packages_a_model_first_used_later_is_served_by_hash_too(
        bare_python: str) -> None:
    """Under --no-preload a model loads on its first request, where falling back to the hash
    tier is refused (hash vectors under the model's name). With the ML packages absent
    altogether every load ends alike, so that is the tier's fallback, as it is at the
    start; before, each request was a 500."""
    srv = start_server("--model", "BAAI/bge-small-en-v1.5", "--no-preload", python=bare_python,
                       env=server_env(EMBEDSERVE_BACKEND="auto"))
    try:
        status, _, body = srv.request("POST", "/v1/embeddings", {"input": "zero dependencies"})
        assert status == 200 and len(body["data"][0]["embedding"]) == 384, body
        assert srv.request("GET", "/info")[2]["backend"] == "hash"
    finally:
        assert srv.stop() == 0


def test_an_ml_backend_asked_for_without_the_ml_packages_is_a_boot_error(
        bare_python: str) -> None:
    done = subprocess.run([bare_python, "-m", "embedserve", "--port", "0", "--backend",
                           "transformers", "--model", "BAAI/bge-small-en-v1.5"],
                          capture_output=True, text=True, env=server_env(), cwd=ROOT,
                          timeout=60)
    assert done.returncode == 3, done.stderr
    assert "not installed" in done.stderr and "pip install 'embedserve[ml]'" in done.stderr
