"""Rerank and similarity, without HTTP: which model scores a request, and how.

- A reranker (a cross-encoder) scores each (query, document) pair: the pairs go through the
  model's batcher like texts (token-budget planning, one model thread, out-of-memory split,
  fair sharing, a client gone dropped), each pair one item.
- An embedding model -- named by the request, or the default when the server has no
  reranker -- scores by cosine similarity: the query and documents are embedded in one
  request (service.embed), so that reranking works on every tier, the hash tier included.

A request that names no model gets the first reranker served, else the default model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from embedserve.backends import RERANKER, SCORE, BackendInfo, Encoding
from embedserve.backends.tokens import CHARS_PER_TOKEN
from embedserve.errors import ApiError
from embedserve.registry import Registry, Slot
from embedserve.requests import (EmbedRequest, Ranked, RerankRequest, RerankResult,
                                 SimilarityRequest)
from embedserve.service import EmbeddingService, check_well_formed
from embedserve.vectors import cosine

log = logging.getLogger("embedserve.scoring")

CROSS_ENCODER = "cross-encoder"
EMBEDDINGS = "embeddings"


def rerank(service: EmbeddingService, request: RerankRequest,
           client_gone: Callable[[], bool] | None = None) -> RerankResult:
    """The documents' scores against the query, best first (ties: the earlier document),
    at most `top_n` of them."""
    registry = service.registry()
    slot = _rerank_model(registry, request.model)
    if slot.kind != RERANKER:
        return _rerank_by_embeddings(service, slot, request, client_gone)
    with registry.use(slot):
        model, batcher = slot.model, slot.batcher
        assert model is not None and batcher is not None  # a reranker is a batched model
        if SCORE not in model.capabilities:  # a kind and its capabilities go together
            raise ApiError(400, f"model {slot.names.primary} does not score pairs")
        _check_well_formed(request)
        batcher.check_room(len(request.documents))  # before tokenizing, as for embed
        documents = first_tokens(model, request.documents, request.max_tokens_per_doc)
        encodings = model.prepare_pairs(request.query, documents)
        _check_pair_lengths(slot.names.primary, model.max_input_tokens, encodings,
                            request.truncate)
        # Rows are [raw score, activated score]: never normalised.
        rows = batcher.embed(encodings, False, client_gone)
        column = 0 if request.raw_scores else 1
        scores = [row[column] for row in rows]
        tokens = sum(e.tokens for e in encodings)
    # Labelled as every family labels a model: by its id (observe_embedding, passes).
    service.metrics.observe_rerank(model.model, CROSS_ENCODER, len(scores), tokens)
    return RerankResult(_best(scores, request.top_n), slot.names.primary, CROSS_ENCODER,
                        tokens)


def similarity(service: EmbeddingService, request: SimilarityRequest,
               client_gone: Callable[[], bool] | None = None) -> list[float]:
    """The cosine similarity of the source sentence to each sentence, in order, with the
    model named, else the first embedding model served."""
    registry = service.registry()
    name = request.model
    if name is None:
        slot = _first_of_kind(registry, lambda kind: kind != RERANKER)
        if slot is None:
            raise ApiError(400, "this server serves no embedding model to compare sentences "
                                "with (it serves rerankers only)")
        name = slot.names.primary
    result = service.embed(EmbedRequest(
        texts=[request.source] + request.sentences, model=name, truncate=request.truncate,
        truncate_left=request.truncate_left, prompt_name=request.prompt_name,
        input_name=_source_or_sentence), client_gone)
    source, *others = result.vectors
    return [cosine(source, vector) for vector in others]


def _rerank_model(registry: Registry, name: str | None) -> Slot:
    if name is not None:
        slot = registry.resolve(name)
        if slot.kind is None:  # not loaded yet (--no-preload): its kind decides the method
            with registry.use(slot):
                pass
        return slot
    return _first_of_kind(registry, lambda kind: kind == RERANKER) or registry.default


def _first_of_kind(registry: Registry, wanted: Callable[[str | None], bool]) -> Slot | None:
    """The first served model whose kind is `wanted`. A model never loaded (--no-preload)
    is loaded to learn its kind, once: its kind is kept when it is unloaded."""
    for slot in registry.slots:
        if slot.kind is None:
            with registry.use(slot):
                pass
        if wanted(slot.kind):
            return slot
    return None


def _rerank_by_embeddings(service: EmbeddingService, slot: Slot, request: RerankRequest,
                          client_gone: Callable[[], bool] | None) -> RerankResult:
    texts = request.documents
    with service.registry().use(slot):
        assert slot.backend is not None  # loaded while in use
        if slot.model is not None:  # as service.embed, naming query and documents
            _check_well_formed(request)
        texts = first_tokens(slot.backend, texts, request.max_tokens_per_doc)
        model_id = slot.backend.model
    result = service.embed(EmbedRequest(texts=[request.query] + texts,
                                        model=slot.names.primary, truncate=request.truncate,
                                        prompts=False, input_name=_query_or_document),
                           client_gone)
    query, *documents = result.vectors
    scores = [cosine(query, document) for document in documents]
    service.metrics.observe_rerank(model_id, EMBEDDINGS, len(scores), result.prompt_tokens)
    return RerankResult(_best(scores, request.top_n), result.model, EMBEDDINGS,
                        result.prompt_tokens)


def first_tokens(backend: BackendInfo, documents: list[str], limit: int | None) -> list[str]:
    """Each document up to the end of its `limit`-th token of the model (its words on the
    hash tier): Cohere's max_tokens_per_doc. A model that reads no more than `limit` tokens
    needs no cut. A document is tokenized in windows from its start, CHARS_PER_TOKEN
    characters a token kept, doubled while a window holds no more than `limit` tokens: a
    long document costs about what is kept of it, unless its start is sparse in tokens (as
    in backends/tokens.py: such text costs by its characters, in its own request's thread).
    """
    most = backend.max_input_tokens
    if limit is None or (most is not None and limit >= most):
        return documents
    cut = []
    for document in documents:
        reach = limit * CHARS_PER_TOKEN
        while True:
            window = document[:reach]
            tokens = [token for token in backend.tokenize([window], add_special_tokens=False)[0]
                      if not token.special]
            if len(tokens) > limit:
                # A word the window's end cut in two comes after the tokens kept: they are
                # the whole document's.
                document = window[:tokens[limit - 1].stop]
                break
            if len(window) == len(document):
                break
            reach *= 2
        cut.append(document)
    return cut


def _source_or_sentence(i: int) -> str:
    return "the source sentence" if i == 0 else f"sentence {i - 1}"


def _query_or_document(i: int) -> str:
    return "the query" if i == 0 else f"document {i - 1}"


def _check_well_formed(request: RerankRequest) -> None:
    check_well_formed([request.query], lambda _: "the query", "query")
    check_well_formed(request.documents, "document {}".format, "documents")


def _best(scores: list[float], top_n: int | None) -> list[Ranked]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [Ranked(i, scores[i]) for i in order[:top_n]]


def _check_pair_lengths(model: str, limit: int | None, encodings: list[Encoding],
                        truncate: bool) -> None:
    if truncate or not limit:
        return
    for i, encoding in enumerate(encodings):
        if encoding.untruncated > limit:
            raise ApiError(422, f"document {i} with the query has at least "
                                f"{encoding.untruncated} tokens; model {model} takes at most "
                                f"{limit} per pair. Shorten them, or allow truncation "
                                "(truncate=true)", param="truncate")
