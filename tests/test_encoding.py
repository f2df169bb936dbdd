"""The wire writers byte for byte, on every kind of vector they can be given: float JSON
against json.dumps, base64 against little-endian float32 from array(). Hash vectors (sparse,
few distinct values), dense model vectors, and the values whose text is easy to get wrong
(-0.0, subnormals, 1e-300, 17 significant digits, NaN, infinity)."""

from __future__ import annotations

import base64
import json
import math
import pickle
import random
import sys
from array import array

import pytest

from embedserve.encoding import (SparseVector, _has_negative_zero, decode_float32_base64,
                                 float32_base64, float_array_json)
from embedserve.hashing import HashEmbedder

from test_hashing import sample_texts

# Values whose shortest round-trip text is unusual: signed zeros, the smallest subnormal and
# others, the extremes, values needing all 17 significant digits, and exponents both ways.
AWKWARD = [0.0, -0.0, 5e-324, -5e-324, 2.225073858507201e-308, sys.float_info.min,
           1e-300, -1e-300, 1e300, sys.float_info.max, -sys.float_info.max,
           0.1 + 0.2, 1 / 3, -2 / 3, 0.30000000000000004, 9007199254740993.0, 1e16, 1e-7,
           1e-5, 123456789012345680.0, 0.5, -1.0, 2.0, 1.7976931348623157e308 / 3]
SIZES = [0, 1, 2, 3, 7, 383, 384, 385, 1024]


def dumps(vector: list[float]) -> str:
    return json.dumps(vector, separators=(",", ":"))


def sparse_vector(rng: random.Random, size: int, density: float, pool: list[float]) -> list[float]:
    return [rng.choice(pool) if rng.random() < density else 0.0 for _ in range(size)]


@pytest.mark.parametrize("size", SIZES)
def test_random_sparse_and_dense_vectors_are_written_as_json_dumps_writes_them(size: int) -> None:
    rng = random.Random(size)
    for density in (0.0, 0.01, 0.1, 0.3, 0.5, 0.51, 0.8, 1.0):
        for _ in range(20):
            few = [rng.randint(-9, 9) / 7.3 for _ in range(5)]
            many = [rng.uniform(-1, 1) for _ in range(50)]
            for pool in (few, many, AWKWARD, few + AWKWARD):
                vector = sparse_vector(rng, size, density, pool)
                assert float_array_json(vector) == dumps(vector), vector


@pytest.mark.parametrize("size", SIZES)
def test_negative_zeros_keep_their_sign(size: int) -> None:
    rng = random.Random(size)
    for pool in ([-0.0], [-0.0, 0.5], [-0.0, 1e-300, 0.25, -0.25]):
        for density in (0.05, 0.5, 1.0):
            vector = sparse_vector(rng, size, density, pool)
            assert float_array_json(vector) == dumps(vector)
    assert float_array_json([-0.0] * size) == dumps([-0.0] * size)
    if size:
        mixed = [0.0] * size
        mixed[-1] = -0.0
        assert float_array_json(mixed) == dumps(mixed)
        assert float_array_json(mixed).endswith("-0.0]")


def test_a_negative_zero_pattern_across_two_values_is_not_a_negative_zero() -> None:
    # Packed (little-endian here), 0.0 then a value whose lowest byte is 0x80 hold the bytes
    # of -0.0 (seven zeros, then 0x80) across the two: only an aligned match is one.
    tricky = [0.0] * 40
    tricky[11] = float.fromhex("0x1.0000000000080p+0")
    assert not _has_negative_zero(tricky)
    assert float_array_json(tricky) == dumps(tricky)
    tricky[30] = -0.0
    assert _has_negative_zero(tricky)
    assert float_array_json(tricky) == dumps(tricky)


def test_nan_and_infinity_are_written_as_json_dumps_writes_them() -> None:
    """No tier emits them (hash vectors are finite integers over a positive norm; model
    vectors are checked by the ML tiers' tests). If one ever did, the writer gives what
    json.dumps gives, NaN / Infinity / -Infinity: a parser with the same extension (Python's
    json, the Node client's fallback does not need it) reads it back, strict ones refuse it."""
    for special in (math.nan, math.inf, -math.inf):
        for vector in ([special], [0.0] * 100 + [special], [special, 0.5] * 100,
                       [0.25] * 50 + [special] * 2 + [0.0] * 300):
            assert float_array_json(vector) == dumps(vector)
    assert "NaN" in float_array_json([0.0] * 10 + [math.nan])


def test_hash_vectors_are_written_as_json_dumps_writes_them() -> None:
    texts = sample_texts()
    for dims in (1, 8, 384, 1024):
        embedder = HashEmbedder(dims)
        for normalize in (True, False):
            for vector in embedder.embed(texts, normalize=normalize):
                assert float_array_json(vector) == dumps(vector)


def test_the_writer_reads_back_to_the_same_floats() -> None:
    rng = random.Random(7)
    for _ in range(200):
        vector = sparse_vector(rng, 384, rng.random(), AWKWARD + [rng.uniform(-1, 1)])
        assert [math.copysign(1, v) for v in json.loads(float_array_json(vector))] == [
            math.copysign(1, v) for v in vector]
        assert json.loads(float_array_json(vector)) == vector


