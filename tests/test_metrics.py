"""/metrics describes the whole server: one scrape, answered by any worker, sums every
worker's counters (those of workers that died and were replaced included) and the running
workers' gauges. Real servers with --workers 2; each request on a fresh connection, so
both workers serve."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Server, server_env, start_server
from embedserve.metricfiles import FileStore, read_live, read_totals, retire, worker_stores
from embedserve.metrics import Metrics

parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
            try:
                srv.proc.wait(20)
            except Exception:
                srv.proc.kill()
                srv.proc.wait(5)
                raise


def scrape(srv: Server) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by their labels."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def requests_of(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], route: str,
                method: str = "GET", status: str = "200") -> float:
    labels = tuple(sorted({"route": route, "method": method, "status": status}.items()))
    return samples.get("embedserve_requests_total", {}).get(labels, 0.0)


def scrape_until(srv: Server, done: Callable[[dict], bool], tries: int = 200) -> dict:  # type: ignore[type-arg]
    """A request is counted just after its answer is written, so a scrape right after it
    may come first: look again (a bounded number of times) until it shows."""
    samples = scrape(srv)
    for _ in range(tries):
        if done(samples):
            break
        time.sleep(0.05)
        samples = scrape(srv)
    return samples


def info_pids(srv: Server, requests: int) -> list[int]:
    return [srv.request("GET", "/info")[2]["pid"] for _ in range(requests)]


def test_one_scrape_counts_every_workers_requests(servers: list[Server]) -> None:
    srv = start_server("--workers", "2")
    servers.append(srv)
    pids = info_pids(srv, 40)
    while len(set(pids)) < 2 and len(pids) < 2000:  # until both have served
        pids += info_pids(srv, 10)
    assert len(set(pids)) == 2, "one worker served every connection"
    for i in range(30):
        assert srv.request("POST", "/embed", {"inputs": [f"text {i}", "two"]})[0] == 200
    samples = scrape_until(srv, lambda s: requests_of(s, "/info") >= len(pids)
                           and requests_of(s, "/embed", "POST") >= 30)
    # Every scrape, whichever worker answers it, gives the whole server's counts.
    for _ in range(10):
        assert requests_of(samples, "/info") == len(pids)
        assert requests_of(samples, "/embed", "POST") == 30
        assert samples["embedserve_texts_embedded_total"][(("model", "hash-v1-384"),)] == 60
        latency = samples["embedserve_request_duration_seconds_count"][(("route", "/info"),)]
        assert latency == len(pids)
        assert samples["embedserve_workers"][()] == 2
        assert samples["embedserve_requests_in_flight"][()] == 0
        samples = scrape(srv)


def test_counts_survive_a_worker_killed_and_replaced(servers: list[Server]) -> None:
    srv = start_server("--workers", "2")
    servers.append(srv)
    pids = info_pids(srv, 40)
    while len(set(pids)) < 2 and len(pids) < 2000:
        pids += info_pids(srv, 10)
    counted = len(pids)
    scrape_until(srv, lambda s: requests_of(s, "/info") >= counted)
    os.kill(pids[0], signal.SIGKILL)
    # Until the replacement serves, the other worker answers.
    while True:
        status, _, info = srv.request("GET", "/info")
        counted += 1
        assert status == 200
        if info["restarts"] == 1 and info["pid"] not in pids:
            break
        assert counted < 5000, "no replacement worker served"
    samples = scrape_until(srv, lambda s: requests_of(s, "/info") >= counted
                           and s["embedserve_workers"][()] == 2)
    assert requests_of(samples, "/info") == counted  # nothing lost, nothing twice
    assert samples["embedserve_workers"][()] == 2  # the dead worker's gauges are gone
    assert samples["embedserve_worker_restarts_total"][()] == 1


def test_counts_survive_a_rolling_restart(servers: list[Server]) -> None:
    srv = start_server("--workers", "2")
    servers.append(srv)
    old = set(info_pids(srv, 20))
    counted = 20
    scrape_until(srv, lambda s: requests_of(s, "/info") >= counted)
    srv.proc.send_signal(signal.SIGHUP)
    while True:  # until only new workers answer
        pids = info_pids(srv, 10)
        counted += 10
        if not old & set(pids):
            break
        assert counted < 5000, "the old workers still serve"
    samples = scrape_until(srv, lambda s: requests_of(s, "/info") >= counted
                           and s["embedserve_workers"][()] == 2)
    assert requests_of(samples, "/info") == counted
    assert samples["embedserve_workers"][()] == 2


def test_requests_in_flight_are_summed_over_workers(servers: list[Server]) -> None:
    srv = start_server("--workers", "2")
    servers.append(srv)
    body = json.dumps({"inputs": ["held open " * 10_000]}).encode()
    held = []
    try:
        for _ in range(6):
            # Headers and part of a large body: the request is under way while it sends.
            sock = socket.create_connection((srv.host, srv.port), timeout=20)
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body[:5])
            held.append(sock)
        samples = scrape_until(srv, lambda s: s["embedserve_requests_in_flight"][()] >= 6)
        for _ in range(6):  # any worker's scrape counts both workers' requests
            assert samples["embedserve_requests_in_flight"][()] == 6
            samples = scrape(srv)
        for sock in held:
            sock.sendall(body[5:])
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    samples = scrape_until(srv, lambda s: s["embedserve_requests_in_flight"][()] == 0)
    assert samples["embedserve_requests_in_flight"][()] == 0
    assert requests_of(samples, "/embed", "POST") == 6


def test_a_request_not_received_in_time_counts_as_its_408(servers: list[Server]) -> None:
    # It was counted a 500: slow clients looked like server faults on a dashboard.
    srv = start_server("--request-timeout", "1")
    servers.append(srv)
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"inputs\"")
        assert sock.recv(1024).startswith(b"HTTP/1.1 408 ")
    samples = scrape_until(srv, lambda s: requests_of(s, "/embed", "POST", "408") == 1)
    assert requests_of(samples, "/embed", "POST", "408") == 1
    assert requests_of(samples, "/embed", "POST", "500") == 0


def test_requests_refused_before_they_are_parsed_are_counted(servers: list[Server]
                                                            ) -> None:
    # A malformed head, an over-long request line, a head not received in time: answered
    # by the transport before any route saw them, and uncounted before.
    srv = start_server("--request-timeout", "1")
    servers.append(srv)
    for data, status in ((b"GET /health HTTP/1.1\r\nHost: localhost\r\nX\r\n\r\n", 400),
                         (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
                         (b"GET /health HTTP/1.1\r\nHost: loc", 408)):
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            sock.sendall(data)
            assert sock.recv(1024).startswith(b"HTTP/1.1 %d " % status)
    def counted(samples: dict) -> bool:  # type: ignore[type-arg]
        return all(requests_of(samples, "(unknown)", "other", status) == 1
                   for status in ("400", "414", "408"))

    samples = scrape_until(srv, counted)
    assert counted(samples), samples.get("embedserve_requests_total")


def test_the_run_directory_goes_with_the_server(servers: list[Server], tmp_path: Path) -> None:
    # One left by a supervisor that is gone (its whole process group killed at once).
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"embedserve-metrics-{gone.pid}-abcd1234"
    stale.mkdir()
    (stale / "total-1.db").write_bytes(b"")
    srv = start_server("--workers", "2", env=server_env(TMPDIR=str(tmp_path)))
    servers.append(srv)
    (run_dir,) = tmp_path.glob("embedserve-metrics-*")  # the stale one was removed
    assert run_dir.name.startswith(f"embedserve-metrics-{srv.pid}-")
    assert {p.name for p in run_dir.iterdir()} >= {"total-1.db", "total-2.db"}
    assert run_dir.stat().st_mode & 0o077 == 0  # the supervisor's own
    assert srv.stop() == 0
    assert not list(tmp_path.glob("embedserve-metrics-*"))


def test_workers_remove_the_run_directory_of_a_supervisor_killed_outright(
        servers: list[Server], tmp_path: Path) -> None:
    srv = start_server("--workers", "2", env=server_env(TMPDIR=str(tmp_path)))
    servers.append(srv)
    assert list(tmp_path.glob("embedserve-metrics-*"))
    srv.proc.kill()  # SIGKILL: no clean-up of its own
    srv.proc.wait(10)
    for _ in range(400):  # the workers notice, drain and exit
        if not list(tmp_path.glob("embedserve-metrics-*")):
            break
        time.sleep(0.05)
    assert not list(tmp_path.glob("embedserve-metrics-*"))


# -- the files themselves -------------------------------------------------------------------

def test_a_store_grows_and_is_read_back_whole(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "total-1.db")
    for i in range(3000):  # far past the first size of the file
        store.add(("family", f'label="{i}"', ""), i)
        store.add(("family", f'label="{i}"', ""), 0.5)
    read = read_totals(tmp_path)
    assert len(read) == 3000
    assert all(read[("family", f'label="{i}"', "")] == i + 0.5 for i in range(3000))


def test_retiring_a_worker_keeps_its_counts_and_drops_its_gauges(tmp_path: Path) -> None:
    for worker in (1, 2):
        metrics = Metrics(tmp_path, worker)
        for _ in range(worker * 3):
            metrics.observe_request("/embed", "POST", 200, 0.002)
        metrics.request_started()
    before = read_totals(tmp_path)
    retire(tmp_path, 1)
    assert read_totals(tmp_path) == before
    assert not (tmp_path / "total-1.db").exists()
    assert len(read_live(tmp_path)) == 1
    retire(tmp_path, 2)
    retire(tmp_path, 2)  # a second time changes nothing
    assert read_totals(tmp_path) == before and read_live(tmp_path) == []
    # A new worker's counts add to the retired ones.
    totals, _ = worker_stores(tmp_path, 3)
    totals.add(("embedserve_requests_total", 'route="/embed",method="POST",status="200"', ""), 1)
    key = ("embedserve_requests_total", 'route="/embed",method="POST",status="200"', "")
    assert read_totals(tmp_path)[key] == 10


def test_totals_read_while_workers_retire_count_each_worker_once(tmp_path: Path) -> None:
    """The supervisor folds dead workers' files into retired.json while a worker reads
    the totals: every read must give the same sum, never one worker twice or not at all."""
    key = ("embedserve_requests_total", 'route="/embed",method="POST",status="200"', "")
    for worker in range(1, 41):
        worker_stores(tmp_path, worker)[0].add(key, worker)
    expected = sum(range(1, 41))
    reads: list[float] = []
    retiring = threading.Thread(target=lambda: [retire(tmp_path, w) for w in range(1, 41)])
    retiring.start()
    while retiring.is_alive():
        reads.append(read_totals(tmp_path).get(key, 0.0))
    retiring.join()
    reads.append(read_totals(tmp_path)[key])
    assert set(reads) == {expected}, sorted(set(reads))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retired.json"]


def test_a_service_without_a_supervisor_reports_itself() -> None:
    metrics = Metrics()
    metrics.observe_request("/embed", "POST", 200, 0.01)
    metrics.observe_batch("m", 3, 0.02)
    metrics.publish([{"backend": "hash", "model": "m"}], {"m": 4})
    families = {f.name: f for f in parser.text_string_to_metric_families(
        metrics.render(restarts=0))}
    assert families["embedserve_requests"].samples[0].value == 1
    assert families["embedserve_queue_depth"].samples[0].value == 4
    buckets = [s for s in families["embedserve_batch_size"].samples
               if s.name.endswith("_bucket")]
    assert [s.value for s in buckets if s.labels["le"] in ("2.0", "4.0", "+Inf")] == [0, 1, 1]
    passes = {s.name: s.value for s in families["embedserve_batch_duration_seconds"].samples
              if not s.name.endswith("_bucket")}
    assert passes == {"embedserve_batch_duration_seconds_count": 1,
                      "embedserve_batch_duration_seconds_sum": 0.02}
    metrics.publish([], {})  # the model unloaded: no longer reported as loaded
    assert "embedserve_backend_info{" not in metrics.render(restarts=0)
