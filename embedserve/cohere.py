"""Cohere's embed API (POST /v2/embed, and /v1/embed), as the `cohere` SDK's ClientV2.embed
and Client.embed send it: texts (or text-only `inputs`), input_type, embedding_types,
truncate, output_dimension; answered with every embedding type asked for, floats and compact
codes alike (v1 without embedding_types: a plain list of float vectors, as Cohere's v1 API).
Like dialects.py, it knows nothing of HTTP or backends: the core computes the codes
(quantize.py), this gives them Cohere's shape.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from embedserve.dialects import _json_type, _object, _optional, texts_from
from embedserve.encoding import float32_base64_json, float_array_json
from embedserve.errors import ApiError, quoted
from embedserve.quantize import BASE64, EMBEDDING_TYPES, FLOAT, codes_json
from embedserve.requests import EmbedRequest, EmbedResult

INPUT_TYPES = ("search_query", "search_document", "classification", "clustering")
# Cohere's truncate: START cuts the start of an over-long text (keeps its end), END its
# end (the default), NONE refuses it with a 422 that names the model's limit.
TRUNCATE = ("NONE", "START", "END")


@dataclass(frozen=True)
class CohereEmbedRequest(EmbedRequest):
    # Every type asked for, in the order asked: floats and base64 are the dialect's to
    # render; the compact ones (EmbedRequest.quantized) the core computes.
    embedding_types: tuple[str, ...] = (FLOAT,)
    by_type: bool = True  # embeddings_by_type; False: v1's embeddings_floats


class CohereEmbed:
    name = "cohere"

    def __init__(self, version: str) -> None:
        self.version = version

    def parse(self, payload: Any, max_batch_size: int) -> EmbedRequest:
        body = _object(payload)
        texts = self._texts(body, max_batch_size)
        input_type = _optional(body, "input_type", str, "a string")
        if input_type is not None and input_type not in INPUT_TYPES:
            if input_type == "image":
                raise ApiError(422, "input_type 'image' is not supported: this server embeds "
                                    "text", param="input_type")
            raise ApiError(422, f"'input_type' must be one of {', '.join(INPUT_TYPES)}; got "
                                f"{quoted(input_type)}", param="input_type")
        truncate = _optional(body, "truncate", str, "a string")
        if truncate is not None and truncate.upper() not in TRUNCATE:
            raise ApiError(422, f"'truncate' must be one of {', '.join(TRUNCATE)}; got "
                                f"{quoted(truncate)}", param="truncate")
        mode = (truncate or "END").upper()
        if _optional(body, "max_tokens", int, "an integer") is not None:
            raise ApiError(422, "'max_tokens' is not supported: texts are cut at the model's "
                                "own limit (GET /info: max_input_tokens), or refused beyond "
                                "it with truncate=NONE", param="max_tokens")
        _optional(body, "priority", int, "an integer")  # one queue here: accepted, no effect
        types = _embedding_types(body.get("embedding_types"))
        return CohereEmbedRequest(
            texts=texts,
            model=_optional(body, "model", str, "a string"),
            dimensions=_optional(body, "output_dimension", int, "an integer"),
            truncate=mode != "NONE",
            truncate_left=mode == "START",
            input_type=input_type,
            quantized=tuple(t for t in types if t not in (FLOAT, BASE64)),
            embedding_types=types,
            by_type=self.version != "1" or body.get("embedding_types") is not None,
        )

    @staticmethod
    def _texts(body: dict[str, Any], max_batch_size: int) -> list[str]:
        images, inputs = body.get("images"), body.get("inputs")
        if images is not None and not isinstance(images, list):
            raise ApiError(400, f"'images' must be a list, got {_json_type(images)}",
                           param="images")
        if images:
            raise ApiError(422, "'images' are not supported: this server embeds text",
                           param="images")
        if inputs is None:
            texts = body.get("texts")
            if isinstance(texts, str):  # Cohere's texts are a list, even of one
                raise ApiError(400, "'texts' must be a list of strings, got a string",
                               param="texts")
            return texts_from(texts, "texts", max_batch_size)
        if body.get("texts") is not None:
            raise ApiError(400, "give 'texts' or 'inputs', not both", param="inputs")
        if not isinstance(inputs, list):
            raise ApiError(400, f"'inputs' must be a list, got {_json_type(inputs)}",
                           param="inputs")
        # An input is one embedding of its text parts, joined by a space (image parts: 422).
        texts = []
        for i, item in enumerate(inputs):
            content = item.get("content") if isinstance(item, dict) else None
            if not isinstance(content, list) or not content:
                raise ApiError(400, f"'inputs[{i}]' must be an object with a non-empty "
                                    "'content' list", param="inputs")
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    what = ("a text part whose 'text' is not a string" if kind == "text" else
                            "an image part" if kind == "image_url" else
                            f"a part of type {quoted(kind)}")
                    raise ApiError(422 if kind == "image_url" else 400,
                                   f"'inputs[{i}]' holds {what}; this server embeds text parts "
                                   "({\"type\": \"text\", \"text\": ...})", param="inputs")
                parts.append(part["text"])
            texts.append(" ".join(parts))
        return texts_from(texts, "inputs", max_batch_size)

    def render(self, request: EmbedRequest, result: EmbedResult) -> bytes:
        types = request.embedding_types if isinstance(request, CohereEmbedRequest) else (FLOAT,)
        lists: dict[str, str] = {}
        for kind in types:
            if kind == FLOAT:
                arrays = map(float_array_json, result.vectors)
            elif kind == BASE64:
                arrays = map(float32_base64_json, result.vectors)
            else:
                arrays = map(codes_json, result.codes[kind])
            lists[kind] = f'[{",".join(arrays)}]'
        by_type = not isinstance(request, CohereEmbedRequest) or request.by_type
        tail = json.dumps({
            "texts": request.texts,
            "meta": {"api_version": {"version": self.version},
                     "billed_units": {"input_tokens": result.prompt_tokens}},
            "response_type": "embeddings_by_type" if by_type else "embeddings_floats"},
            separators=(",", ":"))
        by_kind = ",".join(f'"{kind}":{rendered}' for kind, rendered in lists.items())
        embeddings = f"{{{by_kind}}}" if by_type else lists[FLOAT]  # v1's: the floats alone
        return f'{{"id":"{uuid.uuid4()}","embeddings":{embeddings},{tail[1:]}'.encode()

    def error_body(self, error: ApiError) -> Any:
        message = error.message
        # The core names the other dialects' fields; a Cohere client knows its own.
        for theirs, ours in _OWN_WORDS.get(error.param or "", ()):
            message = message.replace(theirs, ours)
        return {"id": str(uuid.uuid4()), "message": message}


_OWN_WORDS = {"dimensions": (("'dimensions'", "'output_dimension'"),),
              "truncate": (("(truncate=true)", "(truncate \"END\" or \"START\")"),)}


def _embedding_types(value: Any) -> tuple[str, ...]:
    """Cohere's embedding_types: a non-empty list of known types (default: floats)."""
    if value is None:
        return (FLOAT,)
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ApiError(400, "'embedding_types' must be a list of strings, got "
                            f"{_json_type(value)}", param="embedding_types")
    if not value:
        raise ApiError(422, "'embedding_types' must name at least one of "
                            f"{', '.join(EMBEDDING_TYPES)}", param="embedding_types")
    unknown = [t for t in value if t not in EMBEDDING_TYPES]
    if unknown:
        raise ApiError(422, f"unknown embedding type {quoted(unknown[0])}; the types are "
                            f"{', '.join(EMBEDDING_TYPES)}", param="embedding_types")
    return tuple(dict.fromkeys(value))


COHERE = CohereEmbed("2")
COHERE_V1_EMBED = CohereEmbed("1")
