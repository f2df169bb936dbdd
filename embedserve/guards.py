"""Who may talk to the server from a browser: the Host check that stops DNS rebinding, and
the Origin check (with CORS answers) that stops other web pages from using a local server.

A web page can make a browser send requests to 127.0.0.1, and a name the attacker controls
can be re-pointed (rebound) at 127.0.0.1 so that the page counts as same-origin and reads
the answers. So a server bound to loopback answers only to Host names that are its own
(IP addresses, localhost) or listed with --allowed-hosts, and any request that a browser
marks with a foreign Origin is refused unless --cors-origins lists that origin.
Clients that are not browsers send no Origin and are not affected.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from embedserve.config import Config

# Request headers a page may send on an allowed cross-origin request (the preflight's
# answer lists them); the response headers it may read besides the CORS-safelisted ones.
ALLOWED_REQUEST_HEADERS = "Authorization, Content-Type"
EXPOSED_HEADERS = ("Retry-After, x-compute-time, x-total-time, x-compute-characters, "
                   "x-compute-tokens")
PREFLIGHT_MAX_AGE = "600"


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Guards:
    check_host: bool
    allowed_hosts: tuple[str, ...]
    cors_origins: tuple[str, ...]

    @classmethod
    def from_config(cls, config: Config) -> Guards:
        hosts = _split(config.allowed_hosts)
        # Bound to a routable address, the server is reached by whatever names point at it
        # (a Kubernetes Service, a load balancer) and requires an API key: Host is checked
        # there only when the operator lists the names.
        return cls(config.loopback_only or bool(hosts), hosts,
                   tuple(origin.rstrip("/") for origin in _split(config.cors_origins)))

    def host_allowed(self, host: str | None) -> bool:
        """`host` is the Host header: a name or address, with an optional :port."""
        if not self.check_host or host is None:  # HTTP/1.0 clients may send none
            return True
        name = _host_name(host.strip(" \t").lower())
        if name is None:
            return False
        if name == "localhost" or name.endswith(".localhost") or _is_ip(name):
            return True
        return any(pattern == "*" or pattern == name or
                   (pattern.startswith("*.") and name.endswith(pattern[1:]))
                   for pattern in self.allowed_hosts)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """A browser's Origin: allowed when listed, or when it is this server itself (a
        page the server served, e.g. an API explorer on the same host and port)."""
        origin = origin.strip().lower().rstrip("/")
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        return host is not None and origin in (f"http://{host.strip().lower()}",
                                               f"https://{host.strip().lower()}")

    def cors_headers(self, origin: str) -> dict[str, str]:
        """For a response to an allowed cross-origin request."""
        return {"Access-Control-Allow-Origin": origin.strip(),
                "Access-Control-Expose-Headers": EXPOSED_HEADERS, "Vary": "Origin"}

    def preflight_headers(self, origin: str, methods: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": origin.strip(),
                "Access-Control-Allow-Methods": methods,
                "Access-Control-Allow-Headers": ALLOWED_REQUEST_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE, "Vary": "Origin"}


def _host_name(host: str) -> str | None:
    """The name or address of a Host header without its port (and a name without the dot
    that may end it: "localhost." is localhost); None when malformed."""
    if host.startswith("["):  # [v6]:port, and only an IPv6 address between the brackets
        end = host.find("]")
        rest = host[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        address = host[1:end]
        return address if ":" in address and _is_ip(address) else None
    name, colon, port = host.rpartition(":")
    if not colon:
        name = host
    elif not _is_port(port):
        return None
    return name.removesuffix(".") if name not in ("", ".") else None


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone takes "¹" and "٣"


def _is_ip(name: str) -> bool:
    # No address is longer than this (an IPv6 one with a zone): a longer name is none, and
    # is not cached (a Host header may be 64 KiB; 256 of them would pin 16 MiB).
    return len(name) <= 64 and _is_short_ip(name)


@functools.lru_cache(maxsize=256)  # checked on every request, nearly always for one name
def _is_short_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_json_media_type(content_type: str | None) -> bool:
    """application/json or application/<x>+json, parameters allowed. The content types a
    page can send cross-site without a CORS preflight (text/plain, forms) are never JSON."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))
