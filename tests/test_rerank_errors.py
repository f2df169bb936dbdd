"""Rerank and similarity on the hash tier (cosine similarity of its embeddings, nothing
installed), and every bad rerank or similarity request: a clear 4xx in the route's shape."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import pytest

from embedserve.hashing import HashEmbedder
from embedserve.vectors import cosine

from conftest import Server, start_server

EMBEDDER = HashEmbedder()
QUERY = "how do cats sleep"
DOCUMENTS = ["dogs bark at night", "cats sleep all day long", "a cat sleeps on the mat",
             "stock markets fell", "sleep well"]
MOST = 5  # --max-rerank-documents


@pytest.fixture(scope="module")
def hash_server() -> Iterator[Server]:
    srv = start_server("--max-rerank-documents", str(MOST))
    yield srv
    assert srv.stop() == 0


def expected_order() -> tuple[list[int], list[float]]:
    query = EMBEDDER.embed_one(QUERY)
    scores = [cosine(query, EMBEDDER.embed_one(d)) for d in DOCUMENTS]
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i)), scores


def test_the_hash_tier_reranks_by_cosine_similarity(hash_server: Server) -> None:
    order, scores = expected_order()
    assert order[0] in (1, 2) and len(set(scores)) == len(scores)
    status, _, body = hash_server.request("POST", "/rerank", {"query": QUERY,
                                                              "texts": DOCUMENTS})
    assert status == 200 and [r["index"] for r in body] == order
    assert all(abs(r["score"] - scores[r["index"]]) < 1e-12 for r in body)
    for path in ("/v1/rerank", "/v2/rerank"):
        status, _, body = hash_server.request("POST", path, {
            "model": "hash-v1-384", "query": QUERY, "documents": DOCUMENTS, "top_n": 2})
        assert status == 200 and [r["index"] for r in body["results"]] == order[:2]
        assert body["model"] == "hash-v1-384"


def test_max_tokens_per_doc_scores_each_documents_first_words(hash_server: Server) -> None:
    # The hash tier's tokens are its words: each document is scored on its first two, and
    # comes back whole.
    documents = ["cats sleep, all day long", "  sleep!  cats dream", "cats", "a cat sleeps"]
    first_two = ["cats sleep", "  sleep!  cats", "cats", "a cat"]
    query = EMBEDDER.embed_one(QUERY)
    expected = [cosine(query, EMBEDDER.embed_one(d)) for d in first_two]
    assert expected != [cosine(query, EMBEDDER.embed_one(d)) for d in documents]
    status, _, body = hash_server.request("POST", "/v2/rerank", {
        "query": QUERY, "documents": documents, "max_tokens_per_doc": 2,
        "return_documents": True})
    assert status == 200, body
    for result in body["results"]:
        assert abs(result["relevance_score"] - expected[result["index"]]) < 1e-6
        assert result["document"] == {"text": documents[result["index"]]}
    # A bound past every document changes nothing.
    status, _, whole = hash_server.request("POST", "/v2/rerank", {
        "query": QUERY, "documents": documents, "max_tokens_per_doc": 10**9})
    assert status == 200 and [r["relevance_score"] for r in whole["results"]] == sorted(
        (cosine(query, EMBEDDER.embed_one(d)) for d in documents), reverse=True)


def test_similarity_is_the_cosine_of_each_sentence_to_the_source(hash_server: Server) -> None:
    _, scores = expected_order()
    status, _, body = hash_server.request("POST", "/similarity", {
        "inputs": {"source_sentence": QUERY, "sentences": DOCUMENTS}})
    assert status == 200 and body == pytest.approx(scores, abs=1e-12)


def test_metrics_count_documents_reranked_by_embeddings(hash_server: Server) -> None:
    hash_server.request("POST", "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS})
    conn = http.client.HTTPConnection(hash_server.host, hash_server.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    assert 'embedserve_documents_reranked_total{' in text
    assert 'model="hash-v1-384",method="embeddings"}' in text
    assert 'route="/v2/rerank",method="POST",status="200"' in text


TEI_ERRORS: list[tuple[str, Any, int, str]] = [
    ("/rerank", {"texts": ["a"]}, 400, "'query' is required"),
    ("/rerank", {"query": "", "texts": ["a"]}, 400, "'query' is an empty string"),
    ("/rerank", {"query": 3, "texts": ["a"]}, 400, "'query' must be a string"),
    ("/rerank", {"query": "q", "texts": []}, 400, "'texts' must not be an empty list"),
    ("/rerank", {"query": "q", "texts": "a"}, 400, "'texts' must be a list"),
    ("/rerank", {"query": "q", "texts": ["a", ""]}, 400, "'texts[1]' is an empty string"),
    ("/rerank", {"query": "q", "texts": ["a", 1]}, 400, "'texts[1]' must be a string"),
    ("/rerank", {"query": "q", "texts": ["a"] * (MOST + 1)}, 413, "the limit is 5"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, 400,
     "'raw_scores' must be a boolean"),
    ("/rerank", {"query": "q", "texts": ["a"], "return_text": 1}, 400,
     "'return_text' must be a boolean"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, 422,
     "'truncation_direction' must be 'Right'"),
    ("/rerank", ["q"], 400, "must be a JSON object"),
    ("/similarity", {"inputs": "q"}, 400, "'inputs' must be an object"),
    ("/similarity", {"inputs": {"sentences": ["a"]}}, 400, "'source_sentence' is required"),
    ("/similarity", {"inputs": {"source_sentence": "q", "sentences": []}}, 400,
     "'sentences' must not be an empty list"),
    ("/similarity", {"inputs": {"source_sentence": "q", "sentences": ["a"] * (MOST + 1)}},
     413, "the limit is 5"),
    ("/similarity", {"inputs": {"source_sentence": "q", "sentences": ["a"]},
                     "parameters": 3}, 400, "'parameters' must be an object"),
]
COHERE_ERRORS: list[tuple[Any, int, str]] = [
    ({"documents": ["a"]}, 400, "'query' is required"),
    ({"query": "", "documents": ["a"]}, 400, "'query' is an empty string"),
    ({"query": "q", "documents": []}, 400, "'documents' must not be an empty list"),
    ({"query": "q"}, 400, "'documents' is required"),
    ({"query": "q", "documents": [{"title": "a"}]}, 400,
     "'documents[0]' is an object without a 'text' string"),
    ({"query": "q", "documents": [["a"]]}, 400, "'documents[0]' must be a string or an object"),
    ({"query": "q", "documents": [""]}, 400, "'documents[0]' is an empty string"),
    ({"query": "q", "documents": ["a"] * (MOST + 1)}, 413, "the limit is 5"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, 422, "'top_n' must be at least 1"),
    ({"query": "q", "documents": ["a"], "top_n": -3}, 422, "'top_n' must be at least 1"),
    ({"query": "q", "documents": ["a"], "top_n": "2"}, 400, "'top_n' must be an integer"),
    ({"query": "q", "documents": ["a"], "top_n": True}, 400, "'top_n' must be an integer"),
    ({"query": "q", "documents": ["a"], "return_documents": "no"}, 400,
     "'return_documents' must be a boolean"),
    ({"query": "q", "documents": ["a"], "model": "nope"}, 404, "model 'nope' is not served"),
    ({"query": "q", "documents": ["a"], "model": 7}, 400, "'model' must be a string"),
    ({"query": "q", "documents": ["a"], "rank_fields": ["title"]}, 422, "'rank_fields'"),
    ({"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, 422,
     "'max_tokens_per_doc' must be at least 1"),
]


@pytest.mark.parametrize("path,body,status,message", TEI_ERRORS)
def test_bad_tei_requests_are_clear_4xx(hash_server: Server, path: str, body: Any,
                                        status: int, message: str) -> None:
    got, _, answer = hash_server.request("POST", path, body)
    assert got == status, answer
    assert message in answer["error"] and answer["error_type"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize("body,status,message", COHERE_ERRORS)
def test_bad_cohere_requests_are_clear_4xx_in_cohere_shape(hash_server: Server, path: str,
                                                           body: Any, status: int,
                                                           message: str) -> None:
    got, _, answer = hash_server.request("POST", path, body)
    assert got == status, answer
    assert set(answer) == {"id", "message"} and message in answer["message"]


def test_unknown_v1_paths_keep_openais_shape_beside_cohere_rerank(hash_server: Server
                                                                  ) -> None:
    status, _, body = hash_server.request("POST", "/v1/nothing", {})
    assert status == 404 and set(body) == {"error"} and "message" in body["error"]
    status, _, body = hash_server.request("POST", "/v2/nothing", {})
    assert status == 404 and "message" in body and "error" not in body


def test_openapi_describes_the_rerank_routes_with_the_real_limit(hash_server: Server) -> None:
    spec = hash_server.request("GET", "/openapi.json")[2]
    for path in ("/rerank", "/similarity", "/v1/rerank", "/v2/rerank"):
        assert "post" in spec["paths"][path]
    cohere = spec["components"]["schemas"]["CohereRerankRequest"]["properties"]
    assert cohere["documents"]["maxItems"] == MOST
