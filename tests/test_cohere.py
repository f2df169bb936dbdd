"""Cohere's embed API (POST /v2/embed) through the real `cohere` SDK, unmodified, against
real servers: the hash tier and a tiny sentence-transformers model made at test time. Every
compact code is checked against a reference computed here, with numpy, from the served
floats and the ranges /info publishes; packed bits against sentence-transformers'
quantize_embeddings."""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from embedserve.hashing import HashEmbedder
from embedserve.quantize import CALIBRATION_TEXTS, EMBEDDING_TYPES

from conftest import Server, start_server
from tiny_models import make_tiny_models

cohere = pytest.importorskip("cohere")
np = pytest.importorskip("numpy")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HASH_MODEL = "hash-v1-384"
TEXTS = ["the quick brown fox", "hello world", "a cat sat on the mat", "json file parse"]
LONG = " ".join(["cat dog"] * 40)  # far over the tiny model's 32 tokens
BATCH_LIMIT = 8


def client(srv: Server) -> Any:
    return cohere.ClientV2(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)


def embed(srv: Server, texts: list[str], model: str, **options: Any) -> Any:
    options.setdefault("input_type", "search_document")
    options.setdefault("embedding_types", list(EMBEDDING_TYPES))
    return client(srv).embed(model=model, texts=texts, **options)


def ranges_of(srv: Server, model: str | None = None) -> dict[str, Any]:
    info = srv.request("GET", "/info")[2]
    entry = next(m for m in info["models"] if model is None or model in m["names"])
    return entry["quantization_ranges"]


def uint8_reference(floats: list[list[float]], ranges: dict[str, Any]) -> Any:
    """The README's definition: floor((x - min) / step + 0.5), step = (max - min) / 255,
    clamped to 0..255, in float64."""
    x = np.asarray(floats, dtype=np.float64)
    low, high = np.asarray(ranges["min"]), np.asarray(ranges["max"])
    step = (high - low) / 255
    return np.clip(np.floor((x - low) / step + 0.5), 0, 255).astype(np.int64)


def check_every_type(response: Any, ranges: dict[str, Any]) -> list[list[float]]:
    """Every embedding type of one response, against references made from its floats."""
    e = response.embeddings
    floats = e.float_
    float32 = np.asarray(floats, dtype=np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in e.base64])
    assert np.array_equal(decoded, float32)
    codes = uint8_reference(floats, ranges)
    assert np.array_equal(np.asarray(e.uint8), codes)
    assert np.array_equal(np.asarray(e.int8), codes - 128)
    quantize = pytest.importorskip("sentence_transformers").quantize_embeddings
    assert np.array_equal(np.asarray(e.ubinary), quantize(float32, precision="ubinary"))
    assert np.array_equal(np.asarray(e.binary), quantize(float32, precision="binary"))
    return floats


# --- the hash tier ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hash_server() -> Iterator[Server]:
    srv = start_server("--max-batch-size", str(BATCH_LIMIT))
    yield srv
    assert srv.stop() == 0


def test_hash_tier_every_embedding_type_through_the_sdk(hash_server: Server) -> None:
    ranges = ranges_of(hash_server)
    # By definition, not calibration: a unit vector's coordinates lie in [-1, 1].
    assert ranges["min"] == [-1.0] * 384 and ranges["max"] == [1.0] * 384
    response = embed(hash_server, TEXTS, HASH_MODEL)
    floats = check_every_type(response, ranges)
    vectors, counts = HashEmbedder().embed_with_counts(TEXTS)
    assert floats == vectors
    assert response.texts == TEXTS and response.id
    assert response.meta.api_version.version == "2"
    assert response.meta.billed_units.input_tokens == sum(counts)
    # 0 lies midway in [-1, 1]: it is int8 0 (most of a hash vector's coordinates are 0).
    assert response.embeddings.int8[0][floats[0].index(0.0)] == 0


def test_hash_tier_takes_input_type_and_changes_nothing(hash_server: Server) -> None:
    plain = embed(hash_server, TEXTS, HASH_MODEL, embedding_types=["float"])
    for input_type in ("search_query", "classification", "clustering"):
        other = embed(hash_server, TEXTS, HASH_MODEL, input_type=input_type,
                      embedding_types=["float"])
        assert other.embeddings.float_ == plain.embeddings.float_


def test_hash_tier_output_dimension_with_every_type(hash_server: Server) -> None:
    response = embed(hash_server, TEXTS, HASH_MODEL, output_dimension=64)
    floats = check_every_type(response, ranges_of(hash_server) | {
        "min": [-1.0] * 64, "max": [1.0] * 64})
    assert floats == HashEmbedder(64).embed(TEXTS)


