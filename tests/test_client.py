"""embedserve.Client against real server processes, real sockets and real signals:
auto-start, ownership at exit, sharing one server, restart after kill -9, fallback,
chunking, typed errors. Every test checks that no process it caused outlives it.

A scripted HTTP peer (Stub) stands in only where the real server will not misbehave on
demand (answer 429 twice, report another model); it embeds with the real hash tier.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from embedserve.client import (
    AuthenticationError,
    Client,
    EmbedServeError,
    ModelNotFound,
    ServerError,
    ServerStartError,
    ServerUnavailable,
    ValidationError,
)
from embedserve.client import transport
from embedserve.client.transport import MIN_WAIT, RetryPolicy
from embedserve.encoding import decode_float32_base64, float32_base64
from embedserve.hashing import HashEmbedder

from conftest import ROOT, server_env, start_server

HOST = "127.0.0.1"
EMBEDDER = HashEmbedder(384)
TEXTS = ["The cat sat on the mat.", "Feature hashing is deterministic", "naïve café ☕"]
# Every process a test causes inherits this variable; whatever still carries it after the
# test (an orphaned server, a worker, a client script) is a stray.
MARK = "ESCLIENT_TEST_MARK"


# --- helpers ------------------------------------------------------------------------------

def expected(texts: list[str], dims: int = 384) -> list[list[float]]:
    """What the server's hash tier delivers over base64: float32-rounded vectors."""
    return [array("f", v).tolist() for v in HashEmbedder(dims).embed(texts)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


def gone(pid: int) -> bool:
    """Not running (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def marked_processes(mark: str) -> list[int]:
    found = []
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_strays(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    monkeypatch.delenv("EMBEDSERVE_URL", raising=False)
    # The servers clients start here serve the hash tier (`auto` could load a real model)
    # and never reach for a model hub.
    monkeypatch.setenv("EMBEDSERVE_BACKEND", "hash")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    # Servers stop within a second of being told; give stragglers a moment, then fail.
    if not wait_for(lambda: not marked_processes(mark), 5.0):
        strays = marked_processes(mark)
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"stray processes left behind: {strays}")


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def client_script(body: str) -> subprocess.Popen[str]:
    """A separate Python process running `body` with the client imported."""
    # Ctrl-C raises KeyboardInterrupt, as in an app started from a terminal: a test run
    # started in the background by a shell inherits SIGINT ignored, and so would this child.
    # SIGUSR1 makes it print every thread's stack (see wait_exit).
    code = ("import faulthandler, json, signal, sys, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "faulthandler.register(signal.SIGUSR1)\n"
            "from embedserve.client import Client\n") + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=server_env(EMBEDSERVE_BACKEND="hash"), cwd=ROOT)


def wait_exit(proc: subprocess.Popen[str], timeout: float) -> int:
    """The client script's exit code; past `timeout`, a failure showing where each of its
    threads was (it stops its server at exit: up to stop_timeout, 10 s, then a kill)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        proc.kill()
        _, stderr = proc.communicate(timeout=10)
        pytest.fail(f"the client process did not exit within {timeout:g} s; its threads:\n"
                    f"{stderr[-6000:]}")


def read_json_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"client script printed nothing; stderr:\n{proc.stderr.read()}")
    result: dict[str, Any] = json.loads(line)
    return result


def supervisor_pid(info: dict[str, Any]) -> int:
    return int(info.get("supervisor_pid", info["pid"]))


