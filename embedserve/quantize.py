"""Compact embeddings: int8 / uint8 codes over fixed per-model ranges, and packed sign bits
(binary / ubinary) exactly as sentence-transformers' `quantize_embeddings` packs them. Pure
Python, shared by whoever needs it (a leaf: it imports no other embedserve module).

The definitions (the README repeats them, so a client can reproduce every code):

- uint8, dimension d with range [min_d, max_d]: step_d = (max_d - min_d) / 255 and
  code = floor((x - min_d) / step_d + 0.5), clamped to 0..255 (IEEE double arithmetic, in
  that order: divided, not multiplied by a reciprocal). int8 = that code - 128. So min_d
  is code 0, max_d code 255, a value is rounded to the nearest of the 256 levels
  (x ~ min_d + code * step_d), and one outside the range is clamped, never wrapped. (The
  rounding is what sets it apart from sentence-transformers' `quantize_embeddings`, which
  truncates: for the hash tier's [-1, 1], 0 is then int8 0, not -1.)
- ubinary: bit i of the vector is 1 when x_i > 0, packed eight to a byte, the first
  coordinate in the highest bit (numpy.packbits); a size that is no multiple of 8 is padded
  with 0 bits at the end of each vector. binary = each byte - 128, as a signed int8.

Ranges never depend on the request: an ML model's are the per-dimension minimum and maximum
of its own normalised embeddings of CALIBRATION_TEXTS, computed once when it loads; the hash
tier's are [-1, 1] for every dimension, the bounds of a unit vector's coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

FLOAT, INT8, UINT8, BINARY, UBINARY, BASE64 = ("float", "int8", "uint8", "binary", "ubinary",
                                               "base64")
EMBEDDING_TYPES = (FLOAT, INT8, UINT8, BINARY, UBINARY, BASE64)
# The types that need a model's ranges; binary needs nothing but the signs.
CALIBRATED_TYPES = (INT8, UINT8)

# A dimension whose calibration values are all equal (a constant feature) gets this width,
# so that its step is never zero.
MIN_WIDTH = 1e-6

# Embedded once at load to find an ML model's ranges: short and long, questions and
# statements, prose and code, several topics and a few languages, so each dimension sees
# something of its spread.
CALIBRATION_TEXTS = (
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of Australia?",
    "Canberra was chosen as the capital in 1908 as a compromise between Sydney and "
    "Melbourne.",
    "def add(a, b):\n    return a + b",
    "SELECT name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name;",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "best pizza near me open late",
    "The central bank raised interest rates by a quarter of a percentage point to curb "
    "inflation.",
    "My flight was delayed for six hours and nobody told us why.",
    "A recipe for sourdough bread: flour, water, salt and a lively starter.",
    "The patient presented with a persistent dry cough and a mild fever.",
    "import numpy as np\nx = np.linspace(0, 1, 100)",
    "Le chat dort sur le canapé depuis ce matin.",
    "Der Zug nach Berlin fährt um acht Uhr ab.",
    "El museo abre todos los días excepto los lunes.",
    "東京は日本の首都です。",
    "Terms and conditions apply. Offer valid while supplies last.",
    "The defendant pleaded not guilty to all charges.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Install the package with pip and run the server from the command line.",
    "error: connection refused (errno 111) while contacting 127.0.0.1:8765",
    "Shakespeare wrote Hamlet around the year 1600.",
    "Quarterly revenue grew 12% year over year, driven by subscriptions.",
    "The team won the championship after a dramatic penalty shootout.",
    "How many calories are in a banana?",
    "Mount Everest is the highest mountain above sea level, at 8,849 metres.",
    "Please find attached the invoice for last month's services.",
    "Neural networks learn representations by adjusting weights with gradient descent.",
    "The hotel room was clean but the breakfast was disappointing.",
    "Turn left at the second traffic light and the library is on your right.",
    "A black hole is a region of spacetime where gravity prevents anything from escaping.",
    "Symptoms of dehydration include thirst, headache and dark urine.",
    "The meeting has been moved to Thursday at 3 pm.",
    "Vaccines train the immune system to recognise a pathogen.",
    "for i in range(10): print(i * i)",
    "The novel follows three generations of a family in a small fishing village.",
    "Compare the cheapest flights from London to New York in March.",
    "Rust guarantees memory safety without a garbage collector.",
    "The orchestra performed Beethoven's Ninth Symphony to a sold-out hall.",
    "Climate change is raising sea levels and increasing extreme weather events.",
    "Is it safe to take ibuprofen with coffee?",
    "The startup raised a seed round to build tools for small farmers.",
    "Mix the eggs and sugar, then fold in the flour gently.",
    "The Roman Empire split into eastern and western halves in 395 AD.",
    "Your order has shipped and will arrive within three business days.",
    "Kubernetes schedules containers onto nodes in a cluster.",
    "cheap used cars under 5000 dollars",
    "The cat knocked a glass off the table and walked away.",
    "Elections will be held in November, and early voting starts next week.",
    "A prime number has exactly two divisors: one and itself.",
    "The museum's new exhibition explores the history of photography.",
    "Why is the sky blue?",
    "Rayleigh scattering makes shorter blue wavelengths spread across the sky more than red.",
    "He signed the contract without reading the fine print.",
    "The software update fixes a bug that drained the battery overnight.",
    "Tomatoes grow best in full sun with regular watering.",
    "The river flooded the valley after a week of heavy rain.",
    "Learn to play guitar in 30 days with simple chord exercises.",
    "The board approved the merger, pending regulatory review.",
    "hello",
    "Thanks!",
    "An embedding maps a text to a vector so that similar texts lie close together.",
    "The referee showed a red card in the final minute of the match.",
)


@dataclass(frozen=True)
class Ranges:
    """Per-dimension [low, high] for int8 / uint8 codes, and how they were found."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    source: str
    # The hash tier's ranges hold for a vector of any size (its `dimensions` are other
    # hash-v1-N embeddings); a calibrated model's hold for its own size only.
    any_size: bool = False
    # (max - min) / 255 per dimension, kept so that each code is one subtraction and one
    # division: the documented arithmetic, in the documented order.
    steps: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high):
            raise ValueError("low and high must have one value per dimension")
        object.__setattr__(self, "steps", tuple((h - lo) / 255 for lo, h in
                                                 zip(self.low, self.high)))

    @property
    def dimensions(self) -> int:
        return len(self.low)

    def for_size(self, dimensions: int) -> Ranges | None:
        """The ranges for vectors of `dimensions` values, or None where there are none."""
        if dimensions == self.dimensions:
            return self
        if self.any_size:
            return unit_ranges(dimensions)
        return None

    def describe(self) -> dict[str, object]:
        """What /info shows, enough for a client to reproduce every code."""
        return {"source": self.source, "min": list(self.low), "max": list(self.high)}

    def uint8(self, vector: Sequence[float]) -> list[int]:
        return self._codes(vector, 0)

    def int8(self, vector: Sequence[float]) -> list[int]:
        return self._codes(vector, -128)

    def _codes(self, vector: Sequence[float], offset: int) -> list[int]:
        if self.any_size:  # [-1, 1] everywhere (unit_ranges): the only ranges of any size
            # One range for every dimension: a code depends on the value alone, and a hash
            # vector holds a handful of distinct values, so each is computed once.
            low, step = (self.low[0], self.steps[0]) if self.low else (0.0, 1.0)
            table = {x: _code(x, low, step) + offset for x in set(vector)}
            return list(map(table.__getitem__, vector))
        codes: list[int] = []
        append = codes.append
        for x, low, step in zip(vector, self.low, self.steps):  # _code, inlined: per value
            t = (x - low) / step + 0.5
            append((0 if t < 0.0 else 255 if t >= 255.0 else int(t)) + offset)
        return codes


