"""`embedserve pull|models|rm` against a stand-in for the Hugging Face Hub: an HTTP server in
this test, on 127.0.0.1, that answers the routes huggingface_hub's snapshot_download uses, so
the real download path runs (progress bars, cache layout, errors) and nothing leaves the
machine. The cache is a temp HF_HOME."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from embedserve import hub, modelcache
from embedserve.commands import MODEL_COMMANDS

from conftest import ROOT, Server, server_env, start_server
from test_commands import free_port

pytest.importorskip("huggingface_hub")

# Files stored with Git LFS on the hub (its .gitattributes): answered with the LFS headers.
LFS_SUFFIXES = (".safetensors", ".bin")
QUICK = 60  # seconds: a failure must be said long before huggingface_hub's retries would end


def git_blob_id(data: bytes) -> str:
    """A file's id on the hub, as git names a blob (the ETag of a file not in LFS)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""
    tags: tuple[str, ...] = ()
    gated: bool = False

    def __post_init__(self) -> None:
        listing = "".join(f"{p}:{git_blob_id(d)}\n" for p, d in sorted(self.files.items()))
        self.commit = hashlib.sha1(listing.encode()).hexdigest()


@dataclass
class StandIn:
    """The hub's answers for model repositories: the model info API, the tree listing and the
    file routes, with the status codes and X-Error-Code headers huggingface_hub reads."""

    repos: dict[str, Repo]
    requests: list[str] = field(default_factory=list)
    url: str = ""


