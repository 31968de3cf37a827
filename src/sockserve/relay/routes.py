"""Toxiproxy's routes: a request's method and path to what the proxies do, and its answer.

The HTTP is :mod:`.api`'s (h11); this is Toxiproxy 2.12.0's ``api.go`` table: each path's
methods, and each route's status and JSON body.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import unquote

import h11

from .proxies import ApiError, Proxies, decode

#: The Toxiproxy release whose API this one is (routes, bodies, ``/version``).
TOXIPROXY_VERSION = "2.12.0"

#: Each path's methods, ``{}`` standing for a name (a path not here is 404, a method 405).
ROUTES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("reset",): ("POST",),
    ("populate",): ("POST",),
    ("version",): ("GET",),
    ("proxies",): ("GET", "POST"),
    ("proxies", "{}"): ("GET", "POST", "PATCH", "DELETE"),
    ("proxies", "{}", "toxics"): ("GET", "POST"),
    ("proxies", "{}", "toxics", "{}"): ("GET", "POST", "PATCH", "DELETE"),
}


class Raw(NamedTuple):
    """A body sent as it is, not as JSON (``/version``, the 403 of a browser)."""

    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"


def parse_path(target: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A request target to its decoded segments and its shape in :data:`ROUTES`."""
    path = target.decode("ascii", "replace").split("?", 1)[0]
    parts = tuple(unquote(p) for p in path.split("/")[1:]) if path.startswith("/") else ()
    if len(parts) >= 2 and parts[0] == "proxies":
        return parts, tuple("{}" if i in (1, 3) else p for i, p in enumerate(parts))
    return parts, parts


async def route(proxies: Proxies, request: h11.Request, body: bytes) -> tuple[int, Any]:
    """One request to its status and payload: JSON, :class:`Raw`, or ``None`` (no body)."""
    if dict(request.headers).get(b"user-agent", b"").startswith(b"Mozilla/"):
        return 403, Raw(b"User agent not allowed\n")
    method = request.method.decode("ascii", "replace")
    parts, shape = parse_path(request.target)
    allowed = ROUTES.get(shape)
    if allowed is None:
        raise ApiError(f"not found: {request.target.decode('ascii', 'replace')}", 404)
    if method not in allowed:
        raise ApiError(f"method {method} not allowed here: use {', '.join(allowed)}", 405)
    match parts, method:
        case ("version",), _:
            version = b'{"version": "%s"}\n' % TOXIPROXY_VERSION.encode()
            return 200, Raw(version, b"application/json;charset=utf-8")
        case ("reset",), _:
            await proxies.reset()
            return 204, None
        case ("populate",), _:
            done, error = await proxies.populate(decode(body))
            payload = {**(error.to_json() if error else {}), "proxies": [p.to_json() for p in done]}
            return (error.status if error else 201), payload
        case ("proxies",), "GET":
            return 200, proxies.to_json()
        case ("proxies",), _:
            return 201, (await proxies.create(decode(body))).to_json()
        case ("proxies", name), "GET":
            return 200, proxies.get(name).to_json()
        case ("proxies", name), "DELETE":
            await proxies.remove(name)
            return 204, None
        case ("proxies", name), _:
            return 200, (await proxies.update(name, decode(body))).to_json()
        case ("proxies", name, _), "GET":
            return 200, proxies.get(name).toxics_json()
        case ("proxies", name, _), _:
            return 200, proxies.add_toxic(name, decode(body)).to_json()
        case ("proxies", name, _, toxic), "GET":
            return 200, proxies.get_toxic(name, toxic).to_json()
        case ("proxies", name, _, toxic), "DELETE":
            proxies.remove_toxic(name, toxic)
            return 204, None
        case ("proxies", name, _, toxic), _:
            return 200, proxies.update_toxic(name, toxic, decode(body)).to_json()
    raise AssertionError(f"{method} {parts} is in ROUTES but not routed")
