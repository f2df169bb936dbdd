"""`python -m embedserve` / `embedserve`: parse the config, bind the socket, and hand both
to the supervisor, which runs the workers. (`embedserve embed|health|info` go to
commands.py, the client side.)
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence

from embedserve import commands
from embedserve.commands import COMMANDS
from embedserve.config import Config
from embedserve.server import bind_socket
from embedserve.supervisor import Supervisor
from embedserve.worker import setup_logging

log = logging.getLogger("embedserve.cli")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # embedserve embed|health|info: the client side
        return commands.run(argv)
    config = Config.from_args(argv)
    setup_logging(config)
    try:
        sock = bind_socket(config.host, config.port, config.backlog)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc.strerror or exc)
        return 1
    # --port 0: the kernel picked one; everything downstream sees the real port.
    config = dataclasses.replace(config, port=sock.getsockname()[1])
    return Supervisor(config, sock).run()


if __name__ == "__main__":
    sys.exit(main())