class _QuietServer(ThreadingHTTPServer):
    """A stand-in server that takes a client hanging up on a kept-alive connection (what the
    client under test does when it closes) as normal, not as a traceback on stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Stub:
    """A scripted HTTP/1.1 peer: answers the first POSTs from `script` (status, headers),
    then embeds for real; counts POSTs and connections, and keeps the POSTed bodies.
    `info` replaces its GET /info answer (raw bytes); `mangle` changes its embeddings'."""

    def __init__(self, script: list[tuple[int, dict[str, str]]] | None = None,
                 model: str = "hash-v1-384", backend: str = "hash", info: bytes | None = None,
                 mangle: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.script = list(script or [])
        self.model, self.backend = model, backend
        self.posts = 0
        self.bodies: list[dict[str, Any]] = []
        self.connections: set[tuple[str, int]] = set()
        self.sockets: list[socket.socket] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                stub.sockets.append(self.connection)

            def reply(self, status: int, payload: Any, headers: dict[str, str] | None = None
                      ) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json",
                                    "Content-Length": str(len(body)), **(headers or {})
                                    }.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                stub.connections.add(self.client_address)
                if self.path == "/health":
                    self.reply(200, {"status": "ok"})
                elif info is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(info)))
                    self.end_headers()
                    self.wfile.write(info)
                else:
                    self.reply(200, {"backend": stub.backend, "model": stub.model,
                                     "dimensions": 384, "max_batch_size": 2048,
                                     "max_body_bytes": 1 << 20, "pid": os.getpid()})

            def do_POST(self) -> None:
                stub.connections.add(self.client_address)
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.posts += 1
                stub.bodies.append(request)
                if stub.script:
                    status, headers = stub.script.pop(0)
                    self.reply(status, {"error": {"message": f"scripted {status}",
                                                  "type": "x", "param": None, "code": None}},
                               headers)
                    return
                vectors = EMBEDDER.embed(request["input"])
                data = [{"object": "embedding", "index": i, "embedding": float32_base64(v)}
                        for i, v in enumerate(vectors)]
                if mangle is not None:
                    mangle(data)
                self.reply(200, {"object": "list", "model": stub.model, "usage": {},
                                 "data": data})

        self.server = _QuietServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Like a dead server: no listener, and kept-alive connections cut."""
        self.server.shutdown()
        self.server.server_close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def stubs() -> Iterator[list[Stub]]:
    made: list[Stub] = []
    yield made
    for stub in made:
        stub.stop()


# --- auto-start and ownership -------------------------------------------------------------

def test_autostart_on_a_free_port_then_embed_and_stop_at_close() -> None:
    port = free_port()
    with Client(f"http://{HOST}:{port}", fallback="never") as client:
        result = client.embed(TEXTS)
        assert result == expected(TEXTS)
        assert (result.model, result.backend, result.source) == ("hash-v1-384", "hash", "server")
        assert client.owns_server and client.url == f"http://{HOST}:{port}"
        pid = client.server_pid
        assert pid is not None and not gone(pid)
        assert supervisor_pid(client.info()) == pid
        assert client.health() == {"status": "ok"}
        single = client.embed_single("one text")
        assert single == expected(["one text"])[0] and single.model == "hash-v1-384"
    assert gone(pid) and port_free(port)


def test_port_0_starts_a_private_server_on_a_free_port(clients: list[Client]) -> None:
    client = Client(port=0, dimensions=64, fallback="never")
    clients.append(client)
    result = client.embed(TEXTS)
    assert result == expected(TEXTS, 64) and result.model == "hash-v1-64"
    assert client.owns_server and not client.url.endswith(":0")
    pid = client.server_pid
    assert pid is not None
    client.close()
    assert gone(pid)
    with pytest.raises(EmbedServeError, match="closed"):
        client.embed(TEXTS)
    client.close()  # idempotent


EXITS = {
    "returns": "",
    "raises": "raise RuntimeError('the app crashed')",
    "sys.exit": "sys.exit(4)",
    "ctrl-c": "time.sleep(30)",  # the test sends SIGINT
}


@pytest.mark.parametrize("how", list(EXITS))
def test_the_server_a_client_started_is_gone_after_the_client_process_exits(how: str) -> None:
    port = free_port()
    proc = client_script(f"""
        client = Client("http://{HOST}:{port}", fallback="never")
        result = client.embed(["from another process"])
        print(json.dumps({{"pid": client.server_pid, "source": result.source}}), flush=True)
        {EXITS[how]}
    """)
    seen = read_json_line(proc)
    assert seen["source"] == "server" and not gone(seen["pid"])
    if how == "ctrl-c":
        proc.send_signal(signal.SIGINT)
    wait_exit(proc, 30)
    # The client stopped its server at exit, before its own process ended.
    assert gone(seen["pid"]) and port_free(port)


def server_watches_stdin() -> bool:
    done = subprocess.run([sys.executable, "-m", "embedserve", "--help"], capture_output=True,
                          text=True, env=server_env(), cwd=ROOT, timeout=30)
    return "--watch-stdin" in done.stdout


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_server_stops_even_when_the_client_process_is_killed(signum: int) -> None:
    # Neither signal lets Python run atexit; the server sees its stdin pipe close instead.
    if not server_watches_stdin():
        pytest.skip("this server has no --watch-stdin (EMBEDSERVE_WATCH_STDIN) yet")
    port = free_port()
    proc = client_script(f"""
        client = Client("http://{HOST}:{port}", fallback="never")
        client.embed(["x"])
        print(json.dumps({{"pid": client.server_pid}}), flush=True)
        time.sleep(30)
    """)
    seen = read_json_line(proc)
    proc.send_signal(signum)
    proc.wait(10)
    assert wait_for(lambda: gone(seen["pid"]) and port_free(port), 10)


def test_a_server_started_by_someone_else_survives_the_client(clients: list[Client]) -> None:
    srv = start_server("--backend", "hash", env=server_env())
    try:
        client = Client(srv.url, fallback="never")
        clients.append(client)
        assert client.embed(TEXTS) == expected(TEXTS)
        assert not client.owns_server and client.server_pid == srv.pid
        client.close()
        proc = client_script(f"""
            client = Client("{srv.url}", fallback="never")
            print(json.dumps({{"owns": client.connect().owns_server,
                               "n": len(client.embed(["x"]))}}), flush=True)
        """)
        assert read_json_line(proc) == {"owns": False, "n": 1}
        assert proc.wait(20) == 0
        assert srv.proc.poll() is None
        assert srv.request("GET", "/health")[0] == 200
    finally:
        assert srv.stop() == 0


# --- sharing one server ---------------------------------------------------------------------

def test_two_processes_starting_at_once_share_one_server() -> None:
    port = free_port()
    script = f"""
        sys.stdin.readline()  # start together
        client = Client("http://{HOST}:{port}", fallback="never")
        result = client.embed(["one server for both"])
        print(json.dumps({{"owns": client.owns_server, "source": result.source,
                           "server": client.info().get("supervisor_pid")}}), flush=True)
        sys.stdin.readline()  # exit when told
    """
    procs = [client_script(script) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        seen = [read_json_line(proc) for proc in procs]
        assert all(s["source"] == "server" for s in seen)
        assert seen[0]["server"] == seen[1]["server"], seen
        assert sorted(s["owns"] for s in seen) == [False, True], seen
        server = seen[0]["server"]
        owner, other = (procs[0], procs[1]) if seen[0]["owns"] else (procs[1], procs[0])
        # The client that only uses the server leaves it alone...
        other.communicate("exit\n", timeout=20)
        assert not gone(server)
        # ...the one that started it stops it.
        owner.communicate("exit\n", timeout=20)
        assert gone(server) and port_free(port)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_two_clients_in_threads_share_one_server(clients: list[Client]) -> None:
    port = free_port()
    pair = [Client(f"http://{HOST}:{port}", fallback="never") for _ in range(2)]
    clients.extend(pair)
    barrier = threading.Barrier(2)
    results: dict[int, Any] = {}

    def use(i: int) -> None:
        barrier.wait()
        results[i] = pair[i].embed(TEXTS)

    threads = [threading.Thread(target=use, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results[0] == results[1] == expected(TEXTS)
    assert sorted(c.owns_server for c in pair) == [False, True]
    assert pair[0].server_pid == pair[1].server_pid


def test_one_client_shared_by_threads_starts_one_server(clients: list[Client]) -> None:
    client = Client(port=0, fallback="never")
    clients.append(client)
    batches = [[f"thread {i} text {j}" for j in range(50)] for i in range(8)]
    results: dict[int, Any] = {}

    def use(i: int) -> None:
        results[i] = (client.embed(batches[i]), client.server_pid)

    threads = [threading.Thread(target=use, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({pid for _, pid in results.values()}) == 1
    for i, (result, _) in results.items():
        assert result == expected(batches[i])


# --- the server dies --------------------------------------------------------------------------

def test_kill_9_of_the_server_mid_use_restarts_it(clients: list[Client]) -> None:
    client = Client(port=0, fallback="never")
    clients.append(client)
    client.embed(TEXTS)
    old = client.server_pid
    assert old is not None
    worker = client.info()["pid"]
    os.kill(old, signal.SIGKILL)
    # The very next call succeeds and says who answered.
    result = client.embed(TEXTS)
    assert result == expected(TEXTS) and result.source == "server" and result.backend == "hash"
    # Once the old worker is gone too, the client is on a server it started anew.
    assert wait_for(lambda: gone(worker))
    assert client.embed(TEXTS) == expected(TEXTS)
    new = client.server_pid
    assert new is not None and new != old and client.owns_server and gone(old)
    client.close()
    assert gone(new)


def test_kill_9_during_a_stream_of_calls_loses_none(clients: list[Client]) -> None:
    client = Client(port=0, fallback="never")
    clients.append(client)
    client.embed(TEXTS)
    old = client.server_pid
    assert old is not None
    batch = [f"stream text {i}" for i in range(300)]
    want = expected(batch)
    errors: list[BaseException] = []
    done: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            try:
                assert client.embed(batch) == want
                done.append(client.server_pid or 0)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=stream)
    thread.start()
    assert wait_for(lambda: len(done) >= 3)
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: any(pid not in (0, old) for pid in done) or bool(errors), 15)
    stop.set()
    thread.join(30)
    assert not errors, errors
    assert client.server_pid != old


def test_kill_9_of_a_worker_is_invisible_to_the_client(clients: list[Client]) -> None:
    client = Client(port=0, fallback="never")
    clients.append(client)
    client.embed(TEXTS)
    supervisor, worker = client.server_pid, client.info()["pid"]
    assert worker != supervisor
    os.kill(worker, signal.SIGKILL)
    result = client.embed(TEXTS)
    assert result == expected(TEXTS) and result.source == "server"
    assert client.server_pid == supervisor and client.info()["pid"] != worker


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny sentence-transformers model (tests/tiny_models.py), made in a child process so
    that torch is not imported into this one; skips where the ML extra is missing."""
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in ("torch", "sentence_transformers")):
        pytest.skip("needs the ml extra (torch, sentence-transformers)")
    root = tmp_path_factory.mktemp("models")
    code = ("import sys; from pathlib import Path; from tiny_models import make_tiny_models; "
            "print(make_tiny_models(Path(sys.argv[1]))[1])")
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                          text=True, cwd=ROOT / "tests", env=server_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_worker_reloading_its_model_after_kill_9_loses_no_call(tiny_model: str) -> None:
    # A model server's replacement worker answers 503 "loading" (Retry-After: 1) for the
    # seconds its model takes to load; calls in flight when the worker died see their
    # connection reset. Both are waited out within retry_timeout: the app notices nothing.
    srv = start_server("--backend", "sentence-transformers", "--model", tiny_model,
                       env=server_env(EMBEDSERVE_BACKEND="sentence-transformers"), timeout=120)
    # fallback="always": a call that gave up would not raise but come back as "fallback".
    client = Client(srv.url, autostart=False, fallback="always")
    try:
        old_worker = client.info()["pid"]
        stop = threading.Event()
        errors: list[BaseException] = []
        results: dict[int, list[str]] = {i: [] for i in range(4)}

        def loop(i: int) -> None:
            while not stop.is_set():
                try:
                    result = client.embed([f"the cat sat on the mat {i}", "hello world"])
                    results[i].append(result.source)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: all(len(r) >= 3 for r in results.values()), 60)
        os.kill(old_worker, signal.SIGKILL)
        # A 503 "loading" window really happened: the new worker answers it while loading.
        status, headers, _ = srv.request("GET", "/health")
        assert (status, headers.get("retry-after")) == (503, "1")
        # Once the new worker serves, every thread gets through again.
        seen = {i: len(r) for i, r in results.items()}
        assert wait_for(lambda: bool(errors) or all(len(r) >= seen[i] + 2
                                                    for i, r in results.items()), 120)
        stop.set()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert all(source == "server" for r in results.values() for source in r)
        assert client.info()["pid"] != old_worker
    finally:
        stop.set()
        client.close()
        assert srv.stop() == 0