def _code(x: float, low: float, step: float) -> int:
    t = (x - low) / step + 0.5
    return 0 if t < 0.0 else 255 if t >= 255.0 else int(t)  # int(t): floor, as t >= 0


def unit_ranges(dimensions: int) -> Ranges:
    """[-1, 1] for every dimension: what any coordinate of a unit vector lies in."""
    return Ranges((-1.0,) * dimensions, (1.0,) * dimensions,
                  "definition: coordinates of a unit vector lie in [-1, 1]", any_size=True)


def calibrate(vectors: Sequence[Sequence[float]], source: str) -> Ranges:
    """Per-dimension min and max of `vectors` (a model's embeddings of CALIBRATION_TEXTS)."""
    if not vectors:
        raise ValueError("calibration needs at least one vector")
    low = tuple(map(min, zip(*vectors)))
    high = tuple(h if h - lo >= MIN_WIDTH else lo + MIN_WIDTH
                 for lo, h in zip(low, map(max, zip(*vectors))))
    return Ranges(low, high, source)


def ubinary(vector: Sequence[float]) -> list[int]:
    """The signs as bits (1: x > 0), eight to a byte, first coordinate highest."""
    if not vector:
        return []
    bits = "".join(["1" if x > 0 else "0" for x in vector])
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def binary(vector: Sequence[float]) -> list[int]:
    return [byte - 128 for byte in ubinary(vector)]


# JSON text of every code, so a response joins prepared strings instead of formatting ints.
_CODE_TEXT = {n: str(n) for n in range(-128, 256)}


def codes_json(codes: Sequence[int]) -> str:
    return "[" + ",".join(map(_CODE_TEXT.__getitem__, codes)) + "]"
