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

import pytest

import embedserve.backends.hash as hash_backend
import embedserve.hashing as hashing
from embedserve.backends.hash import HashBackend
from embedserve.encoding import decode_float32_base64, float32_base64
from embedserve.hashing import HashEmbedder

from conftest import ROOT, Server, start_server

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
    buckets = reference_buckets(tf, dims)
    total = sum(b * b for b in buckets)
    if total == 0:  # the whole-text rule
        whole = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text.lower())
        buckets = reference_buckets({whole: 1}, dims)
        total = sum(b * b for b in buckets)
    norm = math.sqrt(float(total))
    return [float(b) / norm for b in buckets]


def reference_buckets(tf: dict[str, int], dims: int) -> list[int]:
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
    return buckets


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
    # Sizes a request's `dimensions` may ask for are pinned too (the Node tests read them).
    assert {16, 32, 64, 128, 384} <= {case["dimensions"] for case in GOLDEN["cases"]}


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


NO_WORDS = ["!!!", "???", "... !!!", "   ", " ", "\t\n", "\ud800", "\udc00x\ud83d", "🙂🙂",
            "👍🏽", "\u0301"]


def test_vectors_are_unit_length() -> None:
    embedder = HashEmbedder()
    for vector in embedder.embed(sample_texts()[:50]):
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("dims", [384, 16, 1])
def test_texts_without_words_are_unit_vectors_with_finite_cosines(dims: int) -> None:
    embedder = HashEmbedder(dims)
    others = embedder.embed(["a plain sentence", "!!!", "x"])
    for text in NO_WORDS:
        vector = embedder.embed_one(text)
        assert any(vector), text
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-12), text
        for other in others:
            assert math.isfinite(sum(p * q for p, q in zip(vector, other)))
        # Unnormalised: the whole-text word's integer buckets, weight 1.
        assert all(x == int(x) for x in embedder.embed_one(text, normalize=False))


def test_texts_without_words_differ_by_their_characters() -> None:
    embedder = HashEmbedder()
    assert embedder.embed_one("!!!") != embedder.embed_one("???")
    assert embedder.embed_one("   ") != embedder.embed_one("  ")
    # Lower-cased first, like words: circled letters are symbols (So), not word
    # characters, yet have case mappings.
    assert embedder.embed_one("ⒶⒷ!") == embedder.embed_one("ⓐⓑ!")


def test_a_lone_surrogate_is_hashed_as_the_replacement_character() -> None:
    """JavaScript's TextEncoder writes a lone surrogate as U+FFFD (EF BF BD); Python must
    hash the same bytes, not raise and not write surrogate bytes."""
    embedder = HashEmbedder()
    assert embedder.embed_one("\ud800") == embedder.embed_one("\ufffd")
    assert embedder.embed_one("\udfff!") == embedder.embed_one("\ufffd!")
    assert hashing.whole_text_word("a\ud800\udc00b") == "a\ufffd\ufffdb"
    # With words, lone surrogates only separate them, as before.
    assert embedder.embed_one("a\ud800b") == embedder.embed_one("a b")


def test_words_whose_features_cancel_use_the_whole_text_rule() -> None:
    # CRC-32 is affine over XOR: "ad" and "nx" land in the same buckets at D = 16 with
    # opposite signs, so their buckets sum to zero.
    embedder = HashEmbedder(16)
    assert not any(reference_buckets({"ad": 1, "nx": 1}, 16))
    assert embedder.embed_one("ad nx") == reference_embedding("ad nx", 16)
    whole = reference_buckets({"ad nx": 1}, 16)
    assert any(whole) and embedder.embed_one("ad nx", normalize=False) == whole
    assert embedder.embed_with_counts(["ad nx"])[1] == [2]  # still two words


def test_the_empty_string_has_no_hash_embedding() -> None:
    # The server answers "" with a 400 and both clients refuse it before sending, so this
    # is only reachable in-process; an error beats the one zero vector left in the spec.
    with pytest.raises(ValueError, match="empty string"):
        HashEmbedder().embed_one("")
    with pytest.raises(ValueError, match="empty string"):
        HashEmbedder().embed(["fine", ""])
    with pytest.raises(ValueError, match="empty string"):
        HashBackend(384).encode([""])


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
    vectors, counts = HashEmbedder(8).embed_with_counts(["one two, three", "!!!", "a a a"])
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


