"""Ollama and the rest of TEI, model names, /tokenize, /metrics, /openapi.json, headers,
and auth on non-loopback binds: raw HTTP against a real server."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest

from embedserve.hashing import HashEmbedder

from conftest import Server, server_env, start_server

EMBEDDER = HashEmbedder()


def test_ollama_embed(server: Server) -> None:
    status, _, body = server.request("POST", "/api/embed",
                                     {"model": "hash-v1-384", "input": ["a b", "c"]})
    assert status == 200 and body["model"] == "hash-v1-384"
    assert body["embeddings"] == EMBEDDER.embed(["a b", "c"])
    assert body["prompt_eval_count"] == 3
    status, _, body = server.request("POST", "/api/embed", {"model": "hash-v1-384:latest",
                                                           "input": "one", "dimensions": 8})
    assert status == 200 and len(body["embeddings"][0]) == 8


def test_ollama_legacy_embeddings(server: Server) -> None:
    status, _, body = server.request("POST", "/api/embeddings",
                                     {"model": "hash-v1-384", "prompt": "legacy"})
    assert status == 200 and body == {"embedding": EMBEDDER.embed_one("legacy")}


@pytest.mark.parametrize("route,body,reply", [
    ("/api/embed", {"model": "hash-v1-384"}, {"model": "hash-v1-384", "embeddings": []}),
    ("/api/embed", {"model": "hash-v1-384:latest", "input": ""},
     {"model": "hash-v1-384:latest", "embeddings": []}),
    ("/api/embed", {"model": "hash-v1-384", "input": [], "keep_alive": 0},
     {"model": "hash-v1-384", "embeddings": []}),
    ("/api/embeddings", {"model": "hash-v1-384"}, {"embedding": []}),
    ("/api/embeddings", {"model": "hash-v1-384", "prompt": "", "keep_alive": "5m"},
     {"embedding": []}),
])
def test_ollama_no_input_loads_the_model_and_embeds_nothing(server: Server, route: str,
                                                            body: dict, reply: dict) -> None:
    # How Ollama's clients load a model ahead of use, or unload it with keep_alive 0.
    status, _, answer = server.request("POST", route, body)
    assert status == 200
    assert {key: answer[key] for key in reply} == reply, answer


@pytest.mark.parametrize("body,status,fragment", [
    ({"model": "nomic-embed-text", "input": "x"}, 404, "not served here"),
    ({"input": "x"}, 400, "'model' is required"),
    ({"model": "hash-v1-384", "input": ["x", ""]}, 400, "'input[1]' is an empty string"),
    ({"model": "hash-v1-384", "input": "x", "keep_alive": {}}, 400, "keep_alive"),
    ({"model": "nomic-embed-text"}, 404, "not served here"),
])
def test_ollama_errors_are_ollama_shaped(server: Server, body: dict, status: int,
                                         fragment: str) -> None:
    got, _, answer = server.request("POST", "/api/embed", body)
    assert got == status and set(answer) == {"error"} and fragment in answer["error"]


def test_ollama_tags_version_and_root(server: Server) -> None:
    status, _, body = server.request("GET", "/api/tags")
    assert status == 200 and body["models"][0]["name"] == "hash-v1-384:latest"
    status, _, body = server.request("GET", "/api/version")
    assert status == 200 and body["version"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"Ollama is running"
    conn.request("HEAD", "/")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    conn.close()


def test_openai_model_must_be_the_served_one(server: Server) -> None:
    status, _, body = server.request("POST", "/v1/embeddings",
                                     {"input": "x", "model": "text-embedding-3-small"})
    assert status == 404 and "hash-v1-384" in body["error"]["message"]
    assert body["error"]["param"] == "model"
    for name in ("hash-v1-384", "HASH-V1-384"):
        assert server.request("POST", "/v1/embeddings", {"input": "x", "model": name})[0] == 200


def test_tei_truncation_direction_and_options(server: Server) -> None:
    status, _, body = server.request("POST", "/embed", {
        "inputs": ["x y"], "normalize": True, "truncate": True,
        "truncation_direction": "Left", "dimensions": 384})
    assert status == 200 and body == [EMBEDDER.embed_one("x y")]


def test_tokenize(server: Server) -> None:
    status, _, body = server.request("POST", "/tokenize", {"inputs": ["Hello, wörld!", "a"]})
    assert status == 200
    assert [t["text"] for t in body[0]] == ["Hello", "wörld"]
    assert [(t["start"], t["stop"]) for t in body[0]] == [(0, 5), (7, 12)]
    assert all(t["special"] is False and isinstance(t["id"], int) for t in body[0])
    assert server.request("POST", "/tokenize", {"inputs": []})[0] == 400


def test_timing_headers(server: Server) -> None:
    status, headers, _ = server.request("POST", "/embed", {"inputs": ["one two", "three"]})
    assert status == 200
    assert float(headers["x-compute-time"]) >= 0 and float(headers["x-total-time"]) >= 0
    assert headers["x-compute-characters"] == "12" and headers["x-compute-tokens"] == "3"


def test_an_error_before_the_body_is_read_keeps_the_connection_usable(server: Server) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    body = json.dumps({"inputs": "a body nobody reads"})
    for method, path, status in [("PUT", "/embed", 405), ("POST", "/nowhere", 404),
                                 ("QUERY", "/v1/embeddings", 405)]:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == status
        response.read()
        conn.request("POST", "/embed", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == [
            EMBEDDER.embed_one("a body nobody reads")]
    conn.close()


def test_metrics_parse_with_prometheus_client(server: Server) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    server.request("POST", "/embed", {"inputs": ["metric me", "twice"]})
    server.request("GET", "/nope")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value
                for s in families["embedserve_requests"].samples}
    assert requests[("/embed", "200")] >= 1 and requests[("(unknown)", "404")] >= 1
    assert families["embedserve_texts_embedded"].samples[0].value >= 2
    assert families["embedserve_request_duration_seconds"].type == "histogram"
    info = families["embedserve_backend_info"].samples[0].labels
    assert info["backend"] == "hash" and info["model"] == "hash-v1-384"
    assert "embedserve_worker_restarts" in families and "embedserve_queue_depth" in families


def test_openapi_describes_every_route(server: Server) -> None:
    from embedserve.routes import ROUTES
    status, _, spec = server.request("GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    for route in ROUTES:
        for method in route.methods:
            if method != "HEAD":
                assert method.lower() in spec["paths"][route.path], (method, route.path)
    request = spec["components"]["schemas"]["OpenAIEmbeddingRequest"]
    assert request["properties"]["dimensions"]["anyOf"][0]["maximum"] == 384


def test_api_key_on_a_non_loopback_bind(fresh_server: list[Server]) -> None:
    refused = subprocess.run([sys.executable, "-m", "embedserve", "--host", "0.0.0.0",
                              "--port", "0"], capture_output=True, text=True,
                             env=server_env(), timeout=60)
    assert refused.returncode == 2 and "without an API key" in refused.stderr
    srv = start_server("--host", "0.0.0.0", "--api-key", "k3y")
    fresh_server.append(srv)
    # Only ever spoken to over loopback, even though it listens on every address.
    from conftest import request
    assert request("127.0.0.1", srv.port, "GET", "/health")[0] == 200
    assert request("127.0.0.1", srv.port, "GET", "/info")[0] == 401
    assert request("127.0.0.1", srv.port, "GET", "/metrics",
                   headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request("127.0.0.1", srv.port, "POST", "/api/embed",
                   {"model": "hash-v1-384", "input": "x"},
                   headers={"Authorization": "Bearer k3y"})[0] == 200
    insecure = start_server("--host", "0.0.0.0", "--allow-insecure")
    fresh_server.append(insecure)
    assert request("127.0.0.1", insecure.port, "GET", "/info")[0] == 200
