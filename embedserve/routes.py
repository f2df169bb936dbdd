"""This server's routes: one record each (see routing.py), and the answers they run. An
answer fetches what it needs from the service and hands it to a dialect, which gives it its
shape; HTTP itself (framing, limits, auth, writing) is handler.py's.
"""

from __future__ import annotations

import time

from embedserve import __version__, scoring
from embedserve.cohere import COHERE, COHERE_V1_EMBED
from embedserve.dialects import OLLAMA, OLLAMA_LEGACY, OPENAI, TEI_DIALECT
from embedserve.errors import ApiError
from embedserve.openapi import build_openapi
from embedserve.rerank_dialects import COHERE_V1, COHERE_V2, TEI_RERANK, Cohere
from embedserve.routing import Exchange, Method, Reply, Route, RouteTable

# /tokenize answers ~15x its input in JSON: its texts are bounded in characters.
MAX_TOKENIZE_CHARS = 256 * 1024


def health(exchange: Exchange) -> Reply:
    if exchange.draining:
        raise ApiError(503, "draining: this worker is shutting down")
    if not exchange.service.ready:
        raise ApiError(503, "loading: the model is not ready yet", headers={"Retry-After": "1"})
    return Reply({"status": "ok"})


def info(exchange: Exchange) -> Reply:
    return Reply(exchange.service.info())


def metrics(exchange: Exchange) -> Reply:
    text = exchange.service.render_metrics()
    return Reply(text.encode(), "text/plain; version=0.0.4; charset=utf-8")


def openapi(exchange: Exchange) -> Reply:
    return Reply(build_openapi(exchange.service, ROUTES))


def openai_models(exchange: Exchange) -> Reply:
    service = exchange.service
    return Reply(OPENAI.render_models(service.model_names().listed, service.started))


def ollama_tags(exchange: Exchange) -> Reply:
    service = exchange.service
    return Reply(OLLAMA.render_tags(service.listed_models(), service.started))


def ollama_ps(exchange: Exchange) -> Reply:
    return Reply(OLLAMA.render_ps(exchange.service.loaded_models()))


def ollama_show(exchange: Exchange) -> Reply:
    service = exchange.service
    name = OLLAMA.parse_show(exchange.read_json())
    return Reply(OLLAMA.render_show(service.model_info(name), service.started))


def ollama_version(exchange: Exchange) -> Reply:
    return Reply(OLLAMA.render_version(__version__))


def ollama_running(exchange: Exchange) -> Reply:
    return Reply(OLLAMA.running_text, "text/plain; charset=utf-8")


def tei_tokenize(exchange: Exchange) -> Reply:
    service = exchange.service
    with exchange.admit():
        request = TEI_DIALECT.parse_tokenize(exchange.read_json(), service.config.max_batch_size,
                                             MAX_TOKENIZE_CHARS)
        tokens = service.tokenize(request.texts, request.add_special_tokens, request.model)
        return Reply(TEI_DIALECT.render_tokens(tokens))


def embed(exchange: Exchange) -> Reply:
    """Every dialect's embedding route: the route's dialect parses and renders."""
    service, dialect = exchange.service, exchange.dialect
    with exchange.admit():
        request = dialect.parse(exchange.read_json(), service.config.max_batch_size)
        computing = time.monotonic()
        result = service.embed(request, exchange.client_gone)
        body = dialect.render(request, result)
    now = time.monotonic()
    # TEI's timing headers, for clients and proxies that log them.
    return Reply(body, headers={
        "x-compute-time": f"{(now - computing) * 1000:.3f}",
        "x-total-time": f"{(now - exchange.started) * 1000:.3f}",
        "x-compute-characters": str(sum(map(len, request.texts))),
        "x-compute-tokens": str(result.prompt_tokens),
    })


def tei_rerank(exchange: Exchange) -> Reply:
    service = exchange.service
    with exchange.admit():
        payload = exchange.read_json()
        request = TEI_RERANK.parse_rerank(payload, service.config.max_rerank_documents)
        TEI_RERANK.check_return_text(payload)
        result = scoring.rerank(service, request, exchange.client_gone)
        return Reply(TEI_RERANK.render_rerank(payload, request, result))


def cohere_rerank(exchange: Exchange) -> Reply:
    """Cohere's /v1/rerank and /v2/rerank (the route's dialect holds the version)."""
    service, dialect = exchange.service, exchange.dialect
    assert isinstance(dialect, Cohere)
    with exchange.admit():
        payload = exchange.read_json()
        request = dialect.parse_rerank(payload, service.config.max_rerank_documents)
        result = scoring.rerank(service, request, exchange.client_gone)
        return Reply(dialect.render_rerank(payload, request, result))


