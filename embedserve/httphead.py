"""What a request's head may be, as RFC 9112 has it and a proxy in front relies on: the
request line, each header line, and all of them together; and the header lines read. The
stdlib's parser is lenient where another reader of the same bytes may not be; what it would
take and others would read otherwise is refused here (400, and the connection closes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MAX_LINE = 65536  # bytes in a request line or a header line
# A request line as RFC 9112 has it: method, one space, a target of visible characters,
# one space, HTTP/ and a digit on either side of the dot. The stdlib also takes tabs or
# several spaces between them, "HTTP/01.1", control characters in the target, and a
# two-word HTTP/0.9 request. (Raw non-ASCII bytes in the target are let through: clients
# do send UTF-8 paths.)
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e\x80-\xff]+ "
                           rb"HTTP/[0-9]\.[0-9]\r?\n")
# A header line as RFC 9112 has it: a token, a colon, then visible characters, spaces and
# tabs. The stdlib's parser (email) is lenient where a proxy in front may not be: it ends
# the head at a line without a colon (the rest then read as a body or the next request),
# splits a line at a bare CR, and joins folded lines; each of those is a 400 here.
_HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r?\n")
# All header lines together (each is also at most MAX_LINE): about what Go and hyper allow.
MAX_HEAD_BYTES = 256 * 1024
# Lines read for a head, the empty one that ends it included: the stdlib's bound.
MAX_HEADER_LINES = 100


class HeadError(Exception):
    """A request head refused before it reaches the Dispatcher: its status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HeaderList:
    """Headers as (name, value) pairs, looked up case-insensitively (the part of
    email.message.Message's interface that is read of a request's headers)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in pairs:
            self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: Any = None) -> Any:
        """The first value of `name`."""
        values = self._values.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, failobj: Any = None) -> Any:
        values = self._values.get(name.lower())
        return list(values) if values else failobj

    def replace(self, name: str, value: str) -> None:
        """`name` has this one value from now on (any it had are dropped)."""
        self._values[name.lower()] = [value]


def read_header_lines(rfile: Any) -> HeaderList:
    """A request's header lines, up to the empty line that ends them, each checked as it is
    read (see _HEADER_LINE), all of them bounded in bytes and in number (the stdlib's 100
    lines, the empty one included). A line that passes is `name:value` with no CR, LF or
    other control character, so a split at its first colon reads it as the stdlib's email
    parser reads it but for the blanks after a value, which RFC 9110 leaves out too; at a
    tenth of that parser's cost: a quarter of a one-text request's CPU went there. A head
    the connection ends before its empty line is refused (the stdlib served it)."""
    pairs: list[tuple[str, str]] = []
    left = MAX_HEAD_BYTES
    for _ in range(MAX_HEADER_LINES):
        line: bytes = rfile.readline(MAX_LINE + 1)
        left -= len(line)
        if left < 0:
            raise HeadError(431, f"request header fields are over {MAX_HEAD_BYTES} bytes")
        if len(line) > MAX_LINE:
            raise HeadError(431, f"a request header line is over {MAX_LINE} bytes")
        if line in (b"\r\n", b"\n"):  # the empty line that ends the head
            return HeaderList(pairs)
        if not line:  # the stdlib took what had come as the whole head
            raise HeadError(400, "malformed request: the connection ended within its head")
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "malformed request: a folded header line")
        if not _HEADER_LINE.fullmatch(line):
            raise HeadError(400, "malformed request: a header line that is not "
                                 "'name: value' (or holds a control character)")
        name, _, value = line.decode("latin-1").partition(":")
        # RFC 9110 5.5: a value has no blanks either side ("Expect: 100-continue " is
        # one; the stdlib kept the trailing ones).
        pairs.append((name, value.rstrip("\r\n").strip(" \t")))
    raise HeadError(431, f"a request has over {MAX_HEADER_LINES - 1} header lines")


def check_request_line(line: bytes) -> None:
    """HeadError unless `line` is a request line as RFC 9112 has it (see _REQUEST_LINE)."""
    if not _REQUEST_LINE.fullmatch(line):
        raise HeadError(400, "malformed request line: not 'METHOD /target HTTP/1.1'")
