"""Several models in one server: two tiny BERTs of different sizes and the hash tier, routed
by name, loaded on demand, unloaded when idle, evicted least recently used."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedserve.hashing import HashEmbedder

from conftest import Server, server_env, start_server
from tiny_models import make_tiny_models

pytest.importorskip("sentence_transformers")

TEXTS = ["the quick brown fox", "search query about a dog", "json file parse", "hello world"]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_models(tmp_path_factory.mktemp("small"))[1]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> str:
    # Some tens of MB of weights, so that unloading it shows in the worker's memory.
    return make_tiny_models(tmp_path_factory.mktemp("big"), hidden_size=512, layers=4,
                            intermediate_size=2048, seed=1)[1]


def in_process(folder: str, texts: list[str]) -> list[list[float]]:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device="cpu").encode(
        texts, normalize_embeddings=True).tolist()


def embed(srv: Server, model: str | None, texts: list[str], **extra: Any) -> list[list[float]]:
    body: dict[str, Any] = {"input": texts, **extra}
    if model is not None:
        body["model"] = model
    status, _, reply = srv.request("POST", "/v1/embeddings", body)
    assert status == 200, reply
    return [item["embedding"] for item in reply["data"]]


def loaded(srv: Server) -> list[str]:
    return [m["name"].removesuffix(":latest") for m in srv.request("GET", "/api/ps")[2]["models"]]


def worker_rss(srv: Server) -> int:
    pid = srv.request("GET", "/info")[2]["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def three(small: str, big: str) -> Iterator[Server]:
    srv = start_server("--backend", "sentence-transformers", "--model", small, "--model", big,
                       "--model", "hash", "--served-model-name", "small,mini",
                       "--served-model-name", "big", timeout=180)
    yield srv
    assert srv.stop() == 0


def test_every_model_answers_to_its_names_with_its_own_vectors(three: Server, small: str,
                                                               big: str) -> None:
    expected = {"small": in_process(small, TEXTS), "big": in_process(big, TEXTS),
                "hash-v1-384": HashEmbedder(384).embed(TEXTS)}
    results: dict[str, list[list[list[float]]]] = {name: [] for name in expected}
    errors: list[BaseException] = []

    def client(name: str) -> None:
        try:
            for _ in range(5):
                results[name].append(embed(three, name, TEXTS))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(name,)) for name in expected
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for name, runs in results.items():
        assert len(runs) == 10
        for vectors in runs:
            for got, want in zip(vectors, expected[name]):
                assert cosine(got, want) >= 0.9999, name
    # No model named: the first. A second name of the first model works too.
    assert embed(three, None, TEXTS[:1]) == embed(three, "mini", TEXTS[:1])
    assert len(embed(three, "big", TEXTS[:1])[0]) == 512
    assert embed(three, "hash", TEXTS[:1]) == embed(three, "hash-v1-384", TEXTS[:1])


def test_every_model_is_listed_and_a_wrong_name_lists_them(three: Server) -> None:
    ids = [m["id"] for m in three.request("GET", "/v1/models")[2]["data"]]
    assert ids == ["small", "mini", "big", "hash-v1-384"]
    tags = [(m["name"], m["details"]["format"])
            for m in three.request("GET", "/api/tags")[2]["models"]]
    # Each with its own backend (all were the default model's before).
    assert tags == [(f"{name}:latest", "hash" if name.startswith("hash") else
                     "sentence-transformers") for name in ids]
    status, _, body = three.request("POST", "/v1/embeddings", {"input": "x", "model": "gpt-4"})
    assert status == 404
    assert all(repr(name) in body["error"]["message"] for name in ids)
    info = three.request("GET", "/info")[2]
    assert [m["names"] for m in info["models"]] == [["small", "mini"], ["big"], ["hash-v1-384"]]
    assert info["models"][1]["memory_bytes"] > 10 * info["models"][0]["memory_bytes"] > 0
    assert info["model"] == info["models"][0]["model"]  # single-model clients read these


def test_ollama_and_tei_routes_pick_models_too(three: Server) -> None:
    status, _, body = three.request("POST", "/api/embed", {"model": "big:latest", "input": "x"})
    assert status == 200 and len(body["embeddings"][0]) == 512
    status, _, body = three.request("POST", "/embed", {"inputs": "x"})  # TEI: the default
    assert status == 200 and len(body[0]) == 32
    # ...or the one named (the default's vectors were given, without a word, before).
    status, _, body = three.request("POST", "/embed", {"inputs": "x", "model": "big"})
    assert status == 200 and len(body[0]) == 512
    status, _, body = three.request("POST", "/tokenize", {"inputs": "x y", "model": "hash"})
    assert status == 200 and [t["text"] for t in body[0]] == ["x", "y"]
    status, _, body = three.request("POST", "/tokenize", {"inputs": "x", "model": "nope"})
    assert status == 404 and body["error_type"] == "NotFound"


def test_no_preload_loads_a_model_on_its_first_request(small: str, big: str) -> None:
    srv = start_server("--backend", "sentence-transformers", "--no-preload", "--model", small,
                       "--model", big, "--served-model-name", "small",
                       "--served-model-name", "big", timeout=60)
    try:
        assert srv.request("GET", "/health")[0] == 200
        assert loaded(srv) == []
        assert [m["loaded"] for m in srv.request("GET", "/info")[2]["models"]] == [False, False]
        vectors = embed(srv, "big", TEXTS)
        assert loaded(srv) == ["big"]
        for got, want in zip(vectors, in_process(big, TEXTS)):
            assert cosine(got, want) >= 0.9999
    finally:
        assert srv.stop() == 0


def test_an_idle_model_is_unloaded_and_its_memory_given_back(big: str) -> None:
    srv = start_server("--backend", "sentence-transformers", "--model", "hash", "--model", big,
                       "--served-model-name", "", "--served-model-name", "big",
                       "--model-idle-timeout", "3", timeout=120)
    try:
        weights = srv.request("GET", "/info")[2]["models"][1]["memory_bytes"]
        assert weights > 20_000_000
        for attempt in range(5):  # RSS read while the model is surely still loaded
            embed(srv, "big", TEXTS)
            before = worker_rss(srv)
            if loaded(srv) == ["big"]:
                break
        else:
            pytest.fail("the model was unloaded before its memory could be measured")
        wait_for(lambda: loaded(srv) == [], "the idle model to be unloaded")
        # /info says unloaded as the slot lets go; the memory is given back just after,
        # and the log says so last (read at once, the RSS was once still the same).
        wait_for(lambda: any("unloaded" in line for line in srv.log), "its memory given back")
        after = worker_rss(srv)
        assert before - after >= weights / 2, (before, after, weights)
        assert embed(srv, "hash-v1-384", TEXTS[:1])  # the hash tier stays
        embed(srv, "big", TEXTS[:1])  # and the model comes back when asked for
        assert loaded(srv) == ["big"]
    finally:
        assert srv.stop() == 0


# Run in a process of its own: freezing is process-wide.
FREEZE_CHECK = """
import contextlib, gc, sys, weakref
from embedserve.config import Config
from embedserve.registry import Registry

