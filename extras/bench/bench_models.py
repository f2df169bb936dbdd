"""Several models in one server: what serving a second model costs the first, and how the
hash tier answers while an ML model beside it is busy. all-MiniLM-L6-v2 on the CPU, all in
one run on one machine, printed as one markdown table.

    python extras/bench/bench_models.py            # full run (about 5 minutes on 2 cores)
    python extras/bench/bench_models.py --quick    # smaller sample, shorter windows (~1.5 min)
    python extras/bench/bench_models.py --json results.json

What is measured (on a fixed, seeded sample of the corpus; requests are POST /v1/embeddings
with encoding_format base64, the openai SDK's default):
  beside      all-MiniLM-L6-v2 (served as "minilm"), 8 clients x 32 texts a request, on
              a server that serves it alone (--model FOLDER) and on one that also serves a
              second copy of it, loaded and idle (--model FOLDER --model COPY, the copy's
              folder under another name, served as "second"); and, as a control, on a
              second server alike the first (--model FOLDER again): the spread between two
              identical servers is what this machine's noise looks like. Rounds go in sets
              of three, "alone" in the middle, the ends swapped every other set (again,
              alone, beside, beside, alone, again, ...): this shared machine's speed drifts
              by 10-30% within minutes, and a fixed order would favour one end.
  hash        the hash tier ("hash-v1-384"), 1 client x 1 text a request, sequential, on a
              server that serves all-MiniLM-L6-v2 and the hash tier (--model FOLDER --model
              hash): while all-MiniLM-L6-v2 is idle, and while it serves 8 clients x 32 texts
              (alternating, all samples of each state pooled).

Progress goes to stderr; stdout carries only the table and its footer.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (HOST, Child, CpuMeter, Endpoint, LoadResult, Report, Row, Scenario, Target,
                    check_response, emit, exit_on_sigterm, fixed_sample, get_json,
                    machine_facts, load_corpus, model_folder, percentile, progress,
                    read_ready_port, request_bodies, run_load, stop_tree, worker_rss_mb)

DIMENSIONS = 384
ML_NAME = "minilm"  # --served-model-name of all-MiniLM-L6-v2 on every server
SECOND_NAME = "second"  # and of its copy, the idle second model
COPY_FOLDER = "minilm-second"  # the copy's folder: a name of its own, as another model has
LOAD = Scenario("8 clients x 32 texts", 8, 32, "base64")
PROBE = Scenario("1 client x 1 text", 1, 1, "base64")
ML_START_TIMEOUT = 180.0  # importing torch and loading two models is slow on a busy machine
REQUEST_TIMEOUT = 60.0
PROBE_WARMUP_REQUESTS = 20
PROBE_GAP = 0.5  # seconds between the load's window opening and the hash probe starting

ALONE = "served alone"
AGAIN = "a second server alike (control)"
BESIDE = "beside an idle second model"
WITH_HASH = "with the hash tier"


@dataclass(frozen=True)
class Settings:
    sample: int  # corpus texts used everywhere
    sets: int  # rounds per server (again, alone, beside) in part 1
    round_s: float  # seconds of load per round, after the warm-up
    warmup: float  # seconds of load before each round's window opens
    hash_rounds: int  # idle / busy alternations in part 2
    probe_s: float  # seconds of hash requests per state and round


FULL = Settings(sample=512, sets=6, round_s=6.0, warmup=3.0, hash_rounds=3, probe_s=6.0)
QUICK = Settings(sample=256, sets=2, round_s=5.0, warmup=2.0, hash_rounds=1, probe_s=3.0)


def copy_model(folder: str, into: Path) -> str:
    """A second copy of the model under another folder name (so the server sees two models).
    Hard links where the file system allows them: the same bytes, no disk used; the server
    loads each folder into memory of its own all the same."""
    target = into / COPY_FOLDER

    def link_or_copy(source: str, destination: str) -> object:
        try:
            os.link(source, destination)
            return destination
        except OSError:
            return shutil.copy2(source, destination)

    shutil.copytree(folder, target, copy_function=link_or_copy)
    return str(target)


# --- servers ---------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    child: Child
    port: int

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.port)


def server_commands(folder: str, copy: str, extra: Sequence[str]) -> dict[str, list[str]]:
    # Defaults for everything else (backend auto, batching options) unless --server-args
    # says otherwise.
    base = [sys.executable, "-m", "embedserve", "--port", "0", "--log-level", "warning"]
    return {
        ALONE: [*base, "--model", folder, "--served-model-name", ML_NAME, *extra],
        AGAIN: [*base, "--model", folder, "--served-model-name", ML_NAME, *extra],
        BESIDE: [*base, "--model", folder, "--model", copy, "--served-model-name", ML_NAME,
                 "--served-model-name", SECOND_NAME, *extra],
        WITH_HASH: [*base, "--model", folder, "--model", "hash", "--served-model-name",
                    ML_NAME, *extra],
    }


@contextmanager
def running_servers(commands: dict[str, list[str]], facts: dict[str, Any]
                    ) -> Iterator[dict[str, Server]]:
    """The four servers, started one after another (each times forward passes while it warms
    up: a neighbour loading at the same moment would skew that), each stopped with everything
    it started when the block ends, however it ends. Idle, they cost nothing."""
    children: list[Child] = []
    try:
        begin = time.perf_counter()
        servers: dict[str, Server] = {}
        for name, command in commands.items():
            progress(f"starting the server {name}")
            child = Child.spawn(command, stdout=subprocess.PIPE)
            children.append(child)
            servers[name] = Server(name, child, read_ready_port(child, ML_START_TIMEOUT))
        facts["servers_ready_s"] = round(time.perf_counter() - begin, 1)
        yield servers
    finally:
        for child in children:
            stop_tree(child)


def models_info(server: Server) -> dict[str, dict[str, Any]]:
    """/info's "models", by each model's first listed name."""
    return {model["names"][0]: model for model in get_json(server.port, "/info")["models"]}


def batches(server: Server) -> dict[str, int | None]:
    """Forward passes each model has run so far."""
    return {name: model["batches"] for name, model in models_info(server).items()}


# --- 1. the ML model, alone and beside an idle second model ----------------------------------

@dataclass
class Round:
    server: str
    result: LoadResult
    others_cpu_percent: float | None
    texts_per_forward: float | None  # texts in the window / forward passes since it opened
    second_model_passes: int | None  # the idle model's forward passes over the round (0)
    failed: int  # answers other than 200 in the window (left out of the figures)
    first_failure: str


def one_round(server: Server, sample: list[str], settings: Settings) -> Round:
    """One run_load, with the forward-pass counts read before the round, when its window
    opens and after it (GET /info "batches"), to see how full the batches were and that the
    second model stayed idle."""
    before = batches(server)
    at_open: list[dict[str, int | None]] = []
    timer = threading.Timer(settings.warmup, lambda: at_open.append(batches(server)))
    timer.start()
    meter = CpuMeter()
    failures: list[str] = []
    try:
        result = run_load(server.endpoint, LOAD, sample, settings.round_s, settings.warmup,
                          model=ML_NAME, dimensions=DIMENSIONS, request_timeout=REQUEST_TIMEOUT,
                          failures=failures)
    finally:
        timer.cancel()
        timer.join(timeout=15)
    others = meter.others_percent()
    after = batches(server)
    per_forward = None
    if at_open:
        passes = (after[ML_NAME] or 0) - (at_open[0][ML_NAME] or 0)
        per_forward = result.requests * LOAD.batch / passes if passes else None
    second = None
    if SECOND_NAME in after:
        second = (after[SECOND_NAME] or 0) - (before[SECOND_NAME] or 0)
    return Round(server.name, result, others, per_forward, second, len(failures),
                 failures[0] if failures else "")


def bench_beside(servers: dict[str, Server], sample: list[str], settings: Settings
                 ) -> list[dict[str, Round]]:
    """A round on each of the three servers, `settings.sets` times: "alone" in the middle, so
    that both comparisons are with a round next to it, and the ends swapped every other
    set, so that a machine speeding up or slowing down over the run favours neither."""
    sets = []
    for number in range(settings.sets):
        rounds: dict[str, Round] = {}
        for name in (AGAIN, ALONE, BESIDE) if number % 2 == 0 else (BESIDE, ALONE, AGAIN):
            progress(f"{LOAD.label}, {name}: round {number + 1}/{settings.sets}, "
                     f"{settings.round_s:g} s after {settings.warmup:g} s warm-up")
            done = one_round(servers[name], sample, settings)
            progress(f"  {done.result.texts_per_s:,.1f} texts/s, p50 {done.result.p50_ms:,.0f} "
                     f"ms; other processes {fmt_percent(done.others_cpu_percent)} of the CPUs"
                     + (f"; the second model ran {done.second_model_passes} passes"
                        if done.second_model_passes is not None else "")
                     + (f"; {done.failed} FAILED, first: {done.first_failure}"
                        if done.failed else ""))
            rounds[name] = done
        progress(f"  beside / alone: {ratio(rounds, BESIDE):.3f}; "
                 f"control / alone: {ratio(rounds, AGAIN):.3f}")
        sets.append(rounds)
    return sets


def ratio(rounds: dict[str, Round], name: str) -> float:
    """`name`'s throughput over the "alone" round of the same set."""
    return rounds[name].result.texts_per_s / rounds[ALONE].result.texts_per_s


