"""What the core takes and gives, whatever the wire format: the dialects build these, the
service answers them. Nothing here imports another embedserve module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    dimensions: int | None = None
    normalize: bool = True
    truncate: bool = True
    prompt_name: str | None = None
    model: str | None = None
    encoding_format: str = "float"
    truncate_left: bool = False  # TEI truncation_direction=Left: keep the end of the text
    # How long the model stays loaded after this request, in seconds (Ollama's keep_alive):
    # None: the server's policy; negative: for good; 0: unload after this request.
    keep_alive: float | None = None
    # Cohere's input_type (search_query, search_document, classification, clustering): the
    # model's prompt of that purpose where it has one (see service.py).
    input_type: str | None = None
    # Compact forms wanted beside the floats (quantize.py: int8, uint8, binary, ubinary):
    # the service computes them from the final vectors.
    quantized: tuple[str, ...] = ()
    # False: the texts as they are, with no prompt (not even --default-prompt-name):
    # rerank by embeddings compares query and documents embedded alike.
    prompts: bool = True
    # What an error calls text i ("the query", "document 0" where a rerank is embedded).
    input_name: Callable[[int], str] = "input {}".format


@dataclass(frozen=True)
class EmbedResult:
    vectors: Sequence[Sequence[float]]
    model: str
    prompt_tokens: int
    # Each form in EmbedRequest.quantized: one list of codes per vector.
    codes: dict[str, list[list[int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class RerankRequest:
    """Score `documents` against `query`, best first. A reranker scores each pair; an
    embedding model (named, or the default when no reranker is served) scores by the
    cosine similarity of its embeddings."""

    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None  # None: all of them
    truncate: bool = True
    raw_scores: bool = False  # a reranker's score before its activation (TEI)
    # Cohere's: each document scored on its first this many tokens of the model (None: all)
    max_tokens_per_doc: int | None = None


@dataclass(frozen=True)
class Ranked:
    index: int  # in the request's documents
    score: float


@dataclass(frozen=True)
class RerankResult:
    ranked: list[Ranked]  # best first, at most top_n
    model: str  # the served name of the model that scored them
    method: str  # "cross-encoder" or "embeddings" (cosine similarity)
    tokens: int


@dataclass(frozen=True)
class SimilarityRequest:
    """TEI's /similarity: the cosine similarity of `source` to each of `sentences`."""

    source: str
    sentences: list[str]
    truncate: bool = True
    truncate_left: bool = False
    prompt_name: str | None = None
    model: str | None = None
