"""API dialects: each turns its own request JSON into one EmbedRequest (the core's type),
and renders results and errors in its own shape, as well as the answers only it has
(OpenAI's model list, TEI's tokens, Ollama's tags). Nothing here knows about HTTP or about
backends; the core knows nothing of dialects.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from embedserve.encoding import float32_base64_json, float_array_json
from embedserve.errors import ApiError, EmptyInput, quoted
from embedserve.requests import EmbedRequest, EmbedResult

if TYPE_CHECKING:
    from embedserve.backends import Token


class Dialect(Protocol):
    name: str

    def parse(self, payload: Any, max_batch_size: int) -> EmbedRequest: ...

    def render(self, request: EmbedRequest, result: EmbedResult) -> bytes:
        """The response body: JSON text assembled around pre-encoded vector arrays."""
        ...

    def error_body(self, error: ApiError) -> Any: ...


# --- shared validation -------------------------------------------------------------------

def _object(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(payload)}")
    return payload


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def texts_from(value: Any, field: str, max_batch_size: int) -> list[str]:
    """A string or a non-empty list of non-empty strings; anything else is a 400."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        texts = value
        if not texts:
            raise EmptyInput(f"'{field}' must not be an empty list", param=field)
        if len(texts) > max_batch_size:
            raise ApiError(413, f"'{field}' has {len(texts)} items; the limit is "
                                f"{max_batch_size} per request", param=field)
        if _looks_like_token_ids(texts):
            raise ApiError(400, f"'{field}' holds token ids; this server takes text only. "
                                "Send strings (LangChain OpenAIEmbeddings: "
                                "check_embedding_ctx_length=False)", param=field)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ApiError(400, f"'{field}[{i}]' must be a string, got "
                                    f"{_json_type(text)}", param=field)
    elif value is None:
        raise ApiError(400, f"'{field}' is required", param=field)
    else:
        raise ApiError(400, f"'{field}' must be a string or a list of strings, got "
                            f"{_json_type(value)}", param=field)
    for i, text in enumerate(texts):
        if not text:
            where = field if len(texts) == 1 and isinstance(value, str) else f"{field}[{i}]"
            raise EmptyInput(f"'{where}' is an empty string", param=field)
    return texts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _looks_like_token_ids(items: list[Any]) -> bool:
    """OpenAI also takes [int] and [[int]]: pre-tokenised input, as LangChain sends it."""
    return all(map(_is_int, items)) or all(
        isinstance(item, list) and item and all(map(_is_int, item)) for item in items)


def _optional(payload: dict[str, Any], field: str, kind: type, kind_name: str) -> Any:
    value = payload.get(field)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 8.0 is a fine way to write 8
    # bool is a subclass of int: `"dimensions": true` is a type error, not 1.
    if value is not None and (not isinstance(value, kind) or
                              (kind is int and not _is_int(value))):
        raise ApiError(400, f"'{field}' must be {kind_name}, got {_json_type(value)}",
                       param=field)
    return value


# --- OpenAI --------------------------------------------------------------------------------

_OPENAI_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}
_OPENAI_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden",
                 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                 411: "length_required", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_value",
                 429: "rate_limit_exceeded", 503: "service_unavailable"}


