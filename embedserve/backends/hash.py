"""The always-available tier: feature hashing, standard library only."""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence

from embedserve.backends import Encoded, Token
from embedserve.hashing import WORD_PATTERN, HashEmbedder
from embedserve.quantize import unit_ranges

# Embedders for request-time `dimensions` other than the served size. Each holds its own
# word cache (up to hashing._MAX_CACHED_WORDS words), so only the few most recently asked
# sizes are kept: memory stays bounded whatever sizes clients ask for.
_MAX_OTHER_SIZES = 4


class HashBackend:
    name = "hash"
    kind = "embedding"
    device = "cpu"
    max_input_tokens: int | None = None
    default_prompt_name: str | None = None

    def __init__(self, dimensions: int) -> None:
        self._embedder = HashEmbedder(dimensions)
        self.dimensions = dimensions
        self.model = self._embedder.model
        self.prompts: dict[str, str] = {}
        # int8 / uint8 codes: the vectors are unit length, so [-1, 1] holds every coordinate,
        # for the served size and any other `dimensions` alike.
        self.quantization_ranges = unit_ranges(dimensions)
        self._others: OrderedDict[int, HashEmbedder] = OrderedDict()
        self._others_lock = threading.Lock()

    def encode(self, texts: Sequence[str], *, normalize: bool = True,
               dimensions: int | None = None) -> Encoded:
        """`dimensions=d` is hash-v1-d computed directly (what `--dimensions d` serves), not
        the first d of the served vector: hash buckets are not ordered by importance, so
        a head of them can be all zeros."""
        embedder = self._embedder_for(dimensions)
        # SparseVectors: the wire writers skip their zeros (encoding.py).
        vectors, token_counts = embedder.embed_sparse_with_counts(texts, normalize=normalize)
        return Encoded(list(vectors), token_counts)

    def _embedder_for(self, dimensions: int | None) -> HashEmbedder:
        if dimensions is None or dimensions == self.dimensions:
            return self._embedder
        with self._others_lock:
            embedder = self._others.get(dimensions)
            if embedder is not None:
                self._others.move_to_end(dimensions)
                return embedder
            embedder = HashEmbedder(dimensions)  # ValueError for a bad size, before caching
            self._others[dimensions] = embedder
            if len(self._others) > _MAX_OTHER_SIZES:
                self._others.popitem(last=False)
            return embedder

    def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True
                 ) -> list[list[Token]]:
        """The words the hash tier sees; a word's id is the CRC-32 of its word feature."""
        return [[Token(zlib.crc32(f" {m.group().lower()} ".encode("utf-8")), m.group(), False,
                       m.start(), m.end()) for m in WORD_PATTERN.finditer(text)]
                for text in texts]