registry = Registry(Config(backend="sentence-transformers", model=(sys.argv[1],)),
                    contextlib.nullcontext)
slot = registry.default
with registry.use(slot):
    backend = slot.loaded.backend
# Loaded: the model is frozen, out of the generations a full collection walks.
assert gc.get_freeze_count() > 0
assert all(obj is not backend for obj in gc.get_objects())
backend.cycle = backend  # a reference cycle: only the collector can free it
gone = weakref.ref(backend)
del backend
registry.unload(slot, "test")
assert gone() is None, "the unloaded model was kept: frozen objects are never collected"
print("ok")
"""


def test_a_loaded_model_is_kept_out_of_full_collections_and_freed_when_unloaded(small: str
                                                                                ) -> None:
    """A full collection walked every object of the model and its libraries, holding the
    interpreter lock: a quarter-second stall under load. Loaded models are frozen out of
    it, and unloading still frees a model whose objects form cycles."""
    result = subprocess.run([sys.executable, "-c", FREEZE_CHECK, small], capture_output=True,
                            text=True, timeout=120, env=server_env())
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_max_loaded_models_evicts_the_least_recently_used(small: str, big: str) -> None:
    srv = start_server("--backend", "sentence-transformers", "--no-preload", "--model", small,
                       "--model", big, "--served-model-name", "small",
                       "--served-model-name", "big", "--max-loaded-models", "1", timeout=60)
    try:
        embed(srv, "small", TEXTS[:1])
        assert loaded(srv) == ["small"]
        embed(srv, "big", TEXTS[:1])
        assert loaded(srv) == ["big"]
        embed(srv, "small", TEXTS[:1])
        assert loaded(srv) == ["small"]
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("preload", [True, False])
def test_a_model_that_cannot_load_after_the_start_fails_its_request_not_into_hash(
        tmp_path: Path, preload: bool) -> None:
    # `auto` falls back to the hash tier at the start. Later (a reload after keep_alive 0,
    # or the first use under --no-preload), a model whose files had gone answered with
    # 384 hash values under its own name.
    folder = make_tiny_models(tmp_path)[1]
    srv = start_server("--backend", "auto", "--model", folder, "--served-model-name", "tiny",
                       *([] if preload else ["--no-preload"]), timeout=60)
    try:
        if preload:
            status, _, body = srv.request("POST", "/api/embed", {"model": "tiny", "input": "x",
                                                                 "keep_alive": 0})
            assert status == 200 and len(body["embeddings"][0]) == 32
        assert loaded(srv) == []
        Path(folder).rename(folder + ".gone")
        status, _, body = srv.request("POST", "/api/embed", {"model": "tiny", "input": "x"})
        assert status == 500 and "tiny failed to load" in body["error"], body
        assert [m["id"] for m in srv.request("GET", "/v1/models")[2]["data"]] == ["tiny"]
        Path(folder + ".gone").rename(folder)  # back: the next request loads it
        status, _, body = srv.request("POST", "/api/embed", {"model": "tiny", "input": "x"})
        assert status == 200 and len(body["embeddings"][0]) == 32
    finally:
        assert srv.stop() == 0


def test_ollama_keep_alive_0_unloads_after_the_request(small: str) -> None:
    srv = start_server("--backend", "sentence-transformers", "--model", small,
                       "--served-model-name", "small", timeout=60)
    try:
        assert loaded(srv) == ["small"]
        facts = ("model", "model_id", "dimensions", "max_input_length", "backend", "prompts")
        before = {key: srv.request("GET", "/info")[2][key] for key in facts}
        status, _, _ = srv.request("POST", "/api/embed", {"model": "small", "input": "x",
                                                          "keep_alive": 0})
        assert status == 200 and loaded(srv) == []
        # Unloaded by any client, the default model is still what /info says it is (its
        # id, size and input limit went to its served name and nulls).
        assert {key: srv.request("GET", "/info")[2][key] for key in facts} == before
        # No input: Ollama's way to load a model ahead of use, and with keep_alive 0 to
        # unload it (a 400 before).
        status, _, body = srv.request("POST", "/api/embed", {"model": "small"})
        assert status == 200 and body["embeddings"] == [] and loaded(srv) == ["small"]
        # A refused request changes nothing: its keep_alive 0 does not unload the model.
        status, _, _ = srv.request("POST", "/api/embed", {
            "model": "small", "input": "x", "dimensions": 100_000, "keep_alive": 0})
        assert status == 422 and loaded(srv) == ["small"]
        status, _, body = srv.request("POST", "/api/embed", {"model": "small", "input": [],
                                                             "keep_alive": 0})
        assert status == 200 and body["embeddings"] == [] and loaded(srv) == []
        status, _, _ = srv.request("POST", "/api/embed", {"model": "small", "input": "x",
                                                          "keep_alive": "5m"})
        assert status == 200
        (entry,) = srv.request("GET", "/api/ps")[2]["models"]
        assert entry["name"] == "small:latest" and entry["size"] > 0
        assert entry["expires_at"].startswith(time.strftime("%Y-"))
        # Longer than a date can say: kept for good, as -1 (a 500 before, until replaced).
        this_year = time.strftime("%Y-")
        for keep_alive, expires in ((1e20, "2318-"), (-1, "2318-"), ("1h", this_year)):
            status, _, _ = srv.request("POST", "/api/embed", {
                "model": "small", "input": "x", "keep_alive": keep_alive})
            assert status == 200
            status, _, body = srv.request("GET", "/api/ps")
            assert status == 200 and body["models"][0]["expires_at"].startswith(expires)
    finally:
        assert srv.stop() == 0
