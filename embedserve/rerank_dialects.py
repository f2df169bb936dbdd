"""The rerank and similarity routes' dialects: TEI's /rerank and /similarity, and the
Cohere-style /v1/rerank and /v2/rerank (Cohere's API, which Jina's and others' copy). Each
turns its request JSON into a RerankRequest or SimilarityRequest (the core's types) and
renders the answer in its own shape. Nothing here knows HTTP or backends.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from embedserve.cohere import COHERE
from embedserve.dialects import TEI, _json_type, _object, _optional
from embedserve.errors import ApiError, EmptyInput, quoted
from embedserve.requests import RerankRequest, RerankResult, SimilarityRequest


def _text(value: Any, field: str) -> str:
    if value is None:
        raise ApiError(400, f"'{field}' is required", param=field)
    if not isinstance(value, str):
        raise ApiError(400, f"'{field}' must be a string, got {_json_type(value)}",
                       param=field)
    if not value:
        raise EmptyInput(f"'{field}' is an empty string", param=field)
    return value


def _documents(value: Any, field: str, limit: int, objects: bool) -> list[str]:
    """A non-empty list of non-empty strings (with `objects`: or of objects whose 'text' is
    one, as Cohere's v1 and Jina's APIs take them), at most `limit` of them."""
    if value is None:
        raise ApiError(400, f"'{field}' is required", param=field)
    if not isinstance(value, list):
        raise ApiError(400, f"'{field}' must be a list of strings, got {_json_type(value)}",
                       param=field)
    if not value:
        raise EmptyInput(f"'{field}' must not be an empty list", param=field)
    if len(value) > limit:
        raise ApiError(413, f"'{field}' has {len(value)} items; the limit is {limit} per "
                            "request (--max-rerank-documents)", param=field)
    texts = []
    for i, item in enumerate(value):
        if objects and isinstance(item, dict):
            item = item.get("text")
            if not isinstance(item, str):
                raise ApiError(400, f"'{field}[{i}]' is an object without a 'text' string",
                               param=field)
        elif not isinstance(item, str):
            kinds = "a string or an object with 'text'" if objects else "a string"
            raise ApiError(400, f"'{field}[{i}]' must be {kinds}, got {_json_type(item)}",
                           param=field)
        if not item:
            raise EmptyInput(f"'{field}[{i}]' is an empty string", param=field)
        texts.append(item)
    return texts


def _at_least(body: dict[str, Any], field: str, least: int = 1) -> int | None:
    value = _optional(body, field, int, "an integer")
    if value is not None and value < least:
        raise ApiError(422, f"'{field}' must be at least {least}, got {quoted(value)}", param=field)
    return value


class TEIRerank(TEI):
    """POST /rerank and POST /similarity, as text-embeddings-inference takes and answers
    them (its error shape too)."""

    def parse_rerank(self, payload: Any, max_documents: int) -> RerankRequest:
        body = _object(payload)
        truncate = _optional(body, "truncate", bool, "a boolean")
        direction = _optional(body, "truncation_direction", str, "a string")
        if direction not in (None, "Right", "right"):
            # A pair is cut 'longest_first', from the right, as the libraries cut it.
            raise ApiError(422, "'truncation_direction' must be 'Right' for rerank: a pair "
                                "loses tokens from the end of its longer side",
                           param="truncation_direction")
        return RerankRequest(
            query=_text(body.get("query"), "query"),
            documents=_documents(body.get("texts"), "texts", max_documents, objects=False),
            truncate=True if truncate is None else truncate,
            raw_scores=bool(_optional(body, "raw_scores", bool, "a boolean")),
            # Not TEI's (one model a server): which of several, as on /embed.
            model=_optional(body, "model", str, "a string"),
        )

    def render_rerank(self, payload: Any, request: RerankRequest, result: RerankResult
                      ) -> list[dict[str, Any]]:
        return_text = bool(payload.get("return_text")) if isinstance(payload, dict) else False
        return [{"index": r.index, "score": r.score,
                 **({"text": request.documents[r.index]} if return_text else {})}
                for r in result.ranked]

    def check_return_text(self, payload: Any) -> None:
        _optional(_object(payload), "return_text", bool, "a boolean")

    def parse_similarity(self, payload: Any, max_sentences: int) -> SimilarityRequest:
        body = _object(payload)
        inputs = body.get("inputs")
        if not isinstance(inputs, dict):
            raise ApiError(400, "'inputs' must be an object with 'source_sentence' and "
                                f"'sentences', got {_json_type(inputs)}", param="inputs")
        parameters = body.get("parameters")
        if parameters is None:
            parameters = {}
        elif not isinstance(parameters, dict):
            raise ApiError(400, f"'parameters' must be an object, got "
                                f"{_json_type(parameters)}", param="parameters")
        truncate = _optional(parameters, "truncate", bool, "a boolean")
        direction = _optional(parameters, "truncation_direction", str, "a string")
        if direction not in (None, "Right", "Left", "right", "left"):
            raise ApiError(422, "'truncation_direction' must be 'Right' or 'Left'",
                           param="truncation_direction")
        return SimilarityRequest(
            source=_text(inputs.get("source_sentence"), "source_sentence"),
            sentences=_documents(inputs.get("sentences"), "sentences", max_sentences,
                                 objects=False),
            truncate=True if truncate is None else truncate,
            truncate_left=direction in ("Left", "left"),
            prompt_name=_optional(parameters, "prompt_name", str, "a string"),
            model=_optional(body, "model", str, "a string"),
        )


class Cohere:
    """POST /v1/rerank and /v2/rerank: Cohere's rerank API (Jina's /v1/rerank is the same
    shape). Errors are Cohere's: {"id", "message"}."""

    name = "cohere"

    def __init__(self, version: str) -> None:
        self.version = version

    def parse_rerank(self, payload: Any, max_documents: int) -> RerankRequest:
        body = _object(payload)
        _optional(body, "return_documents", bool, "a boolean")
        # Accepted as the SDKs send them, and unused.
        _at_least(body, "max_chunks_per_doc")
        _at_least(body, "priority", 0)
        fields = body.get("rank_fields")
        if fields is not None and fields != ["text"]:
            raise ApiError(422, "'rank_fields' other than [\"text\"] are not supported: "
                                "send each document's text", param="rank_fields")
        if _optional(body, "relevant_spans", bool, "a boolean"):
            raise ApiError(422, "'relevant_spans' is not supported", param="relevant_spans")
        return RerankRequest(
            query=_text(body.get("query"), "query"),
            documents=_documents(body.get("documents"), "documents", max_documents,
                                 objects=True),
            model=_optional(body, "model", str, "a string"),
            top_n=_at_least(body, "top_n"),
            max_tokens_per_doc=_at_least(body, "max_tokens_per_doc"),
        )

    def render_rerank(self, payload: Any, request: RerankRequest, result: RerankResult
                      ) -> dict[str, Any]:
        documents = bool(payload.get("return_documents"))
        results = [{"index": r.index, "relevance_score": r.score,
                    **({"document": {"text": request.documents[r.index]}}
                       if documents else {})} for r in result.ranked]
        return {"id": str(uuid.uuid4()), "results": results, "model": result.model,
                "usage": {"total_tokens": result.tokens},
                "meta": {"api_version": {"version": self.version},
                         "billed_units": {"search_units": 1},
                         "tokens": {"input_tokens": result.tokens, "output_tokens": 0}}}

    def error_body(self, error: ApiError) -> Any:
        return COHERE.error_body(error)  # one error shape for every Cohere route

    # The Dialect protocol's embedding half: these routes embed nothing.
    def parse(self, payload: Any, max_batch_size: int) -> Any:
        raise ApiError(404, "this route does not embed")

    def render(self, request: Any, result: Any) -> bytes:
        return json.dumps(None).encode()


TEI_RERANK = TEIRerank()
COHERE_V1 = Cohere("1")
COHERE_V2 = Cohere("2")