# --- 2. the hash tier while the ML model is busy ---------------------------------------------

class HashProbe:
    """One keep-alive connection asking the hash tier for one text at a time (an app
    embedding a user's query), the texts cycling through the sample."""

    def __init__(self, server: Server, hash_name: str, sample: list[str]) -> None:
        self.connection = http.client.HTTPConnection(HOST, server.port, timeout=REQUEST_TIMEOUT)
        self.bodies = request_bodies(sample, 1, PROBE.encoding_format, hash_name)
        self.position = 0
        check_response(self._send(), PROBE, DIMENSIONS)

    def run(self, seconds: float) -> list[float]:
        for _ in range(PROBE_WARMUP_REQUESTS):
            self._send()
        samples = []
        end = time.perf_counter() + seconds
        while (sent := time.perf_counter()) < end:
            self._send()
            samples.append(time.perf_counter() - sent)
        return samples

    def _send(self) -> bytes:
        self.connection.request("POST", "/v1/embeddings",
                                self.bodies[self.position % len(self.bodies)],
                                {"Content-Type": "application/json"})
        self.position += 1
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"hash tier: HTTP {response.status}: {body[:200]!r}")
        return body

    def close(self) -> None:
        self.connection.close()


@dataclass
class HashResult:
    idle: list[float]  # sorted latencies, s
    busy: list[float]
    ml_during: list[dict[str, Any]]  # the ML load's figures in each busy round


