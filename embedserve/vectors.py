"""Vector maths shared by the server and the clients, on the standard library alone."""

from __future__ import annotations

import math
from collections.abc import Sequence


def shorten(vector: list[float], dims: int, normalize: bool) -> list[float]:
    """Matryoshka-style: keep the first `dims` values, then re-normalise."""
    head = vector[:dims]
    if not normalize:
        return head
    # Summed left to right on purpose: sum() of floats is compensated from Python 3.12 on,
    # and the same vector must give the same bits on every version.
    squares = 0.0
    for x in head:
        squares += x * x
    norm = math.sqrt(squares)
    return [x / norm for x in head] if norm else head


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity, summed left to right (the same bits on every Python version);
    0.0 when either vector is all zeros."""
    dot = norm_a = norm_b = 0.0
    for x, y in zip(a, b):
        dot += x * y
        norm_a += x * x
        norm_b += y * y
    if not norm_a or not norm_b:
        return 0.0
    return dot / (math.sqrt(norm_a) * math.sqrt(norm_b))
