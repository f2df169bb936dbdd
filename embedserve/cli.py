"""`python -m embedserve` / `embedserve`: parse the config, load a backend, serve until told
to stop. Signal handlers only record the signal; the main loop acts on it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from embedserve.backends import BackendError, load_backend
from embedserve.config import Config
from embedserve.server import EmbedServer, bind_socket
from embedserve.service import EmbeddingService

log = logging.getLogger("embedserve.cli")

EXIT_CONFIG_ERROR = 3
GRACEFUL_TIMEOUT = 30.0


def main(argv: Sequence[str] | None = None) -> int:
    config = Config.from_args(argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loaded = load_backend(config)
    except BackendError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG_ERROR
    try:
        sock = bind_socket(config.host, config.port, config.backlog)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc.strerror or exc)
        return 1
    config = dataclasses.replace(config, port=sock.getsockname()[1])
    service = EmbeddingService(config, loaded)
    server = EmbedServer(sock, service)
    return serve(server)


def serve(server: EmbedServer) -> int:
    received: list[int] = []
    wakeup_r, wakeup_w = socket.socketpair()
    wakeup_w.setblocking(False)
    signal.set_wakeup_fd(wakeup_w.fileno())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: received.append(signum))

    thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    thread.start()
    backend = server.service.backend
    print(f"embedserve ready at {server.config.url} (backend={backend.name}, "
          f"model={backend.model}, dimensions={backend.dimensions}, pid={os.getpid()})",
          flush=True)

    while not received:
        select.select([wakeup_r], [], [])
        wakeup_r.recv(64)
    log.info("received %s: stopping gracefully (a second signal forces it)",
             signal.Signals(received[0]).name)
    server.draining = True
    server.shutdown()  # stops the accept loop; queued connections are not served
    server.socket.close()
    deadline_left = GRACEFUL_TIMEOUT
    step = 0.1
    while not server.wait_idle(step):
        deadline_left -= step
        if len(received) > 1 or deadline_left <= 0:
            log.warning("stopping with requests still in flight")
            return 1
    log.info("stopped")
    return 0
