"""The supervisor with real processes and real signals; no test leaves a process behind."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server, children_of, pid_alive, start_server

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")


def wait_for(condition, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def worker_pids(srv: Server) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pids = []
    for pid in children_of(srv.pid):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return sorted(pids)


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def supervised() -> Iterator[list[Server]]:
    """Servers started by a test; afterwards neither they nor any of their workers remain."""
    started: list[Server] = []
    yield started
    for srv in started:
        workers = children_of(srv.pid) if srv.proc.poll() is None else []
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
            try:
                srv.proc.wait(20)
            except subprocess.TimeoutExpired:
                srv.proc.kill()
                srv.proc.wait(5)
                raise AssertionError("supervisor did not stop within 20 s of SIGTERM; its "
                                     "log:\n" + "".join(srv.log[-40:])) from None
        for pid in workers:
            assert wait_for(lambda: not pid_alive(pid), 10), f"worker {pid} left behind"
        assert port_is_free(srv.port)


class Load:
    """`threads` clients, each on its own keep-alive connection, embedding until stopped.
    A refused connection is counted separately from other failures."""

    def __init__(self, srv: Server, threads: int = 8) -> None:
        self.srv = srv
        self.ok = 0
        self.failed: list[str] = []
        self.refused = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, i: int) -> None:
        body = json.dumps({"input": [f"client {i} text {j}" for j in range(4)]})
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.srv.host, self.srv.port, timeout=30)
                conn.request("POST", "/v1/embeddings", body=body,
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                if response.status != 200 or len(json.loads(payload)["data"]) != 4:
                    raise RuntimeError(f"status {response.status}: {payload[:200]!r}")
                with self._lock:
                    self.ok += 1
                if response.getheader("Connection") == "close":
                    conn.close()
                    conn = None
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                conn = None
            except Exception as exc:  # an in-flight request on a dying worker
                with self._lock:
                    self.failed.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


def test_worker_killed_under_load_is_restarted_and_the_port_never_refuses(
        supervised: list[Server]) -> None:
    srv = start_server("--workers", "1")
    supervised.append(srv)
    [victim] = worker_pids(srv)
    with Load(srv) as load:
        assert wait_for(lambda: load.ok > 50, 20)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: worker_pids(srv) and worker_pids(srv) != [victim], 10)
        before = load.ok
        assert wait_for(lambda: load.ok > before + 50, 20), "no successes after the restart"
    print(f"\nkill -9 of a worker under 8 clients: {load.ok} ok, {len(load.failed)} in-flight "
          f"failures, {load.refused} refused")
    assert load.refused == 0
    # Only requests on connections the dying worker held can fail: the one in flight on
    # each client's connection, and a reconnect accepted in the instant before it died.
    assert len(load.failed) <= 2 * 8
    info = srv.request("GET", "/info")[2]
    assert info["restarts"] == 1 and info["pid"] != victim
    assert not pid_alive(victim)


def test_stopped_worker_is_detected_and_replaced(supervised: list[Server]) -> None:
    srv = start_server("--worker-timeout", "2")
    supervised.append(srv)
    [victim] = worker_pids(srv)
    os.kill(victim, signal.SIGSTOP)
    start = time.monotonic()
    try:
        assert wait_for(lambda: not pid_alive(victim) or
                        open(f"/proc/{victim}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
                        10)
        replaced_after = time.monotonic() - start
        assert wait_for(lambda: srv.request("GET", "/health")[0] == 200, 10)
    finally:
        if pid_alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert replaced_after < 2 + 3  # timeout + a few heartbeat/tick periods
    info = srv.request("GET", "/info")[2]
    assert info["pid"] != victim and info["restarts"] == 1


@pytest.mark.parametrize("graceful", ["10", "inf"])  # inf: an OverflowError lost it
def test_sigterm_during_a_slow_request_lets_it_finish(supervised: list[Server],
                                                      graceful: str) -> None:
    srv = start_server("--graceful-timeout", graceful)
    supervised.append(srv)
    workers = worker_pids(srv)
    body = json.dumps({"inputs": ["slow but complete"]}).encode()
    with socket.create_connection((srv.host, srv.port), timeout=20) as sock:
        host = b"Host: %s:%d\r\n" % (srv.host.encode(), srv.port)
        sock.sendall(b"POST /embed HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)  # the request is in flight in the worker
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the server is draining while the client is still sending
        sock.sendall(body[5:])
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"]]"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert b"Connection: close" in reply
    assert srv.proc.wait(10) == 0
    for pid in workers:
        assert wait_for(lambda: not pid_alive(pid), 5)


def test_kill_9_of_the_supervisor_takes_the_workers_down(supervised: list[Server]) -> None:
    srv = start_server("--workers", "2")
    workers = worker_pids(srv)
    assert len(workers) == 2
    srv.proc.kill()
    srv.proc.wait(5)
    for pid in workers:
        assert wait_for(lambda: not pid_alive(pid), 5), f"orphan worker {pid}"
    assert wait_for(lambda: port_is_free(srv.port), 5)


def test_boot_error_halts_with_a_message_instead_of_looping(supervised: list[Server]) -> None:
    import subprocess
    import sys

    from conftest import server_env
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "embedserve", "--port", "0", "--backend",
                           "transformers", "--workers", "2"], capture_output=True, text=True,
                          env=server_env(), timeout=60)
    assert done.returncode == 3
    assert "failed to boot with a configuration error" in done.stderr
    assert "not restarting" in done.stderr
    assert done.stderr.count("cannot start") <= 2  # one per worker, no restart loop
    assert time.monotonic() - start < 30


def test_sighup_rolls_workers_without_a_failed_request(supervised: list[Server]) -> None:
    srv = start_server("--workers", "2")
    supervised.append(srv)
    old = set(worker_pids(srv))
    with Load(srv) as load:
        assert wait_for(lambda: load.ok > 50, 20)
        srv.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: len(set(worker_pids(srv)) & old) == 0
                        and len(worker_pids(srv)) == 2, 20)
        before = load.ok
        assert wait_for(lambda: load.ok > before + 50, 20)
    assert load.failed == [] and load.refused == 0
    for pid in old:
        assert wait_for(lambda: not pid_alive(pid), 5)


def test_two_workers_both_serve_and_survive_losing_one(supervised: list[Server]) -> None:
    srv = start_server("--workers", "2")
    supervised.append(srv)
    workers = worker_pids(srv)
    assert len(workers) == 2

    def seen_pids(n: int) -> set[int]:
        return {srv.request("GET", "/info")[2]["pid"] for _ in range(n)}

    assert wait_for(lambda: seen_pids(20) == set(workers), 10)
    os.kill(workers[0], signal.SIGKILL)
    for _ in range(50):
        assert srv.request("POST", "/embed", {"inputs": "still here"})[0] == 200
    assert wait_for(lambda: len(worker_pids(srv)) == 2 and workers[0] not in worker_pids(srv),
                    10)
    assert srv.request("GET", "/info")[2]["restarts"] == 1


def test_two_workers_stop_promptly_after_serving(supervised: list[Server]) -> None:
    """Regression: both workers wake for each new connection and only one gets it; with a
    blocking accept() the other stayed stuck in it, and the drain at SIGTERM waited for a
    connection that never came."""
    srv = start_server("--workers", "2", "--graceful-timeout", "30")
    workers = worker_pids(srv)
    for _ in range(20):  # fresh connections: each one wakes both workers
        assert srv.request("GET", "/health")[0] == 200
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0  # well inside the 30 s grace: nothing was in flight
    for pid in workers:
        assert wait_for(lambda: not pid_alive(pid), 5)


# --- stopping: signals during a drain, and no listening while draining ----------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` from /proc/<pid>/stat (fields 14 and 15)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_has(srv: Server, text: str, timeout: float = 10) -> bool:
    return wait_for(lambda: any(text in line for line in srv.log), timeout)


class InFlight:
    """A request held in flight in a worker: the connection is first proven accepted (a
    complete GET /health answered on it), then a POST is sent all but its last bytes. The
    worker has the request on an open connection and waits for the rest of the body."""

    BODY = json.dumps({"inputs": ["held in flight"]}).encode()

    def __init__(self, srv: Server) -> None:
        self.sock = socket.create_connection((srv.host, srv.port), timeout=30)
        host = f"Host: {srv.host}:{srv.port}\r\n".encode()
        self.sock.sendall(b"GET /health HTTP/1.1\r\n" + host + b"\r\n")
        assert self._reply().startswith(b"HTTP/1.1 200")
        self.sock.sendall(b"POST /embed HTTP/1.1\r\n" + host + b"Content-Type: application/json"
                          b"\r\nContent-Length: %d\r\n\r\n" % len(self.BODY) + self.BODY[:5])

    def _reply(self) -> bytes:
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = self.sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def finish(self) -> bytes:
        """Send the rest of the body; the whole reply."""
        self.sock.sendall(self.BODY[5:])
        return self._reply()

    def close(self) -> None:
        self.sock.close()


def connection_refused(srv: Server) -> bool:
    try:
        socket.create_connection((srv.host, srv.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # a timeout: the kernel queued it and nobody accepts
        return False
    return False


def test_sighup_during_a_drain_neither_spins_nor_restarts(supervised: list[Server]) -> None:
    """Regression: the stop loop waited on the signal wake-up socket without reading it, so
    a SIGHUP during a drain made every wait return at once: 100% CPU until the end."""
    srv = start_server("--graceful-timeout", "10")
    supervised.append(srv)
    held = InFlight(srv)
    try:
        srv.proc.send_signal(signal.SIGTERM)
        assert log_has(srv, "received SIGTERM")
        srv.proc.send_signal(signal.SIGHUP)
        before, began = cpu_seconds(srv.pid), time.monotonic()
        time.sleep(2.0)  # the window measured, not a wait for anything
        used = cpu_seconds(srv.pid) - before
        wall = time.monotonic() - began
        assert used < 0.5, f"the supervisor used {used:.2f} s of CPU in {wall:.2f} s of drain"
        reply = held.finish()
    finally:
        held.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert srv.proc.wait(15) == 0
    assert not any("rolling restart" in line for line in srv.log), "".join(srv.log)


def test_a_second_signal_during_a_drain_forces_the_stop(supervised: list[Server]) -> None:
    srv = start_server("--graceful-timeout", "60")
    supervised.append(srv)
    workers = worker_pids(srv)
    held = InFlight(srv)
    try:
        srv.proc.send_signal(signal.SIGTERM)
        assert log_has(srv, "received SIGTERM")
        srv.proc.send_signal(signal.SIGHUP)  # ignored while stopping: not a second signal
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(20) == 0  # far inside the 60 s of grace: forced
    finally:
        held.close()
    assert log_has(srv, "forcing the stop", 5)
    for pid in workers:
        assert wait_for(lambda: not pid_alive(pid), 5)


def test_a_draining_server_refuses_new_connections(supervised: list[Server]) -> None:
    """Regression: the supervisor kept its copy of the listening socket open through the
    drain, so new clients were queued by the kernel, hung, and were reset at the end."""
    srv = start_server("--graceful-timeout", "20")
    supervised.append(srv)
    held = InFlight(srv)
    try:
        srv.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: connection_refused(srv), 10), \
            "a new connection was still queued during the drain"
        reply = held.finish()
    finally:
        held.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert b"Connection: close" in reply
    assert srv.proc.wait(15) == 0


def test_sigterm_while_a_model_loads_stops_listening_and_exits(
        supervised: list[Server], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker still loading its model held the listening socket (and answered 503
    "loading") until the load ended, however long that took. Here the load never ends: a
    stand-in sentence_transformers package whose import blocks."""
    import subprocess
    import sys

    from conftest import request, server_env

    for package, code in (("torch", ""), ("sentence_transformers",
                                          "import time\nwhile True:\n    time.sleep(1)\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(code)
    env = server_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "embedserve", "--port", str(port),
                             "--backend", "sentence-transformers", "--graceful-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    srv = Server(proc, f"http://127.0.0.1:{port}", proc.pid)
    supervised.append(srv)

    def loading() -> bool:
        try:
            status, _, body = request("127.0.0.1", port, "GET", "/health", timeout=2)
        except OSError:
            return False
        return status == 503 and "loading" in body["error"]

    assert wait_for(loading, 30), "the worker never answered 503 loading"
    proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: connection_refused(srv), 10), \
        "the loading worker still accepted connections after SIGTERM"
    code = proc.wait(20)
    assert proc.stdout is not None
    output = proc.stdout.read()
    assert code == 0, output
    # Health polls answered 503 "loading" are an expected state, not errors.
    assert " ERROR " not in output, output


def test_a_worker_draining_in_a_rolling_restart_keeps_its_heartbeat(
        supervised: list[Server]) -> None:
    """Regression: a draining worker's accept loop is closed and no longer ticks; the
    heartbeat took that for a hang, and the supervisor killed the worker mid-request."""
    srv = start_server("--worker-timeout", "1", "--graceful-timeout", "30")
    supervised.append(srv)
    [old] = worker_pids(srv)
    held = InFlight(srv)
    try:
        srv.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: len(worker_pids(srv)) == 2, 10)
        # Long enough for the stale-loop check (5 s) and the timeout (1 s) to both pass.
        time.sleep(8)
        reply = held.finish()
    finally:
        held.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert wait_for(lambda: not pid_alive(old), 10)
    assert not any("heartbeat" in line for line in srv.log), "".join(srv.log)