def test_a_server_someone_else_restarts_is_waited_for(clients: list[Client]) -> None:
    # autostart=False: the app's server is run by someone else (systemd, a container), who
    # restarts it. Nothing listens for a moment; the call waits for it within retry_timeout.
    port = free_port()
    first = start_server("--port", str(port), env=server_env())
    client = Client(first.url, autostart=False, fallback="never")
    clients.append(client)
    assert client.embed(TEXTS).source == "server"
    assert first.stop() == 0
    second: list[Any] = []
    restart = threading.Timer(1.5, lambda: second.append(
        start_server("--port", str(port), env=server_env())))
    restart.start()
    try:
        result = client.embed(TEXTS)
        assert (result.source, result) == ("server", expected(TEXTS))
        restart.join()
        assert client.info()["supervisor_pid"] == second[0].pid and not client.owns_server
    finally:
        restart.join()
        for srv in second:
            assert srv.stop() == 0


def test_while_a_hash_server_someone_else_runs_restarts_the_fallback_answers(
        clients: list[Client]) -> None:
    # The same restart, but the fallback's vectors are the server's: no reason to wait.
    port = free_port()
    first = start_server("--port", str(port), env=server_env())
    client = Client(first.url, autostart=False)
    clients.append(client)
    served = client.embed(TEXTS)
    assert first.stop() == 0
    second: list[Any] = []
    restart = threading.Timer(5.0, lambda: second.append(
        start_server("--port", str(port), env=server_env())))
    restart.start()
    try:
        meanwhile = client.embed(TEXTS)
        assert (meanwhile.source, meanwhile.model, meanwhile) == ("fallback", served.model,
                                                                  served)
        assert not second  # answered without waiting for the restart
        restart.join()
        assert wait_for(lambda: client.embed(TEXTS).source == "server", 10)
    finally:
        restart.join()
        for srv in second:
            assert srv.stop() == 0


def test_kill_9_without_restart_falls_back_to_identical_vectors(clients: list[Client],
                                                                 caplog: Any) -> None:
    client = Client(port=0, restart=False)
    clients.append(client)
    served = client.embed(TEXTS)
    old = client.server_pid
    assert old is not None
    worker = client.info()["pid"]
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: gone(worker))
    with caplog.at_level(logging.WARNING, logger="embedserve.client"):
        result = client.embed(TEXTS)
    assert (result.source, result.backend, result.model) == ("fallback", "hash", "hash-v1-384")
    assert client.last_source == "fallback" and client.last_model == "hash-v1-384"
    assert result == served  # bit for bit: the fallback rounds to float32 like the transport
    assert "killed by SIGKILL" in caplog.text and "in-process" in caplog.text
    assert gone(old)


def test_kill_9_without_restart_or_fallback_raises(clients: list[Client]) -> None:
    client = Client(port=0, restart=False, fallback=False)
    clients.append(client)
    client.embed(TEXTS)
    old, worker = client.server_pid, client.info()["pid"]
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: gone(worker))
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="restart is off"):
        client.embed(TEXTS)
    assert time.monotonic() - started < 5


