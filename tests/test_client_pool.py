"""A Python client over several servers (Client(url=[...]), EMBEDSERVE_URL="A,B"): calls
spread between them, a server killed mid-run costs no call, and it is used again once it is
back on its port. Real servers on 127.0.0.1, real SIGKILLs."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from conftest import Server, children_of, start_server
from embedserve.client import Client, ServerError, ServerUnavailable
from embedserve.client.options import Endpoint

pytestmark = pytest.mark.timeout(300)

TEXTS = ["first text", "second text", "a third one"]


def served(server: Server) -> int:
    """Embedding requests the server answered 200, from its /metrics (every worker's)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("embedserve_requests_total{")
               and 'route="/v1/embeddings"' in line and 'status="200"' in line)


def kill_hard(server: Server) -> None:
    """SIGKILL the supervisor and its workers at once: a crashed machine, not a drain."""
    for pid in [*children_of(server.pid), server.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(10)


def restart_on(port: int) -> Server:
    """A new server on `port`, once the killed one's workers have let go of it."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return start_server("--backend", "hash", "--port", str(port))
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_calls(client: Client, calls: int, threads: int,
              on_call: Callable[[int], None] | None = None) -> list[BaseException]:
    """`calls` embed calls from `threads` threads; every failure, whatever it is."""
    failures: list[BaseException] = []
    counter = iter(range(calls))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                number = next(counter, None)
            if number is None:
                return
            if on_call is not None:
                on_call(number)
            try:
                result = client.embed(TEXTS)
                assert len(result) == 3 and result.source == "server"
            except BaseException as exc:
                failures.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(240)
    assert not any(worker.is_alive() for worker in workers)
    return failures


@pytest.fixture
def two_servers() -> Iterator[list[Server]]:
    servers = [start_server("--backend", "hash") for _ in range(2)]
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(10)


def test_calls_spread_survive_a_killed_server_and_return_to_it(two_servers: list[Server]
                                                               ) -> None:
    first, second = two_servers
    with Client([first.url, second.url], fallback="never") as client:
        assert client.url == f"{first.url},{second.url}"
        assert not client.owns_server
        # 1,000 calls, both up: each server gets at least 30% of them.
        assert run_calls(client, 1000, threads=4) == []
        counts = served(first), served(second)
        assert sum(counts) >= 1000 and min(counts) >= 0.3 * sum(counts), counts

        # One server dies mid-run: no call fails.
        killed = threading.Event()

        def kill_at_100(number: int) -> None:
            if number == 100:
                kill_hard(second)
                killed.set()

        before = served(first)
        assert run_calls(client, 500, threads=4, on_call=kill_at_100) == []
        assert killed.is_set()
        assert served(first) - before >= 390  # it took over the rest

        # Back on its port: it serves again (after its back-off, at most max_backoff).
        # Calls go on until it does (its back-off may outlast a few hundred quick calls).
        two_servers[1] = second = restart_on(second.port)
        deadline = time.monotonic() + 60
        while served(second) == 0:
            assert time.monotonic() < deadline, "the restarted server was never used again"
            assert run_calls(client, 100, threads=2) == []


def test_a_single_thread_takes_turns(two_servers: list[Server]) -> None:
    first, second = two_servers
    with Client(f"{first.url},{second.url}", fallback="never") as client:
        for _ in range(40):
            client.embed(TEXTS)
    assert served(first) >= 20 and served(second) >= 20


def test_environment_lists_several_servers(two_servers: list[Server],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = two_servers
    monkeypatch.setenv("EMBEDSERVE_URL", f"{first.url}, {second.url}")
    with Client(fallback="never") as client:
        assert client.url == f"{first.url},{second.url}"
        assert client.models() == ["hash-v1-384"]
        assert client._options.pool == (Endpoint("http", first.host, first.port, ""),
                                        Endpoint("http", second.host, second.port, ""))
        assert not client._options.autostart


def test_all_servers_down_fails_after_retry_timeout_and_never_starts_one(
        two_servers: list[Server]) -> None:
    first, second = two_servers
    for server in two_servers:
        kill_hard(server)
    with Client([first.url, second.url], fallback="never", retry_timeout=0.5) as client:
        with pytest.raises(ServerUnavailable):
            client.embed(TEXTS)
        assert not client.owns_server
    # Nothing was started on either port.
    for server in two_servers:
        with pytest.raises(OSError):
            urllib.request.urlopen(server.url + "/health", timeout=2)


def test_bad_server_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        Client(["http://127.0.0.1:9", "http://127.0.0.1:9"])
    with pytest.raises(ValueError, match="port applies to one server"):
        Client(["http://127.0.0.1:9", "http://127.0.0.1:10"], port=11)
    with pytest.raises(ValueError, match="HOST:PORT"):
        Client("http://127.0.0.1:9,,http://127.0.0.1:10")
    with pytest.raises(ValueError, match="list of URLs"):
        Client([])


class _Failing(http.server.BaseHTTPRequestHandler):
    """A stand-in for a proxy whose backend died (Ray Serve's answer then), or for a server
    with a bug: every request is a 500, plain text or embedserve's own JSON error."""

    hits = 0
    json_error = False
    behind = ""  # a real server whose GET answers are passed on (then only POSTs fail)

    def _answer(self) -> None:
        if self.command == "GET" and self.behind:
            with urllib.request.urlopen(self.behind + self.path, timeout=30) as answer:
                body = answer.read()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.json_error:
            body = json.dumps({"error": {"message": "boom", "type": "server_error"}}).encode()
            kind = "application/json"
        else:
            body, kind = b"Internal Server Error", "text/plain"
        self.send_response(500)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing() -> Iterator[tuple[str, type[_Failing]]]:
    handler = type("Failing", (_Failing,), {"hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_a_proxys_plain_500_is_retried_on_another_server(failing: tuple[str, type[_Failing]]
                                                         ) -> None:
    url, handler = failing
    server = start_server("--backend", "hash")
    try:
        with Client([url, server.url], fallback="never", retry_timeout=30) as client:
            for _ in range(6):
                assert len(client.embed(["a text"])[0]) == 384
        assert handler.hits > 0  # it was asked, answered 500, and the call went on
    finally:
        server.stop()


def test_embedserves_own_500_is_not_retried(failing: tuple[str, type[_Failing]]) -> None:
    url, handler = failing
    server = start_server("--backend", "hash")
    handler.json_error, handler.behind = True, server.url
    try:
        with Client(url, autostart=False, fallback="never", retry_timeout=30) as client:
            with pytest.raises(ServerError):
                client.embed(["a text"])
        assert handler.hits == 1  # a bug's 500 is an answer: asked once, not again
    finally:
        server.stop()
