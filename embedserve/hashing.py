"""Deterministic feature-hashing embeddings on the standard library alone.

The algorithm is specified in docs/hash-embedding.md precisely enough to be re-implemented
bit for bit (the Node client does); tests/data/hash_golden.json pins its output. Any change
that alters a single output bit is a new model version: bump HASH_VERSION.

The hot path is arranged so that nearly all per-text work happens inside C builtins
(re.findall, Counter counting, chain/map over cached tuples): each distinct word's signed
bucket codes are computed once and cached, and a text is the sum of its words' codes.
Every bucket holds an integer until the final division, so the result does not depend on
summation order, threads or platform.
"""

from __future__ import annotations

import math
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from operator import mul
from typing import TypeVar

from embedserve.encoding import SparseVector, dense

HASH_VERSION = 1
DEFAULT_DIMENSIONS = 384
NGRAM_SIZES = (3, 5)

# \w+ is "letters, digits (any Unicode numeric) and underscore": the spec spells out the
# JavaScript equivalent, /[\p{L}\p{N}_]+/gu.
WORD_PATTERN = re.compile(r"\w+")
# A lone surrogate is never a word character, so only the whole-text fallback meets one.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# Cache bounds keep a worker's memory flat whatever it is fed: a word longer than this is
# hashed on every call instead of cached, and the cache is dropped when it fills up.
_MAX_CACHED_WORD = 64
_MAX_CACHED_WORDS = 16384

_V = TypeVar("_V", list[float], SparseVector)

try:  # The C helper behind Counter.update, without its per-call isinstance() overhead.
    from collections import _count_elements  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - other interpreters

    def _count_elements(mapping: dict, iterable: Iterable) -> None:  # type: ignore[misc]
        get = mapping.get
        for element in iterable:
            mapping[element] = get(element, 0) + 1


def model_name(dimensions: int) -> str:
    """The model id the hash tier reports: vectors of different sizes never share a name."""
    return f"hash-v{HASH_VERSION}-{dimensions}"


def whole_text_word(lowered: str) -> str:
    """The one word a text without a usable word is embedded as: all of it, with each lone
    surrogate as U+FFFD, which is what JavaScript's TextEncoder makes of it (Python's
    codecs would raise, or write surrogate bytes no other implementation produces)."""
    return _LONE_SURROGATE.sub("\ufffd", lowered)


def word_features(word: str) -> list[str]:
    """The padded word itself, then its character n-grams for n in NGRAM_SIZES."""
    padded = f" {word} "
    features = [padded]
    for n in NGRAM_SIZES:
        features.extend(padded[i : i + n] for i in range(len(padded) - n + 1))
    return features


