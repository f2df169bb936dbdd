"""The real `openai` SDK, unmodified, against the real server."""

from __future__ import annotations

import pytest

from embedserve.hashing import HashEmbedder

from conftest import Server

openai = pytest.importorskip("openai")

TEXTS = ["The openai SDK sends base64 by default", "and decodes it for you", "ünïcode"]


@pytest.fixture
def client(server: Server):  # type: ignore[no-untyped-def]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_default_encoding_is_base64_and_decodes_to_our_vectors(client, server: Server) -> None:
    result = client.embeddings.create(model="hash-v1-384", input=TEXTS)
    expected = HashEmbedder().embed(TEXTS)
    assert [d.index for d in result.data] == [0, 1, 2]
    for item, want in zip(result.data, expected):
        assert len(item.embedding) == 384
        assert max(abs(a - b) for a, b in zip(item.embedding, want)) < 1e-7
    assert result.model == "hash-v1-384"
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0


def test_float_encoding_gives_exact_vectors(client) -> None:
    result = client.embeddings.create(model="hash-v1-384", input=TEXTS,
                                      encoding_format="float")
    assert [d.embedding for d in result.data] == HashEmbedder().embed(TEXTS)


def test_dimensions(client) -> None:
    result = client.embeddings.create(model="hash-v1-384", input="short", dimensions=64)
    assert len(result.data[0].embedding) == 64


def test_validation_error_surfaces_as_bad_request(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="hash-v1-384", input="")
    assert "empty" in str(info.value)


def test_models_list(client) -> None:
    assert [m.id for m in client.models.list()] == ["hash-v1-384"]