def bench_hash(server: Server, sample: list[str], settings: Settings) -> HashResult:
    names = [name for name, model in models_info(server).items() if model["backend"] == "hash"]
    if not names:
        raise RuntimeError(f"the server {server.name} serves no hash tier")
    probe = HashProbe(server, names[0], sample)
    idle: list[float] = []
    busy: list[float] = []
    ml_during: list[dict[str, Any]] = []
    try:
        for number in range(settings.hash_rounds):
            progress(f"hash tier, {PROBE.label}, ML model idle: round {number + 1}/"
                     f"{settings.hash_rounds}, {settings.probe_s:g} s")
            samples = probe.run(settings.probe_s)
            idle += samples
            progress(f"  p50 {percentile(sorted(samples), 50) * 1e3:.2f} ms of {len(samples)}")

            progress(f"hash tier, {PROBE.label}, ML model serving {LOAD.label}: round "
                     f"{number + 1}/{settings.hash_rounds}, {settings.probe_s:g} s")
            outcome: dict[str, Any] = {}

            def load() -> None:
                try:
                    outcome["result"] = run_load(
                        server.endpoint, LOAD, sample, settings.probe_s + 2 * PROBE_GAP,
                        settings.warmup, model=ML_NAME, dimensions=DIMENSIONS,
                        request_timeout=REQUEST_TIMEOUT)
                except Exception as exc:  # raised in the main thread below
                    outcome["error"] = exc

            thread = threading.Thread(target=load, daemon=True)
            thread.start()
            time.sleep(settings.warmup + PROBE_GAP)
            samples = probe.run(settings.probe_s)
            thread.join(timeout=settings.probe_s + settings.warmup + REQUEST_TIMEOUT + 30)
            if "error" in outcome:
                raise outcome["error"]
            if "result" not in outcome:
                raise RuntimeError("the ML load did not finish")
            busy += samples
            ml_during.append(asdict(outcome["result"]))
            progress(f"  p50 {percentile(sorted(samples), 50) * 1e3:.2f} ms of {len(samples)}; "
                     f"the ML model served {outcome['result'].texts_per_s:,.1f} texts/s")
    finally:
        probe.close()
    return HashResult(sorted(idle), sorted(busy), ml_during)


# --- the table -------------------------------------------------------------------------------