def test_only_the_types_asked_for_in_one_request(hash_server: Server) -> None:
    status, _, body = hash_server.request("POST", "/v2/embed", {
        "model": HASH_MODEL, "texts": TEXTS, "embedding_types": ["ubinary", "int8", "int8"]})
    assert status == 200 and set(body["embeddings"]) == {"ubinary", "int8"}
    assert len(body["embeddings"]["ubinary"][0]) == 384 // 8
    status, _, body = hash_server.request("POST", "/v2/embed", {"texts": TEXTS})
    assert status == 200 and set(body["embeddings"]) == {"float"}  # the default, and model


def test_inputs_of_text_parts_are_texts(hash_server: Server) -> None:
    status, _, body = hash_server.request("POST", "/v2/embed", {"model": HASH_MODEL, "inputs": [
        {"content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]},
        {"content": [{"type": "text", "text": "json file parse"}]}]})
    assert status == 200, body
    assert body["embeddings"]["float"] == HashEmbedder().embed(["hello world", "json file parse"])


def test_the_v1_client_embeds_unmodified(hash_server: Server) -> None:
    # cohere.Client (v1) posts to /v1/embed: it was a 404, in OpenAI's error shape.
    v1 = cohere.Client(base_url=hash_server.url, api_key="unused", max_retries=0, timeout=60)
    plain = v1.embed(model=HASH_MODEL, texts=TEXTS, input_type="search_query")
    assert plain.response_type == "embeddings_floats"  # v1's answer without embedding_types
    assert plain.embeddings == HashEmbedder().embed(TEXTS) and plain.texts == TEXTS
    assert plain.meta.api_version.version == "1"
    typed = v1.embed(model=HASH_MODEL, texts=TEXTS, embedding_types=["float", "ubinary"])
    assert typed.response_type == "embeddings_by_type"
    assert typed.embeddings.float_ == plain.embeddings
    assert typed.embeddings.ubinary == embed(hash_server, TEXTS, HASH_MODEL).embeddings.ubinary
    with pytest.raises(cohere.core.api_error.ApiError) as info:
        v1.embed(model="no-such-model", texts=TEXTS)
    assert info.value.status_code == 404 and "no-such-model" in info.value.body["message"]
    status, _, body = hash_server.request("POST", "/v1/nowhere", {"input": "x"})
    assert status == 404 and body["error"]["code"] == "not_found"  # /v1 is still OpenAI's


def sdk_error(srv: Server, **request: Any) -> Any:
    with pytest.raises(cohere.core.api_error.ApiError) as info:
        client(srv).embed(**{"model": HASH_MODEL, "input_type": "search_document",
                             "texts": TEXTS, **request})
    return info.value


def test_errors_through_the_sdk(hash_server: Server) -> None:
    error = sdk_error(hash_server, embedding_types=["float", "int4"])
    assert isinstance(error, cohere.UnprocessableEntityError)
    assert "int4" in error.body["message"] and "ubinary" in error.body["message"]
    error = sdk_error(hash_server, texts=[])
    assert isinstance(error, cohere.BadRequestError) and "empty" in error.body["message"]
    error = sdk_error(hash_server, texts=["x"] * (BATCH_LIMIT + 1))
    assert error.status_code == 413 and str(BATCH_LIMIT) in error.body["message"]
    error = sdk_error(hash_server, input_type="search_everything")
    assert isinstance(error, cohere.UnprocessableEntityError)
    assert "search_query" in error.body["message"]
    error = sdk_error(hash_server, input_type="image")
    assert isinstance(error, cohere.UnprocessableEntityError)
    error = sdk_error(hash_server, model="embed-v4.0")
    assert isinstance(error, cohere.NotFoundError) and HASH_MODEL in error.body["message"]
    error = sdk_error(hash_server, truncate="MIDDLE")
    assert isinstance(error, cohere.UnprocessableEntityError)
    error = sdk_error(hash_server, max_tokens=16)
    assert isinstance(error, cohere.UnprocessableEntityError)
    error = sdk_error(hash_server, output_dimension=385)
    assert isinstance(error, cohere.UnprocessableEntityError) and "384" in error.body["message"]
    assert "'output_dimension'" in error.body["message"]  # Cohere's name, not 'dimensions'
    error = sdk_error(hash_server, images=["data:image/png;base64,AAAA"], texts=None)
    assert isinstance(error, cohere.UnprocessableEntityError)


@pytest.mark.parametrize("body,status", [
    ({}, 400), ({"texts": "one"}, 400), ({"texts": ["one"], "embedding_types": "float"}, 400),
    ({"texts": ["one"], "embedding_types": []}, 422),
    ({"texts": ["one", ""]}, 400), ({"texts": ["one"], "inputs": []}, 400),
    ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422),
    ({"inputs": [{"content": "text"}]}, 400), ({"texts": [1, 2]}, 400),
    ({"texts": ["one"], "input_type": 3}, 400),
])
def test_bad_requests_in_cohere_shape(hash_server: Server, body: dict[str, Any],
                                      status: int) -> None:
    got, _, answer = hash_server.request("POST", "/v2/embed", body)
    assert got == status and set(answer) == {"id", "message"} and answer["message"]