# --- `dimensions` on the hash tier: hash-v1-d computed directly, not a head of 384 ----------

DIMENSION_TEXTS = ["single", "a b", "Feature hashing is deterministic", "!!!", "naïve café"]


@pytest.mark.parametrize("dims", [1, 16, 32, 64, 383, 384, 1000, None])
def test_backend_dimensions_are_the_embedder_of_that_size(dims: int | None) -> None:
    backend = HashBackend(384)
    for normalize in (True, False):
        encoded = backend.encode(DIMENSION_TEXTS, normalize=normalize, dimensions=dims)
        expected = HashEmbedder(dims or 384).embed_with_counts(DIMENSION_TEXTS,
                                                               normalize=normalize)
        assert (encoded.vectors, encoded.token_counts) == expected
    assert backend.model == "hash-v1-384"  # the served model does not change


def test_backend_keeps_a_bounded_set_of_other_sizes() -> None:
    backend = HashBackend(384)
    for dims in range(8, 40):
        backend.encode(["x"], dimensions=dims)
    assert len(backend._others) == hash_backend._MAX_OTHER_SIZES
    assert list(backend._others) == list(range(40 - hash_backend._MAX_OTHER_SIZES, 40))
    recent = backend._others[39]
    backend.encode(["x"], dimensions=384)  # the default embedder, not a cached other one
    assert 384 not in backend._others and backend._others[39] is recent
    with pytest.raises(ValueError, match="dimensions"):
        backend.encode(["x"], dimensions=0)
    assert 0 not in backend._others


def test_backend_sizes_are_thread_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hash_backend, "_MAX_OTHER_SIZES", 2)  # force evictions mid-run
    texts = sample_texts()[:60]
    sizes = [16, 32, 64, 128, 384]
    expected = {d: HashEmbedder(d).embed(texts) for d in sizes}
    backend = HashBackend(384)
    failures: list[int] = []

    def work(i: int) -> None:
        for round_ in range(10):
            dims = sizes[(i + round_) % len(sizes)]
            if backend.encode(texts, dimensions=dims).vectors != expected[dims]:
                failures.append(dims)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures and len(backend._others) <= 2


def test_a_short_hash_vector_is_not_one_hot() -> None:
    """What the issue was about: the first 32 of the 384 buckets of "single" hold at most
    one non-zero value (one-hot or zero after re-normalising); its own 32 hold many."""
    full = HashEmbedder(384).embed_one("single")
    assert sum(1 for x in full[:32] if x) <= 1
    assert sum(1 for x in HashEmbedder(32).embed_one("single") if x) > 3


def test_dimensions_over_http_equal_a_server_of_that_size(server: Server,
                                                          fresh_server: list[Server]) -> None:
    """`dimensions=32` asked of the default server == what `--dimensions 32` serves, on
    both the TEI and OpenAI routes. Needs service.py to pass `dimensions` to the backend."""
    small = start_server("--dimensions", "32")
    fresh_server.append(small)
    expected = HashEmbedder(32).embed(DIMENSION_TEXTS)

    status, _, direct = small.request("POST", "/embed", {"inputs": DIMENSION_TEXTS})
    assert status == 200 and direct == expected
    status, _, asked = server.request("POST", "/embed",
                                      {"inputs": DIMENSION_TEXTS, "dimensions": 32})
    assert status == 200 and asked == expected

    status, _, direct = small.request("POST", "/v1/embeddings", {"input": DIMENSION_TEXTS})
    assert status == 200
    status, _, asked = server.request("POST", "/v1/embeddings",
                                      {"input": DIMENSION_TEXTS, "dimensions": 32})
    assert status == 200
    assert [d["embedding"] for d in asked["data"]] == [d["embedding"] for d in direct["data"]]
    assert [d["embedding"] for d in asked["data"]] == expected

    single = asked["data"][0]["embedding"]
    assert sum(1 for x in single if x) > 3  # "single": neither one-hot nor zero
    assert math.isclose(sum(x * x for x in single), 1.0, rel_tol=1e-12)


def test_texts_without_words_over_http(server: Server) -> None:
    texts = ["!!!", "   ", "\ud800", "🙂🙂"]
    status, _, body = server.request("POST", "/embed", {"inputs": texts})
    assert status == 200 and body == HashEmbedder(384).embed(texts)
    assert all(any(vector) for vector in body)