def build_rows(report: Report, sets: list[dict[str, Round]], rss: dict[str, float | None],
               hashed: HashResult) -> None:
    count = len(sets)
    rounds = f"{count} round{'s' if count > 1 else ''}"
    results = {name: [one[name].result for one in sets] for name in (ALONE, AGAIN, BESIDE)}
    best = {name: max(found, key=lambda r: r.texts_per_s) for name, found in results.items()}
    mean = {name: statistics.fmean(r.texts_per_s for r in found)
            for name, found in results.items()}
    label = f"ML model {BESIDE}, {LOAD.label}"
    report.add(Row(f"{label}: throughput, best of {rounds}", "texts/s", True,
                   best[BESIDE].texts_per_s, {ALONE: best[ALONE].texts_per_s},
                   Target(">= 0.95x served alone", min_ratio=0.95)))
    # All rounds, the servers' taken in turns: where a round's speed swings with the
    # machine's, this uses every one of them.
    report.add(Row(f"{label}: throughput, mean of {rounds}", "texts/s", True, mean[BESIDE],
                   {ALONE: mean[ALONE]}, Target(">= 0.95x served alone", min_ratio=0.95)))
    report.add(Row(f"ML model on {AGAIN}, {LOAD.label}: throughput, mean of {rounds}",
                   "texts/s", True, mean[AGAIN], {ALONE: mean[ALONE]}))
    report.add(Row(f"{label}: p50 latency, best round", "ms", False, best[BESIDE].p50_ms,
                   {ALONE: best[ALONE].p50_ms}))
    report.add(Row(f"{label}: p99 latency, best round", "ms", False, best[BESIDE].p99_ms,
                   {ALONE: best[ALONE].p99_ms}))
    failed = {name: sum(one[name].failed for one in sets) for name in (ALONE, AGAIN, BESIDE)}
    if any(failed.values()):  # shown only when something failed
        report.add(Row(f"{label}: failed requests (all rounds)", "count", False, failed[BESIDE],
                       {ALONE: failed[ALONE], AGAIN: failed[AGAIN]},
                       Target("none", limit=0.5)))
    report.add(Row(f"worker RSS when ready, {BESIDE}", "MB", False, rss.get(BESIDE),
                   {ALONE: rss.get(ALONE)}))
    idle, busy = hashed.idle, hashed.busy
    probe = f"hash tier, {PROBE.label}, while the ML model serves {LOAD.label}"
    report.add(Row(f"{probe}: p50 of {len(busy):,}", "ms", False, percentile(busy, 50) * 1e3,
                   {f"ML model idle, p50 of {len(idle):,}": percentile(idle, 50) * 1e3},
                   Target("< 2 ms", limit=2.0)))
    report.add(Row(f"{probe}: p99", "ms", False, percentile(busy, 99) * 1e3,
                   {"ML model idle": percentile(idle, 99) * 1e3}))


def footer(report: Report, sets: list[dict[str, Round]], settings: Settings) -> str:
    facts = report.facts

    def ratios(name: str) -> str:
        each = [ratio(one, name) for one in sets]
        listed = ", ".join(f"{value:.3f}" for value in each)
        return (f"{listed} (median {statistics.median(each):.3f}, mean "
                f"{statistics.fmean(each):.3f})")

    disturbed = ", ".join("/".join(fmt_percent(one[name].others_cpu_percent)
                                   for name in (AGAIN, ALONE, BESIDE)) for one in sets)
    per_forward = "; ".join(
        f"{name}: " + ", ".join(f"{one[name].texts_per_forward:.1f}"
                                if one[name].texts_per_forward else "n/a" for one in sets)
        for name in (ALONE, AGAIN, BESIDE))
    second = sum(one[BESIDE].second_model_passes or 0 for one in sets)
    overheads = "; ".join(
        f"{server}: " + ", ".join(f"{name} {model.get('pass_overhead_tokens')}"
                                  for name, model in info.items() if model.get("batches")
                                  is not None)
        for server, info in facts["models_info"].items())
    backends = sorted({model["backend"] for info in facts["models_info"].values()
                       for model in info.values()})
    probed = settings.probe_s * settings.hash_rounds

    def rate(state: str) -> float:
        return len(facts["hash"][f"{state}_latencies_s"]) / probed

    during = ", ".join(f"{r['texts_per_s']:,.1f}" for r in facts["hash"]["ml_during"])
    rss_after = ", ".join(f"{name} {fmt_mb(value)}"
                          for name, value in facts["rss_after_rounds_mb"].items())
    return "\n".join([
        "",
        "ratio: how many times better the figure is than the reference (> 1: better); for "
        "latency and memory reference / figure.",
        f"Rounds in sets of three, again, alone, beside, then beside, alone, again, ... "
        f"({settings.sets} each, {settings.round_s:g} s after {settings.warmup:g} s warm-up, "
        f"{facts['sample']} texts, base64). Per set, beside / alone: {ratios(BESIDE)}; "
        f"control / alone: {ratios(AGAIN)}. Other processes' CPU per set (again/alone/"
        f"beside): {disturbed}. The second model ran {second} forward passes during them. "
        f"Texts per forward pass (/info batches) per round: {per_forward}. Worker RSS after "
        f"the rounds: {rss_after}.",
        f"Hash tier: sequential requests of one corpus text, {settings.probe_s:g} s per state "
        f"and round, {settings.hash_rounds} round(s) of idle then busy, samples pooled "
        f"({rate('idle'):,.0f} requests/s idle, {rate('busy'):,.0f} busy); the ML model "
        f"served {during} texts/s during the busy rounds.",
        f"Backends: {', '.join(backends)} (--backend auto). Forward-pass overhead measured at "
        f"warm-up (/info pass_overhead_tokens): {overheads}.",
        f"embedserve options: {facts['server_args'] or 'defaults'}. Other processes used "
        f"{fmt_percent(facts.get('others_cpu_percent'))} of the CPUs during the run. "
        f"{facts['cpus']} CPUs, Python {facts['python']}, torch {facts['torch']}, "
        f"{facts['wall_s']} s.",
    ])


