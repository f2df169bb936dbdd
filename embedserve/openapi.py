"""The OpenAPI 3 description of every route, built from the routes' records (routing.py)
and the running service, so that paths, methods, limits, dimensions, model names and
prompts in the document are the real ones."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from embedserve import __version__
from embedserve.cohere import INPUT_TYPES, TRUNCATE
from embedserve.quantize import EMBEDDING_TYPES
from embedserve.routing import Method, Route
from embedserve.service import EmbeddingService


def build_openapi(service: EmbeddingService, routes: Iterable[Route]) -> dict[str, Any]:
    info = service.info()
    dims = int(info["dimensions"])  # type: ignore[call-overload]
    names = list(service.model_names().accepted)
    batch = service.config.max_batch_size
    text = {"type": "string", "minLength": 1}
    texts = {"oneOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": batch}]}
    dimensions = {"type": "integer", "minimum": 1, "maximum": dims}
    model = {"type": "string", "enum": names}
    ollama_model = {"type": "string", "enum": names + [f"{n}:latest" for n in names]}
    prompts = sorted(info["prompts"])  # type: ignore[call-overload]
    vector = {"type": "array", "items": {"type": "number"}}
    by_type = _object({  # Cohere's embeddings_by_type: each type asked for
        "float": {"type": "array", "items": vector},
        "base64": {"type": "array", "items": {"type": "string", "format": "byte"}},
        **{kind: {"type": "array", "items": {"type": "array", "items": {
            "type": "integer", "minimum": low, "maximum": low + 255}}}
           for kind, low in (("int8", -128), ("uint8", 0), ("binary", -128), ("ubinary", 0))}},
        required=[])
    keep_alive = {"oneOf": [  # seconds, or a Go duration
        {"type": "number"},
        {"type": "string", "pattern": r"^(-?[0-9]+(\.[0-9]+)?|-?([0-9]+(\.[0-9]+)?(ms|h|m|s))+)$"}]}

    schemas: dict[str, Any] = {
        "OpenAIEmbeddingRequest": _object({
            "input": texts, "model": model, "dimensions": dimensions, "user": {"type": "string"},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        }, required=["input"]),
        "OpenAIEmbeddingResponse": _object({
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _object({
                "object": {"type": "string", "enum": ["embedding"]},
                "index": {"type": "integer", "minimum": 0},
                "embedding": {"oneOf": [vector, {"type": "string", "format": "byte"}]},
            }, required=["object", "index", "embedding"])},
            "model": {"type": "string"},
            "usage": _object({"prompt_tokens": {"type": "integer"},
                              "total_tokens": {"type": "integer"}},
                             required=["prompt_tokens", "total_tokens"]),
        }, required=["object", "data", "model", "usage"]),
        "OpenAIError": _object({"error": _object({
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
        }, required=["message", "type", "param", "code"])}, required=["error"]),
        "TEIEmbedRequest": _object({
            "inputs": texts, "normalize": {"type": "boolean"}, "truncate": {"type": "boolean"},
            "truncation_direction": {"type": "string", "enum": ["Left", "Right"]},
            "dimensions": dimensions, "model": model,
            **({"prompt_name": {"type": "string", "enum": prompts}} if prompts else {}),
        }, required=["inputs"]),
        "TEIEmbedResponse": {"type": "array", "items": vector},
        "TEIError": _object({"error": {"type": "string"}, "error_type": {"type": "string"}},
                            required=["error", "error_type"]),
        "TEITokenizeRequest": _object({"inputs": texts, "model": model,
                                       "add_special_tokens": {"type": "boolean"}},
                                      required=["inputs"]),
        "TEITokenizeResponse": {"type": "array", "items": {"type": "array", "items": _object({
            "id": {"type": "integer"}, "text": {"type": "string"},
            "special": {"type": "boolean"}, "start": {"type": ["integer", "null"]},
            "stop": {"type": ["integer", "null"]}},
            required=["id", "text", "special", "start", "stop"])}},
        # Ollama's input may be left out, "" or []: a request to load (or unload) the model.
        "OllamaEmbedRequest": _object({
            "model": ollama_model, "truncate": {"type": "boolean"},
            "input": {"oneOf": [{"type": "string"},
                                {"type": "array", "items": text, "maxItems": batch}]},
            "dimensions": dimensions, "keep_alive": keep_alive,
            "options": {"type": "object"}}, required=["model"]),
        "OllamaEmbedResponse": _object({
            "model": {"type": "string"}, "embeddings": {"type": "array", "items": vector},
            "prompt_eval_count": {"type": "integer"}}, required=["model", "embeddings"]),
        "OllamaEmbeddingsRequest": _object({
            "model": ollama_model, "prompt": {"type": "string"}, "keep_alive": keep_alive,
            "options": {"type": "object"}}, required=["model"]),
        "OllamaEmbeddingsResponse": _object({"embedding": vector}, required=["embedding"]),
        "OllamaError": _object({"error": {"type": "string"}}, required=["error"]),
        "OllamaShowRequest": _object({"model": ollama_model, "name": ollama_model,
                                      "verbose": {"type": "boolean"}}, required=[]) | {
            "anyOf": [{"required": [field], "properties": {field: {"type": "string"}}}
                      for field in ("model", "name")]},  # "name": older clients
        **_rerank_schemas(service, text, model, prompts),
        "CohereEmbedRequest": _object({
            "model": model, "texts": {"type": "array", "items": text, "minItems": 1,
                                      "maxItems": batch},
            "inputs": {"type": "array", "minItems": 1, "maxItems": batch, "items": _object({
                "content": {"type": "array", "minItems": 1, "items": _object({
                    "type": {"type": "string", "enum": ["text"]}, "text": text},
                    required=["type", "text"])}}, required=["content"])},
            "input_type": {"type": "string", "enum": list(INPUT_TYPES)},
            "embedding_types": {"type": "array", "minItems": 1, "items": {
                "type": "string", "enum": list(EMBEDDING_TYPES)}},
            "truncate": {"type": "string", "enum": list(TRUNCATE)},
            "output_dimension": dimensions, "priority": {"type": "integer"},
        }, required=[]) | {"oneOf": [  # texts or inputs, exactly one of them
            {"required": [field], "properties": {field: {"type": "array"}}}
            for field in ("texts", "inputs")]},
        "CohereEmbedResponse": _object({
            "id": {"type": "string"},
            "embeddings": by_type,
            "texts": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object"},
            "response_type": {"type": "string", "enum": ["embeddings_by_type"]},
        }, required=["id", "embeddings", "texts", "meta"]),
        # v1 without embedding_types: the float vectors themselves.
        "CohereV1EmbedResponse": _object({
            "id": {"type": "string"},
            "embeddings": {"oneOf": [by_type, {"type": "array", "items": vector}]},
            "texts": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object"},
            "response_type": {"type": "string",
                              "enum": ["embeddings_by_type", "embeddings_floats"]},
        }, required=["id", "embeddings", "texts", "meta", "response_type"]),
        "Health": _object({"status": {"type": "string"}}, required=["status"]),
        "Info": _object({
            "backend": {"type": "string"}, "model": {"type": "string"},
            "dimensions": {"type": "integer"}, "device": {"type": "string"},
            "max_input_tokens": {"type": ["integer", "null"]},
            "max_batch_size": {"type": "integer"}, "version": {"type": "string"},
            "workers": {"type": "integer"}, "restarts": {"type": "integer"},
        }, required=["backend", "model", "dimensions", "device", "max_input_tokens",
                     "version"]),
        "Models": _object({"object": {"type": "string"}, "data": {"type": "array"}},
                          required=["object", "data"]),
    }

    keyed = bool(service.config.api_key)
    paths = {route.path: {
        # HEAD is left out: it is its GET without the body, and described, schema checkers
        # would expect a body.
        verb.lower(): _operation(method, _ERROR_SCHEMAS[route.dialect.name],
                                 keyed and route.open)
        for verb, method in route.methods.items() if verb != "HEAD"} for route in routes}
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "embedserve", "version": __version__,
                 "description": f"Text embeddings: {info['model']} ({info['backend']})."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if keyed:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    return spec


# Each dialect's error shape, by dialect name.
_ERROR_SCHEMAS = {"openai": "OpenAIError", "tei": "TEIError", "ollama": "OllamaError",
                  "cohere": "CohereError"}


def _rerank_schemas(service: EmbeddingService, text: dict[str, Any], model: dict[str, Any],
                    prompts: list[str]) -> dict[str, Any]:
    """/rerank, /similarity (TEI) and /v1/rerank, /v2/rerank (Cohere)."""
    most = service.config.max_rerank_documents
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": most}
    document = {"oneOf": [text, _object({"text": text}, required=["text"])]}
    score = {"type": "number"}
    index = {"type": "integer", "minimum": 0}
    count = {"type": "integer", "minimum": 0}
    return {
        "TEIRerankRequest": _object({
            "query": text, "texts": texts, "truncate": {"type": "boolean"},
            "truncation_direction": {"type": "string", "enum": ["Right"]},
            "raw_scores": {"type": "boolean"}, "return_text": {"type": "boolean"},
            "model": model,
        }, required=["query", "texts"]),
        "TEIRerankResponse": {"type": "array", "items": _object(
            {"index": index, "score": score, "text": {"type": "string"}},
            required=["index", "score"])},
        "TEISimilarityRequest": _object({
            "inputs": _object({"source_sentence": text, "sentences": texts},
                              required=["source_sentence", "sentences"]),
            "parameters": _object({
                "truncate": {"type": "boolean"},
                "truncation_direction": {"type": "string", "enum": ["Left", "Right"]},
                **({"prompt_name": {"type": "string", "enum": prompts}} if prompts else {}),
            }, required=[]),
            "model": model,
        }, required=["inputs"]),
        "TEISimilarityResponse": {"type": "array", "items": score},
        "CohereRerankRequest": _object({
            "model": model, "query": text,
            "documents": {"type": "array", "items": document, "minItems": 1,
                          "maxItems": most},
            "top_n": {"type": "integer", "minimum": 1},
            "return_documents": {"type": "boolean"},
            "max_tokens_per_doc": {"type": "integer", "minimum": 1},
        }, required=["query", "documents"]),
        "CohereRerankResponse": _object({
            "id": {"type": "string"},
            "results": {"type": "array", "items": _object({
                "index": index, "relevance_score": score,
                "document": _object({"text": {"type": "string"}}, required=["text"])},
                required=["index", "relevance_score"])},
            "model": {"type": "string"},
            "usage": _object({"total_tokens": count}, required=["total_tokens"]),
            "meta": {"type": "object"},
        }, required=["id", "results", "meta"]),
        "CohereError": _object({"id": {"type": "string"}, "message": {"type": "string"}},
                               required=["message"]),
    }


def _operation(method: Method, error_schema: str, without_key: bool) -> dict[str, Any]:
    if method.response:
        schema = _ref(method.response)
    else:  # not described beyond its type
        schema = {"type": "object" if method.content_type == "application/json" else "string"}
    operation: dict[str, Any] = {"summary": method.summary, "responses": {
        "200": {"description": "OK", "content": {method.content_type: {"schema": schema}}},
        "default": {"description": "error", "content": {
            "application/json": {"schema": _ref(error_schema)}}},
    }}
    if method.request:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _ref(method.request)}}}
    if without_key:
        operation["security"] = []  # overrides the document's: no API key needed
    return operation


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], *, required: list[str]) -> dict[str, Any]:
    # Optional fields may also be null: the server treats null as "not given".
    return {"type": "object", "required": required, "properties": {
        name: schema if name in required else {"anyOf": [schema, {"type": "null"}]}
        for name, schema in properties.items()}}