# --- nothing to talk to ---------------------------------------------------------------------

def test_unreachable_url_with_fallback_off_raises_a_clear_error_at_once() -> None:
    url = f"http://{HOST}:{free_port()}"
    client = Client(url, autostart=False, fallback="never", retries=2, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable) as caught:
        client.embed(TEXTS)
    assert time.monotonic() - started < 2
    assert url in str(caught.value) and "autostart is off" in str(caught.value)
    assert "fallback is off" in str(caught.value)
    assert caught.value.url == url


def test_a_server_that_never_answers_raises_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind((HOST, 0))
        silent.listen(16)
        url = f"http://{HOST}:{silent.getsockname()[1]}"
        client = Client(url, fallback="never", timeout=0.3, start_timeout=1.0, retries=1)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer"):
            client.embed(TEXTS)
        assert time.monotonic() - started < 3
        # A client that starts nothing waits retry_timeout for it, not start_timeout (it
        # waited the 60 s of start_timeout, whatever timeout and retry_timeout said).
        client = Client(url, fallback="never", autostart=False, timeout=0.3,
                        retry_timeout=1.0, start_timeout=60.0)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer .* within 1s"):
            client.embed(TEXTS)
        assert time.monotonic() - started < 5


def test_unreachable_url_falls_back_by_default_and_says_so() -> None:
    client = Client(f"http://{HOST}:{free_port()}", autostart=False)
    result = client.embed(TEXTS)
    assert (result.source, result.model) == ("fallback", "hash-v1-384")
    assert result == expected(TEXTS)
    started = time.monotonic()
    for _ in range(20):  # while down, calls do not pay for retries
        client.embed(TEXTS)
    assert time.monotonic() - started < 1


def test_a_server_that_cannot_start_raises_with_its_log_lines() -> None:
    client = Client(port=0, server_args=["--dimensions", "0"], fallback="never")
    with pytest.raises(ServerStartError) as caught:
        client.embed(TEXTS)
    error = caught.value
    assert error.returncode == 2
    assert "dimensions must be at least 1" in str(error)
    assert any("dimensions must be at least 1" in line for line in error.log_tail)


def test_a_call_of_no_texts_is_answered_empty_with_dimensions_too(stubs: list[Stub]) -> None:
    # The size check over a call's vectors took "no vectors" for vectors of no size.
    stub = Stub()
    stubs.append(stub)
    with Client(stub.url, autostart=False) as client:
        assert client.embed([], dimensions=8) == [] and client.embed([]) == []


def test_fallback_never_mixes_models(clients: list[Client]) -> None:
    # Before any server answered: the requested backend says which model to expect.
    failing = ["--dimensions", "0"]
    client = Client(port=0, backend="sentence-transformers", server_args=failing)
    with pytest.raises(ServerUnavailable, match="fallback='always'"):
        client.embed(TEXTS)
    anyway = Client(port=0, backend="sentence-transformers", server_args=failing,
                    fallback="always")
    assert anyway.embed(TEXTS).source == "fallback"
    # After a server answered: its model is the one to match.
    with pytest.raises(ServerUnavailable, match="fallback='always'"):
        stubbed_then_stopped(clients, fallback="same-model").embed(TEXTS)
    result = stubbed_then_stopped(clients, fallback="always").embed(TEXTS)
    assert (result.source, result.model) == ("fallback", "hash-v1-384")


@pytest.mark.parametrize("args", [["--backend", "sentence-transformers"],  # over the hash
                                  ["--backend=auto", "--model=my-ml-model"],  # of the env
                                  ["--backend", "auto", "--model", "my-ml-model"]])
def test_server_args_naming_an_ml_model_count_as_model_does(args: list[str]) -> None:
    # The hash tier answered in its place: only backend= and model= were read.
    client = Client(port=0, server_args=[*args, "--max-body-bytes", "0"])
    with pytest.raises(ServerUnavailable, match="fallback='always'"):
        client.embed(TEXTS)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_env_can_turn_off_watching_stdin(clients: list[Client]) -> None:
    # The client set EMBEDSERVE_WATCH_STDIN=1 after the caller's env, which could not say 0.
    client = Client(port=0, env={"EMBEDSERVE_WATCH_STDIN": "0"}, fallback="never")
    clients.append(client)
    client.embed(TEXTS)
    environ = Path(f"/proc/{client.server_pid}/environ").read_bytes().split(b"\0")
    assert b"EMBEDSERVE_WATCH_STDIN=0" in environ


@pytest.mark.parametrize("args", [["--dimensions", "32"], ["--dim=32"]])  # as argparse reads
def test_server_args_dimensions_size_the_fallback(args: list[str]) -> None:
    result = Client(port=0, dimensions=64,
                    server_args=[*args, "--max-body-bytes", "0"]).embed(TEXTS)
    assert (result.source, result.model, result) == ("fallback", "hash-v1-32",
                                                     expected(TEXTS, 32))


def stubbed_then_stopped(clients: list[Client], fallback: Any) -> Client:
    stub = Stub(model="all-MiniLM-L6-v2", backend="sentence-transformers")
    client = Client(stub.url, autostart=False, fallback=fallback, retries=0)
    clients.append(client)
    served = client.embed(TEXTS)
    assert (served.model, served.backend) == ("all-MiniLM-L6-v2", "sentence-transformers")
    stub.stop()
    return client


@pytest.mark.parametrize("encoding_format", ["base64", "float"])
def test_fallback_vectors_equal_server_vectors(encoding_format: Any) -> None:
    # "single": the first 32 of its 384 buckets are all zero, so only a vector computed
    # into 32 buckets (what the server's hash tier answers) can match.
    texts = TEXTS + ["single", "a b"] + [f"sentence number {i} of the corpus"
                                         for i in range(100)]
    srv = start_server("--backend", "hash", env=server_env())
    try:
        with Client(srv.url, encoding_format=encoding_format) as client:
            served = client.embed(texts)
            sized = {dims: client.embed(texts, dimensions=dims) for dims in (32, 100)}
    finally:
        assert srv.stop() == 0
    with Client(srv.url, autostart=False, encoding_format=encoding_format) as client:
        local = client.embed(texts)
        local_sized = {dims: client.embed(texts, dimensions=dims) for dims in (32, 100)}
    assert (served.source, local.source) == ("server", "fallback")
    assert local == served
    for dims in (32, 100):
        assert local_sized[dims] == sized[dims]  # bit for bit, float32 rounding included
        assert local_sized[dims].source == "fallback"
        # Labelled as the server labels them: the served model's name.
        assert local_sized[dims].model == sized[dims].model == "hash-v1-384"
        want = HashEmbedder(dims).embed(texts)
        assert local_sized[dims] == (want if encoding_format == "float" else
                                     [array("f", v).tolist() for v in want])
    if encoding_format == "float":
        assert served == EMBEDDER.embed(texts)  # doubles, not rounded


