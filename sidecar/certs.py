"""Mesh identities: a CA and one short-lived certificate per service with a SPIFFE URI SAN.

Layout of a certificate directory (what `autoglm certs init|issue` writes and the sidecar reads):

    ca.pem  ca.key                     the mesh CA (keep ca.key off the nodes in production)
    <service>.pem  <service>.key       a service identity: URI SAN spiffe://<td>/ns/<ns>/sa/<service>,
                                       DNS SANs <service> and localhost, IP SAN 127.0.0.1

`CertFiles` watches a service's files and hands out the current bytes, so a rotation (a new file
written in place) is picked up by new handshakes without touching established connections.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "autoglm.local"
DEFAULT_NAMESPACE = "default"
DEFAULT_TTL = dt.timedelta(hours=24)
CA_TTL = dt.timedelta(days=365)


def spiffe_id(service: str, trust_domain: str = DEFAULT_TRUST_DOMAIN, namespace: str = DEFAULT_NAMESPACE) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str = "autoglm mesh CA", ttl: dt.timedelta = CA_TTL,
            now: dt.datetime | None = None) -> KeyPair:
    """A self-signed CA able to sign leaf certificates only (path length 0)."""
    now = now or dt.datetime.now(dt.UTC)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: KeyPair, service: str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
          namespace: str = DEFAULT_NAMESPACE, ttl: dt.timedelta = DEFAULT_TTL,
          now: dt.datetime | None = None) -> KeyPair:
    """A leaf certificate for `service`, valid for both server and client TLS."""
    now = now or dt.datetime.now(dt.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key made by `autoglm certs init`")
    key = _new_key()
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id(service, trust_domain, namespace)),
        x509.DNSName(service), x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + ttl)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_pair(directory: Path, name: str, pair: KeyPair) -> tuple[Path, Path]:
    """Write `<name>.pem` and `<name>.key` (0600) atomically, so a reader never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write_atomic(key_path, pair.key_pem, 0o600)
    _write_atomic(cert_path, pair.cert_pem, 0o644)
    return cert_path, key_path


def read_pair(directory: Path, name: str) -> KeyPair:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    missing = [str(p) for p in (cert_path, key_path) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}; run `autoglm certs init` and "
                                f"`autoglm certs issue {name}`")
    return KeyPair(cert_path.read_bytes(), key_path.read_bytes())


def init_ca(directory: Path, force: bool = False) -> Path:
    """Create the CA in `directory` unless one is there (or `force`)."""
    if (directory / "ca.pem").exists() and not force:
        return directory / "ca.pem"
    cert_path, _ = write_pair(directory, "ca", make_ca())
    return cert_path


def issue_to(directory: Path, service: str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
             namespace: str = DEFAULT_NAMESPACE, ttl: dt.timedelta = DEFAULT_TTL) -> Path:
    ca = read_pair(directory, "ca")
    cert_path, _ = write_pair(directory, service, issue(ca, service, trust_domain=trust_domain,
                                                         namespace=namespace, ttl=ttl))
    return cert_path


@lru_cache(maxsize=256)
def uri_sans(cert_pem: bytes) -> tuple[str, ...]:
    """The URI SANs of a PEM certificate (cached: a connection's peer certificate repeats per call)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def not_valid_after(cert_pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


class CertFiles:
    """The current CA bundle and key pair of one service, re-read when a file changes."""

    def __init__(self, directory: Path, service: str) -> None:
        self.directory = directory
        self.service = service
        self._paths = (directory / "ca.pem", directory / f"{service}.pem", directory / f"{service}.key")
        self._stamp: tuple[float, ...] = ()
        self.ca_pem = b""
        self.pair = KeyPair(b"", b"")
        self.version = 0
        self.refresh()

    def _current_stamp(self) -> tuple[float, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._paths)

    def refresh(self) -> bool:
        """Re-read the files if any changed; True when new material was loaded."""
        try:
            stamp = self._current_stamp()
        except FileNotFoundError:
            if self.version == 0:
                read_pair(self.directory, self.service)  # raises the actionable message
                raise
            return False
        if stamp == self._stamp:
            return False
        ca_pem = self._paths[0].read_bytes()
        pair = read_pair(self.directory, self.service)
        self._stamp, self.ca_pem, self.pair = stamp, ca_pem, pair
        self.version += 1
        return True

    @property
    def identity(self) -> str:
        sans = uri_sans(self.pair.cert_pem)
        return sans[0] if sans else ""
