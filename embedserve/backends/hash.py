"""The always-available tier: feature hashing, standard library only."""

from __future__ import annotations

from collections.abc import Sequence

import zlib

from embedserve.backends import Encoded, Token
from embedserve.hashing import WORD_PATTERN, HashEmbedder


class HashBackend:
    name = "hash"
    device = "cpu"
    max_input_tokens: int | None = None
    default_prompt_name: str | None = None

    def __init__(self, dimensions: int) -> None:
        self._embedder = HashEmbedder(dimensions)
        self.dimensions = dimensions
        self.model = self._embedder.model
        self.prompts: dict[str, str] = {}

    def encode(self, texts: Sequence[str], *, normalize: bool = True) -> Encoded:
        vectors, token_counts = self._embedder.embed_with_counts(texts, normalize=normalize)
        return Encoded(vectors, token_counts)

    def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True
                 ) -> list[list[Token]]:
        """The words the hash tier sees; a word's id is the CRC-32 of its word feature."""
        return [[Token(zlib.crc32(f" {m.group().lower()} ".encode("utf-8")), m.group(), False,
                       m.start(), m.end()) for m in WORD_PATTERN.finditer(text)]
                for text in texts]
