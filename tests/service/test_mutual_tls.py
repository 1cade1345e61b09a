"""Mutual TLS on every gRPC hop (GRPC_TLS_CERT, GRPC_TLS_KEY, GRPC_TLS_CA), with certificates
this test makes: a CA, one certificate for 127.0.0.1/localhost that the processes serve and
call with, and a client certificate for a caller. A caller with a certificate from the CA
gets through the gateway to groups; one without a certificate, or with one from another CA,
is refused before any RPC is served."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from groupchat.gateway.v1 import gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.config import GatewayConfig
from services.gateway.service import build as build_gateway
from services.groups.config import GroupsConfig
from services.groups.service import build as build_groups
from services.kit.config import Env, TlsFiles
from services.kit.healthcheck import is_serving
from tests.service.conftest import ServiceEnv
from tools.suite import health_channel


@dataclass(frozen=True)
class Issued:
    cert: bytes
    key: bytes


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    """A certificate authority of the test's own."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._sign(
            self._name,
            self._key.public_key(),
            [(x509.BasicConstraints(ca=True, path_length=None), True)],
        )

    def _sign(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> bytes:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            extensions.append((x509.SubjectAlternativeName(names), False))
        extensions.append((x509.ExtendedKeyUsage(usages), False))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return Issued(self._sign(subject, key.public_key(), extensions), _pem_key(key))


@dataclass(frozen=True)
class TlsWorld:
    ca: bytes
    gateway_port: int
    groups_port: int
    env: dict[str, str]
    client: Issued
    stranger: Issued  # from another CA


@pytest.fixture
async def tls_world(
    tmp_path: Path, nats_url: str, service_env: ServiceEnv
) -> AsyncIterator[TlsWorld]:
    authority = Authority("groupchat test CA")
    process = authority.issue("groupchat", server=True)
    files = {"GRPC_TLS_CA": authority.cert, "GRPC_TLS_CERT": process.cert}
    files["GRPC_TLS_KEY"] = process.key
    env = {}
    for variable, content in files.items():
        path = tmp_path / f"{variable.lower()}.pem"
        path.write_bytes(content)
        env[variable] = str(path)
    async with AsyncExitStack() as stack:
        groups = build_groups(GroupsConfig.from_env(service_env(nats_url, "groups", **env)))
        await groups.start()
        stack.push_async_callback(groups.stop)
        gateway_env = service_env(
            nats_url, "gateway", GROUPS_ADDRESS=f"127.0.0.1:{groups.port}", **env
        )
        gateway = build_gateway(GatewayConfig.from_env(gateway_env))
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        yield TlsWorld(
            authority.cert,
            gateway.port,
            groups.port,
            env,
            authority.issue("a caller", server=False),
            Authority("another CA").issue("a stranger", server=False),
        )


def channel(world: TlsWorld, port: int, client: Issued | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=world.ca,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def create_group(world: TlsWorld, client: Issued | None, token: Callable[..., str]) -> None:
    async with channel(world, world.gateway_port, client) as ch:
        await gateway_pb2_grpc.GatewayStub(ch).CreateGroup(
            pb.CreateGroupRequest(name="Behind TLS", category=pb.FOOD),
            metadata=(("authorization", f"Bearer {token('alice')}"),),
            timeout=5,
        )


async def test_a_caller_with_a_certificate_of_the_ca_gets_through_to_groups(
    tls_world: TlsWorld, token: Callable[..., str]
) -> None:
    await create_group(tls_world, tls_world.client, token)  # gateway -> groups over mTLS


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
async def test_a_caller_without_a_certificate_of_the_ca_is_refused(
    tls_world: TlsWorld, token: Callable[..., str], who: str
) -> None:
    client = None if who == "no certificate" else tls_world.stranger
    for port in (tls_world.gateway_port, tls_world.groups_port):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with channel(tls_world, port, client) as ch:
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        await create_group(tls_world, client, token)


async def test_a_plaintext_caller_is_refused(tls_world: TlsWorld) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_world.groups_port}") as ch:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_suites_health_checks_use_the_same_material(tls_world: TlsWorld) -> None:
    tls = TlsFiles.from_env(Env(tls_world.env))

    def check() -> int:  # tools.suite's blocking client, off the servers' event loop
        with health_channel(f"127.0.0.1:{tls_world.groups_port}", tls) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status

    assert await asyncio.to_thread(check) == health_pb2.HealthCheckResponse.SERVING


async def test_the_pods_own_probe_speaks_the_same_material(tls_world: TlsWorld) -> None:
    """What deploy's mutual-TLS component probes with, as the kubelet's gRPC probe cannot."""
    tls = TlsFiles.from_env(Env(tls_world.env))
    for service in ("", "liveness"):
        assert await is_serving(tls_world.groups_port, service, tls, "localhost")
    assert not await is_serving(tls_world.groups_port, "", None, "localhost")
