"""A worker process: load the backend, serve HTTP on the socket the supervisor handed over,
prove liveness with a heartbeat, and leave when told to (SIGTERM) or when the supervisor is
gone. The spawn target must live in an importable module, hence this file.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from embedserve.backends import BackendError, load_backend
from embedserve.config import Config
from embedserve.server import EmbedServer
from embedserve.service import EmbeddingService, SharedInt

log = logging.getLogger("embedserve.worker")

EXIT_CONFIG_ERROR = 3
LOADING_GRACE = 0.3  # seconds of loading before a lone worker answers 503 "loading"


@dataclass(frozen=True)
class WorkerLink:
    """What a worker shares with its supervisor. Picklable for the spawn context."""

    channel: Connection  # worker -> supervisor notices; EOF here means the supervisor died
    heartbeat: Any  # multiprocessing.Value("d"): time.monotonic() of the last proof of life
    ready_workers: SharedInt  # how many workers are serving; read here, kept by the supervisor
    restarts: SharedInt


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
    sys.exit(Worker(config, sock, link).run())


class Worker:
    def __init__(self, config: Config, sock: socket.socket, link: WorkerLink) -> None:
        self.config = config
        self.link = link
        self.service = EmbeddingService(config, link.restarts)
        self.server = EmbedServer(sock, self.service)
        self.stop_reason: list[str] = []
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._accepting = False
        self._accept_lock = threading.Lock()

    def run(self) -> int:
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        signal.signal(signal.SIGTERM, lambda signum, frame: self.stop_reason.append("SIGTERM"))
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
            loaded = load_backend(self.config)
        except BackendError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_CONFIG_ERROR
        finally:
            early.cancel()
        self.service.attach(loaded)
        self._start_accepting()
        backend = loaded.backend
        self.link.channel.send(("ready", {"pid": os.getpid(), "backend": backend.name,
                                          "model": backend.model,
                                          "dimensions": backend.dimensions}))
        log.info("serving %s (%s) on %s", backend.model, backend.name, self.config.url)

        while not self.stop_reason:
            select.select([self._wakeup_r], [], [])
            self._wakeup_r.recv(64)
        return self._drain(self.stop_reason[0])

    def _accept_while_loading(self) -> None:
        if self.link.ready_workers.value == 0:
            self._start_accepting()

    def _start_accepting(self) -> None:
        with self._accept_lock:
            if self._accepting:
                return
            self._accepting = True
            # A short poll interval: shutdown() waits up to one interval for the loop.
            threading.Thread(target=self.server.serve_forever, args=(0.1,), name="accept",
                             daemon=True).start()

    def _drain(self, reason: str) -> int:
        log.info("%s: draining (up to %gs for requests in flight)", reason,
                 self.config.graceful_timeout)
        self.server.draining = True
        if self._accepting:
            self.server.shutdown()
        self.server.socket.close()
        if self.server.wait_idle(self.config.graceful_timeout):
            return 0
        log.warning("requests still in flight after %gs; exiting anyway",
                    self.config.graceful_timeout)
        return 1

    def _stop(self, reason: str) -> None:
        self.stop_reason.append(reason)
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass

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
            loop_alive = not self._accepting or now - self.server.loop_tick < 5.0
            if loop_alive and self.service.oldest_call_age() < self.config.worker_timeout:
                self.link.heartbeat.value = now
            time.sleep(interval)
