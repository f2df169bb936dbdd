"""Supervisor benchmark: how long embedserve (hash tier) is unavailable after a worker
dies, with one worker and with two, against uvicorn's own multi-process supervisor; printed as
one markdown table.

    python extras/bench/bench_supervisor.py            # 10 kills per server (about 2 minutes)
    python extras/bench/bench_supervisor.py --quick    # 5 kills per server (about 1 minute)
    python extras/bench/bench_supervisor.py --json results.json

Each kill: SIGKILL to one worker (a child of the server process whose /proc/PID/cmdline holds
"spawn_main"), then a client polls every 2 ms, each poll on a fresh connection:
  first 200         kill -> the first 200 answer to a POST (/embed; /v1/embeddings on the
                    FastAPI reference, its only embedding route)
  spawned           kill -> a new worker pid under the server (watched in /proc every 1 ms)
  serving           kill -> the new pid answers GET /info with its own pid (two workers)
A worker is killed only once it has lived longer than embedserve's STABLE_AFTER: a younger
one would be restarted after a crash-loop back-off, which is measured separately (footer).

Servers (all started at once, idle while another is measured):
  python -m embedserve --backend hash --workers 1 | --workers 2
  uvicorn fastapi_ref:app --workers 2 (with one worker uvicorn runs no supervisor at all)

Progress goes to stderr; stdout carries only the table and its footer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import (BENCH_DIR, HOST, SERVER_START_TIMEOUT, Child, CpuMeter, Report, Row,
                    age_s, child_pids, emit, exit_on_sigterm, free_port, machine_facts,
                    progress, read_ready_port, start_ticks, stop_tree, wait_healthy)
from embedserve.supervisor import BACKOFF_START, STABLE_AFTER

POLL_INTERVAL = 0.002
WATCH_INTERVAL = 0.001
POLL_TIMEOUT = 5.0  # per poll; a poll queued in the backlog waits for the new worker
RECOVERY_TIMEOUT = 30.0  # per kill: give up (and report) after this long
AGE_MARGIN = 0.5  # seconds beyond STABLE_AFTER before a worker is killed
SETTLE = 0.2  # pause after each kill's recovery before the next measurement
CRASH_LOOP_KILLS = 4
UVICORN = "uvicorn --workers 2"
NO_SUPERVISOR = "n/a: uvicorn runs no supervisor with one worker"


@dataclass
class Server:
    name: str
    child: Child
    port: int
    workers: int
    poll_path: str
    poll_body: bytes

    @property
    def pid(self) -> int:
        return self.child.pid


@dataclass
class Kill:
    victim: int
    replacement: int | None = None
    first_ok_s: float | None = None  # None: no success within RECOVERY_TIMEOUT
    spawned_s: float | None = None
    serving_s: float | None = None
    polls: int = 0
    failed_polls: int = 0
    failures: list[str] = field(default_factory=list)


def workers_of(pid: int) -> list[int]:
    """The server's worker processes: children started by multiprocessing's spawn (which also
    starts a resource tracker, a child of another kind)."""
    found = []
    for child in child_pids(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass  # exited meanwhile
    return found


# --- servers ---------------------------------------------------------------------------------

def embedserve_command(workers: int) -> list[str]:
    return [sys.executable, "-m", "embedserve", "--backend", "hash", "--port", "0",
            "--workers", str(workers), "--log-level", "warning"]


def uvicorn_command(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "fastapi_ref:app", "--app-dir", str(BENCH_DIR),
            "--host", HOST, "--port", str(port), "--workers", "2", "--log-level", "warning"]


@contextmanager
def running_servers() -> Iterator[list[Server]]:
    children: list[Child] = []
    try:
        pending = []
        for workers in (1, 2):
            child = Child.spawn(embedserve_command(workers), stdout=subprocess.PIPE)
            children.append(child)
            pending.append((f"embedserve, {workers} worker{'s' * (workers > 1)}", child, None,
                            workers))
        port = free_port()
        child = Child.spawn(uvicorn_command(port))
        children.append(child)
        pending.append((UVICORN, child, port, 2))
        servers = []
        for name, child, port, workers in pending:
            if port is None:
                port = read_ready_port(child)
                path, body = "/embed", {"inputs": "hello world"}
            else:
                wait_healthy(port, child, SERVER_START_TIMEOUT)
                path, body = "/v1/embeddings", {"input": "hello world"}
            servers.append(Server(name, child, port, workers, path, json.dumps(body).encode()))
        for server in servers:  # every worker up, not only the first one to answer
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while len(workers_of(server.pid)) < server.workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name}: {server.workers} workers not up within "
                                       f"{SERVER_START_TIMEOUT:g} s")
                time.sleep(0.05)
        yield servers
    finally:
        for child in children:
            stop_tree(child)


# --- one kill --------------------------------------------------------------------------------

def poll(port: int, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    """One request on a fresh connection."""
    connection = http.client.HTTPConnection(HOST, port, timeout=POLL_TIMEOUT)
    try:
        connection.request(method, path, body,
                           {"Content-Type": "application/json"} if body is not None else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answering_pid(port: int) -> int | None:
    try:
        status, body = poll(port, "GET", "/info", None)
    except OSError:
        return None
    return json.loads(body).get("pid") if status == 200 else None


def kill_and_watch(server: Server) -> Kill:
    """SIGKILL the oldest worker; poll until the server answers again and, with several
    workers, until the replacement itself answers."""
    before = workers_of(server.pid)
    victim = min(before, key=lambda pid: start_ticks(pid) or 0)
    kill = Kill(victim)
    spawned = threading.Event()

    def watch_proc() -> None:
        while time.perf_counter() < deadline and not finished.is_set():
            new = [pid for pid in workers_of(server.pid) if pid not in before]
            if new:
                kill.replacement = new[0]
                kill.spawned_s = time.perf_counter() - killed_at
                spawned.set()
                return
            time.sleep(WATCH_INTERVAL)

    finished = threading.Event()
    killed_at = time.perf_counter()
    deadline = killed_at + RECOVERY_TIMEOUT
    watcher = threading.Thread(target=watch_proc, daemon=True)
    watcher.start()
    killed_at = time.perf_counter()  # the watcher reads it only once a new pid shows up
    os.kill(victim, signal.SIGKILL)
    try:
        next_poll = killed_at
        while time.perf_counter() < deadline:
            kill.polls += 1
            try:
                status, body = poll(server.port, "POST", server.poll_path, server.poll_body)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body[:100]!r}")
                if kill.first_ok_s is None:
                    kill.first_ok_s = time.perf_counter() - killed_at
            except (OSError, RuntimeError, http.client.HTTPException) as exc:
                kill.failed_polls += 1
                if len(kill.failures) < 3:
                    kill.failures.append(f"{type(exc).__name__}: {exc}")
            if kill.first_ok_s is not None and spawned.is_set():
                if kill.serving_s is None and answering_pid(server.port) == kill.replacement:
                    kill.serving_s = time.perf_counter() - killed_at
                if server.workers == 1 or kill.serving_s is not None:
                    break
            next_poll += POLL_INTERVAL
            time.sleep(max(0.0, next_poll - time.perf_counter()))
    finally:
        finished.set()
        watcher.join(timeout=5)
    if server.workers == 1 and kill.first_ok_s is not None and kill.replacement is not None:
        # With one worker the first success is the replacement serving: no separate poll.
        kill.serving_s = kill.first_ok_s
    return kill


def victim_wait_s(server: Server) -> float | None:
    """Seconds until the server's oldest worker has lived past STABLE_AFTER (0: now); None
    while a replacement is still missing."""
    workers = workers_of(server.pid)
    if len(workers) < server.workers:
        return None
    ages = [age for age in map(age_s, workers) if age is not None]
    if not ages:
        return None
    return max(0.0, STABLE_AFTER + AGE_MARGIN - max(ages))


def bench_kills(servers: list[Server], kills: int) -> dict[str, list[Kill]]:
    """`kills` kills per server, scheduled so that one server's waiting (for its worker to
    outlive STABLE_AFTER) is spent measuring the others. One measurement at a time."""
    results: dict[str, list[Kill]] = {server.name: [] for server in servers}
    deadline = time.monotonic() + len(servers) * kills * (STABLE_AFTER + RECOVERY_TIMEOUT)
    while time.monotonic() < deadline:
        waiting = [(wait, server) for server in servers
                   if len(results[server.name]) < kills
                   and (wait := victim_wait_s(server)) is not None]
        if not waiting:
            if all(len(done) >= kills for done in results.values()):
                break
            time.sleep(0.05)  # a replacement is still starting
            continue
        wait, server = min(waiting, key=lambda pair: pair[0])
        time.sleep(min(wait, 1.0))  # short naps: another server may become ready first
        if wait > 1.0:
            continue
        kill = kill_and_watch(server)
        results[server.name].append(kill)
        progress(f"{server.name}: kill {len(results[server.name])}/{kills}: first 200 after "
                 f"{ms(kill.first_ok_s)}, spawned {ms(kill.spawned_s)}, serving "
                 f"{ms(kill.serving_s)}, {kill.failed_polls} of {kill.polls} polls failed")
        time.sleep(SETTLE)
    return results


def bench_crash_loop(server: Server) -> list[Kill]:
    """Kills back to back, each as soon as the last replacement serves: the supervisor's
    back-off for a crash-looping worker, by design."""
    done = []
    for _ in range(CRASH_LOOP_KILLS):
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while len(workers_of(server.pid)) < server.workers and time.monotonic() < deadline:
            time.sleep(0.01)
        done.append(kill_and_watch(server))
    return done


def ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1e3:.1f} ms"


# --- the table -------------------------------------------------------------------------------

def summary(kills: list[Kill], attribute: str) -> tuple[float | None, float | None]:
    """Median and max in ms; None when any kill never got there (that is the news)."""
    values = [getattr(kill, attribute) for kill in kills]
    if not values or any(v is None for v in values):
        return None, None
    return statistics.median(values) * 1e3, max(values) * 1e3


def build_rows(report: Report, results: dict[str, list[Kill]]) -> None:
    one, two = (name for name in results if name != UVICORN)
    count = len(results[one])
    what = {"first_ok_s": "SIGKILL -> first 200", "spawned_s": "SIGKILL -> replacement spawned",
            "serving_s": "SIGKILL -> replacement serving"}
    for attribute in ("first_ok_s", "spawned_s"):
        median, maximum = summary(results[one], attribute)
        for label, value in (("median", median), ("max", maximum)):
            report.add(Row(f"1 worker: {what[attribute]}, {label} of {count}", "ms", False,
                           value, {"uvicorn": None}, note=NO_SUPERVISOR))
    report.add(Row(f"1 worker: failed polls, all {count} kills", "count", False,
                   sum(k.failed_polls for k in results[one]), {"uvicorn": None},
                   note=NO_SUPERVISOR))
    for attribute in ("first_ok_s", "spawned_s", "serving_s"):
        ours = summary(results[two], attribute)
        theirs = summary(results[UVICORN], attribute)
        for index, label in enumerate(("median", "max")):
            report.add(Row(f"2 workers: {what[attribute]}, {label} of {len(results[two])}",
                           "ms", False, ours[index], {UVICORN: theirs[index]}))
    report.add(Row(f"2 workers: failed polls, all {len(results[two])} kills", "count", False,
                   sum(k.failed_polls for k in results[two]),
                   {UVICORN: sum(k.failed_polls for k in results[UVICORN])}))


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark embedserve's recovery from a "
                                                 "killed worker; prints a markdown table.")
    parser.add_argument("--quick", action="store_true", help="5 kills per server instead of 10")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the figures (and every kill's timings) here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    kills = 5 if args.quick else 10
    began = time.perf_counter()
    meter = CpuMeter()
    report = Report(facts={**machine_facts(),
                           "quick": args.quick, "kills": kills, "stable_after_s": STABLE_AFTER,
                           "poll_interval_s": POLL_INTERVAL})
    with running_servers() as servers:
        progress(f"servers up; {kills} kills each, every worker older than "
                 f"{STABLE_AFTER + AGE_MARGIN:g} s when killed")
        results = bench_kills(servers, kills)
        one = servers[0]
        progress(f"{one.name}: crash loop, {CRASH_LOOP_KILLS} kills back to back")
        crash_loop = bench_crash_loop(one)
    report.facts["kills"] = {name: [asdict(k) for k in done] for name, done in results.items()}
    report.facts["crash_loop"] = [asdict(k) for k in crash_loop]
    build_rows(report, results)
    report.facts["others_cpu_percent"] = meter.others_percent()
    report.facts["wall_s"] = round(time.perf_counter() - began, 1)

    others = report.facts["others_cpu_percent"]
    emit(report, "\n".join([
        "",
        "ratio: how many times better embedserve is (> 1: embedserve wins), here reference "
        "time / embedserve time. Polls: every 2 ms, each on a fresh connection, timeout "
        f"{POLL_TIMEOUT:g} s; a poll that reaches the listening socket while no worker accepts "
        "waits in its backlog, so it succeeds (late) instead of failing. 'serving': the new "
        "pid answers GET /info with its own pid (the kernel picks which worker accepts).",
        f"Crash loop (embedserve, 1 worker, {CRASH_LOOP_KILLS} kills back to back, by design "
        f"backed off from {BACKOFF_START:g} s doubling): replacement spawned after "
        + ", ".join(ms(k.spawned_s) for k in crash_loop) + "; first 200 after "
        + ", ".join(ms(k.first_ok_s) for k in crash_loop) + ".",
        f"Other processes used {'n/a' if others is None else f'{others:.0f} %'} of the CPUs "
        f"during the run. {report.facts['cpus']} CPUs, Python {report.facts['python']}, "
        f"{report.facts['wall_s']} s.",
    ]), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
