"""The one error type the request path raises; each dialect renders it in its own shape."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


class EmptyInput(ApiError):
    """An input with nothing in it (an empty list or string): TEI tells it apart from
    other 400s (its error_type "Empty")."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(400, message, param=param)


class ClientGone(Exception):
    """The client hung up before its answer was ready: its work was dropped, and there is
    no one to answer."""


ECHO_LIMIT = 80


def quoted(value: object) -> str:
    """A client's value as an error message echoes it: repr'd and cut, so a megabyte
    model name does not come back as a megabyte error."""
    text = repr(value)
    return text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + f"... ({len(text)} chars)"
