"""What clients remember across processes of what each server serves (client/lastseen.py):
a script run again while its model server is down gets an error, not hash vectors to store
beside the model's. Real servers (stand-ins that answer /info and /v1/embeddings over
sockets), real processes (the CLI), and the real state file in the test's own folder."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from embedserve.client import Client, ServerUnavailable
from embedserve.client import lastseen
from embedserve.client.lastseen import FILE_NAME, MAX_SERVERS, remember, recall
from embedserve.contracts import STATE_ENV

from conftest import ROOT, server_env
from test_client import TEXTS, Stub, stubs  # noqa: F401  (stubs: a fixture)


def served_then_stopped(stubs: list[Stub], model: str, backend: str) -> Stub:
    stub = Stub(model=model, backend=backend)
    stubs.append(stub)
    with Client(stub.url, autostart=False, retries=0) as client:
        assert client.embed(TEXTS).source == "server"
    stub.stop()
    return stub


def cli_embed(url: str) -> subprocess.CompletedProcess[str]:
    """`embedserve embed` as a script runs it: another process, with the default fallback."""
    env = server_env()
    del env["EMBEDSERVE_BACKEND"]  # which would say what a started server serves
    return subprocess.run([sys.executable, "-m", "embedserve", "embed", "--url", url,
                           "--no-autostart", "--timeout", "5", "a text"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_later_process_does_not_stand_hash_vectors_in_for_the_servers_model(
        stubs: list[Stub], client_state: Path) -> None:
    stub = served_then_stopped(stubs, "all-MiniLM-L6-v2", "sentence-transformers")
    kept = json.loads((client_state / FILE_NAME).read_text())
    assert kept["servers"][stub.url]["info"]["model"] == "all-MiniLM-L6-v2"

    run = cli_embed(stub.url)
    assert run.returncode == 1 and not run.stdout, run
    assert "all-MiniLM-L6-v2" in run.stderr and FILE_NAME in run.stderr, run.stderr
    # A fresh client in this process alike; fallback="always" still takes the hash tier.
    with pytest.raises(ServerUnavailable, match="all-MiniLM-L6-v2.*fallback='always'"):
        Client(stub.url, autostart=False, retries=0).embed(TEXTS)
    anyway = Client(stub.url, autostart=False, retries=0, fallback="always").embed(TEXTS)
    assert (anyway.source, anyway.model) == ("fallback", "hash-v1-384")

    # Nothing remembered (the file removed): nothing known to mix with, as before.
    (client_state / FILE_NAME).unlink()
    run = cli_embed(stub.url)
    assert run.returncode == 0 and len(json.loads(run.stdout)) == 384, run


def test_a_remembered_hash_server_is_stood_in_for_with_its_own_size(
        stubs: list[Stub]) -> None:
    stub = Stub(model="hash-v1-384", backend="hash")
    stubs.append(stub)
    with Client(stub.url, autostart=False, retries=0) as client:
        served = client.embed(TEXTS)
    stub.stop()
    result = Client(stub.url, autostart=False, retries=0).embed(TEXTS)
    assert (result.source, result.model) == ("fallback", "hash-v1-384")
    assert result == served


def test_the_options_and_this_processs_server_come_before_the_memory(
        stubs: list[Stub]) -> None:
    stub = served_then_stopped(stubs, "all-MiniLM-L6-v2", "sentence-transformers")
    # Asked for the hash tier: a server started with these options would serve it.
    result = Client(stub.url, autostart=False, retries=0, backend="hash").embed(TEXTS)
    assert result.source == "fallback"
    # Another URL's memory is not this one's.
    other = Stub(model="hash-v1-384", backend="hash")
    stubs.append(other)
    other.stop()
    assert Client(other.url, autostart=False, retries=0).embed(TEXTS).source == "fallback"


def test_a_server_is_remembered_by_its_name_however_its_url_is_spelled(
        stubs: list[Stub], client_state: Path) -> None:
    """127.1 and 0x7f.0.0.1 are 127.0.0.1: one server, one entry, under the name the Node
    client gives it too (tests/data/server_urls.json)."""
    stub = Stub(model="all-MiniLM-L6-v2", backend="sentence-transformers")
    stubs.append(stub)
    port = stub.server.server_address[1]
    for spelling in ("127.1", "0x7f.0.0.1", "127.0.0.1"):
        with Client(f"http://{spelling}:{port}", autostart=False, retries=0) as client:
            assert client.embed(TEXTS).source == "server"
    kept = json.loads((client_state / FILE_NAME).read_text())
    assert list(kept["servers"]) == [f"http://127.0.0.1:{port}"]


def test_a_private_server_on_a_free_port_is_not_remembered(client_state: Path) -> None:
    # Its port is another at every start: remembered, it would speak for whatever server
    # takes that port later.
    with Client(port=0, fallback="never") as client:
        assert client.embed(TEXTS).source == "server"
    assert not (client_state / FILE_NAME).exists()


def test_a_state_folder_that_cannot_be_written_or_read_loses_only_the_memory(
        stubs: list[Stub], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(STATE_ENV, str(blocker / "state"))
    stub = served_then_stopped(stubs, "all-MiniLM-L6-v2", "sentence-transformers")
    assert Client(stub.url, autostart=False, retries=0).embed(TEXTS).source == "fallback"

    # A damaged file: read as empty, and replaced whole by the next server's answer.
    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    (tmp_path / FILE_NAME).write_text('{"servers": {"http://x:1": ')
    assert recall("http://x:1") is None
    remember("http://x:1", {"model": "m", "dimensions": 3, "pid": 7})
    assert recall("http://x:1") == {"model": "m", "dimensions": 3}


def test_the_file_keeps_the_servers_seen_last(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    for port in range(1, MAX_SERVERS + 6):
        remember(f"http://h:{port}", {"model": f"m{port}"})
    remember("http://h:60", {"model": "m60"})  # no news: not made the newest
    remember("http://h:7", {"model": "other"})  # news: kept, as the newest
    servers = json.loads((tmp_path / FILE_NAME).read_text())["servers"]
    assert len(servers) == MAX_SERVERS
    assert list(servers)[0] == "http://h:6"  # 1-5 went, the oldest
    assert list(servers)[-2:] == ["http://h:69", "http://h:7"]
    assert servers["http://h:7"]["info"] == {"model": "other"}


def test_threads_planning_a_fallback_at_once_all_go_by_the_memory(
        stubs: list[Stub], monkeypatch: pytest.MonkeyPatch) -> None:
    # A second thread found the memory "looked up" while the first was still reading it,
    # and let the hash tier stand in for the remembered model.
    stub = served_then_stopped(stubs, "all-MiniLM-L6-v2", "sentence-transformers")
    fallback = Client(stub.url, autostart=False, retries=0)._fallback
    slow = lastseen.recall

    def slow_recall(url: str) -> dict[str, object] | None:
        time.sleep(0.5)  # the file read, long enough for the second thread to come
        return slow(url)

    monkeypatch.setattr(lastseen, "recall", slow_recall)
    plans: list[object] = []
    first = threading.Thread(target=lambda: plans.append(fallback.plan()))
    first.start()
    time.sleep(0.1)
    plans.append(fallback.plan())
    first.join()
    assert len(plans) == 2
    assert all(plan.embedder is None and "all-MiniLM-L6-v2" in plan.refusal  # type: ignore[attr-defined]
               for plan in plans), plans

