"""Mutual TLS for every gRPC hop (GRPC_TLS_CERT, GRPC_TLS_KEY, GRPC_TLS_CA): each server
requires a client certificate signed by the CA, and each client presents its own, so only the
suite's own processes (and the health checks given the same material) reach a port."""

from __future__ import annotations

import grpc

from services.kit.config import TlsFiles


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Mutual TLS: present our certificate, require one from every client, signed by the CA."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """The client side of mutual TLS: trust the CA, present our certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
