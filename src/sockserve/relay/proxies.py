"""Named proxies, Toxiproxy's model: ``name``, ``listen``, ``upstream``, ``enabled`` and
the live toxics of each, over :class:`~sockserve.relay.runner.Relay`.

:class:`Proxies` is what the HTTP API (:mod:`.api`) drives, and a Python API of its own.
It follows Toxiproxy 2.12's ``proxy.go``/``proxy_collection.go`` where a client can tell:

- a disabled proxy has no listener and no connections; enabling binds the port it had
  again; its toxics stay; ``reset`` enables every proxy and removes every toxic;
- ``populate`` keeps a proxy whose listen and upstream are unchanged, replaces the others;
- addresses are ``HOST:PORT`` (TCP). Beyond Toxiproxy, ``listen`` and ``upstream`` may
  be sockserve URLs (``udp://``, ``unix://``, ``tls://``...). ``exec:`` upstreams are
  refused here: the API has no authentication, and a request must not run a program.

Error handling: every failure is an :class:`ApiError` with Toxiproxy's status (400 bad
body or address, 404 unknown name, 409 duplicate, 500 cannot bind) and a message.
Resource handling: :meth:`Proxies.close` stops every relay; changes are serialized.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError, EndpointError, SockserveError
from .runner import Relay
from .target import Target, parse_target
from .toxics import DuplicateToxic, Toxic, ToxicError, ToxicSet


class ApiError(SockserveError):
    """A request Toxiproxy would refuse, with its status: its body is ``{"error", "status"}``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


def bad_body(reason: str) -> ApiError:
    """Toxiproxy's ``ErrBadRequestBody`` joined to the reason (``bad request body: ...``)."""
    return ApiError(f"bad request body: {reason}", 400)


def decode(body: bytes) -> Any:
    """The JSON of a request body, or 400 naming what is wrong with it."""
    if not body.strip():
        raise bad_body("empty body; expected JSON")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad_body(f"malformed JSON: {exc}") from None


def _field(body: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:  # as Go's decoder: null leaves the field as it was
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad_body(f"{key!r} must be a {'boolean' if kind is bool else 'string'}")
    return value


def listen_endpoint(listen: str) -> Endpoint:
    """Toxiproxy's ``HOST:PORT`` (``:PORT`` and ``""`` for every address), or a sockserve URL."""
    if not listen:
        text = "tcp://127.0.0.1:0"  # Go would take every address: loopback is the safe reading
    elif "://" in listen:
        text = listen
    else:
        host, sep, port = listen.rpartition(":")
        if not sep:
            raise ApiError(f"listen {listen!r}: missing port; expected HOST:PORT", 400)
        if host in ("", "[::]"):
            host = "*"  # Go's ":PORT": every IPv4 and IPv6 address
        text = f"tcp://{host}:{port}"
    try:
        return parse_endpoint(text)
    except EndpointError as exc:
        raise ApiError(f"listen {listen!r}: {exc}", 400) from None


def format_listen(endpoint: Endpoint) -> str:
    """As Go's ``Addr().String()`` for TCP (``127.0.0.1:8474``, ``[::1]:8474``); URLs otherwise."""
    if endpoint.scheme != "tcp":
        return endpoint.url()
    host = "::" if endpoint.is_dualstack else endpoint.host
    return f"[{host}]:{endpoint.port}" if ":" in host else f"{host}:{endpoint.port}"


#: Builds the relay of a proxy being enabled: ``(listen, target, toxics) -> Relay``.
Remake = Callable[[Endpoint, Target, ToxicSet], Relay]


class Proxy:
    """One named proxy: a :class:`Relay` while enabled, none while disabled; the toxics stay."""

    def __init__(
        self,
        name: str,
        listen: str,
        upstream: str | Target,
        remake: Remake,
        toxics: ToxicSet | None = None,
    ) -> None:
        """``upstream`` as a :class:`Target` is trusted (``exec:`` allowed): it came from
        the command line, not from a request."""
        if isinstance(upstream, Target):
            self.upstream, self._target = str(upstream), upstream
            upstream = self.upstream
        self.name = name
        self.toxics = ToxicSet() if toxics is None else toxics
        self.move(listen, upstream)
        self.remake = remake
        self.relay: Relay | None = None

    def check(self, listen: str, upstream: str) -> tuple[Endpoint, Target]:
        """The addresses parsed, or 400: bad, one stream and one datagram, or toxics unfit."""
        if upstream == getattr(self, "upstream", None):
            target = self._target
        else:
            target = parse_target_checked(upstream)
        endpoint = listen_endpoint(listen)
        if endpoint.is_stream != target.is_stream:
            raise ApiError(
                f"listen {listen!r} and upstream {upstream!r}: one is a stream endpoint and "
                "the other a datagram one (tcp/unix/tls go to tcp/unix/tls, udp to udp)",
                400,
            )
        transport = "stream" if endpoint.is_stream else "datagram"
        for toxic in self.toxics:  # UDP's drop is not for TCP, TCP's slicer not for UDP
            if transport not in toxic.transports:
                raise ApiError(f"toxic {toxic.name!r} ({toxic.type}) is not for {listen}", 400)
        return endpoint, target

    def move(self, listen: str, upstream: str) -> None:
        """New addresses (400 if they are bad, changing nothing), used from the next start."""
        self.endpoint, self._target = self.check(listen, upstream)
        self.toxics.restrict("stream" if self.endpoint.is_stream else "datagram")
        self.upstream = upstream
        self.asked = listen  # as the client wrote it, for :meth:`same_place`
        self.listen = format_listen(self.endpoint)

    @property
    def enabled(self) -> bool:
        return self.relay is not None

    def to_json(self) -> dict[str, Any]:
        """Toxiproxy's proxy JSON: the toxics upstream first, each in the order added."""
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": self.toxics_json(),
        }

    def toxics_json(self) -> list[dict[str, Any]]:
        chains = self.toxics.chain("upstream") + self.toxics.chain("downstream")
        return [t.to_json() for t in chains]

    async def start(self) -> None:
        """Bind and serve; 500 (as Toxiproxy's ``net.Listen`` error) if it cannot bind."""
        if self.relay is not None:
            return
        try:
            relay = self.remake(self.endpoint, self._target, self.toxics)
            await relay.start()
        except (OSError, SockserveError) as exc:
            raise ApiError(f"proxy {self.name!r} listen {self.listen}: {exc}", 500) from None
        self.relay = relay
        bound = relay.endpoints[0]
        # Later starts bind the same port, as Toxiproxy keeps the address it got.
        self.endpoint = bound
        self.listen = format_listen(bound)

    async def stop(self) -> None:
        """Close the listener and every connection it relays (Toxiproxy's ``stop``)."""
        relay, self.relay = self.relay, None
        if relay is not None:
            await relay.stop()

    def same_place(self, listen: str, upstream: str) -> bool:
        """Toxiproxy's ``Differs``, negated: the same upstream and the same listen address."""
        if upstream != self.upstream:
            return False
        wanted = listen_endpoint(listen)
        if wanted.is_inet and wanted.port == 0:  # any port: Go's "127.0.0.1:0" differs too
            return wanted == self.endpoint
        return listen == self.asked or wanted == self.endpoint  # a hostname as first given