def tei_similarity(exchange: Exchange) -> Reply:
    service = exchange.service
    with exchange.admit():
        request = TEI_RERANK.parse_similarity(exchange.read_json(),
                                              service.config.max_rerank_documents)
        return Reply(scoring.similarity(service, request, exchange.client_gone))


# TEI's shape for paths no dialect claims: TEI's API is this server's own (/embed, /info).
ROUTES = RouteTable.of([
    Route("/health", TEI_DIALECT, {"GET": Method(health, "Ready?", response="Health")},
          open=True),
    Route("/info", TEI_DIALECT, {"GET": Method(info, "Backend, model and limits",
                                               response="Info")}),
    Route("/metrics", TEI_DIALECT, {"GET": Method(metrics, "Prometheus metrics",
                                                  content_type="text/plain")}),
    Route("/openapi.json", TEI_DIALECT, {"GET": Method(openapi, "This document")}),
    Route("/v1/models", OPENAI, {"GET": Method(openai_models, "Served models (OpenAI)",
                                               response="Models")}),
    Route("/v1/embeddings", OPENAI, {"POST": Method(
        embed, "Embed (OpenAI)", "OpenAIEmbeddingRequest", "OpenAIEmbeddingResponse")}),
    Route("/embeddings", OPENAI, {"POST": Method(
        embed, "Embed (OpenAI, no /v1)", "OpenAIEmbeddingRequest", "OpenAIEmbeddingResponse")}),
    Route("/embed", TEI_DIALECT, {"POST": Method(
        embed, "Embed (TEI)", "TEIEmbedRequest", "TEIEmbedResponse")}),
    # huggingface_hub's InferenceClient(model=URL) posts to the URL itself; GET is Ollama's.
    Route("/", TEI_DIALECT, {
        "POST": Method(embed, "Embed (TEI, as huggingface_hub posts it)", "TEIEmbedRequest",
                       "TEIEmbedResponse"),
        "GET": Method(ollama_running, "Liveness, as Ollama answers it",
                      content_type="text/plain")}),
    Route("/tokenize", TEI_DIALECT, {"POST": Method(
        tei_tokenize, "Tokenize (TEI)", "TEITokenizeRequest", "TEITokenizeResponse")}),
    Route("/rerank", TEI_RERANK, {"POST": Method(
        tei_rerank, "Rerank texts against a query (TEI)", "TEIRerankRequest",
        "TEIRerankResponse")}),
    Route("/similarity", TEI_RERANK, {"POST": Method(
        tei_similarity, "Cosine similarity of sentences to a source sentence (TEI)",
        "TEISimilarityRequest", "TEISimilarityResponse")}),
    Route("/v1/rerank", COHERE_V1, {"POST": Method(
        cohere_rerank, "Rerank documents against a query (Cohere v1, Jina)",
        "CohereRerankRequest", "CohereRerankResponse")}, claims_segment=False),
    Route("/v2/rerank", COHERE_V2, {"POST": Method(
        cohere_rerank, "Rerank documents against a query (Cohere v2)", "CohereRerankRequest",
        "CohereRerankResponse")}),
    Route("/api/embed", OLLAMA, {"POST": Method(
        embed, "Embed (Ollama)", "OllamaEmbedRequest", "OllamaEmbedResponse")}),
    Route("/api/embeddings", OLLAMA_LEGACY, {"POST": Method(
        embed, "Embed one prompt (Ollama, legacy)", "OllamaEmbeddingsRequest",
        "OllamaEmbeddingsResponse")}),
    Route("/v2/embed", COHERE, {"POST": Method(
        embed, "Embed (Cohere v2): floats and int8, uint8, binary, ubinary, base64",
        "CohereEmbedRequest", "CohereEmbedResponse")}),
    Route("/v1/embed", COHERE_V1_EMBED, {"POST": Method(
        embed, "Embed (Cohere v1): as /v2/embed; without embedding_types, a list of floats",
        "CohereEmbedRequest", "CohereV1EmbedResponse")}, claims_segment=False),
    Route("/api/tags", OLLAMA, {"GET": Method(ollama_tags, "Served models (Ollama)")}),
    Route("/api/ps", OLLAMA, {"GET": Method(ollama_ps, "Models loaded now (Ollama)")}),
    Route("/api/show", OLLAMA, {"POST": Method(
        ollama_show, "What a served model is (Ollama): its size and input limit in model_info",
        "OllamaShowRequest")}),
    Route("/api/version", OLLAMA, {"GET": Method(ollama_version, "Version (Ollama)")}),
], default_dialect=TEI_DIALECT)
