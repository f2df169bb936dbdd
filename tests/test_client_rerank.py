"""Client.rerank against a real hash-tier server, and its in-process fallback: the same
scores bit for bit, under embed's same-model rule (never in place of a server's reranker)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from embedserve import Client, EmbedServeError, Ranking, ServerUnavailable, ValidationError

from conftest import Server, start_server

HOST = "127.0.0.1"
QUERY = "how do cats sleep"
DOCUMENTS = ["dogs bark at night", "cats sleep all day long", "a cat sleeps on the mat",
             "stock markets fell", "sleep well"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def served(srv: Server, top_n: int | None = None) -> list[tuple[int, float]]:
    body = {"query": QUERY, "documents": DOCUMENTS, **({"top_n": top_n} if top_n else {})}
    status, _, answer = srv.request("POST", "/v2/rerank", body)
    assert status == 200, answer
    return [(r["index"], r["relevance_score"]) for r in answer["results"]]


def test_rerank_gives_the_servers_ranking_with_its_provenance(server: Server) -> None:
    with Client(server.url, autostart=False, fallback="never") as client:
        result = client.rerank(QUERY, DOCUMENTS, top_n=3)
        assert [(r.index, r.score) for r in result] == served(server, 3)
        assert all(isinstance(r, Ranking) and r.document == DOCUMENTS[r.index]
                   for r in result)
        assert (result.model, result.backend, result.method, result.source) == (
            "hash-v1-384", "hash", "embeddings", "server")
        assert client.rerank(QUERY, DOCUMENTS, model="hash").model == "hash-v1-384"


def test_documents_over_the_servers_limit_go_in_several_requests(
        server: Server, fresh_server: list[Server]) -> None:
    srv = start_server("--max-rerank-documents", "2")
    fresh_server.append(srv)
    with Client(srv.url, autostart=False, fallback="never") as client:
        result = client.rerank(QUERY, DOCUMENTS, top_n=4)
    assert [(r.index, r.score) for r in result] == served(server, 4)


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    client = Client(f"http://{HOST}:{free_port()}", autostart=False, fallback="never")
    with pytest.raises(ValidationError, match="'query' is an empty string"):
        client.rerank("", DOCUMENTS)
    with pytest.raises(ValidationError, match="must not be an empty list"):
        client.rerank(QUERY, [])
    with pytest.raises(ValidationError, match="'top_n'"):
        client.rerank(QUERY, DOCUMENTS, top_n=0)
    with pytest.raises(TypeError):
        client.rerank(QUERY, "one document")


def test_the_fallback_ranks_as_the_hash_tier_server_does(server: Server) -> None:
    client = Client(f"http://{HOST}:{free_port()}", autostart=False, backend="hash",
                    retries=1, backoff=0.01)
    result = client.rerank(QUERY, DOCUMENTS, top_n=3)
    assert (result.source, result.method, result.model) == ("fallback", "embeddings",
                                                            "hash-v1-384")
    assert [(r.index, r.score) for r in result] == served(server, 3)
    never = Client(f"http://{HOST}:{free_port()}", autostart=False, fallback="never",
                   retries=1, backoff=0.01)
    with pytest.raises(ServerUnavailable, match="fallback is off"):
        never.rerank(QUERY, DOCUMENTS)
    with pytest.raises(ServerUnavailable, match="only the hash tier"):
        client.rerank(QUERY, DOCUMENTS, model="bge-reranker-base")


def test_the_fallback_never_stands_in_for_a_servers_reranker() -> None:
    # What a server serving a reranker beside the hash tier says in its /info.
    info = {"model": "hash-v1-384", "dimensions": 384, "backend": "hash", "models": [
        {"names": ["hash-v1-384"], "model": "hash-v1-384", "kind": "embedding",
         "backend": "hash", "dimensions": 384},
        {"names": ["reranker"], "model": "/models/reranker", "kind": "reranker",
         "backend": "sentence-transformers", "dimensions": 2}]}
    fallback = Client(autostart=False, fallback="same-model")._fallback
    fallback.learn(info)
    with pytest.raises(ServerUnavailable, match="reranks with reranker"):
        fallback.rerank_vectors([QUERY] + DOCUMENTS, None, "http://x", None)
    vectors, label = fallback.rerank_vectors([QUERY] + DOCUMENTS, None, "http://x",
                                             "hash-v1-384")
    assert label == "hash-v1-384" and len(vectors) == len(DOCUMENTS) + 1
    anything = Client(autostart=False, fallback="always")._fallback
    anything.learn(info)
    assert anything.rerank_vectors([QUERY], None, "http://x", None)[1] == "hash-v1-384"


def test_a_reranker_listed_without_names_is_known_by_its_model() -> None:
    """/info from a server whose reranker lists no names (an empty list): the client knows
    it by its model instead of failing on it (an IndexError before)."""
    client = Client("http://127.0.0.1:9", autostart=False)
    try:
        client._fallback.learn({"model": "hash-v1-384", "dimensions": 384, "models": [
            {"names": ["hash-v1-384"], "backend": "hash", "model": "hash-v1-384",
             "kind": "embedding", "dimensions": 384},
            {"names": [], "backend": "sentence-transformers", "model": "tiny-ce",
             "kind": "reranker", "dimensions": 2}]})
        assert client._fallback.served_reranker == "tiny-ce"
    finally:
        client.close()


def answering(results: list[Any]) -> Iterator[str]:
    """A stand-in server whose /v2/rerank answers `results`; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.reply({"status": "ok"} if self.path == "/health" else
                       {"backend": "hash", "model": "hash-v1-384", "dimensions": 384})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply({"id": "x", "results": results, "model": "hash-v1-384"})

        def reply(self, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("results,message", [
    # Index -1 was read as the last document; a repeated index gave one document two scores.
    ([{"index": -1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}], "indexes"),
    ([{"index": 0, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}], "indexes"),
    ([{"index": 0, "relevance_score": 0.9}], "indexes"),
    ([{"index": 0, "relevance_score": None}, {"index": 1, "relevance_score": 0.1}], "score"),
    ([{"index": 0, "relevance_score": True}, {"index": 1, "relevance_score": 0.1}], "score"),
])
def test_a_ranking_that_cannot_be_the_answer_is_an_error(results: list[Any], message: str
                                                        ) -> None:
    for url in answering(results):
        client = Client(url, autostart=False, fallback="never")
        with pytest.raises(EmbedServeError, match=message):
            client.rerank(QUERY, DOCUMENTS[:2])
        client.close()
