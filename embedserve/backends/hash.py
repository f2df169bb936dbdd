"""The always-available tier: feature hashing, standard library only."""

from __future__ import annotations

from collections.abc import Sequence

from embedserve.backends import Encoded
from embedserve.hashing import HashEmbedder


class HashBackend:
    name = "hash"
    device = "cpu"
    max_input_tokens = None
    default_prompt_name = None

    def __init__(self, dimensions: int) -> None:
        self._embedder = HashEmbedder(dimensions)
        self.dimensions = dimensions
        self.model = self._embedder.model
        self.prompts: dict[str, str] = {}

    def encode(self, texts: Sequence[str], *, normalize: bool = True) -> Encoded:
        vectors, token_counts = self._embedder.embed_with_counts(texts, normalize=normalize)
        return Encoded(vectors, token_counts)