def make_handler(stand_in: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def answer(self, *, body: bool) -> None:
            stand_in.requests.append(f"{self.command} {self.path}")
            path = unquote(urlsplit(self.path).path)
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            match = info or tree or resolve
            if match is None:
                return self.send(404, {"error": "not found"}, body=body)
            repo = stand_in.repos.get(match[1])
            if repo is None:
                return self.send(404, {"error": "Repository not found"}, body=body,
                                 headers={"X-Error-Code": "RepoNotFound",
                                          "X-Error-Message": "Repository not found"})
            revision = (match[2] if match.lastindex and match.lastindex >= 2 else None) or "main"
            if revision not in ("main", repo.commit, *repo.tags):
                return self.send(404, {"error": f"Invalid rev id: {revision}"}, body=body,
                                 headers={"X-Error-Code": "RevisionNotFound",
                                          "X-Error-Message": f"Invalid rev id: {revision}"})
            if info:
                return self.send(200, {
                    "_id": repo.commit[:24], "id": match[1], "modelId": match[1],
                    "author": match[1].split("/")[0], "sha": repo.commit, "private": False,
                    "gated": "auto" if repo.gated else False, "disabled": False,
                    "downloads": 0, "likes": 0, "library_name": "sentence-transformers",
                    "tags": ["sentence-transformers"], "lastModified": "2024-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)]},
                    body=body)
            if tree:
                return self.send(200, self.tree(repo, (tree[3] or "").strip("/")), body=body)
            return self.file(repo, resolve[3], body=body)

        def tree(self, repo: Repo, under: str) -> list[dict[str, object]]:
            entries: list[dict[str, object]] = []
            folders = sorted({str(Path(name).parent) for name in repo.files} - {"."})
            for folder in folders:
                if folder.startswith(under):
                    entries.append({"type": "directory", "oid": git_blob_id(folder.encode()),
                                    "size": 0, "path": folder})
            for name, data in sorted(repo.files.items()):
                if not name.startswith(under):
                    continue
                entry: dict[str, object] = {"type": "file", "oid": git_blob_id(data),
                                            "size": len(data), "path": name}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(),
                                    "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return entries

        def file(self, repo: Repo, name: str, *, body: bool) -> None:
            headers = {"X-Repo-Commit": repo.commit}
            if repo.gated:  # the hub's answer to a download without an accepted token
                message = f"Access to model {name} is restricted. You must be authenticated."
                return self.send(401, {"error": message}, body=body, headers={
                    **headers, "X-Error-Code": "GatedRepo", "X-Error-Message": message})
            data = repo.files.get(name)
            if data is None:
                return self.send(404, {"error": "Entry not found"}, body=body, headers={
                    **headers, "X-Error-Code": "EntryNotFound"})
            if name.endswith(LFS_SUFFIXES):  # the LFS object's sha256, as the hub links it
                sha256 = hashlib.sha256(data).hexdigest()
                headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"',
                                "X-Linked-Size": str(len(data))})
            else:
                headers["ETag"] = f'"{git_blob_id(data)}"'
            self.send(200, data, body=body, headers={**headers, "Accept-Ranges": "bytes"})

        def send(self, status: int, payload: object, *, body: bool,
                 headers: dict[str, str] | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            kind = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


def folder_files(folder: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    pytest.importorskip("torch")
    pytest.importorskip("sentence_transformers")
    from tiny_models import make_tiny_models

    _, st_folder = make_tiny_models(tmp_path_factory.mktemp("models"))
    tiny = folder_files(st_folder)
    no_weights = {k: v for k, v in tiny.items() if not k.endswith(LFS_SUFFIXES)}
    state = StandIn({"org/tiny": Repo(tiny, tags=("v1",)), "org/gated": Repo(tiny, gated=True),
                     "org/no-weights": Repo(no_weights)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


def hub_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    env = server_env(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), COLUMNS="200",
                     # One failure must not turn into minutes of retries.
                     HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5",
                     # The backend a user gets: auto, which falls back to hash when the
                     # model cannot load -- pull's check must see through that.
                     EMBEDSERVE_BACKEND="auto",
                     NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE",
                 "HUGGINGFACE_HUB_CACHE", "HF_HUB_DISABLE_PROGRESS_BARS", "HTTP_PROXY",
                 "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        if name not in extra:
            env.pop(name, None)
    return env


def embedserve(*args: str, env: dict[str, str], timeout: float = 300
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedserve", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def listing(env: dict[str, str]) -> dict[str, dict[str, object]]:
    done = embedserve("models", "--json", env=env)
    assert done.returncode == 0, done.stderr
    return {m["id"]: m for m in json.loads(done.stdout)["models"]}


@pytest.fixture(scope="module")
def pulled(stand_in: StandIn, hf_home: Path) -> subprocess.CompletedProcess[str]:
    stand_in.requests.clear()
    return embedserve("pull", "org/tiny", env=hub_env(stand_in.url, hf_home))


def test_pull_downloads_with_progress_and_checks_it_serves(
        pulled: subprocess.CompletedProcess[str], stand_in: StandIn, hf_home: Path) -> None:
    assert pulled.returncode == 0, pulled.stderr
    repo = stand_in.repos["org/tiny"]
    # The real download path: every file fetched from the stand-in, with progress shown
    # though stderr is a pipe here, as it is in a container build's log.
    fetched = {m[1] for r in stand_in.requests
               if (m := re.fullmatch(rf"GET /org/tiny/resolve/{repo.commit}/(.+)", r))}
    assert fetched == set(repo.files)
    assert "pulling org/tiny from " + stand_in.url in pulled.stderr
    assert f"Fetching {len(repo.files)} files" in pulled.stderr and "100%" in pulled.stderr
    snapshot = hf_home / "hub" / "models--org--tiny" / "snapshots" / repo.commit
    assert (snapshot / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
    assert f"org/tiny: revision {repo.commit[:8]}" in pulled.stdout
    assert "serves offline (backend=sentence-transformers, dimensions=32)" in pulled.stdout


def test_a_pulled_model_serves_offline(pulled: subprocess.CompletedProcess[str],
                                       stand_in: StandIn, hf_home: Path,
                                       fresh_server: list[Server]) -> None:
    assert pulled.returncode == 0, pulled.stderr
    stand_in.requests.clear()
    # Offline twice over: HF_HUB_OFFLINE, and a hub address where nothing listens.
    env = hub_env(f"http://127.0.0.1:{free_port()}", hf_home, HF_HUB_OFFLINE="1")
    srv = start_server("--model", "org/tiny", env=env, timeout=120)
    fresh_server.append(srv)
    status, _, vectors = srv.request("POST", "/embed", {"inputs": ["hello world"]})
    assert status == 200 and len(vectors[0]) == 32
    status, _, info = srv.request("GET", "/info")
    assert status == 200 and info["backend"] == "sentence-transformers"
    assert not stand_in.requests


def test_models_lists_it_with_its_size(pulled: subprocess.CompletedProcess[str],
                                       stand_in: StandIn, hf_home: Path) -> None:
    assert pulled.returncode == 0, pulled.stderr
    env = hub_env(stand_in.url, hf_home)
    repo = stand_in.repos["org/tiny"]
    size = sum(len(data) for data in repo.files.values())
    model = listing(env)["org/tiny"]
    assert model["size_bytes"] == size and model["loads_offline"] is True
    [revision] = model["revisions"]  # type: ignore[misc]
    assert revision["commit"] == repo.commit and revision["refs"] == ["main"]
    done = embedserve("models", env=env)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("org/tiny "))
    assert re.search(rf"{repo.commit[:8]} \(main\)\s+{re.escape(modelcache.human_size(size))}\s+yes$",
                     row), row


def copy_without_weights(hf_home: Path, into: Path, commit: str, *, keep_link: bool) -> Path:
    """A copy of the cache that lost the weights' blob: with its snapshot link too, as a cut
    download leaves it (the link is made after the blob); or only the blob, a damaged copy."""
    shutil.copytree(hf_home, into, symlinks=True)
    weights = into / "hub" / "models--org--tiny" / "snapshots" / commit / "model.safetensors"
    os.unlink(os.path.realpath(weights))
    if not keep_link:
        os.unlink(weights)
    return into


def test_models_says_what_an_incomplete_copy_lacks(pulled: subprocess.CompletedProcess[str],
                                                   stand_in: StandIn, hf_home: Path,
                                                   tmp_path: Path) -> None:
    assert pulled.returncode == 0, pulled.stderr
    copy = copy_without_weights(hf_home, tmp_path / "hf-home",
                                stand_in.repos["org/tiny"].commit, keep_link=False)
    model = listing(hub_env(stand_in.url, copy))["org/tiny"]
    assert model["loads_offline"] is False
    assert model["problems"] == ["no weights (model.safetensors or pytorch_model.bin)",
                                 "incomplete download: 1 files missing (model.safetensors)"]
    done = embedserve("models", env=hub_env(stand_in.url, copy))
    assert "no: no weights (model.safetensors or pytorch_model.bin); incomplete" in done.stdout


def test_a_damaged_copy_is_listed_and_removable(pulled: subprocess.CompletedProcess[str],
                                                stand_in: StandIn, hf_home: Path,
                                                tmp_path: Path) -> None:
    # huggingface_hub's scan only warns about such a folder; it still takes disk.
    assert pulled.returncode == 0, pulled.stderr
    copy = copy_without_weights(hf_home, tmp_path / "hf-home",
                                stand_in.repos["org/tiny"].commit, keep_link=True)
    env = hub_env(stand_in.url, copy)
    model = listing(env)["org/tiny"]
    assert model["loads_offline"] is False and model["size_bytes"] > 0
    assert "damaged copy: Blob missing (broken symlink)" in model["problems"][0]  # type: ignore[index]
    done = embedserve("rm", "org/tiny", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed org/tiny (a damaged copy): ")
    assert not (copy / "hub" / "models--org--tiny").exists()


def test_rm_frees_it_and_models_no_longer_lists_it(pulled: subprocess.CompletedProcess[str],
                                                   stand_in: StandIn, hf_home: Path,
                                                   tmp_path: Path) -> None:
    assert pulled.returncode == 0, pulled.stderr
    copy = tmp_path / "hf-home"  # the other tests keep the module's cache
    shutil.copytree(hf_home, copy, symlinks=True)
    env = hub_env(stand_in.url, copy)
    size = sum(len(data) for data in stand_in.repos["org/tiny"].files.values())
    done = embedserve("rm", "org/tiny", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"removed org/tiny (1 revision): {modelcache.human_size(size)} freed"
    assert "org/tiny" not in listing(env)
    assert not (copy / "hub" / "models--org--tiny").exists()
    done = embedserve("rm", "org/tiny", env=env)
    assert done.returncode == 1
    assert "embedserve rm: org/tiny is not in the Hugging Face cache" in done.stderr


def test_rm_keeps_a_model_a_running_server_serves_unless_forced(
        pulled: subprocess.CompletedProcess[str], stand_in: StandIn, hf_home: Path,
        tmp_path: Path, fresh_server: list[Server]) -> None:
    # Deleted under a running server, the model would be missing for the next worker it
    # starts (a crash, a SIGHUP): that worker could not serve.
    assert pulled.returncode == 0, pulled.stderr
    copy = tmp_path / "hf-home"
    shutil.copytree(hf_home, copy, symlinks=True)
    env = hub_env(f"http://127.0.0.1:{free_port()}", copy, HF_HUB_OFFLINE="1")
    srv = start_server("--model", "org/tiny", env=env, timeout=120)
    fresh_server.append(srv)
    url = f"http://127.0.0.1:{srv.port}"
    done = embedserve("rm", "org/tiny", "--url", url, env=env)
    assert done.returncode == 1
    assert f"the server at {url} serves org/tiny" in done.stderr and "--force" in done.stderr
    assert (copy / "hub" / "models--org--tiny").exists()
    # Not loaded yet (--no-preload) and served under another name: /info named only that
    # name, and rm deleted the model the server loads on its first request.
    lazy = start_server("--model", "org/tiny", "--no-preload", "--served-model-name", "mine",
                        env=env, timeout=120)
    fresh_server.append(lazy)
    lazy_url = f"http://127.0.0.1:{lazy.port}"
    done = embedserve("rm", "org/tiny", "--url", lazy_url, env=env)
    assert done.returncode == 1 and f"the server at {lazy_url} serves org/tiny" in done.stderr
    assert (copy / "hub" / "models--org--tiny").exists()
    # The same server found by EMBEDSERVE_URL; --force deletes, and the server serves on.
    done = embedserve("rm", "ORG/tiny", "--force", env={**env, "EMBEDSERVE_URL": url})
    assert done.returncode == 0, done.stderr
    assert not (copy / "hub" / "models--org--tiny").exists()
    assert srv.request("POST", "/embed", {"inputs": ["still served"]})[0] == 200


def test_an_unknown_model_is_a_clear_error(stand_in: StandIn, tmp_path: Path) -> None:
    started = time.monotonic()
    done = embedserve("pull", "org/nope", env=hub_env(stand_in.url, tmp_path), timeout=QUICK)
    assert done.returncode == 1
    assert f"no model 'org/nope' on {stand_in.url} (404)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < QUICK


def test_an_unknown_revision_is_a_clear_error(stand_in: StandIn, tmp_path: Path) -> None:
    done = embedserve("pull", "org/tiny", "--revision", "v9", timeout=QUICK,
                      env=hub_env(stand_in.url, tmp_path))
    assert done.returncode == 1
    assert f"org/tiny has no revision 'v9' on {stand_in.url} (404)" in done.stderr, done.stderr


def test_a_gated_model_says_how_to_get_access(stand_in: StandIn, tmp_path: Path) -> None:
    done = embedserve("pull", "org/gated", env=hub_env(stand_in.url, tmp_path), timeout=QUICK)
    assert done.returncode == 1
    assert "org/gated is gated on" in done.stderr and "HF_TOKEN" in done.stderr, done.stderr


def test_an_unreachable_hub_is_a_clear_quick_error(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = embedserve("pull", "org/tiny", env=hub_env(endpoint, tmp_path), timeout=QUICK)
    assert done.returncode == 1
    assert f"cannot reach the model hub at {endpoint}" in done.stderr, done.stderr
    assert "HF_ENDPOINT" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < QUICK


@pytest.mark.parametrize("args,fragment", [
    (("pull", "org/" + "b" * 300), "is not a Hugging Face model id"),  # was OSError: too long
    (("pull", "org/name/more"), "nor a folder"),  # was "a folder path ... serve it with"
    (("pull", "org/tiny", "--check-timeout", "-1"), "positive, finite number of seconds"),
    (("pull", "org/tiny", "--check-timeout", "inf"), "positive, finite number of seconds"),
    (("models",), "cannot read the Hugging Face cache"),  # was a ValueError traceback
    (("rm", "org/tiny"), "cannot read the Hugging Face cache"),
])
def test_user_errors_are_one_line_not_a_traceback(tmp_path: Path, args: tuple[str, ...],
                                                  fragment: str) -> None:
    (tmp_path / "a-file").write_text("")
    env = hub_env(f"http://127.0.0.1:{free_port()}", tmp_path,
                  HF_HUB_CACHE=str(tmp_path / "a-file"))
    done = embedserve(*args, env=env, timeout=QUICK)
    assert done.returncode in (1, 2) and fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_hash_needs_no_download(tmp_path: Path) -> None:
    done = embedserve("pull", "hash", env=hub_env(f"http://127.0.0.1:{free_port()}", tmp_path),
                      timeout=QUICK)
    assert done.returncode == 0, done.stderr
    assert "nothing to download" in done.stdout


def test_a_model_that_downloads_but_cannot_load_fails_with_the_reason(
        stand_in: StandIn, tmp_path: Path) -> None:
    done = embedserve("pull", "org/no-weights", env=hub_env(stand_in.url, tmp_path))
    assert done.returncode == 1
    assert "org/no-weights downloaded, but the server would serve the hash tier" in done.stderr
    assert "skipped" in done.stderr  # the server's own reason, from its log
    assert "no weights (model.safetensors or pytorch_model.bin)" in done.stderr, done.stderr


def test_another_revision_is_served_from_its_folder(stand_in: StandIn, tmp_path: Path) -> None:
    done = embedserve("pull", "org/tiny", "--revision", "v1", "--no-check",
                      env=hub_env(stand_in.url, tmp_path))
    assert done.returncode == 0, done.stderr
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots"
    commit = stand_in.repos["org/tiny"].commit
    assert f"serve this revision with --model {snapshot / commit}" in done.stdout
    assert (tmp_path / "hub" / "models--org--tiny" / "refs" / "v1").read_text() == commit


def test_explain_names_the_disk() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    assert hub.explain(full, "org/tiny").startswith("the disk is full while downloading")


def test_snapshot_problems_of_sharded_and_module_folders(tmp_path: Path) -> None:
    (tmp_path / "0_Transformer").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    inner = tmp_path / "0_Transformer"
    (inner / "config.json").write_text("{}")
    (inner / "vocab.txt").write_text("[PAD]\n")
    (inner / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (inner / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert modelcache.snapshot_problems(tmp_path) == [
        "no 1_Pooling/ (named in modules.json)",
        "1 weight shards missing (model-00002-of-00002.safetensors, ...)"]


def test_the_model_commands_are_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("### Managing models", 1)[-1].split("\n#", 1)[0]
    assert "### Managing models" in readme
    for command in MODEL_COMMANDS:
        assert f"embedserve {command}" in section, command
