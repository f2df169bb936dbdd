"""The compact codes of embedserve/quantize.py (pure Python) against numpy written out from
the documented definitions, and against sentence-transformers' quantize_embeddings."""

from __future__ import annotations

import random

import pytest

from embedserve.quantize import (MIN_WIDTH, Ranges, binary, calibrate, codes_json, ubinary,
                                 unit_ranges)

np = pytest.importorskip("numpy")


def random_vectors(rows: int, dims: int, scale: float, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.gauss(0.0, scale) for _ in range(dims)] for _ in range(rows)]


def uint8_reference(vectors: list[list[float]], ranges: Ranges) -> object:
    x = np.asarray(vectors, dtype=np.float64)
    low, high = np.asarray(ranges.low), np.asarray(ranges.high)
    return np.clip(np.floor((x - low) / ((high - low) / 255) + 0.5), 0, 255).astype(np.int64)


def test_int8_and_uint8_follow_the_definition_inside_and_outside_the_ranges() -> None:
    ranges = calibrate(random_vectors(64, 48, 0.1, seed=1), "test")
    # Drawn wider than the calibration set: some values fall outside and are clamped.
    vectors = random_vectors(200, 48, 0.15, seed=2)
    want = uint8_reference(vectors, ranges)
    assert np.array_equal([ranges.uint8(v) for v in vectors], want)
    assert np.array_equal([ranges.int8(v) for v in vectors], want - 128)
    assert (want == 0).any() and (want == 255).any()  # clamping was exercised
    # The range's ends are the extreme codes.
    assert ranges.uint8(list(ranges.low)) == [0] * 48
    assert ranges.uint8(list(ranges.high)) == [255] * 48


def test_calibration_is_the_per_dimension_min_and_max() -> None:
    vectors = random_vectors(10, 8, 1.0, seed=3) + [[0.5] * 8]
    ranges = calibrate(vectors, "test")
    assert list(ranges.low) == np.min(vectors, axis=0).tolist()
    assert list(ranges.high) == np.max(vectors, axis=0).tolist()
    # A dimension with one value throughout gets a width, so its step is never zero.
    flat = calibrate([[0.25, 1.0], [0.25, 2.0]], "test")
    assert flat.high[0] == 0.25 + MIN_WIDTH and flat.uint8([0.25, 1.5]) == [0, 128]


def test_unit_ranges_put_zero_at_int8_zero_and_hold_for_any_size() -> None:
    ranges = unit_ranges(16)
    assert ranges.int8([0.0] * 16) == [0] * 16
    assert ranges.int8([-1.0, 1.0] + [0.0] * 14)[:2] == [-128, 127]
    assert ranges.for_size(5) == unit_ranges(5)
    assert calibrate([[0.0, 1.0]], "test").for_size(3) is None


@pytest.mark.parametrize("dims", [8, 16, 384, 1024])
def test_binary_equals_sentence_transformers_quantize_embeddings(dims: int) -> None:
    quantize = pytest.importorskip("sentence_transformers").quantize_embeddings
    vectors = random_vectors(20, dims, 1.0, seed=dims)
    vectors[0][:8] = [0.0, -0.0, 1e-30, -1e-30, 0.0, 2.0, -2.0, 0.0]  # x > 0, strictly
    array = np.asarray(vectors, dtype=np.float32)
    assert np.array_equal([ubinary(v) for v in array.tolist()],
                          quantize(array, precision="ubinary"))
    assert np.array_equal([binary(v) for v in array.tolist()],
                          quantize(array, precision="binary"))


def test_a_size_no_multiple_of_eight_is_padded_per_vector() -> None:
    vectors = random_vectors(5, 13, 1.0, seed=4)
    packed = np.packbits(np.asarray(vectors) > 0, axis=-1)
    assert np.array_equal([ubinary(v) for v in vectors], packed)
    assert ubinary([]) == [] and ubinary([1.0]) == [128]


def test_codes_json() -> None:
    assert codes_json([-128, 0, 255, 7]) == "[-128,0,255,7]"
    assert codes_json([]) == "[]"