def test_fallback_dimensions_match_a_server_started_with_them() -> None:
    srv = start_server("--backend", "hash", "--dimensions", "32", env=server_env())
    try:
        with Client(srv.url) as client:
            served = client.embed(TEXTS + ["single"])
    finally:
        assert srv.stop() == 0
    # A client that never reached that server, asked for 32 dimensions of the default size.
    local = Client(f"http://{HOST}:{free_port()}", autostart=False).embed(
        TEXTS + ["single"], dimensions=32)
    assert (served.model, served.source, local.source) == ("hash-v1-32", "server", "fallback")
    assert local == served


# --- models: named per call or by the client, listed, unknown -------------------------------

def test_models_lists_the_served_names_and_a_call_names_one(caplog: Any) -> None:
    # One model under two served names: enough to see the name travel and be checked.
    srv = start_server("--backend", "hash", "--served-model-name", "small,large",
                       env=server_env())
    try:
        with Client(srv.url, autostart=False, fallback="never") as client:
            assert client.models() == ["small", "large"]  # in order: the default first
            with caplog.at_level(logging.WARNING, logger="embedserve.client"):
                named = client.embed(TEXTS, model="large")
                default = client.embed(TEXTS)
                single = client.embed_single("one text", model="LARGE")  # any case
                # 'hash' (what --model hash serves) names the server's hash tier.
                tier = client.embed(TEXTS, model="hash")
            # Responses carry the model's first name, whichever name the call used.
            assert (named.model, named.source, default.model) == ("small", "server", "small")
            assert named == default == expected(TEXTS)
            assert single == expected(["one text"])[0] and single.model == "small"
            assert (tier.model, tier.source, tier) == ("small", "server", default)
            assert "model changed" not in caplog.text
    finally:
        assert srv.stop() == 0


def test_the_model_of_a_call_or_of_the_client_is_sent_with_every_chunk(
        stubs: list[Stub]) -> None:
    stub = Stub()
    stubs.append(stub)
    texts = [f"text {i}" for i in range(5)]
    with Client(stub.url, autostart=False, batch_size=2) as client:
        assert client.embed(texts) == expected(texts)
        assert client.embed(texts, model="hash-v1-384") == expected(texts)
    with Client(stub.url, autostart=False, batch_size=2, model="theirs") as client:
        client.embed(texts)
        client.embed(texts, model="mine")  # the call's own model wins over the client's
    # Three requests per call (2 + 2 + 1 texts), each naming the call's model.
    assert [body.get("model") for body in stub.bodies] == (
        [None] * 3 + ["hash-v1-384"] * 3 + ["theirs"] * 3 + ["mine"] * 3)
    assert [len(body["input"]) for body in stub.bodies] == [2, 2, 1] * 4


def test_a_client_for_model_hash_starts_and_asks_for_the_hash_tier(
        clients: list[Client]) -> None:
    client = Client(port=0, model="hash", fallback="never")  # --model hash: the hash tier
    clients.append(client)
    result = client.embed(TEXTS)
    assert (result.model, result.backend, result.source) == ("hash-v1-384", "hash", "server")
    assert result == expected(TEXTS)


def test_an_unknown_model_is_a_model_not_found_listing_the_served_names(
        clients: list[Client]) -> None:
    import pickle

    client = Client(port=0, fallback="always", server_args=[
        "--served-model-name", "small,large", "--max-batch-size", "2"])
    clients.append(client)
    with pytest.raises(ModelNotFound) as caught:
        client.embed(TEXTS, model="huge")  # never answered by the fallback, even "always"
    error = caught.value
    assert (error.status, error.param, error.model) == (404, "model", "huge")
    assert error.available == ["small", "large"]
    # The server's own words, which name what it serves.
    assert error.message == ("model 'huge' is not served here; this server serves 'small', "
                             "'large'")
    assert error.message in str(error)
    assert isinstance(error, ValidationError) and not isinstance(error, ServerUnavailable)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.model, copy.available, str(copy)) == (
        ModelNotFound, "huge", ["small", "large"], str(error))
    assert client.embed(TEXTS, model="large").source == "server"  # the client is fine
    # The client's own `model` names every call's model the same way.
    other = Client(client.url, autostart=False, model="huge")
    clients.append(other)
    with pytest.raises(ModelNotFound, match="this server serves 'small', 'large'"):
        other.embed(TEXTS)
    with pytest.raises(ValidationError, match="'model' must name a model"):
        client.embed(TEXTS, model=" ")
    with pytest.raises(TypeError, match="model must be a str"):
        client.embed(TEXTS, model=3)  # type: ignore[arg-type]


def test_the_fallback_answers_a_named_model_only_when_it_is_the_hash_tier() -> None:
    for policy in ("same-model", "always"):
        client = Client(f"http://{HOST}:{free_port()}", autostart=False, fallback=policy)
        for name, dims in (("hash", 384), ("hash-v1-384", 384), ("HASH-v1-32", 32)):
            result = client.embed(TEXTS, model=name)
            assert (result.source, result.model) == ("fallback", f"hash-v1-{dims}")
            assert result == expected(TEXTS, dims)
        # Another model's vectors are never made up, whatever the policy.
        with pytest.raises(ServerUnavailable, match="asked for model 'text-embedding-3-small'"):
            client.embed(TEXTS, model="text-embedding-3-small")
    never = Client(f"http://{HOST}:{free_port()}", autostart=False, fallback="never")
    with pytest.raises(ServerUnavailable, match="fallback is off"):
        never.embed(TEXTS, model="hash")


def test_a_named_hash_model_falls_back_even_after_an_ml_model_answered(
        clients: list[Client]) -> None:
    # The default model was an ML one: calls that name none get no fallback ...
    client = stubbed_then_stopped(clients, fallback="same-model")
    with pytest.raises(ServerUnavailable, match="all-MiniLM-L6-v2"):
        client.embed(TEXTS)
    # ... but a call that names the hash tier asks for exactly what the fallback makes.
    result = client.embed(TEXTS, model="hash-v1-384")
    assert (result.source, result.model, result) == ("fallback", "hash-v1-384",
                                                     expected(TEXTS))


