"""What a route is: one record per path that says which methods it answers and with what,
which dialect shapes its errors, whether it answers without the API key, and how
/openapi.json describes it. routes.py holds this server's records; handler.py dispatches
on them and openapi.py describes them, so the three can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from embedserve.dialects import Dialect
from embedserve.service import EmbeddingService


@dataclass(frozen=True)
class Reply:
    """What a route answers: a JSON-able object, or bytes already in `content_type`."""

    body: Any
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    status: int = 200


class Exchange(Protocol):
    """What an answer may use of the request it answers (dispatch._Exchange is one): the
    route's service and dialect, the body as JSON, and no more of HTTP than that."""

    @property
    def service(self) -> EmbeddingService: ...

    @property
    def dialect(self) -> Dialect: ...

    @property
    def draining(self) -> bool: ...

    @property
    def started(self) -> float:
        """time.monotonic() when the request line arrived."""
        ...

    def admit(self) -> AbstractContextManager[None]:
        """Receive the body, then hold a slot among max_concurrent_requests for the work
        (service.admit: 429 when none is free)."""
        ...

    def read_json(self) -> Any:
        """The request body as JSON; call it inside admit()."""
        ...

    def client_gone(self) -> bool:
        """Whether the client has hung up (asked while its answer is being computed)."""
        ...


Answer = Callable[[Exchange], Reply]


@dataclass(frozen=True)
class Method:
    """One method of a route: the answer, and what /openapi.json says of it."""

    answer: Answer
    summary: str
    # Names of schemas in openapi.py: the JSON body taken (None: no body), and the answer
    # (None: not described beyond its content type, text or a JSON object).
    request: str | None = None
    response: str | None = None
    content_type: str = "application/json"


@dataclass(frozen=True)
class Route:
    path: str
    # The dialect that shapes this route's errors, and the requests of its embedding answer.
    dialect: Dialect
    # Every GET is also a HEAD: the GET's answer without its body (added here).
    methods: Mapping[str, Method]
    # Open routes answer without the API key: health checks from load balancers and
    # orchestrators, which hold no key.
    open: bool = False
    # Whether an unknown path under this route's first segment takes its dialect (see
    # RouteTable.of): /v1/rerank (Cohere's) sits among OpenAI's /v1 routes and leaves
    # their unknown paths to OpenAI's shape.
    claims_segment: bool = True

    def __post_init__(self) -> None:
        methods = dict(self.methods)
        if "GET" in methods:
            methods.setdefault("HEAD", methods["GET"])
        # Read-only, so a route's methods cannot change after the tables are derived.
        object.__setattr__(self, "methods", MappingProxyType(methods))

    @property
    def allowed(self) -> str:
        """The Allow header of a 405 on this route."""
        return ", ".join(sorted(self.methods))


@dataclass(frozen=True)
class RouteTable:
    """Routes by path, and the dialect for paths that are no route (a 404's shape)."""

    routes: Mapping[str, Route]
    default_dialect: Dialect
    by_segment: Mapping[str, Dialect]

    @classmethod
    def of(cls, routes: Iterable[Route], default_dialect: Dialect) -> RouteTable:
        by_path: dict[str, Route] = {}
        for route in routes:
            if route.path in by_path:
                raise ValueError(f"two routes for {route.path}")
            by_path[route.path] = route
        # An unknown path under a known first segment (/v1/..., /api/...) is most likely a
        # client of that segment's API: its 404 comes in that API's shape, so the client
        # can read it. A segment whose routes speak different dialects claims nothing.
        # Dialects are told apart by name: Ollama's legacy one shares Ollama's errors.
        segments: dict[str, dict[str, Dialect]] = {}
        for route in by_path.values():
            if not route.claims_segment:
                continue
            named = segments.setdefault(_first_segment(route.path), {})
            named.setdefault(route.dialect.name, route.dialect)
        by_segment = {segment: next(iter(named.values()))
                      for segment, named in segments.items() if len(named) == 1}
        return cls(MappingProxyType(by_path), default_dialect, MappingProxyType(by_segment))

    def get(self, path: str) -> Route | None:
        return self.routes.get(path)

    @property
    def all_methods(self) -> str:
        """The Allow header for `OPTIONS *`: every method some route answers."""
        return ", ".join(sorted({"OPTIONS"}.union(*(r.methods for r in self.routes.values()))))

    def dialect_for(self, target: str) -> Dialect:
        """The dialect of a request target (path and query): its route's, or for a path
        that is no route, its first segment's."""
        path = target.split("?", 1)[0]
        route = self.routes.get(path)
        if route is not None:
            return route.dialect
        return self.by_segment.get(_first_segment(path), self.default_dialect)

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes.values())


def _first_segment(path: str) -> str:
    return path.split("/", 2)[1] if path.startswith("/") else ""