@pytest.mark.parametrize("part,message", [
    ({"type": "image_url", "image_url": {"url": "x"}}, "holds an image part"),
    ({"type": "image"}, "holds a part of type 'image'"),  # was "a 'image' part"
    ({"type": "text", "text": 3}, "holds a text part whose 'text' is not a string"),
])
def test_a_part_that_is_no_text_is_named(hash_server: Server, part: dict[str, Any],
                                         message: str) -> None:
    _, _, answer = hash_server.request("POST", "/v2/embed", {"inputs": [{"content": [part]}]})
    assert answer["message"].startswith(f"'inputs[0]' {message}; this server embeds text")


def test_metrics_and_openapi_cover_the_route(hash_server: Server) -> None:
    embed(hash_server, ["counted"], HASH_MODEL, embedding_types=["int8"])
    _, _, spec = hash_server.request("GET", "/openapi.json")
    operation = spec["paths"]["/v2/embed"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CohereEmbedRequest")
    schemas = spec["components"]["schemas"]
    assert set(EMBEDDING_TYPES) <= set(
        schemas["CohereEmbedResponse"]["properties"]["embeddings"]["properties"])
    with urllib.request.urlopen(hash_server.url + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert 'route="/v2/embed",method="POST",status="200"' in metrics


# --- a tiny sentence-transformers model ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("torch")
    pytest.importorskip("sentence_transformers")
    return make_tiny_models(tmp_path_factory.mktemp("models"))[1]


@pytest.fixture(scope="module")
def reference(tiny: str) -> Any:
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(tiny, device="cpu")


@pytest.fixture(scope="module")
def ml_server(tiny: str) -> Iterator[Server]:
    srv = start_server("--backend", "sentence-transformers", "--model", tiny, timeout=120)
    yield srv
    assert srv.stop() == 0


def model_of(srv: Server) -> str:
    return srv.request("GET", "/info")[2]["model"]


def test_ml_ranges_are_calibrated_at_load_on_the_built_in_texts(ml_server: Server,
                                                                 reference: Any) -> None:
    ranges = ranges_of(ml_server)
    calibration = reference.encode(list(CALIBRATION_TEXTS), normalize_embeddings=True)
    assert ranges["min"] == pytest.approx(calibration.min(axis=0).tolist(), abs=1e-5)
    assert ranges["max"] == pytest.approx(calibration.max(axis=0).tolist(), abs=1e-5)
    assert str(len(CALIBRATION_TEXTS)) in ranges["source"]


def test_ml_every_embedding_type_through_the_sdk(ml_server: Server, reference: Any) -> None:
    model, ranges = model_of(ml_server), ranges_of(ml_server)
    response = embed(ml_server, TEXTS + [LONG], model, input_type="clustering")
    floats = check_every_type(response, ranges)
    want = reference.encode(TEXTS + [LONG], normalize_embeddings=True)
    assert np.allclose(floats, want, atol=1e-6)
    # The ranges are the model's, not the request's: the same after requests, and one
    # text's codes are the same alone as beside others.
    assert ranges_of(ml_server) == ranges
    alone = embed(ml_server, [TEXTS[1]], model, input_type="clustering")
    check_every_type(alone, ranges)
    assert np.allclose(alone.embeddings.float_[0], floats[1], atol=1e-6)


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_input_type_picks_the_prompt_sentence_transformers_would(ml_server: Server,
                                                                 reference: Any) -> None:
    """search_query and search_document as SentenceTransformer.encode_query and
    encode_document choose their prompts (the tiny model's: query, document (empty),
    passage); classification and clustering have no prompt here: the text as it is."""
    model = model_of(ml_server)
    plain = reference.encode(["cat"], normalize_embeddings=True)[0]
    for input_type, want in (
            ("search_query", reference.encode_query(["cat"], normalize_embeddings=True)[0]),
            ("search_document", reference.encode_document(["cat"],
                                                          normalize_embeddings=True)[0]),
            ("classification", plain), ("clustering", plain)):
        got = embed(ml_server, ["cat"], model, input_type=input_type,
                    embedding_types=["float"]).embeddings.float_[0]
        assert cosine(got, want) >= 0.9999, input_type
    query = embed(ml_server, ["cat"], model, input_type="search_query",
                  embedding_types=["float"]).embeddings.float_[0]
    assert cosine(query, plain) < 0.9999  # the prompt changed it


def test_truncate_start_keeps_the_input_types_prompt(ml_server: Server, reference: Any) -> None:
    """Cut from the start, a long text lost its prompt first: a search_query's vector was
    that of no input type at all. Now the text loses its first tokens after the prompt."""
    model = model_of(ml_server)
    words = ("the quick brown fox jumps over the lazy dog " * 20).split()
    text = " ".join(words)
    got, plain = (embed(ml_server, [text], model, truncate="START", embedding_types=["float"],
                        **extra).embeddings.float_[0]
                  for extra in ({"input_type": "search_query"}, {"input_type": "clustering"}))
    tokenizer, prompt = reference.tokenizer, reference.prompts["query"]
    room = reference.max_seq_length - 2 - len(tokenizer(prompt, add_special_tokens=False)
                                              ["input_ids"])
    tail = " ".join(words[-room:])  # a token a word: the tiny vocabulary's own words
    assert len(tokenizer(tail, add_special_tokens=False)["input_ids"]) == room
    want = reference.encode([prompt + tail], normalize_embeddings=True)[0]
    assert cosine(got, want) >= 0.9999 and cosine(got, plain) < 0.9999


NOMIC_STYLE = {name: f"{name}: " for name in ("search_query", "search_document",
                                              "classification", "clustering")}


@pytest.fixture(scope="module")
def nomic_style(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a prompt named after each input type (as nomic-embed's are)."""
    folder = tmp_path_factory.mktemp("nomic-style") / "tiny-nomic-style"
    shutil.copytree(tiny, folder)
    settings = folder / "config_sentence_transformers.json"
    config = json.loads(settings.read_text())
    config["prompts"] = NOMIC_STYLE
    settings.write_text(json.dumps(config))
    return str(folder)


def test_transformers_tier_prompts_named_after_input_types(nomic_style: str,
                                                           reference: Any) -> None:
    srv = start_server("--backend", "transformers", "--model", nomic_style, timeout=120)
    try:
        model, ranges = model_of(srv), ranges_of(srv)
        calibration = reference.encode(list(CALIBRATION_TEXTS), normalize_embeddings=True)
        assert ranges["min"] == pytest.approx(calibration.min(axis=0).tolist(), abs=1e-5)
        for input_type, prompt in NOMIC_STYLE.items():
            response = embed(srv, ["cat", "a dog"], model, input_type=input_type)
            floats = check_every_type(response, ranges)
            want = reference.encode(["cat", "a dog"], prompt=prompt, normalize_embeddings=True)
            assert np.allclose(floats, want, atol=1e-5), input_type
    finally:
        assert srv.stop() == 0


def test_truncate_none_start_end(ml_server: Server) -> None:
    model = model_of(ml_server)
    error = sdk_error(ml_server, model=model, texts=[LONG], truncate="NONE")
    assert isinstance(error, cohere.UnprocessableEntityError)
    assert "at most 32" in error.body["message"]
    assert '"END"' in error.body["message"] and "truncate=true" not in error.body["message"]
    for truncate, direction in (("START", "Left"), ("END", "Right")):
        got = embed(ml_server, [LONG + " the end"], model, truncate=truncate,
                    embedding_types=["float"]).embeddings.float_[0]
        status, _, tei = ml_server.request("POST", "/embed", {
            "inputs": LONG + " the end", "truncation_direction": direction})
        assert status == 200 and np.allclose(got, tei[0], atol=1e-6), truncate


def test_ml_output_dimension(ml_server: Server) -> None:
    model = model_of(ml_server)
    full = embed(ml_server, TEXTS, model, embedding_types=["float"]).embeddings.float_
    short = embed(ml_server, TEXTS, model, output_dimension=16,
                  embedding_types=["float", "binary", "ubinary"]).embeddings
    head = np.asarray(full)[:, :16]
    assert np.allclose(short.float_, head / np.linalg.norm(head, axis=1, keepdims=True),
                       atol=1e-6)
    quantize = pytest.importorskip("sentence_transformers").quantize_embeddings
    assert np.array_equal(short.ubinary, quantize(np.asarray(short.float_), "ubinary"))
    # int8 codes exist for the calibrated size only: shortened vectors are re-normalised,
    # and the full-size ranges do not hold for them.
    error = sdk_error(ml_server, model=model, output_dimension=16, embedding_types=["int8"])
    assert isinstance(error, cohere.UnprocessableEntityError)
    assert "32 dimensions" in error.body["message"]


def test_ml_metrics_count_the_tokens_billed(ml_server: Server, reference: Any) -> None:
    response = embed(ml_server, TEXTS, model_of(ml_server), embedding_types=["uint8"])
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert response.meta.billed_units.input_tokens == tokens
