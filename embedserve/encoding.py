"""Vectors to wire formats. base64 float32 little-endian is OpenAI's compact format."""

from __future__ import annotations

import base64
import json
import math
import struct
import sys
from array import array
from collections import deque
from collections.abc import Sequence

_BIG_ENDIAN = sys.byteorder == "big"
# -0.0 in native byte order: the one zero whose text is not "0.0".
_NEGATIVE_ZERO = struct.pack("=d", -0.0)
_ZERO_FLOAT32 = (0.0,)


def float32_base64(vector: Sequence[float]) -> str:
    if isinstance(vector, SparseVector):
        packed = array("f", _ZERO_FLOAT32) * len(vector)
        deque(map(packed.__setitem__, vector.places, vector.values), maxlen=0)
    else:
        packed = array("f", vector)
    if _BIG_ENDIAN:
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def decode_float32_base64(text: str) -> list[float]:
    packed = array("f")
    packed.frombytes(base64.b64decode(text))
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tolist()


class SparseVector(list[float]):
    """A vector that is a plain list of floats to every reader, and also carries where its
    non-zero values are: `places` (ascending) and `values` (the floats there). Every other
    element is 0.0 (never -0.0). The hash tier makes these (most of a hash vector is zeros),
    so the writers below touch a few dozen values instead of scanning hundreds."""

    __slots__ = ("places", "values")
    places: list[int]
    values: list[float]


def float_array_json(vector: Sequence[float]) -> str:
    """The JSON text of a float array, byte for byte what json.dumps(..., separators=(",",
    ":")) writes, NaN and infinities included (json writes them as NaN, Infinity and
    -Infinity, which strict JSON parsers refuse; no tier produces them).

    Float formatting dominates a float response, and a hash vector holds only a handful of
    distinct values (small integers over one norm), mostly zeros: each distinct value is
    formatted once, and a SparseVector's zeros are never looked at one by one."""
    if isinstance(vector, SparseVector):
        values = vector.values
        distinct = set(values)
        if all(map(math.isfinite, distinct)):
            # json writes finite floats with float.__repr__.
            text = {value: repr(value) for value in distinct}
            parts = ["0.0"] * len(vector)
            # Each non-zero value's text put in its place (a C-level loop: map, drained).
            deque(map(parts.__setitem__, vector.places, map(text.__getitem__, values)),
                  maxlen=0)
            return "[" + ",".join(parts) + "]"
    distinct = set(vector)
    if len(distinct) * 4 <= len(vector) and all(map(math.isfinite, distinct)):
        # 0.0 and -0.0 are one set entry (they are equal): with both in the vector, the
        # text of either would be that of whichever came first.
        if all(distinct) or not _has_negative_zero(vector):
            text = {value: repr(value) for value in distinct}
            return "[" + ",".join(map(text.__getitem__, vector)) + "]"
    return json.dumps(vector, separators=(",", ":"))


def _has_negative_zero(vector: Sequence[float]) -> bool:
    """Whether any element is -0.0: a search of the packed doubles for its bit pattern (at a
    multiple of 8 bytes: the pattern may also straddle two neighbouring values)."""
    packed = array("d", vector).tobytes()
    found = packed.find(_NEGATIVE_ZERO)
    while found >= 0:
        if not found % 8:
            return True
        found = packed.find(_NEGATIVE_ZERO, found + 1)
    return False


def float32_base64_json(vector: Sequence[float]) -> str:
    return '"' + float32_base64(vector) + '"'