# --- a replacement worker serves what the server served -------------------------------------

def test_a_replacement_worker_never_serves_another_model(supervised: list[Server],
                                                         tmp_path: Path) -> None:
    # Its model gone (removed from the cache, its folder moved), a replacement worker fell
    # to the hash tier under --backend auto and served 384-d vectors beside its sibling's
    # 32-d ones on one port (or, failing to boot, took the whole server down). Now it
    # refuses to serve, and is retried while the others serve on.
    pytest.importorskip("sentence_transformers")
    from tiny_models import make_tiny_models

    folder = Path(make_tiny_models(tmp_path / "tiny")[1])
    srv = start_server("--backend", "auto", "--model", str(folder), "--workers", "2",
                       timeout=120)
    supervised.append(srv)
    dims = srv.request("GET", "/info")[2]["dimensions"]
    assert dims != 384
    folder.rename(folder.with_name("moved"))
    os.kill(worker_pids(srv)[0], signal.SIGKILL)
    assert log_has(srv, "but this server serves", 60)
    for _ in range(40):
        status, _, body = srv.request("POST", "/embed", {"inputs": "same model"})
        assert status == 200 and len(body[0]) == dims
    assert srv.proc.poll() is None  # still serving
    # A rolling restart with no model to load keeps the old worker serving.
    srv.proc.send_signal(signal.SIGHUP)
    time.sleep(3)
    status, _, body = srv.request("POST", "/embed", {"inputs": "same model"})
    assert status == 200 and len(body[0]) == dims
    # The model back, the replacement boots and serves it (after its back-off).
    folder.with_name("moved").rename(folder)
    assert wait_for(lambda: len({srv.request("GET", "/info")[2]["pid"] for _ in range(20)})
                    == 2, 60, interval=0.5), "".join(srv.log[-30:])
    for _ in range(40):
        status, _, body = srv.request("POST", "/embed", {"inputs": "same model"})
        assert status == 200 and len(body[0]) == dims
