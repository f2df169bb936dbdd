"""The route records (embedserve.routes.ROUTES) against a real server started with an API
key: every route they list is served, described in /openapi.json with exactly its methods,
open or closed to the key as its record says, and answers errors in its dialect's shape."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from embedserve.dialects import OLLAMA, OPENAI, TEI_DIALECT
from embedserve.errors import ApiError
from embedserve.routes import ROUTES
from embedserve.routing import Method, Reply, Route, RouteTable

from conftest import Server, start_server

KEY = "route-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "hash-v1-384"
# A valid body for each request schema a route may take: every route then answers 200,
# which shows the request reached its answer. A route taking a new schema fails here
# until it has a sample.
SAMPLE_BODIES: dict[str, Any] = {
    "OpenAIEmbeddingRequest": {"input": "a text"},
    "TEIEmbedRequest": {"inputs": "a text"},
    "TEITokenizeRequest": {"inputs": "a text"},
    "OllamaEmbedRequest": {"model": MODEL, "input": "a text"},
    "OllamaEmbeddingsRequest": {"model": MODEL, "prompt": "a text"},
    "OllamaShowRequest": {"model": MODEL},
    "TEIRerankRequest": {"query": "a query", "texts": ["a text", "another"]},
    "TEISimilarityRequest": {"inputs": {"source_sentence": "a text", "sentences": ["a"]}},
    "CohereRerankRequest": {"model": MODEL, "query": "a query", "documents": ["a text"]},
    "CohereEmbedRequest": {"model": MODEL, "texts": ["a text"],
                           "input_type": "search_document"},
}
ROUTE_METHODS = [(route.path, verb) for route in ROUTES for verb in route.methods]


@pytest.fixture(scope="module")
def keyed() -> Iterator[Server]:
    srv = start_server("--api-key", KEY)
    yield srv
    assert srv.stop() == 0


def call(srv: Server, verb: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request; the answer's body raw, as some routes answer text."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(verb, path, body=payload,
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def sample_body(method: Method) -> Any:
    return None if method.request is None else SAMPLE_BODIES[method.request]


def route(path: str) -> Route:
    found = ROUTES.get(path)
    assert found is not None
    return found


def same_shape(got: Any, expected: Any) -> bool:
    """The same keys at every level of nested objects (values aside)."""
    if isinstance(expected, dict):
        return isinstance(got, dict) and set(got) == set(expected) and all(
            same_shape(got[key], value) for key, value in expected.items())
    return True


# -- served ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path,verb", ROUTE_METHODS)
def test_every_route_method_is_served(keyed: Server, path: str, verb: str) -> None:
    method = route(path).methods[verb]
    status, headers, body = call(keyed, verb, path, sample_body(method), AUTH)
    assert status == 200, body[:300]
    # The content type its record describes in /openapi.json is the one it answers.
    media = headers["content-type"].split(";", 1)[0]
    assert media == method.content_type.split(";", 1)[0]
    if verb == "HEAD":
        assert body == b""
    elif media == "application/json":
        json.loads(body)


# -- described -----------------------------------------------------------------------------

def test_openapi_describes_exactly_the_routes_and_their_methods(keyed: Server) -> None:
    status, _, raw = call(keyed, "GET", "/openapi.json", headers=AUTH)
    assert status == 200
    spec = json.loads(raw)
    assert set(spec["paths"]) == {r.path for r in ROUTES}
    assert spec["security"] == [{"bearer": []}]
    for listed in ROUTES:
        described = spec["paths"][listed.path]
        # HEAD is its GET without the body, not described on its own.
        assert set(described) == {verb.lower() for verb in listed.methods if verb != "HEAD"}
        for verb, method in listed.methods.items():
            if verb == "HEAD":
                continue
            operation = described[verb.lower()]
            assert operation["summary"] == method.summary
            request = operation.get("requestBody", {}).get("content", {})
            assert (request["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                    if request else None) == method.request
            answer = operation["responses"]["200"]["content"]
            assert list(answer) == [method.content_type]
            if method.response:
                assert answer[method.content_type]["schema"]["$ref"].endswith(
                    "/" + method.response)
            # Open routes override the document's security with none.
            assert ("security" in operation) == listed.open
            if listed.open:
                assert operation["security"] == []


def test_every_schema_the_document_names_is_in_it(keyed: Server) -> None:
    spec = json.loads(call(keyed, "GET", "/openapi.json", headers=AUTH)[2])
    refs = set()

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            if "$ref" in value:
                refs.add(value["$ref"].rsplit("/", 1)[1])
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    collect(spec)
    assert refs and refs <= set(spec["components"]["schemas"])


# -- open or closed ----------------------------------------------------------------------------

@pytest.mark.parametrize("path,verb", ROUTE_METHODS)
def test_the_api_key_is_asked_exactly_where_the_record_says(keyed: Server, path: str,
                                                           verb: str) -> None:
    listed = route(path)
    body = sample_body(listed.methods[verb])
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, answer_headers, _ = call(keyed, verb, path, body, headers)
        if listed.open:
            assert status == 200, (path, verb, headers)
        else:
            assert status == 401, (path, verb, headers)
            assert answer_headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", [r.path for r in ROUTES])
def test_options_never_needs_the_key(keyed: Server, path: str) -> None:
    # A browser's CORS preflight carries no credentials.
    status, headers, _ = call(keyed, "OPTIONS", path)
    assert status == 204
    assert headers["allow"] == ", ".join(sorted({*route(path).methods, "OPTIONS"}))


def test_options_asterisk_lists_every_method_the_server_answers(keyed: Server) -> None:
    # "OPTIONS *" asks about the server as a whole (a 404 "no route '*'" before).
    status, headers, body = call(keyed, "OPTIONS", "*")
    assert status == 204 and body == b""
    assert headers["allow"] == "GET, HEAD, OPTIONS, POST"
    assert call(keyed, "GET", "*")[0] == 404  # the asterisk form is OPTIONS's alone


# -- errors in the route's dialect ---------------------------------------------------------------

@pytest.mark.parametrize("path", [r.path for r in ROUTES])
def test_a_routes_errors_come_in_its_dialect(keyed: Server, path: str) -> None:
    listed = route(path)
    assert "DELETE" not in listed.methods  # so that it is a 405 on every route
    status, headers, body = call(keyed, "DELETE", path, headers=AUTH)
    assert status == 405 and headers["allow"] == listed.allowed
    expected = listed.dialect.error_body(ApiError(405, "not allowed"))
    assert same_shape(json.loads(body), expected), body


@pytest.mark.parametrize("path,dialect", [
    ("/v1/no-such-route", OPENAI), ("/api/no-such-route", OLLAMA),
    ("/no-such-route", TEI_DIALECT), ("/embed/no-such-route", TEI_DIALECT),
    ("/embeddings/no-such-route", OPENAI),
])
def test_a_path_that_is_no_route_takes_its_segments_dialect(keyed: Server, path: str,
                                                            dialect: Any) -> None:
    assert ROUTES.dialect_for(path).name == dialect.name
    status, _, body = call(keyed, "GET", path + "?q=1", headers=AUTH)
    assert status == 404
    assert same_shape(json.loads(body), dialect.error_body(ApiError(404, "none")))


def test_the_dialect_of_a_route_ignores_the_query() -> None:
    for listed in ROUTES:
        assert ROUTES.dialect_for(listed.path + "?x=1&y=/api/") is listed.dialect


# -- the table itself ----------------------------------------------------------------------------

def _answer(exchange: Any) -> Reply:
    return Reply({})


def test_a_path_has_one_record() -> None:
    method = Method(_answer, "anything")
    with pytest.raises(ValueError, match="two routes for /x"):
        RouteTable.of([Route("/x", OPENAI, {"GET": method}),
                       Route("/x", TEI_DIALECT, {"POST": method})], TEI_DIALECT)


def test_a_segment_of_mixed_dialects_claims_no_unknown_path() -> None:
    method = Method(_answer, "anything")
    table = RouteTable.of([Route("/mixed/a", OPENAI, {"GET": method}),
                           Route("/mixed/b", OLLAMA, {"GET": method}),
                           Route("/one/a", OLLAMA, {"GET": method})], TEI_DIALECT)
    assert table.dialect_for("/mixed/c") is TEI_DIALECT
    assert table.dialect_for("/one/c") is OLLAMA


def test_records_are_read_only() -> None:
    listed = route("/health")
    with pytest.raises(TypeError):
        listed.methods["DELETE"] = listed.methods["GET"]  # type: ignore[index]