def fmt_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} %"


def fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark several models in one embedserve "
                                                 "server (all-MiniLM-L6-v2 on the CPU, the hash "
                                                 "tier); prints a markdown table.")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.sample} texts, {QUICK.sets} rounds of {QUICK.round_s:g} s "
                             f"per server, {QUICK.hash_rounds} hash round (full: "
                             f"{FULL.sample} texts, {FULL.sets} rounds of {FULL.round_s:g} s, "
                             f"{FULL.hash_rounds} hash rounds)")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the figures (and the raw samples behind them) here")
    parser.add_argument("--server-args", metavar="ARGS", default="",
                        help="extra embedserve options for every server, e.g. "
                             "--server-args='--backend transformers'")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    settings = QUICK if args.quick else FULL
    began = time.perf_counter()
    meter = CpuMeter()
    try:
        folder = model_folder()
        import torch
    except ImportError as exc:
        raise SystemExit(f"bench_models needs {exc.name}: pip install -r "
                         f"extras/bench/requirements.txt") from None
    texts, source = load_corpus()
    sample = fixed_sample(texts, settings.sample)
    report = Report(facts={**machine_facts(), "corpus": source, "sample": len(sample),
                           "torch": torch.__version__, "quick": args.quick, "settings": asdict(settings), "model": folder,
                           "server_args": args.server_args})
    progress(f"corpus: {len(sample)} of {len(texts)} texts from {source}")
    with tempfile.TemporaryDirectory(prefix="bench_models_") as scratch:
        copy = copy_model(folder, Path(scratch))
        commands = server_commands(folder, copy, args.server_args.split())
        report.facts["commands"] = commands
        with running_servers(commands, report.facts) as servers:
            progress(f"servers ready after {report.facts['servers_ready_s']} s")
            report.facts["models_info"] = {name: models_info(server)
                                           for name, server in servers.items()}
            # Right after start-up (warm-up passes run), before the load: what holding the
            # second model costs; after the load the allocator's caches blur it.
            rss = {name: worker_rss_mb(servers[name].child.pid) for name in (ALONE, BESIDE)}
            sets = bench_beside(servers, sample, settings)
            report.facts["rss_after_rounds_mb"] = {
                name: worker_rss_mb(servers[name].child.pid) for name in (ALONE, BESIDE)}
            hashed = bench_hash(servers[WITH_HASH], sample, settings)
    report.facts["rounds"] = [{name: asdict(r) for name, r in one.items()} for one in sets]
    report.facts["rss_ready_mb"] = rss
    report.facts["hash"] = {"idle_latencies_s": hashed.idle, "busy_latencies_s": hashed.busy,
                            "ml_during": hashed.ml_during}
    build_rows(report, sets, rss, hashed)
    report.facts["others_cpu_percent"] = meter.others_percent()
    report.facts["wall_s"] = round(time.perf_counter() - began, 1)
    emit(report, footer(report, sets, settings), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