def parse_target_checked(upstream: str) -> Target:
    """The relay's TARGET for an upstream; 400 for a bad one or an ``exec:`` command."""
    if upstream.startswith("exec:"):
        raise ApiError(
            f"upstream {upstream!r}: exec: targets are not allowed over the API "
            "(it has no authentication); use `sockserve relay LISTEN exec:...`",
            400,
        )
    try:
        return parse_target(upstream)
    except (EndpointError, ConfigError) as exc:
        raise ApiError(f"upstream {upstream!r}: {exc}", 400) from None


def _like(relay: Relay) -> Remake:
    """Relays as ``relay`` is: its limits, TLS, PROXY header and origin settings."""
    link = relay.link
    origin = dataclasses.asdict(link.origin)

    def remake(listen: Endpoint, target: Target, toxics: ToxicSet) -> Relay:
        config = relay.config
        return Relay(
            listen, target, toxics=toxics, config=config, send_proxy=link.send_proxy, **origin
        )

    return remake


def _proxy_fields(body: Any, where: str = "") -> tuple[str, str, str, bool | None]:
    if not isinstance(body, dict):
        raise bad_body(f"expected a JSON object{where}")
    name = _field(body, "name", str, "")
    upstream = _field(body, "upstream", str, "")
    if not name:
        raise ApiError(f"missing required field: name{where}", 400)
    if not upstream:
        raise ApiError(f"missing required field: upstream{where}", 400)
    return name, _field(body, "listen", str, ""), upstream, _field(body, "enabled", bool, None)


