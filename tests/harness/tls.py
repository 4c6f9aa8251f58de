"""A throwaway certificate authority for the secure harness servers, made with ``cryptography``.

One CA per server set; server certificates carry ``IP:127.0.0.1`` and ``DNS:localhost`` as
subject alternative names because every client (librdkafka, the JVM's own controller client,
urllib3) verifies the host name against them. Keys are unencrypted PEM files (0600) in the run
directory: they live as long as the servers and protect nothing but a loopback test.
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=2)


@dataclass(frozen=True)
class Issued:
    """One key pair and its certificate, written as PEM files."""

    name: str
    key_path: Path
    cert_path: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def pkcs12(self, path: Path, password: str, ca: x509.Certificate) -> Path:
        """The key, certificate and CA as a PKCS12 keystore (what Kafka's JVM reads).

        PBES2/AES-256 with SHA-256 MAC: every JDK from 11.0.12/17 on reads it.
        """
        encryption = (serialization.PrivateFormat.PKCS12.encryption_builder()
                      .kdf_rounds(20_000)
                      .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
                      .hmac_hash(hashes.SHA256())
                      .build(password.encode()))
        data = pkcs12.serialize_key_and_certificates(self.name.encode(), self.key, self.cert,
                                                     [ca], encryption)
        _write_private(path, data)
        return path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "logpipe harness"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestCA:
    """A CA whose certificate is ``ca.crt`` in ``directory``; ``issue()`` makes leaf certs."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, directory: Path, name: str = "logpipe harness CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.dir / "ca.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.cert_path.chmod(0o644)

    def issue(self, name: str, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
              ) -> Issued:
        """A certificate for servers and clients alike (mutual TLS on Kafka's controller
        listener uses the same one in both roles), CN = ``name``."""
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_path = self.dir / f"{name}.key"
        cert_path = self.dir / f"{name}.crt"
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(name, key_path, cert_path, key, cert)


class HttpsServer:
    """A threaded HTTPS server on a free loopback port serving ``handler`` (the stubs of HTTP
    APIs the role tests run tasks against); ``close()`` stops it."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], cert_path: Path,
                 key_path: Path) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
