"""The hash tier against its specification (docs/hash-embedding.md) and golden vectors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

import embedserve.hashing as hashing
from embedserve.encoding import decode_float32_base64, float32_base64
from embedserve.hashing import HashEmbedder

from conftest import ROOT

GOLDEN = json.loads((ROOT / "tests" / "data" / "hash_golden.json").read_text("utf-8"))
# Varied English (plus some accents, other scripts, numbers and repeated words), one text a
# line, kept in the repository so a fresh clone tests the same texts.
CORPUS = ROOT / "tests" / "data" / "texts.txt"


def sample_texts() -> list[str]:
    texts = CORPUS.read_text("utf-8").splitlines()
    # Every text has a word: the unit-length checks would fail on a zero vector.
    assert len(texts) >= 300 and all(re.search(r"\w", t) for t in texts)
    return texts


def reference_embedding(text: str, dims: int) -> list[float]:
    """The spec, step by step, written as plainly as possible and independently of the
    optimised implementation (no caches, no counters of codes)."""
    words = re.findall(r"\w+", text.lower())
    tf: dict[str, int] = {}
    for word in words:
        tf[word] = tf.get(word, 0) + 1
    buckets = [0] * dims
    for word, count in tf.items():
        weight = 1 + int(math.floor(math.log2(count)))
        p = " " + word + " "
        features = [p] + [p[i:i + 3] for i in range(len(p) - 2)] \
            + [p[i:i + 5] for i in range(len(p) - 4)]
        for feature in features:
            h = zlib.crc32(feature.encode("utf-8")) & 0xFFFFFFFF
            sign = -1 if h >= 2 ** 31 else 1
            buckets[h % dims] += sign * weight
    total = sum(b * b for b in buckets)
    if total == 0:
        return [0.0] * dims
    norm = math.sqrt(float(total))
    return [float(b) / norm for b in buckets]


@pytest.mark.parametrize("case", GOLDEN["cases"],
                         ids=lambda c: f"{c['dimensions']}-{c['text'][:20]}")
def test_golden_vectors_bit_for_bit(case: dict) -> None:
    embedder = HashEmbedder(case["dimensions"])
    vector = embedder.embed_one(case["text"])
    assert vector == case["vector"]  # exact equality of doubles, not approx
    assert float32_base64(vector) == case["float32_base64"]
    assert embedder.embed_one(case["text"], normalize=False) == case["unnormalized"]


def test_golden_file_matches_the_current_version() -> None:
    assert GOLDEN["hash_version"] == hashing.HASH_VERSION
    assert GOLDEN["models"]["384"] == HashEmbedder(384).model == "hash-v1-384"


@pytest.mark.parametrize("dims", [384, 16, 1, 1000])
def test_implementation_equals_the_plain_reading_of_the_spec(dims: int) -> None:
    texts = sample_texts() + [case["text"] for case in GOLDEN["cases"]]
    embedder = HashEmbedder(dims)
    assert embedder.embed(texts) == [reference_embedding(t, dims) for t in texts]


def test_deterministic_across_processes_and_hash_seeds() -> None:
    texts = sample_texts()[:200]
    script = ("import json,sys; from embedserve.hashing import HashEmbedder; "
              "print(json.dumps(HashEmbedder(384).embed(json.load(sys.stdin))))")
    outputs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts),
                              capture_output=True, text=True, env=env, check=True, timeout=120)
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1] == HashEmbedder(384).embed(texts)


def test_cache_eviction_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = sample_texts()[:300]
    expected = HashEmbedder(64).embed(texts)
    monkeypatch.setattr(hashing, "_MAX_CACHED_WORDS", 50)
    small = HashEmbedder(64)
    assert small.embed(texts) == expected
    assert len(small._positive) <= 50 + max(len(set(re.findall(r"\w+", t.lower())))
                                            for t in texts)


def test_thread_safe_under_concurrent_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "_MAX_CACHED_WORDS", 100)  # force clears mid-run
    texts = sample_texts()[:300]
    expected = HashEmbedder(128).embed(texts)
    shared = HashEmbedder(128)
    results: dict[int, list[list[float]]] = {}

    def work(i: int) -> None:
        results[i] = shared.embed(texts[i::4])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(4):
        assert results[i] == expected[i::4]


def test_vectors_are_unit_length_and_the_empty_text_is_zero() -> None:
    embedder = HashEmbedder()
    for vector in embedder.embed(sample_texts()[:50]):
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-12)
    assert embedder.embed_one("... !!!") == [0.0] * 384
    assert embedder.embed_one("") == [0.0] * 384


def test_lexical_similarity_ranks_related_texts_first() -> None:
    embedder = HashEmbedder()

    def cos(a: str, b: str) -> float:
        x, y = embedder.embed([a, b])
        return sum(p * q for p, q in zip(x, y))

    query = "how to parse a JSON file in Python"
    related = "Parsing JSON files with Python's json module"
    unrelated = "The weather in Paris is mild in spring"
    assert cos(query, related) > cos(query, unrelated) + 0.2
    # Morphology: sub-word n-grams relate "embedding" and "embeddings".
    assert cos("embedding", "embeddings") > 0.5


def test_token_counts_are_word_counts() -> None:
    vectors, counts = HashEmbedder(8).embed_with_counts(["one two, three", "", "a a a"])
    assert counts == [3, 0, 3]
    assert len(vectors) == 3


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "384"])
def test_bad_dimensions_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="dimensions"):
        HashEmbedder(bad)  # type: ignore[arg-type]


def test_non_string_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        HashEmbedder().embed([b"bytes"])  # type: ignore[list-item]


def test_base64_round_trip_is_float32() -> None:
    vector = HashEmbedder().embed_one("round trip")
    decoded = decode_float32_base64(float32_base64(vector))
    assert len(decoded) == 384
    assert max(abs(a - b) for a, b in zip(decoded, vector)) < 1e-7


def test_float_array_json_is_byte_identical_to_json_dumps() -> None:
    from embedserve.encoding import float_array_json
    compact = {"separators": (",", ":")}
    for vector in HashEmbedder().embed(sample_texts()[:100]):  # few distinct values
        assert float_array_json(vector) == json.dumps(vector, **compact)
    dense = [i / 7 - 3.0 for i in range(384)]  # all distinct: the plain json path
    assert float_array_json(dense) == json.dumps(dense, **compact)
    assert json.loads(float_array_json([1e-300, 5e300, 0.1, 0.1, 0.1, 0.1])) == [
        1e-300, 5e300, 0.1, 0.1, 0.1, 0.1]
