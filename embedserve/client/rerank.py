"""Client.rerank: what it sends and reads back (Cohere's /v2/rerank, which every embedserve
server answers), its arguments checked once, and the in-process fallback's ranking.

A call that names no model gets the server's first reranker, else its default model (which
then ranks by the cosine similarity of its embeddings). When no server can be had, the
fallback ranks by the cosine similarity of in-process hash embeddings -- the server's hash
tier's scores, bit for bit -- under the rule embed's fallback follows (see fallback.py): only
when the hash tier is the model the server would have used, so never in place of a server's
reranker under "same-model".

Documents beyond the server's `max_rerank_documents` (/info) go in several requests: each
document's score depends on the query and that document alone, so the rankings merge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from embedserve.client import wire
from embedserve.client.errors import EmbedServeError, ModelNotFound, ValidationError
from embedserve.client.results import Ranking, Rankings, Source
from embedserve.vectors import cosine

# The server's limit when its /info does not say (its own default).
DEFAULT_MAX_DOCUMENTS = 1000
CROSS_ENCODER, EMBEDDINGS = "cross-encoder", "embeddings"


def checked(query: str, documents: Sequence[str], top_n: int | None, model: str | None
            ) -> tuple[str, list[str]]:
    """The call's arguments, or the error the server would give (so the fallback agrees)."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if isinstance(documents, (str, bytes)):
        raise TypeError("rerank() takes a list of documents (strings)")
    documents = list(documents)
    if not query:
        raise ValidationError(400, "'query' is an empty string", param="query")
    if not documents:
        raise ValidationError(400, "'documents' must not be an empty list", param="documents")
    for i, document in enumerate(documents):
        if not isinstance(document, str):
            raise TypeError(f"documents[{i}] must be str, got {type(document).__name__}")
        if not document:
            raise ValidationError(400, f"'documents[{i}]' is an empty string",
                                  param="documents")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)
                              or top_n < 1):
        raise ValidationError(422, f"'top_n' must be an integer of at least 1, got {top_n!r}",
                              param="top_n")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ValidationError(400, f"'model' must name a model, got {model!r}", param="model")
    return query, documents


def max_documents(info: Mapping[str, Any]) -> int:
    """The server's document limit a request (its /info's, else its default)."""
    most = info.get("max_rerank_documents")
    return most if isinstance(most, int) and most > 0 else DEFAULT_MAX_DOCUMENTS


def bodies(query: str, documents: list[str], most: int, model: str | None
           ) -> list[tuple[int, bytes]]:
    """(index of the first document, request body) per request, `most` documents each."""
    named = {} if model is None else {"model": model}
    return [(first, json.dumps({"query": query, "documents": documents[first:first + most],
                                **named}).encode())
            for first in range(0, len(documents), most)]


def read(body: bytes, first: int, most: int, documents: list[str], url: str
         ) -> tuple[str, list[Ranking]]:
    """(model, rankings) of the answer for documents[first:first + most], its indexes
    made the call's."""
    try:
        payload = json.loads(body)
        results = payload["results"]
        sent = min(len(documents) - first, most)
        indexes = [r["index"] for r in results]
        # Each document of the request scored once (no top_n is sent): an index out of
        # range, or twice, would give one document another's score.
        if sorted(indexes) != list(range(sent)) or not all(type(i) is int for i in indexes):
            raise ValueError(f"the indexes are not 0 to {sent - 1}, each once")
        scores = [r["relevance_score"] for r in results]
        if not all(type(x) in (float, int) and math.isfinite(x) for x in scores):
            raise ValueError("a relevance_score is not a finite number")
        rankings = [Ranking(first + i, float(score), documents[first + i])
                    for i, score in zip(indexes, scores)]
        return str(payload["model"]), rankings
    except (ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
        raise EmbedServeError(f"unexpected response from {url}/v2/rerank: {exc!r}") from exc


def kind_of(info: Mapping[str, Any], model: str) -> str | None:
    """The kind ("reranker", "embedding") of the served model answering as `model`."""
    entry = wire.model_entry(info, model)
    return (entry if entry is not None else info).get("kind")  # type: ignore[no-any-return]


def ranked(rankings: list[Ranking], top_n: int | None, *, model: str, backend: str,
           method: str, source: Source) -> Rankings:
    """Best first (ties: the earlier document), at most top_n."""
    order = sorted(rankings, key=lambda r: (-r.score, r.index))
    return Rankings(order[:top_n], model=model, backend=backend, method=method, source=source)


def by_cosine(vectors: list[list[float]], documents: list[str]) -> list[Ranking]:
    """The fallback's scores: each document's cosine similarity to the query (vectors[0]),
    as the server's hash tier computes them."""
    query, *others = vectors
    return [Ranking(i, cosine(query, vector), documents[i]) for i, vector in enumerate(others)]


def remote(client: Any, query: str, documents: list[str], top_n: int | None,
           asked: str | None) -> Rankings:
    """The server's ranking (a Client's requests, retries and model names)."""
    target, info = client._server_info()
    sent = None if asked is None else client._fallback.request_name(asked)
    rankings: list[Ranking] = []
    model = ""
    most = max_documents(info)
    for first, body in bodies(query, documents, most, sent):
        try:
            response, target = client._request("POST", "/v2/rerank", body, first=first)
        except ModelNotFound as exc:
            client._name_missing_model(exc, asked)
            raise
        model, chunk = read(response.body, first, most, documents, target.url)
        rankings += chunk
    method = CROSS_ENCODER if kind_of(info, model) == "reranker" else EMBEDDINGS
    return ranked(rankings, top_n, model=model, backend=wire.backend_of(info, model),
                  method=method, source="server")
