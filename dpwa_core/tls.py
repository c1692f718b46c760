"""Optional mutual TLS (Python's :mod:`ssl`) for nodes on untrusted networks.

Every node has a certificate and key signed by the cluster's own CA. The server requires a
client certificate signed by that CA, and the client verifies the server's certificate against
it, so only holders of a CA-signed key can connect at all, and the traffic (parameters
included) is encrypted and integrity-protected. Host names are not checked by default: nodes
are usually addressed by IP, and membership is "holds a certificate from the cluster CA";
``check_hostname: true`` additionally requires the server certificate to name the host (or IP,
as a subjectAltName) the config gives for it.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from dpwa_core.errors import ConfigError

__all__ = ["TlsSettings", "client_context", "server_context"]


@dataclass(frozen=True)
class TlsSettings:
    """Paths of this node's certificate, its key and the cluster CA, all PEM.

    Args:
        cert: this node's certificate (may hold the chain up to the CA).
        key: the certificate's private key.
        ca: the cluster CA certificate(s) that peers' certificates must be signed by.
        check_hostname: also require the server's certificate to name its configured host.
    """

    cert: str
    key: str
    ca: str
    check_hostname: bool = False


def _base(settings: TlsSettings, purpose: int, where: str) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for key in ("cert", "key", "ca"):
        path = getattr(settings, key)
        if not os.path.isfile(path):
            raise ConfigError(
                f"{where}: key 'tls.{key}': {path!r} is not a file. Give the path of a PEM file."
            )
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{where}: key 'tls': cannot load certificate {settings.cert!r} with key "
            f"{settings.key!r}: {exc}. Check that both are PEM and that the key matches."
        ) from exc
    try:
        context.load_verify_locations(cafile=settings.ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{where}: key 'tls.ca': cannot load CA certificates from {settings.ca!r}: {exc}."
        ) from exc
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(settings: TlsSettings, where: str = "tls") -> ssl.SSLContext:
    """A server context that requires a client certificate signed by the cluster CA.

    Raises:
        ConfigError: a file is missing or not a usable PEM certificate, key or CA.
    """
    return _base(settings, ssl.PROTOCOL_TLS_SERVER, where)


def client_context(settings: TlsSettings, where: str = "tls") -> ssl.SSLContext:
    """A client context that presents our certificate and verifies the server's.

    Raises:
        ConfigError: a file is missing or not a usable PEM certificate, key or CA.
    """
    context = _base(settings, ssl.PROTOCOL_TLS_CLIENT, where)
    context.check_hostname = settings.check_hostname
    return context
