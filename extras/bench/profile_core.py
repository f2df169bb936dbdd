"""Where one served 8 x 32 float request's time goes, for bench_core.py: each stage of the
worker's request path timed in-process on the bench's own request bodies, then set against
the worker's CPU time per request measured while it serves them (1 client, then 8).

    stage                     measured with (CPU time of the thread doing it)
    HTTP request head         the request line's check and httphead.read_header_lines
    JSON parse + validation   json.loads + the OpenAI dialect's parse
    hashing                   EmbeddingService.embed (registry, locks, metrics, HashBackend)
    JSON writing              the OpenAI dialect's render (float arrays, one body)
    socket write              the response head and body sent over a loopback TCP socket

The worker's CPU per request (utime + stime from /proc, over the requests the load answered
in the same interval) less the sum of the stages is the serving loop: socket reads, select,
framing, metrics, and handing the interpreter lock between threads. Context switches are the
worker threads' (/proc/PID/task/*/status), per request.
"""

from __future__ import annotations

import io
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (HOST, Endpoint, LoadResult, Scenario, child_pids, progress, request_bodies,
                    run_load)


def _thread_us(action: Callable[[], object], repeat: int) -> float:
    """Median CPU time of this thread per call, in µs (other threads' work is not counted)."""
    samples = []
    for _ in range(repeat):
        begin = time.thread_time()
        action()
        samples.append(time.thread_time() - begin)
    return statistics.median(samples) * 1e6


def in_process_stages(texts: list[str], batch: int, dimensions: int, model: str,
                      repeat: int = 200) -> dict[str, float]:
    """µs per request for each stage, over the requests the served scenario sends."""
    from embedserve.config import Config
    from embedserve.dialects import OPENAI
    from embedserve.httphead import check_request_line, read_header_lines
    from embedserve.service import EmbeddingService

    service = EmbeddingService(Config(backend="hash", dimensions=dimensions))
    service.load()
    bodies = request_bodies(texts, batch, "float", model)
    heads = [(f"POST /v1/embeddings HTTP/1.1\r\nHost: {HOST}:8765\r\nAccept-Encoding: identity"
              f"\r\nContent-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
              ).encode("latin-1") for body in bodies]
    requests = [OPENAI.parse(json.loads(body), 4096) for body in bodies]
    results = [service.embed(request) for request in requests]  # also warms the word cache
    rendered = [OPENAI.render(r, res) for r, res in zip(requests, results)]
    position = iter(range(10**9))

    def pick() -> int:
        return next(position) % len(bodies)

    def parse_head() -> None:
        stream = io.BytesIO(heads[pick()])
        check_request_line(stream.readline())
        read_header_lines(stream)

    stages = {
        "HTTP request head": _thread_us(parse_head, repeat),
        "JSON parse + validation": _thread_us(
            lambda: OPENAI.parse(json.loads(bodies[pick()]), 4096), repeat),
        "hashing": _thread_us(lambda: service.embed(requests[pick()]), repeat),
        "JSON writing": _thread_us(
            lambda: OPENAI.render(requests[i := pick()], results[i]), repeat),
    }
    stages["socket write"] = _socket_write_us(rendered, repeat)
    return stages


def _socket_write_us(bodies: list[bytes], repeat: int) -> float:
    """A response's head and body in one sendall on TCP_NODELAY loopback, as the handler
    writes it; a thread drains the other end (its CPU time is not counted)."""
    listener = socket.create_server((HOST, 0))
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    listener.close()
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def drain() -> None:
        while receiver.recv(1 << 20):
            pass

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    head = (b"HTTP/1.1 200 OK\r\nServer: embedserve\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: 55555\r\n\r\n")
    position = iter(range(10**9))
    try:
        return _thread_us(lambda: sender.sendall(head + bodies[next(position) % len(bodies)]),
                          repeat)
    finally:
        sender.close()
        drainer.join(5)
        receiver.close()


