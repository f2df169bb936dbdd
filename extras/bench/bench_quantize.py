"""Compact embeddings: what embedserve's pure-Python codes (embedserve/quantize.py) cost,
in-process against numpy, and served through Cohere's /v2/embed against plain floats.
Prints one markdown table.

    python extras/bench/bench_quantize.py            # about 1.5 minutes on 2 cores
    python extras/bench/bench_quantize.py --quick    # shorter rounds
    python extras/bench/bench_quantize.py --no-ml    # skip all-MiniLM-L6-v2's calibration

In-process, per vector (384 dimensions: hash vectors of corpus texts, and dense Gaussian
vectors with per-dimension ranges as an ML model has them), 32 vectors a call as
a request of 32 texts has them:
  int8      Ranges.int8 over lists (what the server runs) vs numpy written out from the same
            definition, starting from the same lists (np.asarray included: the server holds
            lists) -- and vs the float JSON text of the same vectors, which a float
            response pays anyway;
  ubinary   quantize.ubinary vs numpy.packbits, likewise.
Served: one hash-tier server, 4 clients in a closed loop, 32 corpus texts a request, POST
/v2/embed asking for float / int8 / ubinary / all six types, in alternating rounds; each is
compared with the float rounds of the same run.
Calibration: loading all-MiniLM-L6-v2 (sentence-transformers, CPU) and timing the
calibration pass that warm-up adds (64 texts), against the whole load.

Progress goes to stderr; stdout carries only the table and one line of context.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import (HOST, Child, Report, Row, emit, fixed_sample, git_revision, load_corpus,
                    model_folder, progress, read_ready_port)

from embedserve.encoding import float_array_json
from embedserve.hashing import HashEmbedder
from embedserve.quantize import EMBEDDING_TYPES, calibrate, ubinary, unit_ranges

BATCH = 32
CLIENTS = 4


def per_vector_us(action, calls: int, vectors: int) -> float:  # type: ignore[no-untyped-def]
    """Microseconds per vector, the best of 5 repeats of `calls` calls."""
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(calls):
            action()
        best = min(best, time.perf_counter() - began)
    return best / (calls * vectors) * 1e6


def in_process(report: Report, texts: list[str], quick: bool) -> None:
    import numpy as np

    random.seed(0)
    vectors = HashEmbedder(384).embed(texts[:BATCH])
    ranges = unit_ranges(384)
    low, high = np.asarray(ranges.low), np.asarray(ranges.high)
    step = (high - low) / 255
    calls = 50 if quick else 300

    def numpy_int8() -> object:
        x = np.asarray(vectors, dtype=np.float64)
        return (np.clip(np.floor((x - low) / step + 0.5), 0, 255) - 128).astype(np.int8)

    def numpy_ubinary() -> object:
        return np.packbits(np.asarray(vectors) > 0, axis=-1)

    progress("in-process codes")
    ours = per_vector_us(lambda: [ranges.int8(v) for v in vectors], calls, BATCH)
    theirs = per_vector_us(numpy_int8, calls, BATCH)
    floats = per_vector_us(lambda: [float_array_json(v) for v in vectors], calls, BATCH)
    report.add(Row("int8 codes of one 384-d hash vector, in-process (32 a call)", "us", False,
                   ours, {"numpy": theirs, "its float JSON text": floats}))
    # An ML model's vectors: every value distinct, a range per dimension.
    dense = [[random.gauss(0.0, 0.05) for _ in range(384)] for _ in range(BATCH)]
    calibrated = calibrate([[random.gauss(0.0, 0.05) for _ in range(384)]
                            for _ in range(64)], "bench")
    c_low, c_high = np.asarray(calibrated.low), np.asarray(calibrated.high)
    c_step = (c_high - c_low) / 255

    def numpy_dense_int8() -> object:
        x = np.asarray(dense, dtype=np.float64)
        return (np.clip(np.floor((x - c_low) / c_step + 0.5), 0, 255) - 128).astype(np.int8)

    ours = per_vector_us(lambda: [calibrated.int8(v) for v in dense], calls, BATCH)
    theirs = per_vector_us(numpy_dense_int8, calls, BATCH)
    floats = per_vector_us(lambda: [float_array_json(v) for v in dense], calls, BATCH)
    report.add(Row("int8 codes of one 384-d dense vector (as an ML model's), per-dimension "
                   "ranges, in-process (32 a call)", "us", False, ours,
                   {"numpy": theirs, "its float JSON text": floats}))
    floats = per_vector_us(lambda: [float_array_json(v) for v in vectors], calls, BATCH)
    ours = per_vector_us(lambda: [ubinary(v) for v in vectors], calls, BATCH)
    theirs = per_vector_us(numpy_ubinary, calls, BATCH)
    report.add(Row("ubinary codes of one 384-d hash vector, in-process (32 a call)", "us", False,
                   ours, {"numpy.packbits": theirs, "its float JSON text": floats}))


def served(report: Report, texts: list[str], quick: bool) -> None:
    child = Child.spawn([sys.executable, "-m", "embedserve", "--port", "0", "--backend",
                         "hash", "--log-level", "warning"], stdout=subprocess.PIPE)
    try:
        port = read_ready_port(child)
        kinds = {"float": ["float"], "int8": ["int8"], "ubinary": ["ubinary"],
                 "all six types": list(EMBEDDING_TYPES)}
        rounds, seconds = (2, 2.0) if quick else (5, 4.0)
        rates: dict[str, list[float]] = {name: [] for name in kinds}
        for round_ in range(rounds):
            for name, types in kinds.items():
                progress(f"served round {round_ + 1}/{rounds}: {name}")
                rates[name].append(closed_loop(port, texts, types, seconds))
        best = {name: max(values) for name, values in rates.items()}
        for name in kinds:
            if name != "float":
                report.add(Row(f"served /v2/embed, {CLIENTS} clients x {BATCH} texts, hash "
                               f"tier: {name} (best of {rounds} rounds)", "texts/s", True,
                               best[name], {"float": best["float"]}))
        report.facts["served_rounds"] = rates
    finally:
        child.stop()


def closed_loop(port: int, texts: list[str], types: list[str], seconds: float) -> float:
    bodies = [json.dumps({"model": "hash-v1-384", "texts": texts[i:i + BATCH],
                          "input_type": "search_document", "embedding_types": types}).encode()
              for i in range(0, len(texts) - BATCH + 1, BATCH)]
    done = [0] * CLIENTS
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=30)
        position = index * len(bodies) // CLIENTS
        try:
            while time.perf_counter() < deadline and not errors:
                connection.request("POST", "/v2/embed", bodies[position % len(bodies)],
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    errors.append(f"HTTP {response.status}: {body[:200]!r}")
                    break
                done[index] += BATCH
                position += 1
        finally:
            connection.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    if errors:
        raise RuntimeError(errors[0])
    return sum(done) / (time.perf_counter() - began)


def calibration(report: Report) -> None:
    from embedserve.backends.sentence_transformers import SentenceTransformersBackend
    from embedserve.config import Config

    progress("loading all-MiniLM-L6-v2 to time its calibration")
    began = time.perf_counter()
    backend = SentenceTransformersBackend(Config(model=(model_folder(),), device="cpu"))
    backend.warm_up()
    load = time.perf_counter() - began
    passes = []
    for _ in range(3):
        began = time.perf_counter()
        backend._calibrate()
        passes.append(time.perf_counter() - began)
    report.add(Row("all-MiniLM-L6-v2: calibration at load (64 texts, median of 3)", "ms",
                   False, statistics.median(passes) * 1e3,
                   {"the whole load with warm-up": load * 1e3}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-ml", action="store_true", help="skip the calibration timing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    corpus, source = load_corpus()
    texts = fixed_sample(corpus, 1024)
    report = Report()
    in_process(report, texts, args.quick)
    served(report, texts, args.quick)
    if not args.no_ml:
        calibration(report)
    emit(report, f"\nCorpus: {source}. Commit {git_revision()}. One run; ratios within it. "
                 "For in-process rows the ratio is reference time / embedserve time.",
         args.json)


if __name__ == "__main__":
    main()