class Proxies:
    """The proxies of one API server, by name. ``settings`` go to every :class:`Relay`."""

    def __init__(self, **settings: Any) -> None:
        self._proxies: dict[str, Proxy] = {}
        self.lock = asyncio.Lock()  # bound to a loop only when first waited on

        def remake(listen: Endpoint, target: Target, toxics: ToxicSet) -> Relay:
            return Relay(listen, target, toxics=toxics, **settings)

        self.remake = remake

    def __iter__(self) -> Iterator[Proxy]:
        return iter(list(self._proxies.values()))

    def get(self, name: str) -> Proxy:
        proxy = self._proxies.get(name)
        if proxy is None:
            raise ApiError("proxy not found", 404)
        return proxy

    def to_json(self) -> dict[str, Any]:
        return {p.name: p.to_json() for p in self}

    async def add(self, name: str, listen: str, upstream: str, *, enabled: bool = True) -> Proxy:
        """A new proxy, started unless ``enabled`` is false; 409 if the name is taken."""
        async with self.lock:
            return await self._add(name, listen, upstream, enabled)

    async def _add(self, name: str, listen: str, upstream: str, enabled: bool) -> Proxy:
        if name in self._proxies:
            raise ApiError("proxy already exists", 409)
        proxy = Proxy(name, listen, upstream, self.remake)
        if enabled:
            await proxy.start()
        self._proxies[name] = proxy
        return proxy

    def adopt(self, name: str, relay: Relay, remake: Remake | None = None) -> Proxy:
        """A relay started elsewhere (the command line's ``LISTEN TARGET``), shown and driven
        by the API under ``name``. ``remake`` builds its replacement when the API enables
        or moves it (a relay runs once); by default one with that relay's own settings."""
        if name in self._proxies:
            raise ApiError("proxy already exists", 409)
        bound = relay.endpoints[0] if relay.endpoints else relay.listen
        proxy = Proxy(name, bound.url(), relay.target, remake or _like(relay), relay.toxics)
        proxy.relay = relay
        self._proxies[name] = proxy
        return proxy

    async def create(self, body: Any) -> Proxy:
        """``POST /proxies``: ``{name, upstream, listen, enabled}`` (enabled by default)."""
        name, listen, upstream, enabled = _proxy_fields(body)
        return await self.add(name, listen, upstream, enabled=enabled is not False)

    async def update(self, name: str, body: Any) -> Proxy:
        """``POST``/``PATCH /proxies/{name}``: fields absent keep their value; a new
        listen or upstream restarts the proxy there, ``enabled`` starts or stops it."""
        async with self.lock:
            proxy = self.get(name)
            if not isinstance(body, dict):
                raise bad_body("expected a JSON object")
            listen = _field(body, "listen", str, proxy.listen)
            upstream = _field(body, "upstream", str, proxy.upstream)
            enabled = _field(body, "enabled", bool, proxy.enabled)
            if not proxy.same_place(listen, upstream):
                proxy.check(listen, upstream)  # a bad body stops nothing
                await proxy.stop()
                proxy.move(listen, upstream)
            if enabled:
                await proxy.start()
            else:
                await proxy.stop()
            return proxy

    async def remove(self, name: str) -> None:
        """``DELETE /proxies/{name}``: stopped, then forgotten."""
        async with self.lock:
            proxy = self.get(name)
            await proxy.stop()
            del self._proxies[name]

    async def populate(self, body: Any) -> tuple[list[Proxy], ApiError | None]:
        """``POST /populate``: every entry checked first, then each added or replaced.

        Returns the proxies and the error that stopped it, if any (Toxiproxy answers
        with both: the error's status and the proxies made before it).
        """
        if not isinstance(body, list):
            raise bad_body("expected a JSON array of proxies")
        wanted = [_proxy_fields(item, f" at proxy {i + 1}") for i, item in enumerate(body)]
        done: list[Proxy] = []
        async with self.lock:
            for name, listen, upstream, enabled in wanted:
                try:
                    done.append(await self._replace(name, listen, upstream, enabled))
                except ApiError as exc:
                    return done, exc
        return done, None

    async def _replace(self, name: str, listen: str, upstream: str, enabled: bool | None) -> Proxy:
        existing = self._proxies.get(name)
        if existing is not None:
            if existing.same_place(listen, upstream):
                return existing
            await existing.stop()
            del self._proxies[name]
        return await self._add(name, listen, upstream, enabled is not False)

    async def reset(self) -> None:
        """``POST /reset``: every proxy enabled, every toxic removed."""
        async with self.lock:
            for proxy in self:
                await proxy.start()
                proxy.toxics.clear()

    def add_toxic(self, name: str, body: Any) -> Toxic:
        """``POST /proxies/{name}/toxics``: 400 bad toxic, 409 if its name is taken."""
        proxy = self.get(name)
        if not isinstance(body, dict):
            raise bad_body("expected a JSON object")
        try:
            toxic = Toxic.from_json(body)
            proxy.toxics.add(toxic)  # raises if it does not suit the proxy's transport
        except ToxicError as exc:
            raise ApiError(str(exc), 400) from None
        except DuplicateToxic:
            raise ApiError("toxic already exists", 409) from None
        return toxic

    def get_toxic(self, name: str, toxic: str) -> Toxic:
        found = self.get(name).toxics.get(toxic)
        if found is None:
            raise ApiError("toxic not found", 404)
        return found

    def update_toxic(self, name: str, toxic: str, body: Any) -> Toxic:
        """``POST``/``PATCH .../toxics/{toxic}``: new attributes or toxicity, kept otherwise."""
        toxics = self.get(name).toxics
        self.get_toxic(name, toxic)  # 404 before any 400, as Toxiproxy
        try:
            return toxics.update(toxic, body)
        except ToxicError as exc:
            raise ApiError(str(exc), 400) from None
        except KeyError:
            raise ApiError("toxic not found", 404) from None

    def remove_toxic(self, name: str, toxic: str) -> None:
        toxics = self.get(name).toxics
        try:
            toxics.remove(toxic)
        except KeyError:
            raise ApiError("toxic not found", 404) from None

    async def close(self) -> None:
        """Stop every relay (the API server is going away); the proxies are forgotten."""
        async with self.lock:
            for proxy in self:
                await proxy.stop()
            self._proxies.clear()
