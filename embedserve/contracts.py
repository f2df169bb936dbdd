"""What processes agree on, in one place: the line a server prints when it is ready, its
exit codes, and the names of its environment variables. The supervisor writes these; the
clients (Python and Node), the tests and the benchmarks read them. Standard library only,
importing no other embedserve module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Exit codes of `python -m embedserve`.
EXIT_OK = 0
EXIT_FAILURE = 1  # e.g. the address is taken (a stop is 0, as gunicorn's, even when
#                   it had to kill workers still draining: the signal asked for it)
EXIT_USAGE = 2  # a bad flag or EMBEDSERVE_* value (argparse's own code)
EXIT_CONFIG_ERROR = 3  # a worker failed to boot with a configuration error: not retried

ENV_PREFIX = "EMBEDSERVE_"
URL_ENV = "EMBEDSERVE_URL"  # where clients look for a server (not a server option)
# Where clients keep what each server last served (not a server option; client/lastseen.py).
STATE_ENV = "EMBEDSERVE_STATE_DIR"


def env_name(option: str) -> str:
    """The environment variable of a server option: max_body_bytes -> EMBEDSERVE_MAX_BODY_BYTES."""
    return ENV_PREFIX + option.upper()


@dataclass(frozen=True)
class ReadyLine:
    """One line on the server's stdout, printed once when every worker is ready:

    embedserve ready at http://127.0.0.1:8765 (backend=hash, model=hash-v1-384, dimensions=384, pid=4242, workers=1)
    """

    url: str
    backend: str
    model: str
    dimensions: int
    pid: int
    workers: int

    def format(self) -> str:
        return (f"embedserve ready at {self.url} (backend={self.backend}, model={self.model}, "
                f"dimensions={self.dimensions}, pid={self.pid}, workers={self.workers})")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


# A model name may hold anything but the separators around it; a folder path may even hold
# ", " -- so the fields are matched by name, model lazily up to the next known field.
_READY = re.compile(r"embedserve ready at (?P<url>https?://\S+) \(backend=(?P<backend>[^,]*), "
                    r"model=(?P<model>.*?), dimensions=(?P<dimensions>\d+), "
                    r"pid=(?P<pid>\d+), workers=(?P<workers>\d+)\)")


def parse_ready_line(line: str) -> ReadyLine | None:
    """The ready line's fields, when `line` holds one (log prefixes are allowed)."""
    match = _READY.search(line)
    if match is None:
        return None
    return ReadyLine(match["url"], match["backend"], match["model"], int(match["dimensions"]),
                     int(match["pid"]), int(match["workers"]))
