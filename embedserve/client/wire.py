"""What goes over the wire for one embed call: request bodies for the OpenAI route, split
into chunks that respect the server's /info limits (max_batch_size, max_body_bytes), and
the vectors read back from its answers (base64 float32 or JSON floats), and the served
model names of GET /v1/models.

Vectors are decoded with `array`: numpy was measured no faster at building the lists
returned here (list creation dominates), so it is not imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

from embedserve.client.errors import EmbedServeError, ValidationError
from embedserve.client.options import EncodingFormat
from embedserve.config import Config
from embedserve.encoding import decode_float32_base64

# The server's limits when its /info does not say (its own defaults).
DEFAULT_MAX_BATCH = Config.max_batch_size
DEFAULT_MAX_BODY = Config.max_body_bytes
# Room for the JSON around the inputs in a request body.
BODY_OVERHEAD = 256


def chunks(texts: list[str], info: Mapping[str, Any], dimensions: int | None,
           encoding_format: EncodingFormat, batch_size: int | None,
           model: str | None = None) -> Iterator[tuple[int, bytes]]:
    """(index of the first text, request body) per request, within the server's limits
    (and within `batch_size` texts, when given). `model`, when given, is every request's
    OpenAI `model` field: the served model that embeds them all."""
    max_batch = info.get("max_batch_size")
    max_batch = max_batch if isinstance(max_batch, int) and max_batch > 0 else DEFAULT_MAX_BATCH
    if batch_size is not None:
        max_batch = min(max_batch, batch_size)
    max_body = info.get("max_body_bytes")
    max_body = max_body if isinstance(max_body, int) and max_body > 0 else DEFAULT_MAX_BODY
    tail: dict[str, str | int] = {"encoding_format": encoding_format}
    if dimensions is not None:
        tail["dimensions"] = dimensions
    if model is not None:
        tail["model"] = model
    head = b'{"input":'
    end = b"," + json.dumps(tail, separators=(",", ":")).encode()[1:]
    budget = max_body - len(head) - len(end) - BODY_OVERHEAD

    for first in range(0, len(texts), max_batch):
        group = texts[first : first + max_batch]
        # Fast path, nearly always taken: one C-level json.dumps for the whole group when
        # even the worst case (6 bytes per character, "\u001f") fits the body limit.
        if 6 * sum(map(len, group)) + 3 * len(group) + 2 <= budget:
            try:
                encoded = json.dumps(group, ensure_ascii=False, separators=(",", ":"))
                yield first, head + encoded.encode("utf-8") + end
                continue
            except UnicodeEncodeError:
                pass  # a lone surrogate: the exact path below escapes it
        yield from _split_by_size(group, first, head, end, budget, max_body)


def _split_by_size(group: list[str], first: int, head: bytes, end: bytes, budget: int,
                   max_body: int) -> Iterator[tuple[int, bytes]]:
    """Bodies of exact size, text by text, each under `budget` bytes of inputs."""
    batch: list[bytes] = []
    size = 2  # the brackets
    start = first
    for i, text in enumerate(group, first):
        try:
            encoded = encode_basestring(text).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: only \u escapes can carry it
            encoded = encode_basestring_ascii(text).encode("ascii")
        if len(encoded) + 2 > budget:
            raise ValidationError(413, f"texts[{i}] is {len(encoded)} bytes as JSON; the "
                                       f"server takes request bodies up to {max_body} "
                                       "bytes", param="input")
        if batch and size + len(encoded) + 1 > budget:
            yield start, head + b"[" + b",".join(batch) + b"]" + end
            batch, size, start = [], 2, i
        batch.append(encoded)
        size += len(encoded) + 1
    if batch:
        yield start, head + b"[" + b",".join(batch) + b"]" + end


def decode(body: bytes, encoding_format: EncodingFormat, url: str
           ) -> tuple[str, list[list[float]]]:
    """(model, vectors in input order) of an OpenAI-shaped answer from `url`."""
    try:
        payload = json.loads(body)
        items = payload["data"]
        if any(item["index"] != i for i, item in enumerate(items)):
            items = sorted(items, key=lambda item: item["index"])
            if [item["index"] for item in items] != list(range(len(items))):
                raise ValueError("the indices are not 0 to n-1, each once")
        raw = [item["embedding"] for item in items]
        if encoding_format == "base64":
            vectors = [decode_float32_base64(text) for text in raw]
        else:
            vectors = [_floats(vector) for vector in raw]
        for i, vector in enumerate(vectors):
            # NaN or infinity (JSON's NaN literal, or base64 bytes) is no embedding. A NaN
            # or an infinity makes the sum so: only then is each value looked at (a sum of
            # huge finite values can overflow too).
            if not math.isfinite(sum(vector)) and not all(map(math.isfinite, vector)):
                raise ValueError(f"vector {i} holds a NaN or infinite value")
        return str(payload["model"]), vectors
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # Overflow: 1e400 as int
        raise EmbedServeError(f"unexpected response from {url}/v1/embeddings: "
                              f"{exc!r}") from exc


def _floats(vector: Any) -> list[float]:
    """A JSON array of numbers as floats; ValueError for anything else (a string, null, or a
    boolean, which float() would have taken as 1.0 or 0.0)."""
    if not isinstance(vector, list):
        raise ValueError(f"an embedding is {type(vector).__name__}, not an array")
    kinds = set(map(type, vector))
    if not kinds <= {float, int}:
        raise ValueError(f"an embedding holds {', '.join(sorted(k.__name__ for k in kinds))} "
                         "values, not numbers only")
    return vector if int not in kinds else list(map(float, vector))


def check_start(answered: int, start: int) -> None:
    """EmbedServeError unless the requests before the one for texts[start:] answered one
    vector for each of their texts (else texts would get their neighbours' vectors)."""
    if answered != start:
        raise EmbedServeError(f"server returned {answered} vectors for the {start} texts "
                              f"before texts[{start}:]")


def check_answer(vectors: list[list[float]], texts: int, dimensions: int | None,
                 info: Mapping[str, Any], model: str) -> None:
    """EmbedServeError unless `vectors` (a call's, from all its chunks) can be the answer:
    one for each text, all of one size (the call's `dimensions`, else the size the server's
    /info gives `model`, if it does), and not empty."""
    dimensions = dimensions or described_dimensions(info, model)
    if len(vectors) != texts:
        raise EmbedServeError(f"server returned {len(vectors)} vectors for {texts} texts")
    sizes = {len(vector) for vector in vectors}  # none for a call of no texts
    if len(sizes) > 1 or 0 in sizes or (dimensions is not None and sizes - {dimensions}):
        raise EmbedServeError(f"server returned vectors of {sorted(sizes)} values"
                              + (f", not {dimensions}" if dimensions is not None else ""))


def json_object(body: bytes, url: str) -> dict[str, Any]:
    """The JSON object a GET to `url` (its route included) answered, or EmbedServeError."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EmbedServeError(f"unexpected response from {url}: not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise EmbedServeError(f"unexpected response from {url}: JSON, but not an object")
    return payload


def model_ids(body: bytes, url: str) -> list[str]:
    """The served names of an OpenAI-shaped GET /v1/models answer from `url`, in order."""
    try:
        items = json.loads(body)["data"]
        ids = [item["id"] for item in items]
        if not all(isinstance(name, str) for name in ids):
            raise TypeError(f"a model id is not a string: {ids!r}")
        return ids
    except (ValueError, KeyError, TypeError) as exc:
        raise EmbedServeError(f"unexpected response from {url}/v1/models: {exc!r}") from exc


def backend_of(info: Mapping[str, Any], model: str) -> str:
    """The backend of the served model whose answers carry the name `model`: a server of
    several lists each one's names and backend in its /info "models"; else the server's."""
    entry = model_entry(info, model)
    return str((entry if entry is not None else info).get("backend", ""))


def described_dimensions(info: Mapping[str, Any], model: str) -> int | None:
    """The vector size /info gives the served model named `model` (None: not described)."""
    entry = model_entry(info, model)
    size = entry.get("dimensions") if entry is not None else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def model_entry(info: Mapping[str, Any], model: str) -> Mapping[str, Any] | None:
    """The entry of /info "models" whose names (or model id) include `model`."""
    entries = info.get("models")
    wanted = model.lower()
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        names = entry.get("names")
        names = [*(names if isinstance(names, list) else []), entry.get("model")]
        if any(isinstance(name, str) and name.lower() == wanted for name in names):
            return entry
    return None


def checked_texts(texts: Sequence[str]) -> list[str]:
    """embed()'s texts as a list, each a non-empty str, else a clear error before sending."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("embed() takes a list of strings; for one text use "
                        "embed_single(text)")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
        if not text:
            # The server rejects it too; checked here so that the fallback agrees.
            raise ValidationError(400, f"texts[{i}] is an empty string", param="input")
    return texts
