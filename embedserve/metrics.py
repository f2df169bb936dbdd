"""Prometheus text-format metrics for the whole server (no client library needed).

Each worker counts what it serves into its own store (metricfiles.py: memory-mapped files
in the supervisor's run directory), and the worker a scrape reaches reads every worker's:
counters and histograms are summed over all the workers that ever ran (a restart loses no
count), gauges over the workers running now. A service hosted without a supervisor (no
run directory) reports itself alone.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from pathlib import Path

from embedserve.metricfiles import (Key, MemoryStore, Store, read_live, read_totals,
                                    worker_stores)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # counter, gauge or histogram
    help: str
    buckets: tuple[float, ...] = ()

    @property
    def bounds(self) -> tuple[str, ...]:
        """The buckets' `le` labels, as rendered and as the stores' keys."""
        return tuple(_bound(bound) for bound in self.buckets)


BACKEND_INFO = Family("embedserve_backend_info", "gauge",
                      "The models loaded (1), by any worker of this server.")
WORKERS = Family("embedserve_workers", "gauge", "Worker processes running.")
REQUESTS = Family("embedserve_requests_total", "counter",
                  "HTTP requests by route and status, over all workers.")
DURATION = Family("embedserve_request_duration_seconds", "histogram",
                  "Time to answer a request.", LATENCY_BUCKETS)
TEXTS = Family("embedserve_texts_embedded_total", "counter", "Texts embedded.")
TOKENS = Family("embedserve_tokens_embedded_total", "counter", "Tokens embedded.")
RERANKED = Family("embedserve_documents_reranked_total", "counter",
                  "Documents scored against a query (method: cross-encoder, or embeddings "
                  "for cosine similarity).")
BATCH = Family("embedserve_batch_size", "histogram",
               "Texts (or a reranker's pairs) per forward pass (ML tiers).", BATCH_BUCKETS)
PASS = Family("embedserve_batch_duration_seconds", "histogram",
              "Time of one forward pass (ML tiers); the sum's rate is how busy the model is "
              "(summed over workers: up to one per worker).",
              LATENCY_BUCKETS)
IN_FLIGHT = Family("embedserve_requests_in_flight", "gauge",
                   "Embedding and tokenize requests being served now, and large bodies "
                   "being received, over all workers (at most twice "
                   "--max-concurrent-requests per worker).")
QUEUE = Family("embedserve_queue_depth", "gauge",
               "Texts waiting for the model, over all workers (sampled each second).")
RESTARTS = Family("embedserve_worker_restarts_total", "counter",
                  "Workers restarted by the supervisor.")
ORDER = (BACKEND_INFO, WORKERS, REQUESTS, DURATION, TEXTS, TOKENS, RERANKED, BATCH, PASS,
         IN_FLIGHT, QUEUE, RESTARTS)


class Metrics:
    """One worker's counts, and the whole server's report.

    `directory`: the supervisor's run directory (None: this process reports alone);
    `worker`: this worker's id there, unique for the supervisor's life."""

    def __init__(self, directory: Path | None = None, worker: int = 0) -> None:
        self._lock = threading.Lock()  # the stores are written by every request thread
        self.directory = directory
        self._totals: Store
        self._live: Store
        if directory is None:
            self._totals, self._live = MemoryStore(), MemoryStore()
        else:
            self._totals, self._live = worker_stores(directory, worker)
        self._in_flight = 0
        self._published: set[Key] = set()
        # Keys made once per label set: a request's counting is on every request's path.
        self._request_keys: dict[tuple[str, str, int], tuple[Key, str]] = {}
        self._model_keys: dict[str, tuple[Key, Key, str]] = {}
        self._bounds = {family.name: family.bounds for family in (DURATION, BATCH, PASS)}

    # -- counting (every worker, in its request and model threads) ----------------------
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        keys = self._request_keys.get((route, method, status))
        if keys is None:
            keys = self._request_keys[(route, method, status)] = (
                (REQUESTS.name, f'route="{_escape(route)}",method="{_escape(method)}",'
                                f'status="{status}"', ""), f'route="{_escape(route)}"')
        with self._lock:
            self._totals.add(keys[0], 1)
            self._observe(DURATION, keys[1], seconds)

    def observe_embedding(self, model: str, texts: int, tokens: int) -> None:
        texts_key, tokens_key, _ = self._keys_of(model)
        with self._lock:
            self._totals.add(texts_key, texts)
            self._totals.add(tokens_key, tokens)

    def observe_rerank(self, model: str, method: str, documents: int, tokens: int) -> None:
        labels = f'model="{_escape(model)}",method="{_escape(method)}"'
        with self._lock:
            self._totals.add((RERANKED.name, labels, ""), documents)
            if method == "cross-encoder":  # embeddings are counted by observe_embedding
                self._totals.add(self._keys_of(model)[1], tokens)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        labels = self._keys_of(model)[2]
        with self._lock:
            self._observe(BATCH, labels, size)
            self._observe(PASS, labels, seconds)

    def _keys_of(self, model: str) -> tuple[Key, Key, str]:
        keys = self._model_keys.get(model)
        if keys is None:
            labels = f'model="{_escape(model)}"'
            keys = self._model_keys[model] = ((TEXTS.name, labels, ""),
                                              (TOKENS.name, labels, ""), labels)
        return keys

    def request_started(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._live.set((IN_FLIGHT.name, "", ""), self._in_flight)

    def request_finished(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._live.set((IN_FLIGHT.name, "", ""), self._in_flight)

    def publish(self, backends: list[dict[str, str]], queue_depth: dict[str, int]) -> None:
        """This worker's sampled gauges, now: `backends`, the labels of each model loaded
        (backend, model, device...); `queue_depth`, texts waiting, by model. A model no
        longer loaded is set to 0 (a file's entries stay; 0 is not reported as loaded)."""
        current: dict[Key, float] = {}
        for labels in backends:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            current[(BACKEND_INFO.name, text, "")] = 1
        for model, depth in queue_depth.items():
            current[(QUEUE.name, f'model="{_escape(model)}"', "")] = depth
        with self._lock:
            for key in self._published - current.keys():
                self._live.set(key, 0)
            for key, value in current.items():
                self._live.set(key, value)
            self._published = set(current)

    def _observe(self, family: Family, labels: str, value: float) -> None:
        # Stored per bucket (one write), made cumulative when rendered.
        index = bisect.bisect_left(family.buckets, value)  # the first bound >= value
        if index < len(family.buckets):
            self._totals.add((family.name, labels, self._bounds[family.name][index]), 1)
        self._totals.add((family.name, labels, "sum"), value)
        self._totals.add((family.name, labels, "count"), 1)

    # -- the report (the worker a scrape reaches) ----------------------------------------
    def render(self, *, restarts: int) -> str:
        if self.directory is None:
            with self._lock:
                totals, live = self._totals.values(), [self._live.values()]
        else:
            totals, live = read_totals(self.directory), read_live(self.directory)
        gauges: dict[Key, float] = {}
        for values in live:
            for key, value in values.items():
                if key[0] == BACKEND_INFO.name:  # loaded anywhere: 1
                    gauges[key] = max(gauges.get(key, 0.0), value)
                else:
                    gauges[key] = gauges.get(key, 0.0) + value
        samples = {**totals, **{k: v for k, v in gauges.items()
                                if v or k[0] != BACKEND_INFO.name}}
        samples[(WORKERS.name, "", "")] = len(live)
        samples[(RESTARTS.name, "", "")] = restarts
        samples.setdefault((IN_FLIGHT.name, "", ""), 0)
        lines: list[str] = []
        for family in ORDER:
            lines += [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}"]
            mine = {key: value for key, value in samples.items() if key[0] == family.name}
            if family.kind == "histogram":
                lines += _histogram_lines(family, mine)
            else:
                lines += [f"{family.name}{_braces(labels)} {_number(value)}"
                          for (_, labels, _), value in sorted(mine.items())]
        return "\n".join(lines) + "\n"


def _histogram_lines(family: Family, samples: dict[Key, float]) -> list[str]:
    parts: dict[str, dict[str, float]] = {}
    for (_, labels, part), value in samples.items():
        parts.setdefault(labels, {})[part] = value
    lines: list[str] = []
    for labels, values in sorted(parts.items()):
        sep = "," if labels else ""
        running = 0.0
        for bound in family.bounds:
            running += values.get(bound, 0.0)
            lines.append(f'{family.name}_bucket{{{labels}{sep}le="{bound}"}} '
                         f"{_number(running)}")
        count = values.get("count", 0.0)
        lines.append(f'{family.name}_bucket{{{labels}{sep}le="+Inf"}} {_number(count)}')
        lines.append(f"{family.name}_sum{_braces(labels)} {_number(values.get('sum', 0.0))}")
        lines.append(f"{family.name}_count{_braces(labels)} {_number(count)}")
    return lines


def _braces(labels: str) -> str:
    return f"{{{labels}}}" if labels else ""


def _number(value: float) -> str:
    """A sample's value: counts without a fraction, others as Python's shortest repr."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _bound(value: float) -> str:
    """A bucket's `le` label, as prometheus_client writes it (1.0, 0.005)."""
    return repr(float(value)) if value != int(value) else f"{value:.1f}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

