"""The client's options, checked and resolved once, at construction: a bad URL, value or
EMBEDSERVE_* variable is a ValueError there, naming what is wrong, rather than a server
that fails to start later or a fallback of a silently other size."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from embedserve.config import DEFAULT_PORT, FLAGS, Config, parse_option
from embedserve.contracts import URL_ENV, env_name
from embedserve.hashing import HASH_VERSION

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
FallbackPolicy = Literal["same-model", "always", "never"]
EncodingFormat = Literal["base64", "float"]
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ML_BACKENDS = frozenset({"sentence-transformers", "transformers"})
# The hash tier's model ids (hash-v1-384): what a model name of the hash tier looks like.
HASH_MODEL = re.compile(rf"hash-v{HASH_VERSION}-([1-9][0-9]*)")


@dataclass(frozen=True)
class Endpoint:
    """One server's address, from a URL."""

    scheme: str
    host: str
    port: int
    base_path: str


def url_of(scheme: str, host: str, port: int, base_path: str) -> str:
    """A server's URL as the client names it (in errors, logs and lastseen.py's file)."""
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}{base_path}"


def canonical_host(host: str) -> str:
    """`host` (lower case already, as urlsplit gives it) as a WHATWG URL parser -- the Node
    client's `new URL` -- writes it, so that both clients key a server alike in lastseen's
    shared file: an IPv6 address compressed ("0:0::1" is "::1"), an IPv4 address in any of
    its inet_aton spellings dotted ("127.1" and "0x7f.0.0.1" are "127.0.0.1"). Names, and
    what else inet_aton refuses, stay as given."""
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        pass
    else:
        mapped = address.ipv4_mapped  # Python 3.13 writes it dotted; WHATWG in hex
        return f"::ffff:{int(mapped) >> 16:x}:{int(mapped) & 0xffff:x}" if mapped \
            else address.compressed
    if re.fullmatch(r"[0-9a-fx.]+", host):  # what a number-spelled IPv4 address can hold
        try:
            return socket.inet_ntoa(socket.inet_aton(host.removesuffix(".")))
        except OSError:
            pass
    return host


