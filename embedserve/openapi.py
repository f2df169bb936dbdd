"""The OpenAPI 3 description of every route, built from the running service so that
limits, dimensions, model names and prompts in the schemas are the real ones."""

from __future__ import annotations

from typing import Any

from embedserve import __version__
from embedserve.service import EmbeddingService


def build_openapi(service: EmbeddingService) -> dict[str, Any]:
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
    ref = _ref

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
            "dimensions": dimensions,
            **({"prompt_name": {"type": "string", "enum": prompts}} if prompts else {}),
        }, required=["inputs"]),
        "TEIEmbedResponse": {"type": "array", "items": vector},
        "TEIError": _object({"error": {"type": "string"}, "error_type": {"type": "string"}},
                            required=["error", "error_type"]),
        "TEITokenizeRequest": _object({"inputs": texts,
                                       "add_special_tokens": {"type": "boolean"}},
                                      required=["inputs"]),
        "TEITokenizeResponse": {"type": "array", "items": {"type": "array", "items": _object({
            "id": {"type": "integer"}, "text": {"type": "string"},
            "special": {"type": "boolean"}, "start": {"type": ["integer", "null"]},
            "stop": {"type": ["integer", "null"]}},
            required=["id", "text", "special", "start", "stop"])}},
        "OllamaEmbedRequest": _object({
            "model": ollama_model, "input": texts, "truncate": {"type": "boolean"},
            "dimensions": dimensions, "keep_alive": {"type": ["string", "number"]},
            "options": {"type": "object"}}, required=["model", "input"]),
        "OllamaEmbedResponse": _object({
            "model": {"type": "string"}, "embeddings": {"type": "array", "items": vector},
            "prompt_eval_count": {"type": "integer"}}, required=["model", "embeddings"]),
        "OllamaEmbeddingsRequest": _object({"model": ollama_model, "prompt": text},
                                           required=["model", "prompt"]),
        "OllamaEmbeddingsResponse": _object({"embedding": vector}, required=["embedding"]),
        "OllamaError": _object({"error": {"type": "string"}}, required=["error"]),
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

    def op(summary: str, response: str | None, error: str, body: str | None = None,
           content_type: str = "application/json") -> dict[str, Any]:
        operation: dict[str, Any] = {"summary": summary, "responses": {
            "200": {"description": "OK", "content": {
                content_type: {"schema": ref(response) if response else {"type": "string"}}}},
            "default": {"description": "error", "content": {
                "application/json": {"schema": ref(error)}}},
        }}
        if body:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": ref(body)}}}
        return operation

    text_plain = "text/plain"
    paths = {
        "/health": {"get": op("Ready?", "Health", "TEIError")},
        "/info": {"get": op("Backend, model and limits", "Info", "TEIError")},
        "/metrics": {"get": op("Prometheus metrics", None, "TEIError", content_type=text_plain)},
        "/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {
                "type": "object"}}}}}}},
        "/v1/models": {"get": op("Served models (OpenAI)", "Models", "OpenAIError")},
        "/v1/embeddings": {"post": op("Embed (OpenAI)", "OpenAIEmbeddingResponse",
                                      "OpenAIError", "OpenAIEmbeddingRequest")},
        "/embeddings": {"post": op("Embed (OpenAI, no /v1)", "OpenAIEmbeddingResponse",
                                   "OpenAIError", "OpenAIEmbeddingRequest")},
        "/embed": {"post": op("Embed (TEI)", "TEIEmbedResponse", "TEIError", "TEIEmbedRequest")},
        "/": {"post": op("Embed (TEI, as huggingface_hub posts it)", "TEIEmbedResponse",
                         "TEIError", "TEIEmbedRequest"),
              "get": op("Liveness, as Ollama answers it", None, "TEIError",
                        content_type=text_plain)},
        "/tokenize": {"post": op("Tokenize (TEI)", "TEITokenizeResponse", "TEIError",
                                 "TEITokenizeRequest")},
        "/api/embed": {"post": op("Embed (Ollama)", "OllamaEmbedResponse", "OllamaError",
                                  "OllamaEmbedRequest")},
        "/api/embeddings": {"post": op("Embed one prompt (Ollama, legacy)",
                                       "OllamaEmbeddingsResponse", "OllamaError",
                                       "OllamaEmbeddingsRequest")},
        "/api/tags": {"get": op("Served models (Ollama)", None, "OllamaError")},
        "/api/version": {"get": op("Version (Ollama)", None, "OllamaError")},
    }
    for route in ("/api/tags", "/api/version"):
        paths[route]["get"]["responses"]["200"]["content"]["application/json"] = {
            "schema": {"type": "object"}}
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "embedserve", "version": __version__,
                 "description": f"Text embeddings: {info['model']} ({info['backend']})."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if service.config.api_key:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
        paths["/health"]["get"]["security"] = []
    return spec


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], *, required: list[str]) -> dict[str, Any]:
    # Optional fields may also be null: the server treats null as "not given".
    return {"type": "object", "required": required, "properties": {
        name: schema if name in required else {"anyOf": [schema, {"type": "null"}]}
        for name, schema in properties.items()}}
