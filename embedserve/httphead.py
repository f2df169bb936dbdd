"""What a request's head may be, as RFC 9112 has it and a proxy in front relies on: the
request line, each header line, and all of them together. The stdlib's parser is lenient
where another reader of the same bytes may not be; what it would take and others would read
otherwise is refused here (400, and the connection closes).
"""

from __future__ import annotations

import re
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


class HeadError(Exception):
    """A request head refused before it reaches the Dispatcher: its status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HeaderLines:
    """The connection's reader while the stdlib parses a request's header lines: each is
    checked as it is read (see _HEADER_LINE), and all of them are bounded in bytes."""

    def __init__(self, rfile: Any) -> None:
        self._rfile = rfile
        self._left = MAX_HEAD_BYTES

    def readline(self, limit: int = -1) -> bytes:
        line: bytes = self._rfile.readline(limit)
        self._left -= len(line)
        if self._left < 0:
            raise HeadError(431, f"request header fields are over {MAX_HEAD_BYTES} bytes")
        if line in (b"\r\n", b"\n", b"") or len(line) > MAX_LINE:
            return line  # the end of the head, or the stdlib's own 431 for a long line
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "malformed request: a folded header line")
        if not _HEADER_LINE.fullmatch(line):
            raise HeadError(400, "malformed request: a header line that is not "
                                 "'name: value' (or holds a control character)")
        return line


def check_request_line(line: bytes) -> None:
    """HeadError unless `line` is a request line as RFC 9112 has it (see _REQUEST_LINE)."""
    if not _REQUEST_LINE.fullmatch(line):
        raise HeadError(400, "malformed request line: not 'METHOD /target HTTP/1.1'")
