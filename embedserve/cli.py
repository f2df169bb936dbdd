"""`python -m embedserve` / `embedserve`: parse the config, bind the socket, and hand both
to the supervisor, which runs the workers. (`embedserve embed|health|info` go to
commands.py, the client side, as do `embedserve pull|models|rm`, the model cache.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from embedserve import commands
from embedserve.commands import COMMANDS
from embedserve.config import Config, build_parser
from embedserve.server import bind_socket
from embedserve.supervisor import Supervisor
from embedserve.worker import setup_logging

log = logging.getLogger("embedserve.cli")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # embed|health|info|pull|models|rm: commands.py
        return commands.run(argv)
    if "-h" in argv or "--help" in argv:
        # The server's own help, plus the model commands, which its parser does not know of.
        parser = build_parser(os.environ)
        parser.epilog = f"{parser.epilog} {commands.MODEL_COMMANDS_HELP}"
        parser.print_help()
        return 0
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
