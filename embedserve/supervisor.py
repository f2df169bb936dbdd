"""The supervisor: owns the listening socket, keeps `workers` worker processes alive, and
shuts them all down cleanly. It never imports an ML package.

Read top to bottom like gunicorn's arbiter: signal handlers only record the signal; one
loop wakes on a signal, a worker notice, a worker exit or a tick, and acts.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from embedserve import metricfiles
from embedserve import worker as worker_module
from embedserve.config import Config
from embedserve.contracts import EXIT_CONFIG_ERROR, ReadyLine

log = logging.getLogger("embedserve.supervisor")

TICK = 0.5
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STDIN_FD = 0
# Restart delays after quick deaths double from BACKOFF_START up to BACKOFF_MAX; a worker
# that lived STABLE_AFTER seconds resets the count.
BACKOFF_START = 0.1
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0
BOOT_TIMEOUT = 600.0  # for a rolling restart's new workers (a model download can be slow)


class Halt(Exception):
    """Stop supervising and exit with `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass(eq=False)
class Child:
    process: Any  # multiprocessing.Process (spawn context)
    channel: Connection
    heartbeat: Any
    generation: int
    worker_id: int  # its metrics' id: the spawn count, unlike a pid never reused
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    draining: bool = False
    killed_for_hang: bool = False


class Supervisor:
    def __init__(self, config: Config, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.ctx = multiprocessing.get_context("spawn")  # never fork: CUDA breaks after it
        self.children: list[Child] = []
        self.generation = 0
        self.ready_workers = self.ctx.Value("i", 0, lock=False)
        self.restarts = self.ctx.Value("i", 0, lock=False)
        self.quick_deaths = 0
        self.next_spawn = 0.0
        self.announced = False
        self.serves: tuple[str, int] | None = None  # see WorkerLink.serves
        self.reloading = False
        self.signals: list[int] = []
        self.stopping = False
        self.forced = False  # a second SIGTERM/SIGINT during a stop
        self.watching_stdin = config.watch_stdin
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        # The workers' metric files (metricfiles.py), ours to create and remove.
        self.metrics_dir: Path | None = None
        try:
            metricfiles.remove_stale_run_dirs(Path(tempfile.gettempdir()))
            self.metrics_dir = Path(tempfile.mkdtemp(
                prefix=f"{metricfiles.RUN_DIR_PREFIX}{os.getpid()}-"))
        except OSError as exc:  # e.g. a read-only file system with no writable TMPDIR
            log.warning("no run directory for metrics (%s): each worker's /metrics will "
                        "report that worker alone; set TMPDIR to a writable folder", exc)
        self.spawned = 0

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        atexit.register(self._kill_all)
        for _ in range(self.config.workers):
            self._spawn()
        try:
            while True:
                self._sleep()
                self._handle_signals()
                self._read_notices()
                self._reap()
                self._check_heartbeats()
                self._maintain()
        except Halt as halt:
            return halt.code
        finally:
            self._kill_all()
            self.sock.close()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _sleep(self) -> None:
        waitables: list[Any] = []
        if self.watching_stdin:
            waitables.append(STDIN_FD)
        for child in self.children:
            waitables += [child.channel, child.process.sentinel]
        # Wake in time for a restart that is due before the next tick.
        timeout = TICK
        if len(self.children) < self.config.workers:
            timeout = min(TICK, max(0.0, self.next_spawn - time.monotonic()))
        if STDIN_FD in self._wait(waitables, timeout):
            self._read_stdin()

    def _wait(self, waitables: list[Any], timeout: float) -> list[Any]:
        """wait() on `waitables` and the signal wake-up socket, which it empties: a byte
        left in it would make every later wait return at once, a busy loop."""
        ready = wait([self._wakeup_r, *waitables], timeout)
        if self._wakeup_r in ready:
            try:
                while self._wakeup_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        return ready

    def _read_stdin(self) -> None:
        # EOF on stdin: the process that started us is gone, however it went (kill -9
        # included). Stop as if told to with SIGTERM.
        try:
            data = os.read(STDIN_FD, 4096)
        except OSError:
            data = b""
        if not data:
            self.watching_stdin = False
            log.info("stdin closed: the process that started this server is gone; stopping")
            self.signals.append(signal.SIGTERM)

    # -- signals: the handlers only record; the loop calls handle_<name> ----------------
    def _install_signals(self) -> None:
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, lambda signum, frame: self.signals.append(signum))

    def _handle_signals(self) -> None:
        while self.signals:
            name = signal.Signals(self.signals.pop(0)).name
            getattr(self, "handle_" + name[3:].lower())()

    def handle_hup(self) -> None:
        """Rolling restart; while stopping, nothing (a new generation would only drain)."""
        if self.stopping:
            log.info("received SIGHUP while stopping: ignored")
        else:
            self._reload()

    def handle_term(self) -> None:
        self._stop_signal("SIGTERM")

    def handle_int(self) -> None:
        self._stop_signal("SIGINT")

    def _stop_signal(self, name: str) -> None:
        """Graceful stop; a second stop signal during the stop forces it."""
        if self.stopping:
            log.warning("received %s again: forcing the stop", name)
            self.forced = True
            return
        log.info("received %s: stopping gracefully (a second signal forces it)", name)
        raise Halt(self._stop())

    # -- workers ---------------------------------------------------------------------------
    def _spawn(self) -> None:
        parent_end, child_end = self.ctx.Pipe()
        heartbeat = self.ctx.Value("d", time.monotonic(), lock=False)
        self.spawned += 1
        link = worker_module.WorkerLink(child_end, heartbeat, self.ready_workers, self.restarts,
                                        str(self.metrics_dir or ""), self.spawned, self.serves)
        process = self.ctx.Process(target=worker_module.run, args=(self.config, self.sock, link),
                                   name=f"embedserve-worker-{self.generation}", daemon=False)
        process.start()
        child_end.close()  # the worker holds the other copy: EOF reaches us if it dies
        self.children.append(Child(process, parent_end, heartbeat, self.generation,
                                   self.spawned))
        log.debug("spawned worker %s (generation %d)", process.pid, self.generation)

    def _read_notices(self) -> None:
        for child in self.children:
            try:
                while child.channel.poll():
                    kind, detail = child.channel.recv()
                    # A worker told to drain while it loaded may still finish loading:
                    # it does not count as serving.
                    if kind == "ready" and not child.ready and not child.draining:
                        child.ready = True
                        self.ready_workers.value += 1
                        self._on_ready(detail)
            except (EOFError, OSError):
                pass  # it died; _reap handles that

    def _on_ready(self, detail: dict[str, Any]) -> None:
        current = [c for c in self.children if c.generation == self.generation]
        if not all(c.ready for c in current):
            return
        if self.serves is None and detail["dimensions"]:  # 0: not loaded (--no-preload)
            self.serves = (detail["model"], detail["dimensions"])
        if not self.announced:
            self.announced = True
            # One line on stdout, the contract for whoever started us (tests, clients).
            print(ReadyLine(self.config.url, detail["backend"], detail["model"],
                            detail["dimensions"], os.getpid(), self.config.workers).format(),
                  flush=True)
        if self.reloading:
            self.reloading = False
            old = [c for c in self.children if c.generation < self.generation]
            log.info("rolling restart: %d new workers ready; draining %d old ones",
                     len(current), len(old))
            for child in old:
                self._drain(child)

    def _reap(self) -> None:
        for child in [c for c in self.children if not c.process.is_alive()]:
            self.children.remove(child)
            child.channel.close()
            if child.ready:
                self.ready_workers.value -= 1
            # Its counts stay in the server's totals; its gauges go.
            if self.metrics_dir is not None:
                metricfiles.retire(self.metrics_dir, child.worker_id)
            code = child.process.exitcode
            if child.draining:
                log.info("worker %s drained and exited (%s)", child.process.pid, code)
                continue
            if code == EXIT_CONFIG_ERROR and not child.ready and not self.announced:
                log.error("worker %s failed to boot with a configuration error (see above); "
                          "not restarting", child.process.pid)
                self._stop()
                raise Halt(EXIT_CONFIG_ERROR)
            # Once serving, a worker that cannot boot (see its error above) is retried with
            # the back-off below, while the others serve on: in a rolling restart, the old
            # generation until the new one is ready.
            how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with code {code}")
            lived = time.monotonic() - child.started
            if lived < STABLE_AFTER:
                self.quick_deaths += 1
            else:
                self.quick_deaths = 0
            delay = 0.0 if not self.quick_deaths else min(
                BACKOFF_MAX, BACKOFF_START * 2 ** (self.quick_deaths - 1))
            self.next_spawn = max(self.next_spawn, time.monotonic() + delay)
            self.restarts.value += 1
            log.warning("worker %s %s after %.1fs%s; restarting in %.1fs", child.process.pid,
                        how, lived, " (unresponsive)" if child.killed_for_hang else "", delay)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for child in self.children:
            silent = now - child.heartbeat.value
            if silent > self.config.worker_timeout and not child.killed_for_hang:
                log.error("worker %s sent no heartbeat for %.1fs (limit %gs): killing it",
                          child.process.pid, silent, self.config.worker_timeout)
                child.killed_for_hang = True
                self._signal(child, signal.SIGKILL)
            elif (self.reloading and not child.ready and child.generation == self.generation
                  and now - child.started > BOOT_TIMEOUT):
                log.error("new worker %s not ready after %gs: killing it", child.process.pid,
                          BOOT_TIMEOUT)
                self._signal(child, signal.SIGKILL)

    def _maintain(self) -> None:
        current = [c for c in self.children if c.generation == self.generation]
        while len(current) < self.config.workers and time.monotonic() >= self.next_spawn:
            self._spawn()
            current.append(self.children[-1])

    # -- reload and stop -------------------------------------------------------------------
    def _reload(self) -> None:
        """SIGHUP: start a new generation; the old one drains once the new one is ready."""
        log.info("rolling restart of %d workers", self.config.workers)
        # A reload during a reload: the half-started generation is dropped too.
        for child in self.children:
            if child.generation == self.generation and not child.ready:
                self._drain(child)
        self.generation += 1
        self.reloading = True
        for _ in range(self.config.workers):
            self._spawn()

    def _drain(self, child: Child) -> None:
        if not child.draining:
            child.draining = True
            if child.ready:
                child.ready = False
                self.ready_workers.value -= 1
            self._signal(child, signal.SIGTERM)

    def _stop(self) -> int:
        """Drain every worker, for up to graceful_timeout; a second SIGTERM or SIGINT
        meanwhile forces the stop."""
        # Stop listening first. Once the workers have closed their copies too, new clients
        # are refused at once instead of queued by the kernel for a server that will never
        # accept them (they hung, then got a reset). A rolling restart keeps the socket.
        self.stopping = True
        self.sock.close()
        for child in self.children:
            self._drain(child)
        deadline = time.monotonic() + self.config.graceful_timeout + 1.0
        while self.children:
            self._handle_signals()
            if self.forced:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wait([c.process.sentinel for c in self.children], min(TICK, left))
            self.children = [c for c in self.children if c.process.is_alive()]
        if self.children:
            log.warning("killing %d workers still draining", len(self.children))
        self._kill_all()
        log.info("stopped")
        return 0

    def _kill_all(self) -> None:
        for child in self.children:
            self._signal(child, signal.SIGKILL)
        for child in self.children:
            child.process.join(5)
        self.children = []

    @staticmethod
    def _signal(child: Child, signum: int) -> None:
        try:
            os.kill(child.process.pid, signum)
        except ProcessLookupError:
            pass
