"""The one configuration object: CLI flag > EMBEDSERVE_* environment variable > default.

Each option is declared once, as a dataclass field whose metadata carries its help text;
the argparse parser and the environment lookup are both generated from those fields, so a
new option cannot drift out of sync with its flag, its env var or the README table.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from embedserve import __version__
from embedserve.contracts import env_name

BACKENDS = ("auto", "sentence-transformers", "transformers", "hash")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DEFAULT_PORT = 8765


def _option(default: Any, help: str, *, choices: Sequence[str] | None = None,
            minimum: float | None = None, maximum: float | None = None,
            separator: str = ",") -> Any:
    """A field and its flag. A tuple default makes a flag that may be given several times;
    its variable then holds the values joined by `separator`."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum,
                                            "maximum": maximum, "separator": separator})


@dataclass(frozen=True)
class Config:
    host: str = _option("127.0.0.1", "address to bind")
    port: int = _option(DEFAULT_PORT, "port to bind; 0 picks a free one (printed when ready)",
                        minimum=0, maximum=65535)
    backend: str = _option("auto", "embedding backend; auto picks the best one installed",
                           choices=BACKENDS)
    model: tuple[str, ...] = _option(
        (), "a model to serve: Hugging Face id, local folder, or 'hash' for the hash tier; "
            "give it several times to serve several (the first answers requests that name "
            "none; default: sentence-transformers/all-MiniLM-L6-v2 on the ML backends)")
    served_model_name: tuple[str, ...] = _option(
        (), "comma-separated names clients may use for a model (responses carry the first), "
            "e.g. text-embedding-3-small; given several times, paired with the --model "
            "flags by position (env: one model's names after another's, split by ';'); "
            "a model's own names stay accepted", separator=";")
    preload: bool = _option(
        True, "load every model at start (/health is 200 once all are ready); with "
              "--no-preload a model loads on its first request")
    model_idle_timeout: float = _option(
        0.0, "unload an ML model unused this many seconds, giving its memory back "
             "(0: never)", minimum=0.0)
    max_loaded_models: int = _option(
        0, "most ML models loaded at once; loading one more unloads the least recently "
           "used (0: no limit)", minimum=0)
    device: str = _option("auto", f"where the ML backends run: {DEVICES}")
    fp32: bool = _option(False, "keep float32 on CUDA (default there: float16)")
    trust_remote_code: bool = _option(
        False, "let a model run code from its repository (nomic-embed models need it)")
    default_prompt_name: str = _option(
        "", "prompt applied when a request names none (one of the model's prompts)")
    max_batch_tokens: int = _option(
        16384, "ML tiers: most tokens (longest text x texts) in one forward pass", minimum=1)
    max_batch_texts: int = _option(32, "ML tiers: most texts in one forward pass", minimum=1)
    batch_wait_ms: float = _option(
        0.0, "ML tiers: after the model was idle, wait this long for more requests before "
        "its next forward pass", minimum=0.0)
    max_queue: int = _option(
        4096, "ML tiers: texts waiting for the model; more are answered 429", minimum=1)
    dimensions: int = _option(384, "vector size of the hash backend", minimum=1,
                              maximum=65536)
    api_key: str = _option("", "require this Bearer token on every route but /health")
    api_key_file: str = _option(
        "", "read --api-key from this file instead (a mounted secret, e.g. "
            "/run/secrets/embedserve_api_key; surrounding whitespace is dropped)")
    allowed_hosts: str = _option(
        "", "comma-separated host names accepted in the Host header besides IP addresses "
            "and localhost ('*.example.com' matches subdomains, '*' any); checked when "
            "bound to a loopback address, or whenever set (DNS-rebinding protection)")
    cors_origins: str = _option(
        "", "comma-separated origins whose web pages may call this server "
            "(e.g. http://localhost:3000; '*' for any); other cross-origin browser "
            "requests are refused")
    allow_insecure: bool = _option(
        False, "allow binding a non-loopback address without --api-key")
    log_level: str = _option("info", "logging level", choices=LOG_LEVELS)
    access_log: bool = _option(False, "log every request (through logging, at INFO)")
    max_body_bytes: int = _option(8 * 1024 * 1024, "largest request body accepted (413 beyond)",
                                  minimum=1)
    max_batch_size: int = _option(2048, "most inputs in one request (413 beyond)", minimum=1)
    max_rerank_documents: int = _option(
        1000, "most documents in one rerank request, and sentences in one /similarity "
              "request (413 beyond)", minimum=1)
    max_concurrent_requests: int = _option(
        64, "embedding requests served at once; more are answered 429", minimum=1)
    max_connections: int = _option(512, "open client connections; more are answered 503",
                                   minimum=1)
    backlog: int = _option(1024, "listen backlog: connections the kernel queues", minimum=1,
                           maximum=65535)
    workers: int = _option(1, "worker processes sharing the socket", minimum=1)
    worker_timeout: float = _option(
        30.0, "seconds without a heartbeat before a worker is killed and replaced",
        minimum=0.5)
    graceful_timeout: float = _option(
        30.0, "seconds in-flight requests get to finish at shutdown", minimum=0.0)
    watch_stdin: bool = _option(
        False, "stop gracefully when stdin closes (embedserve.Client sets it for a server "
               "it starts, so the server stops even if that client is killed)")
    keep_alive_timeout: float = _option(
        15.0, "seconds an idle keep-alive connection is kept open", minimum=0.001)
    request_timeout: float = _option(
        30.0, "seconds a client may take to send one request", minimum=0.001)

    def __post_init__(self) -> None:
        if self.api_key_file:
            # Read once, here: the workers get the key itself, and a missing or empty file
            # is a start-up error, never a server without its key.
            if self.api_key:
                raise ValueError("give the API key once: --api-key or --api-key-file")
            object.__setattr__(self, "api_key", _read_secret(self.api_key_file))
            # Done with the file: a copy made with dataclasses.replace keeps the key.
            object.__setattr__(self, "api_key_file", "")
        if self.host.replace(".", "").isdigit():  # not a name: an address, or nothing
            try:
                ipaddress.IPv4Address(self.host)
            except ValueError:
                raise ValueError(f"host {self.host!r} is not an IPv4 address") from None
        if not (self.loopback_only or self.api_key or self.allow_insecure):
            raise ValueError(f"refusing to serve on {self.host} without an API key: anyone "
                             "who can reach it could use it. Set --api-key (or "
                             "EMBEDSERVE_API_KEY), or pass --allow-insecure")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device must be {DEVICES}; got {self.device!r}")
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    @property
    def model_id(self) -> str:
        """The one model a backend loads from this config ('' for its default): the
        registry hands each backend a config naming its model alone."""
        return self.model[0] if self.model else ""

    def for_model(self, spec: str) -> Config:
        return dataclasses.replace(self, model=(spec,) if spec else (),
                                   served_model_name=())

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Config:
        environ = os.environ if environ is None else environ
        parser = build_parser(environ)
        namespace = parser.parse_args(argv)
        values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if isinstance(_OPTIONS[name].default, tuple):
                # Flags given replace the variable's values; none given: the variable's.
                values[name] = tuple(value) if value is not None else _tuple_default(
                    name, environ)
        try:
            return cls(**values)
        except ValueError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


