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
        # By model: several models share a server (names come from the server's own list).
        self.texts: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.batch_sizes: dict[str, Histogram] = {}
        # Documents scored against a query, by model and method (cross-encoder, embeddings).
        self.reranked: dict[tuple[str, str], int] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            histogram = self.latency.get(route)
            if histogram is None:
                histogram = self.latency[route] = Histogram(LATENCY_BUCKETS)
            histogram.observe(seconds)

    def observe_embedding(self, model: str, texts: int, tokens: int) -> None:
        with self._lock:
            self.texts[model] = self.texts.get(model, 0) + texts
            self.tokens[model] = self.tokens.get(model, 0) + tokens

    def observe_rerank(self, model: str, method: str, documents: int, tokens: int) -> None:
        with self._lock:
            key = (model, method)
            self.reranked[key] = self.reranked.get(key, 0) + documents
            if method == "cross-encoder":  # embeddings are counted by observe_embedding
                self.tokens[model] = self.tokens.get(model, 0) + tokens

    def observe_batch(self, model: str, size: int) -> None:
        with self._lock:
            histogram = self.batch_sizes.get(model)
            if histogram is None:
                histogram = self.batch_sizes[model] = Histogram(BATCH_BUCKETS)
            histogram.observe(size)

    def render(self, *, backends: list[dict[str, str]], queue_depth: dict[str, int],
               restarts: int) -> str:
        """`backends`: the labels of each model loaded (backend, model, device...);
        `queue_depth`: texts waiting, by model."""
        pid = f'worker="{os.getpid()}"'
        lines = ["# HELP embedserve_backend_info The models this worker has loaded.",
                 "# TYPE embedserve_backend_info gauge"]
        lines += ["embedserve_backend_info{%s} 1" % ",".join(
            [pid] + [f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())])
            for labels in backends]
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
                      "# TYPE embedserve_texts_embedded_total counter"]
            lines += [f'embedserve_texts_embedded_total{{{pid},model="{_escape(model)}"}} '
                      f"{count}" for model, count in sorted(self.texts.items())]
            lines += ["# HELP embedserve_tokens_embedded_total Tokens embedded.",
                      "# TYPE embedserve_tokens_embedded_total counter"]
            lines += [f'embedserve_tokens_embedded_total{{{pid},model="{_escape(model)}"}} '
                      f"{count}" for model, count in sorted(self.tokens.items())]
            lines += ["# HELP embedserve_documents_reranked_total Documents scored against a "
                      "query (method: cross-encoder, or embeddings for cosine similarity).",
                      "# TYPE embedserve_documents_reranked_total counter"]
            lines += [f'embedserve_documents_reranked_total{{{pid},model="{_escape(model)}",'
                      f'method="{method}"}} {count}'
                      for (model, method), count in sorted(self.reranked.items())]
            lines += ["# HELP embedserve_batch_size Texts (or a reranker's pairs) per forward "
                      "pass (ML tiers).",
                      "# TYPE embedserve_batch_size histogram"]
            for model, histogram in sorted(self.batch_sizes.items()):
                lines += histogram.lines("embedserve_batch_size",
                                         f'{pid},model="{_escape(model)}"')
        lines += ["# HELP embedserve_queue_depth Texts waiting for the model.",
                  "# TYPE embedserve_queue_depth gauge"]
        lines += [f'embedserve_queue_depth{{{pid},model="{_escape(model)}"}} {depth}'
                  for model, depth in sorted(queue_depth.items())]
        lines += ["# HELP embedserve_worker_restarts_total Workers restarted by the supervisor.",
                  "# TYPE embedserve_worker_restarts_total counter",
                  f"embedserve_worker_restarts_total {restarts}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{value:.1f}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
