"""Prometheus text-format metrics for one worker process (no client library needed).

With --workers N each scrape is answered by one worker; its series carry that worker's
pid, so a scraper can tell them apart (sum them for totals).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{_number(bound)}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{suffix} {_number(self.total)}")
        out.append(f"{name}_count{suffix} {self.count}")
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.texts = 0
        self.tokens = 0
        self.batch_sizes = Histogram(BATCH_BUCKETS)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            histogram = self.latency.get(route)
            if histogram is None:
                histogram = self.latency[route] = Histogram(LATENCY_BUCKETS)
            histogram.observe(seconds)

    def observe_embedding(self, texts: int, tokens: int) -> None:
        with self._lock:
            self.texts += texts
            self.tokens += tokens

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes.observe(size)

    def render(self, *, backend: dict[str, str], queue_depth: int, restarts: int) -> str:
        pid = f'worker="{os.getpid()}"'
        lines = ["# HELP embedserve_backend_info The backend and model this worker serves.",
                 "# TYPE embedserve_backend_info gauge",
                 "embedserve_backend_info{%s} 1" % ",".join(
                     [pid] + [f'{k}="{_escape(v)}"' for k, v in sorted(backend.items())])]
        with self._lock:
            lines += ["# HELP embedserve_requests_total HTTP requests by route and status.",
                      "# TYPE embedserve_requests_total counter"]
            for (route, method, status), count in sorted(self.requests.items()):
                lines.append(f'embedserve_requests_total{{{pid},route="{_escape(route)}",'
                             f'method="{_escape(method)}",status="{status}"}} {count}')
            lines += ["# HELP embedserve_request_duration_seconds Time to answer a request.",
                      "# TYPE embedserve_request_duration_seconds histogram"]
            for route, histogram in sorted(self.latency.items()):
                lines += histogram.lines("embedserve_request_duration_seconds",
                                         f'{pid},route="{_escape(route)}"')
            lines += ["# HELP embedserve_texts_embedded_total Texts embedded.",
                      "# TYPE embedserve_texts_embedded_total counter",
                      f"embedserve_texts_embedded_total{{{pid}}} {self.texts}",
                      "# HELP embedserve_tokens_embedded_total Tokens embedded.",
                      "# TYPE embedserve_tokens_embedded_total counter",
                      f"embedserve_tokens_embedded_total{{{pid}}} {self.tokens}",
                      "# HELP embedserve_batch_size Texts per forward pass (ML tiers).",
                      "# TYPE embedserve_batch_size histogram"]
            lines += self.batch_sizes.lines("embedserve_batch_size", pid)
        lines += ["# HELP embedserve_queue_depth Texts waiting for the model.",
                  "# TYPE embedserve_queue_depth gauge",
                  f"embedserve_queue_depth{{{pid}}} {queue_depth}",
                  "# HELP embedserve_worker_restarts_total Workers restarted by the supervisor.",
                  "# TYPE embedserve_worker_restarts_total counter",
                  f"embedserve_worker_restarts_total {restarts}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{value:.1f}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
