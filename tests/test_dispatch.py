"""dispatch.Dispatcher.handle, the transport-independent entry that Ray Serve replicas use:
for the same request it answers what the socket server answers (status, body, the headers
that matter), routes, dialects, auth and errors alike. A real hash-tier service in this
process against a real server process with the same options."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from conftest import Server, start_server
from embedserve.config import Config
from embedserve.dispatch import Dispatcher
from embedserve.service import EmbeddingService

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
CASES: list[tuple[str, str, dict[str, str], bytes]] = [
    ("POST", "/v1/embeddings", AUTH, json.dumps({"input": ["a b", "c"], "model": "hash-v1-384",
                                                 "encoding_format": "base64"}).encode()),
    ("POST", "/embed", AUTH, json.dumps({"inputs": "one text", "dimensions": 8}).encode()),
    ("POST", "/api/embed", AUTH, json.dumps({"model": "hash-v1-384", "input": "x"}).encode()),
    ("POST", "/v1/embeddings", AUTH, json.dumps({"input": "a", "model": "nope"}).encode()),
    ("POST", "/v1/embeddings", {}, json.dumps({"input": "a"}).encode()),
    ("POST", "/v1/embeddings", AUTH, b"{not json"),
    ("POST", "/embed", {**AUTH, "Content-Type": "text/plain"}, b"{}"),
    ("GET", "/v1/embeddings", AUTH, b""),
    ("GET", "/v1/nothing-here", AUTH, b""),
    ("GET", "/health", {}, b""),
    ("POST", "/embed", {**AUTH, "Origin": "http://evil.example"}, b"{}"),
    ("GET", "/health", {"Host": "rebound.example"}, b""),
]


@pytest.fixture(scope="module")
def both() -> Iterator[tuple[Dispatcher, Server]]:
    service = EmbeddingService(Config(backend="hash", api_key=KEY))
    service.load()
    server = start_server("--backend", "hash", "--api-key", KEY)
    yield Dispatcher(service), server
    assert server.stop() == 0


@pytest.mark.parametrize("method,path,headers,body", CASES,
                         ids=[f"{m} {p} {i}" for i, (m, p, _, _) in enumerate(CASES)])
def test_handle_answers_as_the_socket_server(both: tuple[Dispatcher, Server], method: str,
                                             path: str, headers: dict[str, str],
                                             body: bytes) -> None:
    dispatcher, server = both
    sent = {"Content-Type": "application/json", **headers}
    status, got_headers, parsed = server.request(method, path, headers=sent, raw=body or None)
    host = {"Host": f"{server.host}:{server.port}"}
    answer = dispatcher.handle(method, path, [*({**host, **sent}).items()], body)
    assert answer.status == status
    assert json.loads(answer.body) == parsed if answer.body else parsed is None
    for name in ("allow", "www-authenticate", "retry-after"):
        ours = {k.lower(): v for k, v in answer.headers.items()}.get(name)
        assert ours == got_headers.get(name), name


def test_handle_refuses_a_body_over_the_limit() -> None:
    service = EmbeddingService(Config(backend="hash", max_body_bytes=64))
    service.load()
    answer = Dispatcher(service).handle(
        "POST", "/embed", [("Content-Type", "application/json")],
        json.dumps({"inputs": "x" * 100}).encode())
    assert answer.status == 413 and b"limit" in answer.body


def test_two_host_headers_are_refused_on_every_transport() -> None:
    """The DNS-rebinding guard reads one Host: a second one (that a proxy or another host
    than the socket server might read instead) is refused in the shared dispatch."""
    service = EmbeddingService(Config(backend="hash"))
    service.load()
    answer = Dispatcher(service).handle(
        "GET", "/health", [("Host", "localhost"), ("Host", "evil.example")], b"")
    assert answer.status == 400 and b"more than one Host header" in answer.body
    # Header names in any case, as HTTP has them.
    answer = Dispatcher(service).handle("GET", "/health", [("host", "evil.example")], b"")
    assert answer.status == 403