# --- the served side -------------------------------------------------------------------------

def worker_pid(server: int) -> int:
    """The server's worker: its child spawned by multiprocessing (not the resource tracker)."""
    for child in child_pids(server):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    raise RuntimeError(f"no worker process under pid {server}")


def _cpu_and_switches(pid: int) -> tuple[float, int]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    switches = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue  # a thread that ended just now
        for line in text.splitlines():
            if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                switches += int(line.split()[1])
    return cpu, switches


def served_per_request(endpoint: Endpoint, worker: int, scenario: Scenario, texts: list[str],
                       duration: float, warmup: float, *, model: str, dimensions: int
                       ) -> dict[str, float]:
    """The worker's CPU µs and context switches per request under `scenario`'s load, read
    inside the load's timed window (its connections, and so its threads, live throughout)."""
    readings: list[tuple[float, float, int]] = []
    margin = min(0.2, duration / 10)

    def sample() -> None:
        time.sleep(warmup + margin)
        readings.append((time.perf_counter(), *_cpu_and_switches(worker)))
        time.sleep(duration - 2 * margin)
        readings.append((time.perf_counter(), *_cpu_and_switches(worker)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result: LoadResult = run_load(endpoint, scenario, texts, duration, warmup, model=model,
                                  dimensions=dimensions)
    sampler.join(10)
    (t0, cpu0, sw0), (t1, cpu1, sw1) = readings
    answered = result.texts_per_s / scenario.batch * (t1 - t0)
    return {"cpu_us": (cpu1 - cpu0) / answered * 1e6, "switches": (sw1 - sw0) / answered,
            "texts_per_s": result.texts_per_s}


def profile(endpoint: Endpoint, worker: int, texts: list[str], duration: float, warmup: float,
            *, model: str, dimensions: int, batch: int = 32) -> tuple[str, dict[str, Any]]:
    """The breakdown as a markdown table, and its figures for the JSON facts."""
    progress(f"profile: in-process stages of a {batch}-text float request")
    stages = in_process_stages(texts, batch, dimensions, model)
    served = {}
    for clients in (1, 8):
        scenario = Scenario(f"{clients} x {batch}", clients, batch)
        progress(f"profile: worker CPU per request, {scenario.label} float, {duration:g} s")
        served[clients] = served_per_request(endpoint, worker, scenario, texts, duration,
                                             warmup, model=model, dimensions=dimensions)
    total = sum(stages.values())
    lines = [f"Profile of one served {batch}-text float request (OpenAI route; worker CPU "
             "time per request, µs):", "",
             "| stage | µs | share of 8-client CPU |", "|---|---|---|"]
    busy = served[8]["cpu_us"]
    for name, us in stages.items():
        lines.append(f"| {name} (in-process) | {us:,.0f} | {us / busy:.0%} |")
    lines.append(f"| sum of the stages | {total:,.0f} | {total / busy:.0%} |")
    for clients in (1, 8):
        figures = served[clients]
        # CPU seconds per second: below 1, the worker's one interpreter lock sat unused
        # (waiting for the next request, or handed from one thread to another).
        used = figures["texts_per_s"] / batch * figures["cpu_us"] / 1e6
        lines.append(f"| served, {clients} client{'s' if clients > 1 else ''}: worker CPU "
                     f"per request ({figures['switches']:.1f} context switches; the worker "
                     f"busy {used:.0%} of the time) | "
                     f"{figures['cpu_us']:,.0f} | {figures['cpu_us'] / busy:.0%} |")
        lines.append(f"| served, {clients} client{'s' if clients > 1 else ''}: serving loop "
                     f"and thread switching (CPU less the stages) | "
                     f"{figures['cpu_us'] - total:,.0f} | {(figures['cpu_us'] - total) / busy:.0%} |")
    return "\n".join(lines), {"stages_us": stages, "served": served}
