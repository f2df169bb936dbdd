"""What the client raises. Every class derives from EmbedServeError; the ones that mean "no
server could be had" derive from ServerUnavailable, and only those let the fallback policy
answer instead: a request the server rejected (bad input, a wrong API key) is the caller's
to fix, and a fallback would only hide it.

Errors pickle (and copy) with their attributes, so they cross process pools intact.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any


class EmbedServeError(Exception):
    """Base class of every error the client raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments defeat the default pickling (and copy):
        # rebuild from args + attributes instead, so errors cross process pools intact.
        return _rebuild_error, (type(self), self.args, self.__dict__)


def _rebuild_error(cls: type[EmbedServeError], args: tuple[Any, ...],
                   state: dict[str, Any]) -> EmbedServeError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ServerUnavailable(EmbedServeError, ConnectionError):
    """No server answered at `url` (or none could be started) within the client's bounds.
    `status` is the last HTTP status it answered, if any (503 while a server is loading)."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.status = status


class ServerStartError(ServerUnavailable):
    """A server this client started exited or did not become ready in time."""

    def __init__(self, message: str, *, url: str, returncode: int | None,
                 log_tail: Sequence[str]) -> None:
        tail = "".join(f"\n    {line}" for line in log_tail) or " (none)"
        super().__init__(f"{message}; the server's last log lines:{tail}", url=url)
        self.returncode = returncode
        self.log_tail = list(log_tail)


class ServerError(EmbedServeError):
    """The server answered with an HTTP error. `message` is the server's own text."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 code: str | None = None, param: str | None = None, url: str = "") -> None:
        super().__init__(f"{status} {phrase(status)}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.url = url


class ValidationError(ServerError, ValueError):
    """The request is wrong (400, 413, 422; 404 for a model: ModelNotFound); retrying it
    cannot help. Raised the same way when the client itself catches the problem before
    sending (e.g. an empty text)."""


class ModelNotFound(ValidationError):
    """The server serves no model of the name a call asked for (404). `message` is the
    server's own text, which lists the names it serves; `model` is the name asked for, and
    `available` the names the server serves (GET /v1/models; None where they could not be
    read). Never answered by the fallback: the server is there, the name is wrong."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 code: str | None = None, param: str | None = None, url: str = "",
                 model: str | None = None, available: Sequence[str] | None = None) -> None:
        super().__init__(status, message, type=type, code=code, param=param, url=url)
        self.model = model
        self.available = None if available is None else list(available)


class AuthenticationError(ServerError):
    """Missing or wrong API key (401, 403): pass `api_key` or set EMBEDSERVE_API_KEY."""


class ModelMismatch(EmbedServeError):
    """The server changed models in the middle of one call, twice in a row."""


def phrase(status: int) -> str:
    """The reason phrase of an HTTP status ("Service Unavailable"), or "HTTP error"."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"
