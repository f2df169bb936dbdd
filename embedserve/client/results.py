"""What a call returns: plain lists of floats, labelled with the model and backend that made
them and whether the server or the in-process fallback answered. One call's vectors always
come from one model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Source = Literal["server", "fallback"]


class Embeddings(list[list[float]]):
    """Vectors in input order (a plain list otherwise), with the model and backend that
    made them and whether the server or the in-process fallback answered."""

    model: str
    backend: str
    source: Source

    def __init__(self, vectors: Iterable[list[float]] = (), *, model: str, backend: str,
                 source: Source) -> None:
        super().__init__(vectors)
        self.model = model
        self.backend = backend
        self.source = source

    @property
    def dimensions(self) -> int:
        return len(self[0]) if self else 0


class Embedding(list[float]):
    """One vector (a plain list otherwise), labelled like Embeddings."""

    model: str
    backend: str
    source: Source

    def __init__(self, vector: Iterable[float], *, model: str, backend: str,
                 source: Source) -> None:
        super().__init__(vector)
        self.model = model
        self.backend = backend
        self.source = source


@dataclass(frozen=True)
class Ranking:
    """One document of a rerank call: its index in the call's documents, its score, and
    its text."""

    index: int
    score: float
    document: str


class Rankings(list[Ranking]):
    """A rerank call's documents, best first (a plain list otherwise), with the model and
    backend that scored them, how ("cross-encoder", or "embeddings": cosine similarity of
    an embedding model's vectors), and whether the server or the fallback answered."""

    model: str
    backend: str
    method: str
    source: Source

    def __init__(self, rankings: Iterable[Ranking] = (), *, model: str, backend: str,
                 method: str, source: Source) -> None:
        super().__init__(rankings)
        self.model = model
        self.backend = backend
        self.method = method
        self.source = source