@pytest.mark.parametrize("dims", [1, 8, 384, 1024])
def test_sparse_hash_vectors_are_the_same_vectors_and_written_the_same(dims: int) -> None:
    """What the server writes: the hash tier's SparseVectors, equal to embed()'s lists bit for
    bit, and written (float JSON and base64) exactly as those lists are."""
    texts = sample_texts()
    embedder = HashEmbedder(dims)
    for normalize in (True, False):
        dense, dense_counts = embedder.embed_with_counts(texts, normalize=normalize)
        sparse, sparse_counts = embedder.embed_sparse_with_counts(texts, normalize=normalize)
        assert sparse_counts == dense_counts
        for plain, vector in zip(dense, sparse):
            assert isinstance(vector, SparseVector)
            assert [vector.weights.get(i, 0) / vector.norm for i in range(dims)] == plain
            assert float_array_json(vector) == dumps(plain)
            assert float32_base64(vector) == float32_base64(list(plain))
            # Written from its weights: the server never makes a hash vector's list.
            assert vector._list is None
            assert [math.copysign(1, v) for v in vector] == [math.copysign(1, v) for v in plain]
            assert vector == plain


def as_sparse(vector: list[float]) -> SparseVector:
    """The SparseVector of these elements: each non-zero (and -0.0) a weight over norm 1."""
    weights = {i: x for i, x in enumerate(vector) if x or math.copysign(1, x) < 0}
    return SparseVector(weights, 1.0, len(vector))


@pytest.mark.parametrize("size", SIZES)
def test_sparse_vectors_of_any_values_are_written_as_their_lists_are(size: int) -> None:
    """The writers' sparse paths against json.dumps and array() of the same elements, for
    the awkward values, non-finite ones included (which the float writer leaves to json)."""
    rng = random.Random(size)
    pool = AWKWARD + [math.inf, -math.inf, math.nan, 1e39, -1e39, 3.4028235e38, 1e-46]
    for density in (0.0, 0.05, 0.5, 1.0):
        for _ in range(10):
            plain = sparse_vector(rng, size, density, pool)
            vector = as_sparse(plain)
            assert float_array_json(vector) == dumps(plain)
            assert float32_base64(vector) == float32_reference(plain)


def test_a_sparse_vector_reads_as_the_list_it_stands_for() -> None:
    vector = SparseVector({1: 3, 4: -1}, 2.0, 6)
    plain = [0.0, 1.5, 0.0, 0.0, -0.5, 0.0]
    assert len(vector) == 6 and list(vector) == plain and vector.tolist() == plain
    assert vector[1] == 1.5 and vector[-2] == -0.5 and vector[1:3] == [1.5, 0.0]
    assert vector == plain and plain == vector and vector != plain[:-1]
    assert vector == SparseVector({1: 6, 4: -2}, 4.0, 6) and vector != tuple(plain)
    assert repr(vector) == repr(plain) and not SparseVector({}, 1.0, 0)
    with pytest.raises(IndexError):
        vector[6]
    with pytest.raises(TypeError):
        hash(vector)
    copy = vector.tolist()
    copy[0] = 9.0  # a new list each time: the vector's own elements stay as they were
    assert vector[0] == 0.0 and vector.tolist() == plain


def test_a_sparse_vector_with_non_finite_values_is_written_as_json_dumps_writes_it() -> None:
    # Made as the hash tier never makes one: a NaN norm, or a division that overflows.
    for weight, norm in ((1, math.nan), (10**308, 1e-10), (-(10**308), 1e-10)):
        vector = SparseVector({3: weight}, norm, 10)
        assert not math.isfinite(vector[3])
        assert float_array_json(vector) == dumps(list(vector))


def test_a_sparse_vector_survives_pickling_whole() -> None:
    """Hosts that move results between processes (multiprocessing, Ray) pickle them."""
    vector = HashEmbedder(64).embed_sparse_with_counts(["pickled hash vector"])[0][0]
    copied = pickle.loads(pickle.dumps(vector))
    assert type(copied) is SparseVector and copied == vector and len(copied) == 64
    assert (copied.weights, copied.norm) == (vector.weights, vector.norm)
    assert float_array_json(copied) == dumps(list(vector))


def float32_reference(vector: list[float]) -> str:
    """OpenAI's base64: little-endian float32, each double rounded as C's (float) cast."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


@pytest.mark.parametrize("size", SIZES)
def test_base64_is_little_endian_float32_whatever_the_sequence(size: int) -> None:
    """A plain list, a SparseVector (packed another way) and a tuple give the same text, for
    the awkward values, values past float32's range (infinite, as the cast makes them), NaN
    and infinities included."""
    rng = random.Random(size)
    pool = AWKWARD + [math.inf, -math.inf, 1e39, -1e39, 3.4028235e38, 1e-46, 0.1]
    for _ in range(10):
        vector = sparse_vector(rng, size, rng.random(), pool)
        expected = float32_reference(vector)
        for kind in (list, as_sparse, tuple):
            assert float32_base64(kind(vector)) == expected
    nan = float32_base64(SparseVector({0: math.nan, 1: 1.0}, 1.0, 2))
    assert math.isnan(decode_float32_base64(nan)[0]) and decode_float32_base64(nan)[1] == 1.0
