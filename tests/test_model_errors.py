"""--model naming a folder that is not there: said in those words, not as advice about the
Hugging Face cache. A Hugging Face id is `name` or `org/name`; anything else is a path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, server_env, start_server
from embedserve.backends import looks_like_path

MISSING = ["./no/such/folder", "no/such/folder", "../no-such-folder",
           "~/no-such-embedserve-model"]


@pytest.mark.parametrize("model", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                                   "BAAI/bge-small-en-v1.5"])
def test_hugging_face_ids_are_not_paths(model: str) -> None:
    assert not looks_like_path(model)


@pytest.mark.parametrize("model", [*MISSING, "/abs/model", "models\\bge", "C:\\models\\bge",
                                   "org/name/", "."])
def test_paths_are_paths(model: str) -> None:
    assert looks_like_path(model)


def ml_installed() -> None:
    for package in ("torch", "transformers", "sentence_transformers"):
        pytest.importorskip(package)


@pytest.mark.parametrize("model", MISSING)
def test_auto_skips_the_ml_tiers_saying_the_folder_does_not_exist(model: str) -> None:
    ml_installed()
    srv = start_server("--model", model, env=server_env(EMBEDSERVE_BACKEND="auto"),
                       timeout=120)
    try:
        info = srv.request("GET", "/info")[2]
    finally:
        assert srv.stop() == 0
    assert info["backend"] == "hash"
    assert set(info["skipped_backends"]) == {"sentence-transformers", "transformers"}
    for reason in info["skipped_backends"].values():
        assert f"model folder {model!r} does not exist" in reason, reason
        assert "cache" not in reason
    log = "".join(srv.log)
    assert f"model folder {model!r} does not exist" in log


@pytest.mark.parametrize("backend", ["transformers", "sentence-transformers"])
def test_an_explicit_backend_with_a_missing_folder_is_a_boot_error(backend: str,
                                                                   tmp_path: Path) -> None:
    ml_installed()
    model = str(tmp_path / "no" / "such" / "folder")
    done = subprocess.run([sys.executable, "-m", "embedserve", "--port", "0", "--backend",
                           backend, "--model", model], capture_output=True, text=True,
                          env=server_env(), cwd=ROOT, timeout=120)
    assert done.returncode == 3, done.stderr
    assert f"model folder {model!r} does not exist" in done.stderr
    assert "cache" not in done.stderr


def test_a_file_is_not_a_model_folder(tmp_path: Path) -> None:
    ml_installed()
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not a folder")
    done = subprocess.run([sys.executable, "-m", "embedserve", "--port", "0", "--backend",
                           "transformers", "--model", str(model)], capture_output=True,
                          text=True, env=server_env(), cwd=ROOT, timeout=120)
    assert done.returncode == 3, done.stderr
    assert f"model folder {str(model)!r} is a file, not a folder" in done.stderr
