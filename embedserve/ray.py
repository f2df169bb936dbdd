"""embedserve on Ray Serve: the same service -- every route and dialect, the models, the
batcher, the API key and the browser guards -- in Ray Serve replicas, which Serve scales
(a fixed number, or autoscaling on requests in flight) and places (CPUs, GPU fractions).

    serve run embedserve.ray:build_app model=sentence-transformers/all-MiniLM-L6-v2 \\
        num_replicas=2

`build_app(args)` is a Serve application builder: it takes the server's options by their
CLI names (model, backend, served_model_name, api_key, max_batch_texts...; `-` or `_`),
over the EMBEDSERVE_* variables of the process that builds it, plus the deployment's own:
num_replicas, min_replicas / max_replicas / target_ongoing_requests (autoscaling),
max_ongoing_requests, num_cpus and num_gpus (per replica, fractions allowed). Options are
checked there, before anything is deployed. Each replica loads the models once, then
answers through the same Dispatcher as the socket server (dispatch.py): Serve's proxy
frames HTTP, embedserve does the rest. Ray (`pip install 'embedserve[ray]'`) is imported
here only, never by the core.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from embedserve.config import Config, parse_option
from embedserve.dispatch import Dispatcher
from embedserve.service import EmbeddingService

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("embedserve.ray")

# Options of the Serve deployment itself; every other key is one of the server's options.
_DEPLOYMENT_INTS = ("num_replicas", "min_replicas", "max_replicas", "max_ongoing_requests")
_DEPLOYMENT_FLOATS = ("target_ongoing_requests", "num_cpus", "num_gpus")
_SERVER_OPTIONS = {f.name for f in dataclasses.fields(Config)}
# Options that mean nothing inside a replica: Serve's proxy owns the socket and the
# processes. (host stays: it decides the Host check and whether an API key is required.)
_NOT_FOR_SERVE = frozenset({"port", "workers", "backlog", "worker_timeout", "watch_stdin",
                            "keep_alive_timeout", "request_timeout", "max_connections",
                            "graceful_timeout"})


class EmbedServeReplica:
    """One replica: the service, loaded once, answering whatever Serve's proxy hands it.
    A plain class (made a deployment in build_app), so that this module imports without
    Ray, as every module of the package must."""

    def __init__(self, config: Config) -> None:
        logging.basicConfig(level=config.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s[%(process)d]: "
                                   "%(message)s")
        self.config = config
        self.service = EmbeddingService(config)
        # Blocking: Serve routes nothing here until __init__ returns, so a replica takes
        # requests only with its models loaded (a load error fails the deployment).
        self.service.load()
        self.dispatcher = Dispatcher(self.service)
        # The service blocks (the batcher's queue): one thread per request Serve lets in.
        self._threads = ThreadPoolExecutor(max(config.max_concurrent_requests, 1),
                                           thread_name_prefix="embedserve-request")
        log.info("replica pid %d serving %s", os.getpid(),
                 ", ".join(self.service.model_names().listed))

    async def __call__(self, request: Request) -> Response:
        from starlette.responses import Response  # Serve's own dependency

        scope = request.scope
        path = scope.get("path", "/")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # a route_prefix: the app sees paths below it
            path = path[len(root):] or "/"
        query = scope.get("query_string", b"")
        if query:
            path += "?" + query.decode("latin-1")
        headers = [(name.decode("latin-1"), value.decode("latin-1"))
                   for name, value in scope.get("headers", [])]
        body = await request.body()
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(
            self._threads, lambda: self.dispatcher.handle(request.method, path, headers, body))
        return Response(answer.body, status_code=answer.status, headers=answer.headers,
                        media_type=answer.content_type if answer.status != 204 else None)

    def check_health(self) -> None:
        """Serve's health check: a replica whose service is not ready is replaced."""
        if not self.service.ready:
            raise RuntimeError("embedserve: the service is not ready")


def build_app(args: Mapping[str, Any]) -> Any:
    """The Serve application for `args` (see the module docstring). Raises ValueError for
    an unknown option or a bad value."""
    server: dict[str, Any] = {}
    deployment: dict[str, Any] = {}
    for key, value in args.items():
        name = key.replace("-", "_")
        if name in _DEPLOYMENT_INTS or name in _DEPLOYMENT_FLOATS:
            kind = int if name in _DEPLOYMENT_INTS else float
            try:
                deployment[name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} takes a number, got {value!r}") from None
        elif name in _NOT_FOR_SERVE:
            raise ValueError(f"{key} does not apply on Ray Serve (its proxy serves HTTP; "
                             "scale with num_replicas or min_replicas/max_replicas)")
        elif name in _SERVER_OPTIONS:
            server[name] = _server_value(name, value)
        else:
            raise ValueError(f"unknown option {key!r}; options: "
                             f"{', '.join(sorted(_SERVER_OPTIONS - _NOT_FOR_SERVE))}, and "
                             f"for the deployment {', '.join(_DEPLOYMENT_INTS)}, "
                             f"{', '.join(_DEPLOYMENT_FLOATS)}")
    # EMBEDSERVE_* variables of this process, then the options given: the server's rules.
    config = dataclasses.replace(Config.from_args([]), **server)
    from ray import serve  # the `ray` extra; never imported by the core

    app = serve.deployment(name="embedserve")(EmbedServeReplica)
    return app.options(**deployment_options(deployment, config)).bind(config)


def deployment_options(given: Mapping[str, float], config: Config) -> dict[str, Any]:
    """Serve's options for the deployment: a fixed number of replicas (1 unless given), or
    autoscaling when any of its bounds is given."""
    options: dict[str, Any] = {}
    scaling = {name: given[name] for name in ("min_replicas", "max_replicas",
                                              "target_ongoing_requests") if name in given}
    if scaling and "num_replicas" in given:
        raise ValueError("num_replicas is a fixed number of replicas; min_replicas, "
                         "max_replicas and target_ongoing_requests autoscale: give one or "
                         "the other")
    if scaling:
        options["autoscaling_config"] = {
            "min_replicas": int(scaling.get("min_replicas", 1)),
            "max_replicas": int(scaling.get("max_replicas", max(1, int(scaling.get(
                "min_replicas", 1))))),
            "target_ongoing_requests": scaling.get("target_ongoing_requests", 2.0)}
    else:
        options["num_replicas"] = int(given.get("num_replicas", 1))
    # A replica batches what it is given: let it take as many requests as the service
    # admits (beyond that it answers 429 itself), not Serve's default of 5.
    options["max_ongoing_requests"] = int(given.get("max_ongoing_requests",
                                                    config.max_concurrent_requests))
    # Serve logs every request by default, at a cost per request: like the standalone
    # server, only with --access-log (access_log=true).
    options["logging_config"] = {"enable_access_log": config.access_log,
                                 "log_level": config.log_level.upper()}
    actor: dict[str, Any] = {}
    for name in ("num_cpus", "num_gpus"):
        if name in given:
            if given[name] < 0:
                raise ValueError(f"{name} must not be negative, got {given[name]}")
            actor[name] = given[name]
    if actor:
        options["ray_actor_options"] = actor
    return options


def _server_value(name: str, value: Any) -> Any:
    """A server option from `serve run`'s text (parsed as its EMBEDSERVE_* variable is) or,
    from Python, a value of its type already."""
    if isinstance(value, str):
        return parse_option(name, value)
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value)
    return value
