"""Client benchmark: what embedserve.Client costs on top of doing the HTTP by hand, and how
long an app waits from "no server" to its first vector. Prints one markdown table.

    python extras/bench/bench_client.py            # about 20 s on 2 cores
    python extras/bench/bench_client.py --quick    # fewer calls and start-ups

Per-call overhead: one hash-tier server (started once, `--backend hash`), then blocks of
calls that alternate between
  raw      http.client on one kept-alive connection: json.dumps the request, POST
           /v1/embeddings with encoding_format=base64, json.loads, decode each vector with
           embedserve.encoding.decode_float32_base64 -- the least work that gets the same
           list of float lists;
  Client   Client(url).embed(texts) on the same server (found running, so not owned),
so the difference is the client's own work: input checks, chunk planning, retry
bookkeeping, result labelling. Median and mean per call, same texts for both.

Cold start: from nothing to the first vector, in this process:
  raw      Popen(python -m embedserve --port 0 --backend hash), read the ready line, POST;
  Client   Client(port=0, backend="hash").embed_single(...), which also probes nothing
           (port 0 always starts), spawns, waits for the ready line and asks /info;
and the stop that follows (SIGTERM, wait for exit) for each.

Progress goes to stderr; stdout carries only the table and one line of context.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
CORPUS_PATH = REPO_ROOT.parent / "shared" / "data" / "corpus.jsonl"
sys.path.insert(0, str(REPO_ROOT))  # measure the checkout this script lives in

from embedserve.client import Client  # noqa: E402
from embedserve.contracts import parse_ready_line  # noqa: E402
from embedserve.encoding import decode_float32_base64  # noqa: E402

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                         os.environ.get("PYTHONPATH")]))}
SERVER_ARGS = ["--backend", "hash", "--log-level", "warning"]


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def load_texts() -> list[str]:
    if CORPUS_PATH.exists():
        with CORPUS_PATH.open(encoding="utf-8") as lines:
            return [json.loads(line)["text"] for line in lines if line.strip()]
    return [f"sentence {i} about feature hashing and embeddings" for i in range(4000)]


# --- a server started by hand ------------------------------------------------------------------

@dataclass
class RawServer:
    process: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls) -> RawServer:
        process = subprocess.Popen([sys.executable, "-m", "embedserve", "--port", "0",
                                    *SERVER_ARGS], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, env=CHILD_ENV)
        assert process.stdout is not None
        fd, seen = process.stdout.fileno(), b""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.05)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                seen += chunk
                ready = parse_ready_line(seen.decode(errors="replace"))
                if ready:
                    return cls(process, ready.port)
            elif process.poll() is not None:
                break
        process.kill()
        process.wait()
        raise RuntimeError(f"server printed no ready line: {seen[-300:]!r}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()


class RawEmbedder:
    """The hand-written baseline: one kept-alive connection, the same request and decoding."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection(HOST, port, timeout=30)

    def embed(self, texts: list[str]) -> list[list[float]]:
        body = json.dumps({"input": texts, "encoding_format": "base64"}).encode()
        self.connection.request("POST", "/v1/embeddings", body,
                                {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(payload)
        return [decode_float32_base64(item["embedding"]) for item in payload["data"]]

    def close(self) -> None:
        self.connection.close()


# --- measurements ------------------------------------------------------------------------------

@dataclass
class Timing:
    median_us: float
    mean_us: float


def per_call(call: Callable[[], object], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - started) / 1000)
    return times


def compare_calls(texts: list[str], batch: int, calls: int, rounds: int, raw: RawEmbedder,
                  client: Client) -> tuple[Timing, Timing]:
    chunk = texts[:batch]
    assert raw.embed(chunk) == client.embed(chunk)  # same answers, or the race is unfair
    per_call(lambda: raw.embed(chunk), max(1, calls // 10))  # warm both paths
    per_call(lambda: client.embed(chunk), max(1, calls // 10))
    raw_times: list[float] = []
    client_times: list[float] = []
    for _ in range(rounds):  # alternate so that drift hits both alike
        raw_times += per_call(lambda: raw.embed(chunk), calls)
        client_times += per_call(lambda: client.embed(chunk), calls)
    return (Timing(statistics.median(raw_times), statistics.fmean(raw_times)),
            Timing(statistics.median(client_times), statistics.fmean(client_times)))


def cold_start_raw() -> tuple[float, float]:
    started = time.perf_counter()
    server = RawServer.start()
    raw = RawEmbedder(server.port)
    raw.embed(["hello world"])
    first_vector = time.perf_counter() - started
    raw.close()
    started = time.perf_counter()
    server.stop()
    return first_vector, time.perf_counter() - started


def cold_start_client() -> tuple[float, float]:
    started = time.perf_counter()
    client = Client(port=0, backend="hash", server_args=["--log-level", "warning"],
                    fallback="never", env={"HF_HUB_OFFLINE": "1"})
    client.embed_single("hello world")
    first_vector = time.perf_counter() - started
    assert client.owns_server
    started = time.perf_counter()
    client.close()
    return first_vector, time.perf_counter() - started


# --- table -------------------------------------------------------------------------------------

def fmt_us(value: float) -> str:
    return f"{value:,.0f} µs" if value >= 100 else f"{value:.1f} µs"


def fmt_s(value: float) -> str:
    return f"{value * 1000:,.0f} ms"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and start-ups")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    texts = load_texts()
    # Many short alternating blocks: on a small machine the server's speed drifts by tens
    # of percent over seconds, and both sides must see the same drift.
    rounds, starts = (5, 3) if args.quick else (20, 7)
    # (texts per call, calls per block): about the same wall time per batch size.
    batches = [(1, 50), (32, 15), (256, 3)]

    rows: list[str] = []
    progress("starting one hash-tier server for the per-call comparison")
    server = RawServer.start()
    raw = RawEmbedder(server.port)
    client = Client(f"http://{HOST}:{server.port}", autostart=False, fallback="never")
    try:
        for size, calls in batches:
            progress(f"embed {size} text(s) per call: {rounds} x {calls} calls each way")
            raw_t, client_t = compare_calls(texts, size, calls, rounds, raw, client)
            extra = client_t.median_us - raw_t.median_us
            rows.append(f"| embed {size} text{'s' if size > 1 else ''} per call (median / mean)"
                        f" | {fmt_us(client_t.median_us)} / {fmt_us(client_t.mean_us)}"
                        f" | {fmt_us(raw_t.median_us)} / {fmt_us(raw_t.mean_us)}"
                        f" | {extra:+,.0f} µs ({extra / raw_t.median_us:+.1%}) |")
    finally:
        client.close()
        raw.close()
        server.stop()

    progress(f"cold start to first vector: {starts} start-ups each way")
    raw_starts: list[tuple[float, float]] = []
    client_starts: list[tuple[float, float]] = []
    for _ in range(starts):
        raw_starts.append(cold_start_raw())
        client_starts.append(cold_start_client())
    for label, index in (("cold start → first vector, hash tier (median, min–max)", 0),
                         ("stop: SIGTERM → server gone (median, min–max)", 1)):
        ours = [s[index] for s in client_starts]
        theirs = [s[index] for s in raw_starts]
        extra = statistics.median(ours) - statistics.median(theirs)
        rows.append(f"| {label} | {fmt_s(statistics.median(ours))} "
                    f"({fmt_s(min(ours))}–{fmt_s(max(ours))}) | "
                    f"{fmt_s(statistics.median(theirs))} "
                    f"({fmt_s(min(theirs))}–{fmt_s(max(theirs))}) | {extra * 1000:+,.0f} ms |")

    print("| measurement | embedserve.Client | raw http.client / Popen | client overhead |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {len(texts):,} texts from "
          f"{CORPUS_PATH.name if CORPUS_PATH.exists() else 'a generated list'}; base64 float32 "
          "transport, one kept-alive connection each; raw = the same request and decoding "
          "written by hand.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
