"""Service registry: built-ins by name (loaded lazily), user services by ``module:attr``.

Each built-in lives in its own module and exposes ``SERVICE``; listing them
imports only the table below, not the modules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import ServiceError
from ..service import Service


@dataclass(frozen=True, slots=True)
class BuiltinInfo:
    name: str
    module: str
    description: str
    port: int | None


BUILTINS: dict[str, BuiltinInfo] = {
    info.name: info
    for info in (
        BuiltinInfo(
            "timestamp",
            "sockserve.services.timestamp",
            "replies [<ctime>] <message> to every message (the textbook example)",
            21567,
        ),
        # The classic inetd services (RFCs 862-868), one module each.
        BuiltinInfo(
            "echo",
            "sockserve.services.echo",
            "RFC 862: sends back every byte (TCP until the client closes; UDP the datagram)",
            7,
        ),
        BuiltinInfo(
            "discard",
            "sockserve.services.discard",
            "RFC 863: reads and drops everything, never replies",
            9,
        ),
        BuiltinInfo(
            "daytime",
            "sockserve.services.daytime",
            "RFC 867: one line with the ctime-style local date, then closes",
            13,
        ),
        BuiltinInfo(
            "qotd",
            "sockserve.services.qotd",
            "RFC 865: one short quotation, then closes (--quotes FILE for your own)",
            17,
        ),
        BuiltinInfo(
            "chargen",
            "sockserve.services.chargen",
            "RFC 864: streams the 72-column printable ASCII pattern until the client closes",
            19,
        ),
        BuiltinInfo(
            "time",
            "sockserve.services.time",
            "RFC 868: 4 bytes, big-endian seconds since 1900, then closes",
            37,
        ),
    )
}

DEFAULT_SERVICE = "timestamp"


def builtin(name: str, **parts: Any) -> Service:
    """The built-in ``name`` as a :class:`Service` made of ``parts`` (handler, stream...).

    Its description and port come from :data:`BUILTINS`, so each is written once: the
    table lists services without importing them, the modules build them from it.
    """
    info = BUILTINS[name]
    return Service(name=name, description=info.description, port=info.port, **parts)


def register_builtin(info: BuiltinInfo) -> None:
    """Add a built-in to the registry (used by the built-in service modules' table)."""
    BUILTINS[info.name] = info


def load_service(spec: str) -> Service:
    """Resolve a built-in name or a ``module:attr`` import string to a :class:`Service`.

    A plain callable becomes a request/reply service named after the spec; a
    :class:`Service` is taken as it is. Raises :class:`ServiceError` naming what failed.
    """
    if spec in BUILTINS:
        module = importlib.import_module(BUILTINS[spec].module)
        service = module.SERVICE
        assert isinstance(service, Service)
        return service
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        known = ", ".join(sorted(BUILTINS))
        raise ServiceError(
            f"unknown service {spec!r}: not a built-in ({known}) and not a module:function string"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ServiceError(
            f"cannot import module {module_name!r} for service {spec!r}: {exc}"
        ) from exc
    except Exception as exc:  # the user's module raised while importing
        raise ServiceError(
            f"importing {module_name!r} for service {spec!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ServiceError(f"module {module_name!r} has no attribute {attr!r}") from None
    return as_service(obj, spec)


def as_service(obj: object, name: str) -> Service:
    """Wrap a handler callable (or take a :class:`Service`) as a service."""
    if isinstance(obj, Service):
        return obj
    if not callable(obj):
        raise ServiceError(f"{name!r} is {type(obj).__name__}, not a callable handler or Service")
    return Service(name=name, handler=obj)
