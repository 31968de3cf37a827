"""Server-side TLS contexts for tls:// endpoints (optionally requiring client certificates)."""

from __future__ import annotations

import ssl

from ..errors import ConfigError


def server_context(cert: str | None, key: str | None, client_ca: str | None) -> ssl.SSLContext:
    if not cert:
        raise ConfigError(
            "tls:// endpoints need --tls-cert (and --tls-key unless the cert holds it)"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert!r} / key {key!r}: {exc}") from None
    if client_ca:
        try:
            ctx.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS client CA {client_ca!r}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