def _read_secret(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API key file {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if not secret:
        raise ValueError(f"the API key file {path} is empty")
    return secret


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _check(option: dataclasses.Field[Any], value: Any) -> None:
    if isinstance(option.default, tuple) and not (
            isinstance(value, tuple) and all(isinstance(item, str) for item in value)):
        # Config(model="x") would read as the models "x"[0]...: say so instead.
        raise ValueError(f"{option.name} takes a tuple of strings (one per model); "
                         f"got {value!r}")
    meta = option.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{option.name} must be one of {', '.join(meta['choices'])}; "
                         f"got {value!r}")
    if isinstance(value, float) and math.isnan(value):  # passes every bound below
        raise ValueError(f"{option.name} must be a number; got nan")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ValueError(f"{option.name} must be at least {meta['minimum']}; got {value!r}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise ValueError(f"{option.name} must be at most {meta['maximum']}; got {value!r}")


def parse_option(name: str, text: str) -> Any:
    """An option's value from text, as its EMBEDSERVE_* variable gives it: the field's
    type, choices and minimum. The server and the clients read variables through this,
    so a bad value is the same error everywhere, never a silent default."""
    option = _OPTIONS[name]
    kind: Any = type(option.default)
    if kind is tuple:
        return tuple(item.strip() for item in text.split(option.metadata["separator"])
                     if item.strip())
    value = (_parse_bool if kind is bool else kind)(text)
    _check(option, value)
    return value


def _tuple_default(name: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    env = env_name(name)
    default: tuple[str, ...] = _OPTIONS[name].default  # type: ignore[assignment]
    return tuple(parse_option(name, environ[env])) if env in environ else default


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedserve",
        description="Serve text embeddings over HTTP (OpenAI, TEI and Ollama APIs). "
                    f"Backends (--backend): {', '.join(BACKENDS)}; auto picks the best one "
                    "installed (sentence-transformers, then transformers, then hash). "
                    f"Log levels (--log-level): {', '.join(LOG_LEVELS)}.",
        # The client-side commands are parsed in commands.py, not here: name them so that
        # `embedserve --help` is where a user finds them.
        epilog="Every option can also be set with an environment variable: "
               "--max-body-bytes is EMBEDSERVE_MAX_BODY_BYTES. Flags win over variables. "
               "Client commands, each with its own --help: "
               "`embedserve embed TEXT...` prints embeddings (starts a server if none "
               "answers, and stops it after); `embedserve info` prints the server's /info "
               "(starts one the same way); `embedserve health` only probes: exit 0 when a "
               "server answers ready, 1 otherwise, and it never starts one.")
    parser.add_argument("--version", action="version", version=f"embedserve {__version__}")
    for f in dataclasses.fields(Config):
        flag = flag_of(f.name)
        kind: Any = type(f.default)
        env = env_name(f.name)
        default = f.default
        if env in environ:
            try:
                default = parse_option(f.name, environ[env])
            except ValueError as exc:
                parser.error(f"{env}={environ[env]!r}: {exc}")
        help_text = f"{f.metadata['help']} (env {env}; default: %(default)s)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif kind is tuple:  # given several times; from_args falls back to the variable
            parser.add_argument(flag, action="append", default=None, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} (env {env})")
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text,
                                choices=f.metadata["choices"], metavar=f.name.upper())
    return parser


def flag_of(name: str) -> str:
    """The command-line flag of the option `name` (a BooleanOptionalAction's also takes
    "--no-"; argparse takes a unique prefix of any flag)."""
    return "--" + name.replace("_", "-")


_OPTIONS = {f.name: f for f in dataclasses.fields(Config)}
# Every flag `python -m embedserve` takes (a client reads server_args as the server would).
FLAGS = frozenset(["--help", "--version"] + [
    flag for f in dataclasses.fields(Config)
    for flag in ([flag_of(f.name), "--no-" + flag_of(f.name)[2:]] if type(f.default) is bool
                 else [flag_of(f.name)])])