class OpenAI:
    name = "openai"

    def parse(self, payload: Any, max_batch_size: int) -> EmbedRequest:
        body = _object(payload)
        texts = texts_from(body.get("input"), "input", max_batch_size)
        encoding_format = _optional(body, "encoding_format", str, "a string")
        if encoding_format is None:
            encoding_format = "float"
        elif encoding_format not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64', got "
                                f"{quoted(encoding_format)}", param="encoding_format")
        _optional(body, "user", str, "a string")
        return EmbedRequest(
            texts=texts,
            model=_optional(body, "model", str, "a string"),
            dimensions=_optional(body, "dimensions", int, "an integer"),
            encoding_format=encoding_format,
        )

    def render(self, request: EmbedRequest, result: EmbedResult) -> bytes:
        encode = float32_base64_json if request.encoding_format == "base64" else float_array_json
        data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{encode(v)}}}'
                        for i, v in enumerate(result.vectors))
        tail = json.dumps({"model": result.model, "usage": {
            "prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}},
            separators=(",", ":"))
        return f'{{"object":"list","data":[{data}],{tail[1:]}'.encode()

    def error_body(self, error: ApiError) -> Any:
        kind = _OPENAI_TYPES.get(error.status,
                                 "server_error" if error.status >= 500 else "invalid_request_error")
        # OpenAI's own code for a model it does not serve, which SDK users branch on.
        code = ("model_not_found" if error.status == 404 and error.param == "model"
                else _OPENAI_CODES.get(error.status))
        return {"error": {"message": error.message, "type": kind, "param": error.param,
                          "code": code}}

    def render_models(self, names: Sequence[str], created: float) -> dict[str, Any]:
        """GET /v1/models: the served model's names, as OpenAI's SDKs list models."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(created), "owned_by": "embedserve"}
            for name in names]}


# --- Hugging Face text-embeddings-inference ------------------------------------------------

# TEI's error_type where it is not "Validation" (a client's error) or "Backend" (a fault).
_TEI_TYPES = {401: "Unauthorized", 403: "Unauthorized", 404: "NotFound", 429: "Overloaded",
              503: "Unhealthy", 505: "Validation"}  # 505: the client's HTTP version


@dataclass(frozen=True)
class TokenizeRequest:
    """TEI's POST /tokenize: which texts, and whether to add the model's special tokens."""

    texts: list[str]
    add_special_tokens: bool = True
    model: str | None = None  # None: the default model


class TEI:
    name = "tei"

    def parse(self, payload: Any, max_batch_size: int) -> EmbedRequest:
        body = _object(payload)
        texts = texts_from(body.get("inputs"), "inputs", max_batch_size)
        normalize = _optional(body, "normalize", bool, "a boolean")
        truncate = _optional(body, "truncate", bool, "a boolean")
        direction = _optional(body, "truncation_direction", str, "a string")
        if direction not in (None, "Right", "Left", "right", "left"):
            raise ApiError(422, "'truncation_direction' must be 'Right' or 'Left'",
                           param="truncation_direction")
        return EmbedRequest(
            texts=texts,
            truncate_left=direction in ("Left", "left"),
            normalize=True if normalize is None else normalize,
            truncate=True if truncate is None else truncate,
            prompt_name=_optional(body, "prompt_name", str, "a string"),
            dimensions=_optional(body, "dimensions", int, "an integer"),
            # Not TEI's (one model a server): which of several models, as on /rerank.
            model=_optional(body, "model", str, "a string"),
        )

    def render(self, request: EmbedRequest, result: EmbedResult) -> bytes:
        return ("[" + ",".join(map(float_array_json, result.vectors)) + "]").encode()

    def error_body(self, error: ApiError) -> Any:
        kind = "Empty" if isinstance(error, EmptyInput) else _TEI_TYPES.get(
            error.status, "Validation" if error.status < 500 else "Backend")
        return {"error": error.message, "error_type": kind}

    def parse_tokenize(self, payload: Any, max_batch_size: int, max_chars: int
                       ) -> TokenizeRequest:
        body = _object(payload)
        texts = texts_from(body.get("inputs"), "inputs", max_batch_size)
        special = _optional(body, "add_special_tokens", bool, "a boolean")
        # Each token becomes a JSON object many times its size: the input is bounded.
        chars = sum(map(len, texts))
        if chars > max_chars:
            raise ApiError(413, f"'inputs' hold {chars} characters; /tokenize takes at most "
                                f"{max_chars} per request", param="inputs")
        return TokenizeRequest(texts, True if special is None else special,
                               _optional(body, "model", str, "a string"))

    def render_tokens(self, tokens: Sequence[Sequence[Token]]) -> list[list[dict[str, Any]]]:
        """POST /tokenize: per text, its tokens with character offsets (None: no offsets,
        as for the special tokens)."""
        return [[{"id": token.id, "text": token.text, "special": token.special,
                  "start": token.start, "stop": token.stop} for token in text_tokens]
                for text_tokens in tokens]


# --- Ollama ---------------------------------------------------------------------------------

class Ollama:
    """POST /api/embed, as the `ollama` client's embed() sends it, and Ollama's other
    answers that its clients and tools read."""

    name = "ollama"
    # Ollama answers GET / with this text; tools read it to see that a server is up.
    running_text = b"Ollama is running"

    def parse(self, payload: Any, max_batch_size: int) -> EmbedRequest:
        body = _object(payload)
        truncate = _optional(body, "truncate", bool, "a boolean")
        _optional(body, "options", dict, "an object")
        # No input ("input" left out, "" or []) is Ollama's idiom for loading a model, or,
        # with keep_alive 0, unloading it: answered with no embeddings, as Ollama does.
        text = body.get("input")
        return EmbedRequest(
            texts=[] if text in (None, "", []) else texts_from(text, "input", max_batch_size),
            model=_required_model(body),
            truncate=True if truncate is None else truncate,
            dimensions=_optional(body, "dimensions", int, "an integer"),
            keep_alive=_keep_alive(body.get("keep_alive")),
        )

    def render(self, request: EmbedRequest, result: EmbedResult) -> bytes:
        vectors = ",".join(map(float_array_json, result.vectors))
        tail = json.dumps({"model": request.model, "prompt_eval_count": result.prompt_tokens},
                          separators=(",", ":"))
        return f'{{"embeddings":[{vectors}],{tail[1:]}'.encode()

    def error_body(self, error: ApiError) -> Any:
        return {"error": error.message}

    def render_tags(self, models: Sequence[tuple[str, str]], loaded_at: float
                    ) -> dict[str, Any]:
        """GET /api/tags: the served models (name, backend: "" when not loaded yet) as
        Ollama lists its local models. Sizes and digests describe Ollama's model files,
        which a server here does not have."""
        modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded_at))
        return {"models": [{
            "name": _tagged(name), "model": _tagged(name), "modified_at": modified,
            "size": 0, "digest": "",
            "details": {"format": backend, "family": backend, "families": [backend],
                        "parameter_size": "", "quantization_level": ""}}
            for name, backend in models]}

    def render_ps(self, models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """GET /api/ps: the models loaded now, with their size and when they unload (a
        model kept for good shows a far future, as Ollama shows it)."""
        def when(expires: float | None) -> str:
            # Kept for good, or for longer than a date can say (keep_alive 1e20): the same.
            if expires is None or not expires < _FOREVER:
                return "2318-01-01T00:00:00Z"
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))

        return {"models": [{
            "name": _tagged(m["name"]), "model": _tagged(m["name"]),
            "size": m["size"], "size_vram": 0, "digest": "", "expires_at": when(m["expires_at"]),
            "details": {"format": m["backend"], "family": m["backend"],
                        "families": [m["backend"]], "parameter_size": "",
                        "quantization_level": ""}} for m in models]}

    def render_version(self, version: str) -> dict[str, Any]:
        return {"version": version}

    def parse_show(self, payload: Any) -> str:
        """POST /api/show: the model asked about ("name" in older clients' requests)."""
        body = _object(payload)
        _optional(body, "verbose", bool, "a boolean")  # all there is to say, either way
        _optional(body, "name", str, "a string")
        if body.get("model") is None and body.get("name") is not None:
            body = {**body, "model": body["name"]}
        return _required_model(body)

    def render_show(self, model: Mapping[str, Any], loaded_at: float) -> dict[str, Any]:
        """POST /api/show: what Ollama says of a model that this server can say. Clients
        read the vector size and input limit from model_info, as
        "<general.architecture>.embedding_length" and ".context_length"."""
        backend = model["backend"] or ""
        architecture = backend or "embedserve"
        info: dict[str, Any] = {"general.architecture": architecture}
        if model["dimensions"] is not None:
            info[f"{architecture}.embedding_length"] = model["dimensions"]
        if model["max_input_tokens"] is not None:
            info[f"{architecture}.context_length"] = model["max_input_tokens"]
        return {
            "modelfile": "", "parameters": "", "template": "", "license": "",
            "details": {"parent_model": "", "format": backend, "family": backend,
                        "families": [backend] if backend else [], "parameter_size": "",
                        "quantization_level": ""},
            "model_info": info,
            # Ollama's word for what a model does; a reranker's is this server's own.
            "capabilities": ["embedding"] if model["kind"] != "reranker" else ["rerank"],
            "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded_at)),
        }


class OllamaLegacy(Ollama):
    """POST /api/embeddings: one `prompt` in, one `embedding` out (Ollama's older API)."""

    def parse(self, payload: Any, max_batch_size: int) -> EmbedRequest:
        body = _object(payload)
        prompt = "" if body.get("prompt") is None else body["prompt"]
        if not isinstance(prompt, str):
            raise ApiError(400, f"'prompt' must be a string, got {_json_type(prompt)}",
                           param="prompt")
        _optional(body, "options", dict, "an object")
        return EmbedRequest(texts=[prompt] if prompt else [], model=_required_model(body),
                            keep_alive=_keep_alive(body.get("keep_alive")))

    def render(self, request: EmbedRequest, result: EmbedResult) -> bytes:
        vector = float_array_json(result.vectors[0]) if result.vectors else "[]"
        return f'{{"embedding":{vector}}}'.encode()


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_FOREVER = 10_413_792_000.0  # 2300-01-01 in Unix time: later is "kept for good" in /api/ps


def _keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1")."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer past float's range: as long as can be
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        text = value.strip()
        if _PLAIN_NUMBER.fullmatch(text):
            return float(text)
        sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
        parts = _DURATION_PART.findall(rest)
        if parts and "".join(n + unit for n, unit in parts) == rest:
            return sign * sum(float(n) * _DURATION_UNITS[unit] for n, unit in parts)
    raise ApiError(400, "'keep_alive' must be a duration (\"5m\", \"1h30m\", \"0\", \"-1\") or "
                        "a number of seconds", param="keep_alive")


def _tagged(name: str) -> str:
    """A name as Ollama lists it: with a tag, ":latest" (the one version a server has)
    unless the name has one (--served-model-name nomic-embed-text:v1.5)."""
    return name if ":" in name else f"{name}:latest"


def _required_model(body: dict[str, Any]) -> str:
    model = _optional(body, "model", str, "a string")
    if not model:
        raise ApiError(400, "'model' is required", param="model")
    return model


OPENAI = OpenAI()
TEI_DIALECT = TEI()
OLLAMA = Ollama()
OLLAMA_LEGACY = OllamaLegacy()
