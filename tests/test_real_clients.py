"""The clients people already have, unmodified, against a real server; and schemathesis
against /openapi.json (a bounded run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedserve.hashing import HashEmbedder

from conftest import ROOT, Server

EMBEDDER = HashEmbedder()
TEXTS = ["the first document", "a second, different one"]


def close(a: list[float], b: list[float], tolerance: float = 1e-6) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tolerance


def test_ollama_client(server: Server) -> None:
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server.url)
    result = client.embed(model="hash-v1-384", input=TEXTS)
    assert all(close(a, b) for a, b in zip(result.embeddings, EMBEDDER.embed(TEXTS)))
    assert close(client.embeddings(model="hash-v1-384", prompt="x").embedding,
                 EMBEDDER.embed_one("x"))
    # The client's default input is "": how its users load a model (or, keep_alive=0,
    # unload it) without embedding anything.
    assert client.embed(model="hash-v1-384", keep_alive=0).embeddings == []
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="nomic-embed-text", input="x")
    assert info.value.status_code == 404 and "hash-v1-384" in str(info.value)
    # show(): a 404 before. Clients read the vector size as Ollama gives it.
    shown = client.show("hash-v1-384:latest")
    architecture = shown.modelinfo["general.architecture"]
    assert shown.modelinfo[f"{architecture}.embedding_length"] == 384
    assert shown.capabilities == ["embedding"] and shown.details.family == "hash"
    with pytest.raises(ollama.ResponseError) as info:
        client.show("nomic-embed-text")
    assert info.value.status_code == 404
    # A route that takes no slot takes no large body either (it holds only a connection).
    status, _, body = server.request("POST", "/api/show", raw=b" " * 70_000 + b"{}")
    assert status == 413 and "at most" in body["error"]


def test_huggingface_hub_feature_extraction(server: Server) -> None:
    pytest.importorskip("huggingface_hub")
    # In a process of its own without HF_HUB_OFFLINE (which CI sets, and which makes
    # huggingface_hub refuse every URL, even this loopback one).
    script = (
        "import json, sys\n"
        "from huggingface_hub import InferenceClient\n"
        "client = InferenceClient(model=sys.argv[1])\n"
        "a = client.feature_extraction(sys.argv[2])\n"
        "b = client.feature_extraction(sys.argv[3], normalize=True, truncate=True,\n"
        "                              truncation_direction='left')\n"
        "print(json.dumps([list(a.shape), a[0].tolist(), b[0].tolist()]))\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", script, server.url, *TEXTS],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    shape, first, second = json.loads(done.stdout)
    assert shape == [1, 384] and close(first, EMBEDDER.embed_one(TEXTS[0]))
    assert close(second, EMBEDDER.embed_one(TEXTS[1]))


def test_langchain_openai_embeddings(server: Server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="hash-v1-384", base_url=server.url + "/v1", api_key="unused",
        check_embedding_ctx_length=False)
    assert all(close(a, b) for a, b in zip(embeddings.embed_documents(TEXTS),
                                           EMBEDDER.embed(TEXTS)))
    assert close(embeddings.embed_query("query"), EMBEDDER.embed_one("query"))


def test_token_ids_as_langchain_defaults_send_them_get_a_400_naming_the_fix(
        server: Server) -> None:
    # LangChain's defaults tokenise with tiktoken (whose data it downloads) and send the
    # ids through the openai SDK; this is that request, made with the SDK directly.
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="hash-v1-384", input=[[1820, 1176, 2246]])
    assert "check_embedding_ctx_length=False" in str(info.value)


def test_langchain_with_its_defaults(server: Server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    tiktoken = pytest.importorskip("tiktoken")
    try:
        tiktoken.get_encoding("cl100k_base")
    except Exception as exc:  # its data is downloaded on first use; CI has no internet
        pytest.skip(f"tiktoken cannot load cl100k_base offline: {type(exc).__name__}")
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="hash-v1-384", base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(Exception, match="check_embedding_ctx_length=False"):
        embeddings.embed_documents(TEXTS)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server: Server) -> None:
    pytest.importorskip("schemathesis")
    command = shutil.which("schemathesis") or shutil.which("st")
    argv = [command] if command else [sys.executable, "-m", "schemathesis.cli"]
    done = subprocess.run(
        argv + ["--config-file", str(Path(ROOT, "tests", "schemathesis.toml")), "run",
                server.url + "/openapi.json", "--max-examples", "25", "--seed", "1",
                "--request-timeout", "20"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