class HashEmbedder:
    """Maps texts to L2-normalised vectors of `dimensions` floats. Thread-safe."""

    def __init__(self, dimensions: int = DEFAULT_DIMENSIONS) -> None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            raise ValueError(f"dimensions must be a positive integer, got {dimensions!r}")
        self.dimensions = dimensions
        self.model = model_name(dimensions)
        # Interned bucket numbers: cached tuples then share one int object per bucket.
        self._bucket = tuple(range(dimensions))
        self._positive: dict[str, tuple[int, ...]] = {}
        self._negative: dict[str, tuple[int, ...]] = {}
        # The caches are read with C-level map(); a clear() from another thread in the
        # middle of that would raise KeyError, so one lock covers a whole call.
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], *, normalize: bool = True) -> list[list[float]]:
        return self.embed_with_counts(texts, normalize=normalize)[0]

    def embed_one(self, text: str, *, normalize: bool = True) -> list[float]:
        return self.embed_with_counts([text], normalize=normalize)[0][0]

    def embed_with_counts(self, texts: Sequence[str], *, normalize: bool = True
                          ) -> tuple[list[list[float]], list[int]]:
        """Vectors and each text's word count (the hash tier's "tokens"), in input order."""
        return self._each(texts, normalize, self._embed_one)

    def embed_sparse_with_counts(self, texts: Sequence[str], *, normalize: bool = True
                                 ) -> tuple[list[SparseVector], list[int]]:
        """embed_with_counts, each vector a SparseVector (equal to the list embed gives):
        what the server writes, since its writers then skip the zeros and no list of
        floats is made. A SparseVector is a Sequence, not a list: json.dumps takes its
        .tolist()."""
        return self._each(texts, normalize, self._embed_sparse)

    def _each(self, texts: Sequence[str], normalize: bool,
              embed: Callable[[str, bool], tuple[_V, int]]) -> tuple[list[_V], list[int]]:
        vectors: list[_V] = []
        counts: list[int] = []
        with self._lock:
            for text in texts:
                vector, words = embed(text, normalize)
                vectors.append(vector)
                counts.append(words)
        return vectors, counts

    def _codes(self, word: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        positive: list[int] = []
        negative: list[int] = []
        dims, bucket = self.dimensions, self._bucket
        for feature in word_features(word):
            h = zlib.crc32(feature.encode("utf-8"))
            (negative if h & 0x80000000 else positive).append(bucket[h % dims])
        return tuple(positive), tuple(negative)

    def _learn(self, counts: dict[str, int]) -> list[str]:
        """Cache the codes of this text's unseen words; return those too long to keep."""
        positive, negative = self._positive, self._negative
        unseen = [w for w in counts if w not in positive]
        if not unseen:
            return unseen
        if len(positive) + len(unseen) > _MAX_CACHED_WORDS:
            positive.clear()
            negative.clear()
            unseen = list(counts)
        for word in unseen:
            positive[word], negative[word] = self._codes(word)
        return [w for w in unseen if len(w) > _MAX_CACHED_WORD]

    def _accumulate(self, counts: dict[str, int]) -> dict[int, int]:
        """The integer buckets of distinct words with their term frequencies (spec step 6)."""
        positive, negative = self._positive, self._negative
        transient = self._learn(counts)

        # Every distinct word counts once (C-level counting over cached code tuples)...
        buckets: dict[int, int] = {}
        minus: dict[int, int] = {}
        _count_elements(buckets, chain.from_iterable(map(positive.__getitem__, counts)))
        _count_elements(minus, chain.from_iterable(map(negative.__getitem__, counts)))
        # ...then repeated words add weight up to 1 + floor(log2(tf)): sublinear, integral.
        for word, tf in counts.items():
            if tf > 1:
                extra = tf.bit_length() - 1
                _count_elements(buckets, positive[word] * extra)
                _count_elements(minus, negative[word] * extra)
        for word in transient:
            del positive[word], negative[word]

        get = buckets.get
        for index, value in minus.items():
            buckets[index] = get(index, 0) - value
        return buckets

    def _embed_one(self, text: str, normalize: bool) -> tuple[list[float], int]:
        buckets, norm, words = self._weights(text, normalize)
        return dense(buckets, norm, self.dimensions), words

    def _embed_sparse(self, text: str, normalize: bool) -> tuple[SparseVector, int]:
        buckets, norm, words = self._weights(text, normalize)
        return SparseVector(buckets, norm, self.dimensions), words

    def _weights(self, text: str, normalize: bool) -> tuple[dict[int, int], float, int]:
        """The integer buckets (the zero ones left out), the norm to divide them by, and
        the text's word count."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        lowered = text.lower()
        words = WORD_PATTERN.findall(lowered)
        counts: dict[str, int] = {}
        _count_elements(counts, words)
        buckets = self._accumulate(counts)
        values = buckets.values()
        # Integer sum of squares: exact, so no summation order can change the norm.
        squares = sum(map(mul, values, values))
        if not squares:
            # No words (or, rarely, words whose features cancel): a zero vector would make
            # every cosine NaN, so the text is embedded as one word. Only taken on zero.
            if not text:
                raise ValueError("the empty string has no hash embedding")
            buckets = self._accumulate({whole_text_word(lowered): 1})
            values = buckets.values()
            squares = sum(map(mul, values, values))

        return buckets, math.sqrt(squares) if normalize else 1.0, len(words)
