"""Vectors to wire formats. base64 float32 little-endian is OpenAI's compact format."""

from __future__ import annotations

import base64
import json
import sys
from array import array
from collections.abc import Sequence

_BIG_ENDIAN = sys.byteorder == "big"


def float32_base64(vector: Sequence[float]) -> str:
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


def float_array_json(vector: Sequence[float]) -> str:
    """The JSON text of a float array, byte for byte what json.dumps(..., separators=(",",
    ":")) writes. Float formatting dominates a float response; a hash vector holds only a
    handful of distinct values (small integers over one norm), so each is formatted once."""
    distinct = set(vector)
    if len(distinct) * 4 <= len(vector):
        # json writes finite floats with float.__repr__. (0.0 and -0.0 share a set entry;
        # the hash tier never produces -0.0.)
        text = {value: repr(value) for value in distinct}
        return "[" + ",".join(map(text.__getitem__, vector)) + "]"
    return json.dumps(vector, separators=(",", ":"))


def float32_base64_json(vector: Sequence[float]) -> str:
    return '"' + float32_base64(vector) + '"'
