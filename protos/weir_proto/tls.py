"""TLS and mutual TLS for both planes' listeners and clients (PEM files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from weir_proto.errors import InvalidArgumentError


def _read(field: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidArgumentError(f"{field}: cannot read {path}: {error}") from error


@dataclass(frozen=True)
class ServerTLS:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read("tls key", self.key), _read("tls cert", self.cert))
        if self.client_ca is None:
            return grpc.ssl_server_credentials([pair])
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read("tls client CA", self.client_ca), require_client_auth=True
        )


@dataclass(frozen=True)
class ClientTLS:
    ca: Path | None = None  # None: the system's roots
    cert: Path | None = None  # with key: a client certificate, for mutual TLS
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read("tls CA", self.ca) if self.ca else None,
            private_key=_read("tls client key", self.key) if self.key else None,
            certificate_chain=_read("tls client cert", self.cert) if self.cert else None,
        )


def server_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTLS | None:
    if cert is None and key is None:
        if client_ca is not None:
            raise InvalidArgumentError("tls_client_ca: mutual TLS needs tls_cert and tls_key as well, got neither")
        return None
    if cert is None or key is None:
        raise InvalidArgumentError("tls_cert and tls_key: expected both or neither, got one")
    return ServerTLS(cert, key, client_ca)
