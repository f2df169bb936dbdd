"""A worker process: load the backend, serve HTTP on the socket the supervisor handed over,
prove liveness with a heartbeat, and leave when told to (SIGTERM) or when the supervisor is
gone. The spawn target must live in an importable module, hence this file.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from embedserve.backends import BackendError
from embedserve.config import Config
from embedserve.contracts import EXIT_CONFIG_ERROR
from embedserve.errors import ApiError
from embedserve.metrics import Metrics
from embedserve.server import EmbedServer
from embedserve.service import EmbeddingService, SharedInt

log = logging.getLogger("embedserve.worker")

LOADING_GRACE = 0.3  # seconds of loading before a lone worker answers 503 "loading"
ANSWER_GRACE = 0.5  # seconds to write the 503s of a drain cut short


@dataclass(frozen=True)
class WorkerLink:
    """What a worker shares with its supervisor. Picklable for the spawn context."""

    channel: Connection  # worker -> supervisor notices; EOF here means the supervisor died
    heartbeat: Any  # multiprocessing.Value("d"): time.monotonic() of the last proof of life
    ready_workers: SharedInt  # how many workers are serving; read here, kept by the supervisor
    restarts: SharedInt
    # Where every worker keeps its metrics (the supervisor's run directory), and this
    # worker's id there: one scrape then reports the whole server.
    metrics_dir: str = ""
    worker_id: int = 0
    # The default model and its dimensions, as the server's first workers served them: a
    # worker that loads another (its model gone from the cache, `auto` then falls to the
    # hash tier) must not serve beside them. None: nothing served yet.
    serves: tuple[str, int] | None = None


def setup_logging(config: Config) -> None:
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def run(config: Config, sock: socket.socket, link: WorkerLink) -> None:
    """Process entry point (multiprocessing spawn target)."""
    setup_logging(config)
    # The supervisor coordinates shutdown: Ctrl-C reaches the whole process group, and only
    # the supervisor should act on it; it then sends SIGTERM here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker = Worker(config, sock, link)
    code = worker.run()
    worker.clean_up_after_supervisor()
    # Leave without the interpreter's shutdown: a model thread still inside a forward pass
    # (a drain cut short) then aborts the process from C++ ("terminate called without an
    # active exception"). Nothing is left to clean up but the logs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Worker:
    def __init__(self, config: Config, sock: socket.socket, link: WorkerLink) -> None:
        self.config = config
        self.link = link
        metrics = Metrics(Path(link.metrics_dir), link.worker_id) if link.metrics_dir else None
        self.service = EmbeddingService(config, link.restarts, metrics)
        self.server = EmbedServer(sock, self.service)
        self.stop_reason = ""
        self._stopping = threading.Event()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._accepting = False
        self._listening = True
        self._accept_lock = threading.Lock()

    def run(self) -> int:
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        # The Python-level handler only keeps SIGTERM from killing us. The work is done by
        # _watch_for_stop, woken by the byte set_wakeup_fd writes the moment the signal
        # arrives: the main thread may be busy loading a model for minutes.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        threading.Thread(target=self._watch_for_stop, name="stop-watch", daemon=True).start()
        threading.Thread(target=self._watch_supervisor, name="supervisor-watch",
                         daemon=True).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

        # A load that takes a while (a model) answers 503 "loading" meanwhile, but only when
        # no other worker is serving: otherwise connections are better left to the ready
        # ones. A quick load (the hash tier) just starts serving when it is done.
        early = threading.Timer(LOADING_GRACE, self._accept_while_loading)
        early.daemon = True
        early.start()
        try:
            self.service.load(serves=self.link.serves)
        except BackendError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_CONFIG_ERROR
        finally:
            early.cancel()
        if self._start_accepting():
            # The ready line names the default model; with --no-preload it is not loaded.
            backend = self.service.backend
            names = self.service.model_names()
            self.link.channel.send(("ready", {
                "pid": os.getpid(), "backend": backend.name if backend else "not-loaded",
                "model": backend.model if backend else names.listed[0],
                "dimensions": backend.dimensions if backend else 0}))
            log.info("serving %s on %s", ", ".join(names.listed), self.config.url)
        self._stopping.wait()
        return self._drain()

    def _accept_while_loading(self) -> None:
        if self.link.ready_workers.value == 0:
            self._start_accepting()

    def _start_accepting(self) -> bool:
        """Start the accept loop (once); False when the socket is already closed."""
        with self._accept_lock:
            if not self._listening:
                return False
            if not self._accepting:
                self._accepting = True
                # A short poll interval: shutdown() waits up to one interval for the loop.
                threading.Thread(target=self.server.serve_forever, args=(0.1,),
                                 name="accept", daemon=True).start()
            return True

    def _stop_listening(self) -> None:
        """Stop the accept loop and close this process's copy of the listening socket;
        connections already accepted are served on."""
        with self._accept_lock:
            if not self._listening:
                return
            self._listening = False
            self.server.draining = True
            if self._accepting:
                self.server.shutdown()
            self.server.socket.close()

    def _watch_for_stop(self) -> None:
        # A stop request is SIGTERM's number (written here by the interpreter's C-level
        # handler) or _stop's zero byte; a library's own signal would write another.
        data = b""
        while signal.SIGTERM not in data and 0 not in data:
            data = self._wakeup_r.recv(64)
        if not self.stop_reason:
            self.stop_reason = "SIGTERM" if signal.SIGTERM in data else "stop requested"
        # Stop listening now, not once loading is done: until then the kernel would keep
        # queueing new clients on a socket this process no longer means to serve.
        self._stop_listening()
        if self.service.ready:
            self._stopping.set()  # the main thread drains what is in flight
            return
        # Still loading: nothing of ours is in flight but 503 "loading" answers, and the
        # load may take minutes (a download). Leave now rather than when it ends.
        log.info("%s while loading: exiting", self.stop_reason)
        self.clean_up_after_supervisor()
        self.server.wait_idle(min(1.0, self.config.graceful_timeout))
        logging.shutdown()
        os._exit(0)

    def _drain(self) -> int:
        log.info("%s: draining (up to %gs for requests in flight)", self.stop_reason,
                 self.config.graceful_timeout)
        self._stop_listening()
        if self.server.wait_idle(self.config.graceful_timeout):
            return 0
        # Out of time: what still waits for the model is answered 503, so its clients
        # retry on a worker that stays, instead of losing their connections with us.
        self.service.stop_now(ApiError(503, "this worker is stopping before your request "
                                            "was served; retry", headers={"Retry-After": "1"}))
        self.server.wait_idle(ANSWER_GRACE)
        log.warning("requests still in flight after %gs: those waiting for the model were "
                    "answered 503", self.config.graceful_timeout)
        return 1

    def _stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass

    def clean_up_after_supervisor(self) -> None:
        """A supervisor killed outright (kill -9) cannot remove its run directory: the
        workers, which outlive it to drain, do (each tries; the first one wins)."""
        if self.stop_reason == "supervisor gone" and self.link.metrics_dir:
            shutil.rmtree(self.link.metrics_dir, ignore_errors=True)

    def _watch_supervisor(self) -> None:
        # The supervisor never writes to this end; recv() returns only with EOF, when its
        # process is gone (even after kill -9). Then no orphan may keep the port.
        try:
            self.link.channel.recv()
        except (EOFError, OSError):
            pass
        self._stop("supervisor gone")

    def _heartbeat(self) -> None:
        # A beat proves the accept loop turns and no backend call is stuck. A stopped
        # (SIGSTOP) or wedged process stops beating; the supervisor then replaces it.
        interval = min(1.0, self.config.worker_timeout / 4)
        while True:
            now = time.monotonic()
            # A closed accept loop no longer ticks: that is a drain, not a hang.
            loop_alive = (not self._accepting or not self._listening
                          or now - self.server.loop_tick < 5.0)
            if loop_alive and self.service.oldest_call_age() < self.config.worker_timeout:
                self.link.heartbeat.value = now
            # Queue depths for a sibling's scrape: current to within this interval.
            self.service.publish_gauges()
            time.sleep(interval)
