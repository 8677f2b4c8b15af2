"""
``mtls:`` server endpoints: TLS that also requires a client certificate.

Twisted's ``ssl:`` endpoint string serves TLS but cannot ask clients for a
certificate.  Rather than a cc50-only option, mutual TLS is one more endpoint
type, so it works anywhere an endpoint string does:

    --listen=mtls:9443:privateKey=server.key:certKey=server.pem:caCerts=clients-ca.pem

Clients whose certificate is not signed by a CA in ``caCerts`` fail the
handshake before a single CC50 byte is read.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    prefix = "mtls"

    def parseStreamServer(  # type: ignore[override]
        self,
        reactor: Any,
        port: str,
        privateKey: str,
        certKey: str | None = None,
        caCerts: str | None = None,
        interface: str = "",
        backlog: str = "50",
    ) -> SSL4ServerEndpoint:
        from OpenSSL import crypto
        from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair

        if not caCerts:
            raise ValueError("mtls: endpoints need caCerts=PATH, the CA that signs client certificates")
        certificatePem = _read(certKey or privateKey)
        key = KeyPair.load(_read(privateKey), crypto.FILETYPE_PEM)
        certificate = Certificate.loadPEM(certificatePem)
        authorities = [Certificate.loadPEM(pem).original for pem in _split_pem(_read(caCerts))]
        options = CertificateOptions(
            privateKey=key.original,
            certificate=certificate.original,
            verify=True,
            requireCertificate=True,
            caCerts=authorities,
        )
        return SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)


def _split_pem(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


mutualTLS = MutualTLSServerParser()