@dataclass(frozen=True)
class Options:
    """Everything Client(...) was given, checked; see Client for what each one means."""

    scheme: str
    host: str
    port: int
    base_path: str
    autostart: bool
    restart: bool
    backend: str | None
    model: str | None
    dimensions: int | None
    server_args: tuple[str, ...]
    env: Mapping[str, str]
    python: str
    api_key: str | None
    encoding_format: EncodingFormat
    batch_size: int | None
    timeout: float
    connect_timeout: float
    start_timeout: float
    stop_timeout: float
    retry_timeout: float
    retries: int | None
    backoff: float
    max_backoff: float
    fallback: FallbackPolicy
    # The EMBEDSERVE_* settings the client itself needs, from what a started server sees.
    env_dimensions: int | None
    env_backend: str | None
    env_model: str | None
    # Several servers that serve alike (replicas): requests spread over them and a server
    # that fails is skipped. Empty for one server (scheme, host, port, base_path).
    pool: tuple[Endpoint, ...] = ()

    def server_urls(self) -> tuple[str, ...]:
        """The URLs of the servers these options name; none for a private server on a free
        port (port 0), whose URL changes with every start."""
        endpoints = self.pool or (Endpoint(self.scheme, self.host, self.port, self.base_path),)
        return tuple(url_of(e.scheme, e.host, e.port, e.base_path) for e in endpoints if e.port)

    @property
    def local(self) -> bool:
        """Whether the URL names this machine: only there may a server be started."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    def configured_dimensions(self) -> int:
        """The size of the hash model a server started with these options would serve."""
        given = _last_int(self.server_arg("--dimensions"))  # after the options: it wins
        if given is not None:
            return given
        if self.dimensions is not None:
            return self.dimensions
        return self.env_dimensions if self.env_dimensions is not None else Config.dimensions

    def requested_model(self, hash_model: str) -> str | None:
        """The model a started server would serve, where the options say (`hash_model` for
        the hash backend); None if unknown. server_args count as the server reads them:
        after the options (the last --backend wins; the first --model is the default)."""
        backend = ([None] + self.server_arg("--backend"))[-1] or self.backend or \
            self.env_backend or "auto"
        model = self.model or ([*self.server_arg("--model"), None])[0] or self.env_model
        if backend == "hash" or (model or "").lower() == "hash":  # --model hash: the tier
            return hash_model
        if model and HASH_MODEL.fullmatch(model.lower()):
            return model.lower()
        if backend in ML_BACKENDS or model:
            return f"{model or backend} ({backend})"
        return None

    def server_arg(self, flag: str) -> list[str]:
        """The values server_args give `flag` ("--flag value" or "--flag=value", the flag
        abbreviated as argparse lets the server read it: "--dim 32"), in order."""
        args, values = self.server_args, []
        for i, arg in enumerate(args):
            name, equals, value = arg.partition("=")
            if _server_flag(name) != flag:
                continue
            if equals:
                values.append(value)
            elif i + 1 < len(args):
                values.append(args[i + 1])
        return values


def _server_flag(name: str) -> str | None:
    """The server's flag that `name` gives, whole or a prefix of one alone (argparse)."""
    if not name.startswith("--") or name in FLAGS:
        return name if name in FLAGS else None
    matches = [flag for flag in FLAGS if flag.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def _last_int(values: list[str]) -> int | None:
    """The last value as a size, if it is one (else the server refuses it at start)."""
    try:
        size = int(values[-1]) if values else None
    except ValueError:
        return None
    return size if size is not None and size > 0 else None


def resolve_options(url: str | Sequence[str] | None, *, autostart: bool, backend: str | None,
                    model: str | None, dimensions: int | None, port: int | None,
                    server_args: Sequence[str], env: Mapping[str, str] | None,
                    python: str | None, api_key: str | None, encoding_format: EncodingFormat,
                    batch_size: int | None, timeout: float, connect_timeout: float,
                    start_timeout: float, stop_timeout: float, retry_timeout: float,
                    retries: int | None, backoff: float, max_backoff: float, restart: bool,
                    fallback: FallbackPolicy | bool) -> Options:
    """Client(...)'s arguments, checked, with the environment's defaults filled in."""
    # Where a bad URL came from, for the error: the argument or the variable.
    source = "url" if url else URL_ENV
    if url is not None and not isinstance(url, str):
        urls = list(url)
        if not urls or not all(isinstance(item, str) for item in urls):
            raise ValueError(f"url must be a URL or a list of URLs, got {url!r}")
    else:
        given = url or os.environ.get(URL_ENV) or DEFAULT_URL
        # EMBEDSERVE_URL (or url) may list several servers, comma-separated.
        urls = [part.strip() for part in given.split(",")] if "," in given else [given]
    endpoints = [_endpoint(item, source) for item in urls]
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"{source} lists a server twice: {', '.join(urls)}")
    first = endpoints[0]
    if len(endpoints) > 1 and port is not None:
        raise ValueError("port applies to one server; with several URLs give each its port")
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    if encoding_format not in ("base64", "float"):
        raise ValueError(f"encoding_format must be 'base64' or 'float', got "
                         f"{encoding_format!r}")
    if fallback is True:
        fallback = "same-model"
    elif fallback is False:
        fallback = "never"
    if fallback not in ("same-model", "always", "never"):
        raise ValueError(f"fallback must be 'same-model', 'always', 'never', True or "
                         f"False; got {fallback!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if dimensions is not None and dimensions < 1:
        raise ValueError(f"dimensions must be at least 1, got {dimensions}")
    for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout),
                        ("start_timeout", start_timeout), ("stop_timeout", stop_timeout)):
        if not 0 < value < float("inf"):  # inf overflowed the socket's deadline arithmetic
            raise ValueError(f"{name} must be a positive, finite number of seconds, got "
                             f"{value!r}")
    if not 0 <= retry_timeout < float("inf"):
        raise ValueError(f"retry_timeout must be a number of seconds >= 0, got "
                         f"{retry_timeout!r}")
    if (retries is not None and retries < 0) or backoff < 0 or max_backoff < 0:
        raise ValueError("retries, backoff and max_backoff must not be negative")

    env = dict(env or {})
    # Read once, from what a server this client starts would see, and parsed as that
    # server parses them.
    environ = {**os.environ, **env}
    env_dimensions: int | None = _env_setting("dimensions", environ)
    env_backend: str | None = _env_setting("backend", environ)
    # EMBEDSERVE_MODEL may list several models (a tuple, where the server's config reads
    # it so): the first is the server's default.
    model_setting: str | tuple[str, ...] | None = _env_setting("model", environ)
    env_model: str | None = ((model_setting[0] if model_setting else None)
                             if isinstance(model_setting, tuple) else model_setting or None)
    if api_key is None:
        api_key = _env_setting("api_key", environ) or None
    return Options(
        scheme=first.scheme, host=first.host,
        port=port if port is not None else first.port,
        base_path=first.base_path,
        # Several servers are someone else's to run: none is ever started for them.
        autostart=autostart and len(endpoints) == 1, restart=restart,
        backend=backend, model=model, dimensions=dimensions, server_args=tuple(server_args),
        env=env, python=python or sys.executable,
        api_key=api_key,
        encoding_format=encoding_format, batch_size=batch_size, timeout=timeout,
        connect_timeout=connect_timeout, start_timeout=start_timeout,
        stop_timeout=stop_timeout, retry_timeout=retry_timeout, retries=retries,
        backoff=backoff, max_backoff=max_backoff, fallback=fallback,
        env_dimensions=env_dimensions, env_backend=env_backend, env_model=env_model,
        pool=tuple(endpoints) if len(endpoints) > 1 else ())


def _endpoint(url: str, source: str) -> Endpoint:
    if not url or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"{source} must look like http://HOST:PORT, got {url!r}")
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{source} must look like http://HOST:PORT, got {url!r}")
    try:
        url_port = parts.port
    except ValueError as exc:
        raise ValueError(f"{source} {url!r}: {exc}") from None
    if parts.username is not None or parts.query or parts.fragment:
        # None of them would be sent: say so rather than drop them. (The URL is not quoted
        # back: it may hold a password.)
        raise ValueError(f"{source} must be http://HOST:PORT[/PATH], without user info, query "
                         "or fragment (an API key goes in api_key)")
    return Endpoint(parts.scheme, canonical_host(parts.hostname),
                    url_port or (DEFAULT_PORT if parts.scheme == "http" else 443),
                    parts.path.rstrip("/"))


def _env_setting(name: str, environ: Mapping[str, str]) -> Any:
    """EMBEDSERVE_<NAME> from `environ` as the server reads it, or None when unset. A bad
    value is a ValueError naming the variable and the value."""
    variable = env_name(name)
    text = environ.get(variable)
    if text is None:
        return None
    try:
        return parse_option(name, text)
    except ValueError as exc:
        raise ValueError(f"{variable}={text!r}: {exc}") from None