def test_a_name_the_server_gave_its_hash_tier_falls_back_to_its_vectors() -> None:
    srv = start_server("--backend", "hash", "--dimensions", "32", "--served-model-name",
                       "small,large", env=server_env())
    client = Client(srv.url, autostart=False)
    try:
        served = client.embed(TEXTS, model="large")
        listed = "models" in client.info()
    finally:
        assert srv.stop() == 0
    try:
        # Its /info said which model that is: hash-v1-32, whose vectors the fallback makes.
        local = client.embed(TEXTS, model="hash-v1-32")
        assert (local.source, local) == ("fallback", served)
        assert client.embed(TEXTS, model="hash").dimensions == 32  # the server's hash tier
        if listed:  # a server whose /info lists its models' names: those names too
            by_name = client.embed(TEXTS, model="large")
            assert (by_name.source, by_name.model, by_name) == ("fallback", "small", served)
    finally:
        client.close()


def test_two_models_in_one_server_each_by_name(tiny_model: str) -> None:
    # The hash tier beside an ML model, each under its own names: one call's vectors come
    # from the model it names, and only the hash tier's names may fall back.
    srv = start_server("--model", "hash", "--model", tiny_model, "--served-model-name",
                       "hashy", "--served-model-name", "tiny,mini", timeout=120,
                       env=server_env(EMBEDSERVE_BACKEND="sentence-transformers"))
    client = Client(srv.url, autostart=False, retry_timeout=1.0)  # once gone: soon
    texts = [f"sentence number {i}" for i in range(5)]
    try:
        if len(client.info().get("models", [])) < 2:
            pytest.skip("this server serves one model (several --model flags need the "
                        "multi-model server)")
        assert client.models() == ["hashy", "tiny", "mini"]
        default, hashed = client.embed(TEXTS), client.embed(TEXTS, model="HASHY")
        tier = client.embed(TEXTS, model="hash")  # what --model hash serves, by any name
        assert (default.model, default.backend, default.dimensions) == ("hashy", "hash", 384)
        assert default == hashed == tier == expected(TEXTS) and tier.model == "hashy"
        ml = client.embed(TEXTS, model="mini")
        assert (ml.model, ml.backend, ml.dimensions, ml.source) == (
            "tiny", "sentence-transformers", 32, "server")
        # Split into requests of two texts, every one for the model the call named.
        with Client(srv.url, autostart=False, batch_size=2) as chunked:
            split = chunked.embed(texts, model="mini")
        assert (split.model, len(split), split.dimensions) == ("tiny", 5, 32)
        with pytest.raises(ModelNotFound) as caught:
            client.embed(TEXTS, model="huge")
        assert caught.value.available == ["hashy", "tiny", "mini"]
    finally:
        assert srv.stop() == 0
    try:
        # Gone: the ML model's vectors are never made up; the hash tier's are its own.
        with pytest.raises(ServerUnavailable, match="asked for model 'mini'"):
            client.embed(TEXTS, model="mini")
        local = client.embed(TEXTS, model="hashy")
        assert (local.source, local.model, local) == ("fallback", "hashy", hashed)
        by_default = client.embed(TEXTS)  # the default model is the hash tier, as /info said
        assert (by_default.source, by_default.model, by_default) == ("fallback", "hashy", default)
    finally:
        client.close()


# --- transport --------------------------------------------------------------------------------

