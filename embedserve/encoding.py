"""Vectors to wire formats. base64 float32 little-endian is OpenAI's compact format."""

from __future__ import annotations

import base64
import sys
from array import array

_BIG_ENDIAN = sys.byteorder == "big"


def float32_base64(vector: list[float]) -> str:
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
