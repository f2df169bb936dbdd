"""Rerankers over HTTP against sentence-transformers' CrossEncoder in-process: a tiny
cross-encoder made at test time, served by both rerank tiers beside a tiny embedding model,
through TEI's /rerank and Cohere's /v1/rerank and /v2/rerank, and the real `cohere` SDK."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import Server, start_server
from tiny_models import make_tiny_models, make_tiny_reranker

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKENDS = ["sentence-transformers", "transformers"]
QUERY = "the quick brown fox"
DOCUMENTS = ["hello world", "a cat sat on the mat", "the lazy dog jumps over the fox",
             "json file parse", "search query about python", "the brown fox",
             # over the tiny model's 64 tokens with the query: cut longest_first
             " ".join(["cat dog"] * 60)]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rerankers")
    plain, cross_encoder = make_tiny_reranker(root)
    _, embedding = make_tiny_models(root)
    return {"plain": plain, "cross_encoder": cross_encoder, "embedding": embedding}


@pytest.fixture(scope="module")
def reference(folders: dict[str, str]) -> Any:
    from sentence_transformers import CrossEncoder
    return CrossEncoder(folders["cross_encoder"], device="cpu")


def predict(reference: Any, query: str, documents: list[str], raw: bool = False
            ) -> list[float]:
    options = {"activation_fn": torch.nn.Identity()} if raw else {}
    return [float(s) for s in reference.predict([(query, d) for d in documents], **options)]


def ranked(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@pytest.fixture(scope="module", params=BACKENDS)
def ml_server(request: pytest.FixtureRequest, folders: dict[str, str]) -> Iterator[Server]:
    srv = start_server("--backend", request.param, "--model", folders["cross_encoder"],
                       "--served-model-name", "reranker", "--model", folders["embedding"],
                       "--served-model-name", "embedder", "--max-batch-texts", "4",
                       timeout=180)
    yield srv
    assert srv.stop() == 0


def tei_rerank(srv: Server, query: str, texts: list[str], **options: Any) -> list[dict]:
    status, _, body = srv.request("POST", "/rerank", {"query": query, "texts": texts,
                                                      **options})
    assert status == 200, body
    return body


def cohere_rerank(srv: Server, path: str, query: str, documents: list[Any],
                  **options: Any) -> dict[str, Any]:
    status, _, body = srv.request("POST", path, {"model": "reranker", "query": query,
                                                 "documents": documents, **options})
    assert status == 200, body
    return body


def check(results: list[tuple[int, float]], expected: list[float]) -> None:
    """Served (index, score) pairs, best first, against the in-process scores."""
    assert [i for i, _ in results] == ranked(expected)
    for index, score in results:
        assert abs(score - expected[index]) <= TOLERANCE, (index, score, expected[index])


def test_the_reranker_is_known_as_one(ml_server: Server) -> None:
    info = ml_server.request("GET", "/info")[2]
    kinds = {m["names"][0]: m["kind"] for m in info["models"]}
    assert kinds == {"reranker": "reranker", "embedder": "embedding"}
    assert info["kind"] == "reranker"
    # Its rows (two scores) are no vectors a client could use: no size is given.
    sizes = {m["names"][0]: m["dimensions"] for m in info["models"]}
    assert sizes["reranker"] is None and isinstance(sizes["embedder"], int)
    assert info["dimensions"] is None


def test_every_rerank_route_equals_cross_encoder_predict(ml_server: Server,
                                                         reference: Any) -> None:
    expected = predict(reference, QUERY, DOCUMENTS)
    assert len(set(ranked(expected))) == len(DOCUMENTS)
    check([(r["index"], r["score"]) for r in tei_rerank(ml_server, QUERY, DOCUMENTS)],
          expected)
    for path in ("/v1/rerank", "/v2/rerank"):
        body = cohere_rerank(ml_server, path, QUERY, DOCUMENTS)
        check([(r["index"], r["relevance_score"]) for r in body["results"]], expected)
        assert body["model"] == "reranker" and body["meta"]["api_version"]["version"] == \
            path[2]


def test_tei_routes_take_the_model_asked_for(ml_server: Server) -> None:
    # A model named on TEI's /rerank and /similarity was ignored: another model answered.
    similarity = {"inputs": {"source_sentence": "a", "sentences": ["b"]}}
    for path, body in (("/rerank", {"query": QUERY, "texts": DOCUMENTS[:2]}),
                       ("/similarity", similarity)):
        assert ml_server.request("POST", path, {**body, "model": "nowhere"})[0] == 404, path
        assert ml_server.request("POST", path, {**body, "model": 5})[0] == 400, path
        assert ml_server.request("POST", path, {**body, "model": "embedder"})[0] == 200, path
    status, _, body = ml_server.request("POST", "/similarity", {**similarity,
                                                                "model": "reranker"})
    assert status == 400, body  # a reranker embeds nothing to compare


def test_raw_scores_are_the_logits_and_default_scores_their_sigmoid(
        ml_server: Server, reference: Any) -> None:
    raw = predict(reference, QUERY, DOCUMENTS, raw=True)
    check([(r["index"], r["score"])
           for r in tei_rerank(ml_server, QUERY, DOCUMENTS, raw_scores=True)], raw)
    for result in tei_rerank(ml_server, QUERY, DOCUMENTS, raw_scores=False):
        assert abs(result["score"] - 1 / (1 + math.exp(-raw[result["index"]]))) <= TOLERANCE


def test_top_n_and_returned_documents(ml_server: Server, reference: Any) -> None:
    expected = predict(reference, QUERY, DOCUMENTS)
    body = cohere_rerank(ml_server, "/v2/rerank", QUERY, DOCUMENTS, top_n=3,
                         return_documents=True)
    assert [r["index"] for r in body["results"]] == ranked(expected)[:3]
    assert all(r["document"] == {"text": DOCUMENTS[r["index"]]} for r in body["results"])
    # Documents as objects (Cohere v1, Jina); top_n past the documents gives them all.
    body = cohere_rerank(ml_server, "/v1/rerank", QUERY, [{"text": d} for d in DOCUMENTS],
                         top_n=50)
    assert len(body["results"]) == len(DOCUMENTS)
    assert all("document" not in r for r in body["results"])
    texts = tei_rerank(ml_server, QUERY, DOCUMENTS, return_text=True)
    assert all(r["text"] == DOCUMENTS[r["index"]] for r in texts)
    assert all("text" not in r for r in tei_rerank(ml_server, QUERY, DOCUMENTS))


def test_max_tokens_per_doc_scores_each_documents_first_tokens(
        ml_server: Server, reference: Any, folders: dict[str, str]) -> None:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folders["cross_encoder"])

    def first(document: str, tokens: int) -> str:
        offsets = tokenizer(document, add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
        return document[:offsets[tokens - 1][1]] if len(offsets) > tokens else document

    cut = [first(d, 3) for d in DOCUMENTS]
    assert cut != DOCUMENTS
    expected = predict(reference, QUERY, cut)
    body = cohere_rerank(ml_server, "/v2/rerank", QUERY, DOCUMENTS, max_tokens_per_doc=3,
                         return_documents=True)
    check([(r["index"], r["relevance_score"]) for r in body["results"]], expected)
    assert all(r["document"] == {"text": DOCUMENTS[r["index"]]} for r in body["results"])
    # Past the model's limit, the model's own cut is all there is.
    body = cohere_rerank(ml_server, "/v2/rerank", QUERY, DOCUMENTS, max_tokens_per_doc=10**6)
    check([(r["index"], r["relevance_score"]) for r in body["results"]],
          predict(reference, QUERY, DOCUMENTS))


def test_concurrent_clients_each_get_their_own_scores(ml_server: Server,
                                                      reference: Any) -> None:
    queries = [QUERY, "hello", "a cat on a mat", "python json", "lazy dog", "search the web",
               "the end", "brown"]
    expected = {q: predict(reference, q, DOCUMENTS[i % 3:]) for i, q in enumerate(queries)}
    errors: list[BaseException] = []

    def client(i: int, query: str) -> None:
        try:
            for _ in range(3):
                path = ("/rerank", "/v1/rerank", "/v2/rerank")[i % 3]
                if path == "/rerank":
                    got = [(r["index"], r["score"])
                           for r in tei_rerank(ml_server, query, DOCUMENTS[i % 3:])]
                else:
                    body = cohere_rerank(ml_server, path, query, DOCUMENTS[i % 3:])
                    got = [(r["index"], r["relevance_score"]) for r in body["results"]]
                check(got, expected[query])
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, q)) for i, q in enumerate(queries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[0]
    batches = ml_server.request("GET", "/info")[2]["models"][0]["batches"]
    assert batches > 0


def test_truncate_false_refuses_an_over_long_pair_naming_the_limit(ml_server: Server) -> None:
    status, _, body = ml_server.request("POST", "/rerank", {
        "query": QUERY, "texts": DOCUMENTS, "truncate": False})
    assert status == 422 and "document 6" in body["error"] and "at most 64" in body["error"]
    tei_rerank(ml_server, QUERY, DOCUMENTS[:6], truncate=False)


@pytest.mark.parametrize("model", ["reranker", "embedder"])
def test_a_lone_surrogate_is_a_400_naming_the_query_or_the_document(ml_server: Server,
                                                                    model: str) -> None:
    # By either kind of model (the embedder's said "input 1" for document 0 before).
    for raw, named in ((b'"texts": ["fine", "the \\udfff cat"], "query": "q"', "document 1"),
                       (b'"texts": ["fine"], "query": "\\ud800"', "the query")):
        status, _, body = ml_server.request(
            "POST", "/rerank", raw=b'{"model": "%s", %s}' % (model.encode(), raw))
        assert status == 400 and body["error"].startswith(named + " contains a lone surrogate")


def test_errors_name_models_as_clients_do_and_texts_as_sent(ml_server: Server,
                                                            folders: dict[str, str]) -> None:
    # Before: the model's folder (a path on the server) in every such message, and a rerank
    # or /similarity embedded by a model named document 0 "input 1", the query "input 0".
    long = " ".join(["cat dog"] * 60)
    for path, body, named in (
            ("/v1/embeddings", {"input": "x", "model": "embedder", "dimensions": 999},
             "for model embedder"),
            ("/v1/embeddings", {"input": "x", "model": "reranker"},
             "model reranker does not embed"),
            ("/embed", {"inputs": "x", "prompt_name": "nope", "model": "embedder"},
             "model embedder has no prompt"),
            ("/embed", {"inputs": ["x", long], "truncate": False, "model": "embedder"},
             "input 1 has at least"),
            ("/rerank", {"query": "q", "texts": ["a", long], "truncate": False,
                         "model": "embedder"}, "document 1 has at least"),
            ("/rerank", {"query": long, "texts": ["a"], "truncate": False,
                         "model": "embedder"}, "the query has at least"),
            ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b", long]},
                             "parameters": {"truncate": False}}, "sentence 1 has at least"),
            ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b", "\ud800"]}},
             "sentence 1 contains a lone surrogate")):
        status, _, answer = ml_server.request("POST", path, body)
        message = str(answer)
        assert 400 <= status < 500 and named in message, (path, body, answer)
        assert folders["embedding"] not in message and folders["cross_encoder"] not in message


def test_an_embedding_model_named_reranks_by_cosine_similarity(ml_server: Server,
                                                               folders: dict[str, str]
                                                               ) -> None:
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(folders["embedding"], device="cpu")
    vectors = model.encode([QUERY] + DOCUMENTS, normalize_embeddings=True)
    expected = [float(vectors[0] @ v) for v in vectors[1:]]
    status, _, body = ml_server.request("POST", "/v2/rerank", {
        "model": "embedder", "query": QUERY, "documents": DOCUMENTS})
    assert status == 200, body
    check([(r["index"], r["relevance_score"]) for r in body["results"]], expected)
    assert body["model"] == "embedder"
    # /similarity takes the first embedding model, never the reranker.
    status, _, scores = ml_server.request("POST", "/similarity", {
        "inputs": {"source_sentence": QUERY, "sentences": DOCUMENTS}})
    assert status == 200 and max(abs(a - b) for a, b in zip(scores, expected)) <= TOLERANCE


def test_a_reranker_embeds_nothing_and_metrics_count_its_documents(ml_server: Server) -> None:
    status, _, body = ml_server.request("POST", "/v1/embeddings", {"input": "x",
                                                                   "model": "reranker"})
    assert status == 400 and "does not embed" in body["error"]["message"]
    assert body["error"]["param"] == "model"
    # Said before any option is checked against its two-score rows.
    for path, request in (("/v1/embeddings", {"input": "x", "model": "reranker",
                                              "dimensions": 5}),
                          ("/v2/embed", {"texts": ["x"], "model": "reranker",
                                         "input_type": "search_query",
                                         "embedding_types": ["int8"]})):
        status, _, body = ml_server.request("POST", path, request)
        assert status == 400 and "does not embed" in str(body), (path, body)
    tei_rerank(ml_server, QUERY, DOCUMENTS[:2])
    text = _metrics_text(ml_server)
    assert 'method="cross-encoder"' in text and 'route="/rerank"' in text
    assert 'kind="reranker"' in text
    # Its tokens under the label its passes have (the model's id), not its served name.
    passes = {line.split("{")[1].split("}")[0] for line in text.splitlines()
              if line.startswith("embedserve_batch_duration_seconds_count{")}
    tokens = {line.split("{")[1].split("}")[0] for line in text.splitlines()
              if line.startswith("embedserve_tokens_embedded_total{")}
    assert tokens <= passes, (tokens, passes)


def _metrics_text(srv: Server) -> str:
    import http.client
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_the_cohere_sdk_reranks_unmodified(ml_server: Server, reference: Any) -> None:
    cohere = pytest.importorskip("cohere")
    expected = predict(reference, QUERY, DOCUMENTS)
    client = cohere.ClientV2(base_url=ml_server.url, api_key="unused")
    response = client.rerank(model="reranker", query=QUERY, documents=DOCUMENTS, top_n=4)
    assert [r.index for r in response.results] == ranked(expected)[:4]
    assert all(abs(r.relevance_score - expected[r.index]) <= TOLERANCE
               for r in response.results)
    v1 = cohere.Client(base_url=ml_server.url, api_key="unused")
    response = v1.rerank(model="reranker", query=QUERY, documents=DOCUMENTS,
                         return_documents=True)
    check([(r.index, r.relevance_score) for r in response.results], expected)
    assert [r.document.text for r in response.results] == \
        [DOCUMENTS[i] for i in ranked(expected)]


def test_a_plain_transformers_folder_is_served_as_a_reranker(folders: dict[str, str],
                                                              reference: Any) -> None:
    # No sentence-transformers files: its config.json's architecture says reranker.
    srv = start_server("--backend", "transformers", "--model", folders["plain"], timeout=180)
    try:
        assert srv.request("GET", "/info")[2]["kind"] == "reranker"
        check([(r["index"], r["score"]) for r in tei_rerank(srv, QUERY, DOCUMENTS)],
              predict(reference, QUERY, DOCUMENTS))
    finally:
        assert srv.stop() == 0


def test_the_python_client_reranks_with_the_servers_reranker(ml_server: Server,
                                                             reference: Any) -> None:
    from embedserve import Client
    expected = predict(reference, QUERY, DOCUMENTS)
    with Client(ml_server.url, autostart=False, fallback="never") as client:
        result = client.rerank(QUERY, DOCUMENTS, top_n=3)
        assert (result.model, result.method, result.source) == ("reranker", "cross-encoder",
                                                                "server")
        assert [r.index for r in result] == ranked(expected)[:3]
        assert all(abs(r.score - expected[r.index]) <= TOLERANCE for r in result)
        by_embeddings = client.rerank(QUERY, DOCUMENTS, model="embedder")
        assert by_embeddings.method == "embeddings" and len(by_embeddings) == len(DOCUMENTS)


def test_sides_far_over_the_limit_are_cut_as_the_library_cuts_them(ml_server: Server,
                                                                   reference: Any) -> None:
    # Cut before tokenizing (far over 64 tokens x 16 characters), sparse in tokens (runs of
    # spaces), or both sides long: the ids, so the scores, are CrossEncoder's own.
    query = "the quick brown fox jumps " * 300
    documents = ["hello world " * 500, "a cat", "cat" + " " * 3000 + "dog sat on the mat",
                 "json file parse " * 200 + "the end"]
    expected = predict(reference, query, documents)
    check([(r["index"], r["score"]) for r in tei_rerank(ml_server, query, documents)], expected)