def test_10000_texts_are_chunked_within_the_limits_and_kept_in_order(caplog: Any,
                                                                     clients: list[Client]
                                                                     ) -> None:
    texts = [f"text {i}: " + "word " * (i % 37) + ("é" * (i % 5)) for i in range(10_000)]
    client = Client(port=0, fallback="never", server_args=[
        "--max-batch-size", "1000", "--max-body-bytes", "60000", "--access-log"])
    clients.append(client)
    with caplog.at_level(logging.DEBUG, logger="embedserve.client.server"):
        result = client.embed(texts)
    assert len(result) == 10_000 and result.source == "server"
    assert result == expected(texts)
    posts = [r for r in caplog.records if "POST /v1/embeddings" in r.getMessage()]
    # Both limits bind: at most 1,000 texts per request, and bodies of at most 60 kB.
    body_bytes = len(json.dumps(texts, ensure_ascii=False, separators=(",", ":")).encode())
    assert len(posts) >= max(10, body_bytes // 60_000 + 1)


def test_a_422_is_a_typed_error_with_the_servers_message(clients: list[Client]) -> None:
    client = Client(port=0)
    clients.append(client)
    with pytest.raises(ValidationError) as caught:
        client.embed(TEXTS, dimensions=1000)
    error = caught.value
    assert error.status == 422 and error.param == "dimensions"
    assert error.message == ("'dimensions' must be between 1 and 384 for model hash-v1-384, "
                             "got 1000")
    assert isinstance(error, ValueError) and error.message in str(error)
    # The fallback rejects the same request with the same words.
    client.close()
    local = Client(f"http://{HOST}:{free_port()}", autostart=False)
    with pytest.raises(ValidationError) as caught_locally:
        local.embed(TEXTS, dimensions=1000)
    assert caught_locally.value.message == error.message


def test_bad_input_is_caught_before_sending() -> None:
    client = Client(f"http://{HOST}:{free_port()}", autostart=False, fallback="never")
    with pytest.raises(TypeError, match="embed_single"):
        client.embed("one string")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        client.embed(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValidationError, match=r"texts\[1\] is an empty string"):
        client.embed(["ok", ""])


@pytest.mark.parametrize("url", [f"http://user:secret@{HOST}:8765", f"http://{HOST}:8765/?k=v",
                                 f"http://{HOST}:8765/#top"])
def test_url_parts_that_would_not_be_sent_are_refused(url: str) -> None:
    # Dropped without a word before; the password is not quoted back.
    with pytest.raises(ValueError, match="without user info, query or fragment") as caught:
        Client(url, autostart=False)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("timeout", [0.0, -1.0, math.inf, math.nan])
def test_a_timeout_is_a_positive_finite_number_of_seconds(timeout: float) -> None:
    # inf was taken, and then failed every request with an OverflowError.
    with pytest.raises(ValueError, match="timeout must be a positive, finite number"):
        Client(f"http://{HOST}:{free_port()}", autostart=False, timeout=timeout)


BAD_SETTINGS = [("EMBEDSERVE_DIMENSIONS", value) for value in ("abc", "0", "-3", "1.5", "")] + [
    ("EMBEDSERVE_BACKEND", "bogus"), ("EMBEDSERVE_BACKEND", "")]


@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS)
def test_a_bad_environment_setting_is_an_error_at_construction(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    url = f"http://{HOST}:{free_port()}"
    named = re.escape(f"{variable}={value!r}")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=named):
        Client(url, autostart=False)
    monkeypatch.delenv(variable)
    with pytest.raises(ValueError, match=named):  # the same through the env= option
        Client(url, autostart=False, env={variable: value})
    # Parsed as the server parses it: the server refuses the same value.
    done = subprocess.run([sys.executable, "-m", "embedserve", "--port", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30,
                          env=server_env(**{variable: value}))
    assert done.returncode == 2, done.stderr


def test_a_good_environment_setting_is_used_as_the_server_reads_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSERVE_DIMENSIONS", " 32 ")  # int() takes the spaces, as there
    result = Client(f"http://{HOST}:{free_port()}", autostart=False).embed(TEXTS)
    assert (result.model, result.source, result) == ("hash-v1-32", "fallback", expected(TEXTS, 32))


def test_429_and_503_are_retried_then_succeed(stubs: list[Stub]) -> None:
    stub = Stub(script=[(429, {"Retry-After": "0.2"}), (503, {})])
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never", retries=3, backoff=0.01)
    started = time.monotonic()
    result = client.embed(TEXTS)
    assert result == expected(TEXTS) and stub.posts == 3
    assert time.monotonic() - started >= 0.2  # Retry-After was honoured


def test_a_nan_retry_after_backs_off_as_none_would(stubs: list[Stub]) -> None:
    # NaN passed every bound on a delay: the client retried at once (114 times in 5 s).
    stub = Stub(script=[(429, {"Retry-After": "nan"})] * 2)
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never", retries=3, backoff=0.2)
    started = time.monotonic()
    assert client.embed(TEXTS) == expected(TEXTS) and stub.posts == 3
    assert time.monotonic() - started >= 0.1 + 0.2  # backoff with equal jitter, twice


@pytest.mark.parametrize("info", [b"<html>hello</html>", b"[1, 2]"])
def test_an_info_that_is_no_json_object_is_an_embedserve_error(stubs: list[Stub],
                                                               info: bytes) -> None:
    stub = Stub(info=info)  # a bare JSONDecodeError or AttributeError before
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never")
    with pytest.raises(EmbedServeError, match="unexpected response from .*/info"):
        client.embed(TEXTS)
    with pytest.raises(EmbedServeError, match="unexpected response from .*/info"):
        client.info()


def _two_sizes(data: list[dict[str, Any]]) -> None:
    data[-1]["embedding"] = float32_base64([0.5] * 11)


def _one_index(data: list[dict[str, Any]]) -> None:
    for item in data:
        item["index"] = 0


def _a_nan(data: list[dict[str, Any]]) -> None:
    data[0]["embedding"] = float32_base64([math.nan] * 384)


def _all_short(data: list[dict[str, Any]]) -> None:
    for item in data:
        item["embedding"] = float32_base64([0.5] * 383)


@pytest.mark.parametrize("mangle,dimensions,message", [
    (_two_sizes, None, "vectors of \\[11, 384\\] values"), (_one_index, None, "indices"),
    (None, 16, "vectors of \\[384\\] values, not 16"), (_a_nan, None, "NaN or infinite"),
])
def test_vectors_that_cannot_be_the_answer_are_an_error(stubs: list[Stub], mangle: Any,
                                                        dimensions: int | None,
                                                        message: str) -> None:
    # Accepted before: a call could return vectors of mixed sizes, or one text's vector
    # for every text.
    stub = Stub(mangle=mangle)  # (and a stand-in that ignores `dimensions`)
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never")
    with pytest.raises(EmbedServeError, match=message):
        client.embed(TEXTS, dimensions=dimensions)


def test_vectors_of_another_size_than_info_describes_are_an_error(stubs: list[Stub]) -> None:
    info = json.dumps({"backend": "hash", "model": "hash-v1-384", "dimensions": 384,
                       "models": [{"names": ["hash-v1-384"], "dimensions": 384}]}).encode()
    stub = Stub(info=info, mangle=_all_short)
    stubs.append(stub)
    with pytest.raises(EmbedServeError, match="vectors of \\[383\\] values, not 384"):
        Client(stub.url, autostart=False, fallback="never").embed(TEXTS)


@pytest.mark.parametrize("embedding,message", [
    ([True] * 384, "bool"), (["0.5"] * 384, "str"), ([None] * 384, "NoneType"),
    ([math.inf] + [0.0] * 383, "NaN or infinite"), ([10 ** 400] * 384, "too large")])
def test_float_answers_of_anything_but_finite_numbers_are_an_error(
        stubs: list[Stub], embedding: list[Any], message: str) -> None:
    # Taken before: booleans as 1.0 and 0.0, "0.5" as 0.5, NaN and infinity as they came.
    def mangle(data: list[dict[str, Any]]) -> None:  # the stand-in answers base64 only
        for item in data:
            item["embedding"] = decode_float32_base64(item["embedding"])
        data[1]["embedding"] = embedding

    stub = Stub(mangle=mangle)
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never", encoding_format="float")
    with pytest.raises(EmbedServeError, match=message):
        client.embed(TEXTS)


def test_each_request_of_a_call_answers_for_its_own_texts(stubs: list[Stub]) -> None:
    # One vector short in the first request, one over in the second: the call's count was
    # right, and texts got their neighbours' vectors.
    answers = []

    def mangle(data: list[dict[str, Any]]) -> None:
        if not answers:
            data.pop()
        else:
            data.append({**data[-1], "index": len(data)})
        answers.append(len(data))

    stub = Stub(mangle=mangle)
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never", batch_size=2)
    with pytest.raises(EmbedServeError, match="1 vectors for the 2 texts before texts\\[2:\\]"):
        client.embed(TEXTS + ["a fourth"])
    assert answers == [1, 3]


@pytest.mark.parametrize("value", ["0", "-5", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_retry_after_asking_for_no_wait_backs_off(stubs: list[Stub], value: str) -> None:
    # Retried at once before: about 4,900 requests in 3 s against a server saying "0".
    stub = Stub(script=[(503, {"Retry-After": value})] * 2)
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never", retries=3, backoff=0.2)
    started = time.monotonic()
    assert client.embed(TEXTS) == expected(TEXTS) and stub.posts == 3
    assert time.monotonic() - started >= 0.1 + 0.2  # backoff with equal jitter, twice


def test_a_redirect_is_an_error_naming_where_not_followed(stubs: list[Stub]) -> None:
    stub = Stub(script=[(307, {"Location": "http://elsewhere.example/v1/embeddings"})])
    stubs.append(stub)
    with pytest.raises(ServerError, match="redirects to 'http://elsewhere.example") as caught:
        Client(stub.url, autostart=False, fallback="never").embed(TEXTS)
    assert caught.value.status == 307 and stub.posts == 1


def _dripping(first: bytes, then: bytes) -> Iterator[str]:
    """A listener that answers each connection with `first`, then a byte of `then` every
    0.1 s, forever (until the client hangs up); yields its URL."""
    listener = socket.create_server((HOST, 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(first)
                while not stop.wait(0.1):
                    conn.sendall(then)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://{HOST}:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


@pytest.mark.parametrize("first,then", [
    (b"HTTP/1.1 200 OK\r\n", b"X"),  # header lines that never end
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b" "),  # nor does the body
])
def test_an_answer_trickling_in_is_bounded_by_the_timeouts(first: bytes, then: bytes) -> None:
    # Each read got the timeout, not the answer: a byte every 0.1 s held a call forever.
    for url in _dripping(first, then):
        client = Client(url, autostart=False, fallback="never", timeout=1, retry_timeout=1)
        done: list[BaseException] = []

        def call() -> None:
            try:
                client.embed(TEXTS)
            except BaseException as exc:
                done.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(30)  # the bound is about 2 s; without it, never
        assert done and isinstance(done[0], ServerUnavailable), done
        client.close()


@pytest.mark.parametrize("framing", [b"Content-Length: 9999999999",  # refused unread
                                     b"Connection: close"])  # read up to the limit
def test_an_answer_over_the_size_limit_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                                   framing: bytes) -> None:
    monkeypatch.setattr(transport, "MAX_ANSWER_BYTES", 1 << 20)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n"
    for url in _dripping(head + b"[" * 65536, b"[" * 65536):
        with pytest.raises(EmbedServeError, match="over 1048576 bytes"):
            Client(url, autostart=False, fallback="never", timeout=30).info()


@pytest.mark.parametrize("first", [b"SSH-2.0-OpenSSH_9.6\r\n", b"x" * 70_000],
                         ids=["banner", "endless-line"])
def test_a_port_answering_something_not_http_is_refused_at_once(first: bytes) -> None:
    # An SSH banner (or a line of no end) was "not answering" until start_timeout (60 s).
    for url in _dripping(first, b""):
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="not HTTP"):
            Client(url, fallback="never", start_timeout=20).embed(TEXTS)
        assert time.monotonic() - started < 15  # at once, not at start_timeout


def test_retries_are_bounded(stubs: list[Stub]) -> None:
    stub = Stub(script=[(503, {})] * 10)
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never", retries=2, backoff=0.01)
    with pytest.raises(ServerUnavailable, match="failed 3 times") as caught:
        client.embed(TEXTS)
    assert caught.value.status == 503 and stub.posts == 3


def test_one_retry_policy_bounds_every_loop_by_deadline_and_cap() -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=2.0)
    capped = policy.start(cap=2)  # the looks where nothing listens: a cap, no deadline
    assert [capped.next_delay() is not None for _ in range(3)] == [True, True, False]
    assert capped.tries == 3
    growing = policy.start()
    for retry in range(1, 8):  # doubling, capped, with equal jitter: never zero
        ceiling = min(2.0, 0.1 * 2 ** (retry - 1))
        delay = growing.next_delay()
        assert delay is not None and ceiling / 2 <= delay <= ceiling
    # Retry-After is honoured, up to max_backoff.
    assert 1.0 <= (policy.start().next_delay(1.0) or 0) <= 1.1
    assert 2.0 <= (policy.start().next_delay(30.0) or 0) <= 2.2
    # A deadline: no sleep past it, one last try at it, then no more.
    soon = policy.start(seconds=0.05)
    assert soon.answer_wait(60.0) == 60.0  # the first try waits its full timeout
    delay = soon.next_delay(1.0)
    assert delay is not None and delay <= 0.05
    time.sleep(delay)
    assert soon.answer_wait(60.0) == MIN_WAIT  # a retry waits no longer than the deadline
    assert soon.next_delay() is None and soon.tries == 2
    assert policy.start(seconds=0).next_delay() is None  # retry_timeout=0: no retries


def test_a_400_is_not_retried(stubs: list[Stub]) -> None:
    stub = Stub(script=[(400, {})])
    stubs.append(stub)
    client = Client(stub.url, autostart=False, retries=3)
    with pytest.raises(ValidationError, match="scripted 400"):
        client.embed(TEXTS)
    assert stub.posts == 1


def test_keep_alive_one_connection_per_thread(stubs: list[Stub]) -> None:
    stub = Stub()
    stubs.append(stub)
    client = Client(stub.url, autostart=False, fallback="never")
    for _ in range(20):
        client.embed(TEXTS)
    assert len(stub.connections) == 2  # the /health probe, then one kept alive
    thread = threading.Thread(target=lambda: [client.embed(TEXTS) for _ in range(5)])
    thread.start()
    thread.join(10)
    assert len(stub.connections) == 3
    client.close()


def test_api_key_reaches_the_server_it_starts_and_is_sent(clients: list[Client]) -> None:
    client = Client(port=0, api_key="s3cret", fallback="never")
    clients.append(client)
    assert client.embed(TEXTS) == expected(TEXTS)
    stranger = Client(client.url, autostart=False, fallback="never", api_key="")
    with pytest.raises(AuthenticationError) as caught:
        stranger.embed(TEXTS)
    assert caught.value.status == 401 and "API key" in caught.value.message


def test_results_and_errors_survive_pickling() -> None:
    import pickle

    client = Client(f"http://{HOST}:{free_port()}", autostart=False)
    result = pickle.loads(pickle.dumps(client.embed(TEXTS)))
    assert result == expected(TEXTS) and (result.model, result.source) == ("hash-v1-384",
                                                                          "fallback")
    error = ValidationError(422, "bad", param="dimensions")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.status, copy.message, copy.param, str(copy)) == (
        ValidationError, 422, "bad", "dimensions", str(error))


def test_every_result_and_error_class_is_importable_from_embedserve() -> None:
    import embedserve
    from embedserve import client as client_module
    from embedserve import Embedding, ModelMismatch

    assert (Embedding, ModelMismatch) == (client_module.Embedding, client_module.ModelMismatch)
    classes = {name for name in client_module.__all__
               if isinstance(getattr(client_module, name), type)}
    assert classes <= set(embedserve.__all__)
    for name in classes:
        assert getattr(embedserve, name) is getattr(client_module, name)
