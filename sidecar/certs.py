"""Mesh identities: a CA and one short-lived certificate per service with a SPIFFE URI SAN.

Layout of a certificate directory (what `autoglm certs init|issue` writes and the sidecar reads):

    ca.pem  ca.key                     the mesh CA (keep ca.key off the nodes in production)
    <service>.pem  <service>.key       a service identity: URI SAN spiffe://<td>/ns/<ns>/sa/<service>,
                                       DNS SANs <service> and localhost, IP SAN 127.0.0.1
    <service>.bundle.pem  <service>.sds.yaml   the same pair for Envoy, read through file-based SDS

`CertFiles` watches a service's files and hands out the current bytes, so a rotation (a new file
renamed into place) is picked up by new handshakes without touching established connections. A key and
certificate that do not belong together (read between the two renames of a renewal) are not loaded: the
previous pair stays in force until the next check.

Renewal: a leaf certificate is due for renewal once less than a third of its lifetime is left
(`renewal_due`); `renew_due` reissues those from the CA in the same directory. `autoglm up` runs that
while the mesh runs, so certificates never expire under a running mesh.

Private keys are written to a file created with mode 0600 (`tempfile.mkstemp`), then renamed into place:
there is never a moment when the key bytes sit in a file others may read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import tempfile
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
    """Write `data` to a new file created with mode 0600 (whatever the umask), set `mode` before any byte
    is written, then rename it over `path`: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def write_pair(directory: Path, name: str, pair: KeyPair) -> tuple[Path, Path]:
    """Write `<name>.pem` and `<name>.key` (0600) atomically, so a reader never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write_atomic(key_path, pair.key_pem, 0o600)
    _write_atomic(cert_path, pair.cert_pem, 0o644)
    return cert_path, key_path


def sds_path(directory: Path, service: str) -> Path:
    return directory / f"{service}.sds.yaml"


def bundle_path(directory: Path, service: str) -> Path:
    return directory / f"{service}.bundle.pem"


def write_sds(directory: Path, service: str, pair: KeyPair | None = None) -> Path:
    """For Envoy: `<service>.bundle.pem` (certificate then key, 0600, replaced by one rename, so Envoy never
    reads a key and certificate that do not belong together) and `<service>.sds.yaml`, the file-based SDS
    resource naming it, with the directory as the watched one: Envoy reloads the pair when a renewal renames
    the bundle into place."""
    if pair is None:
        pair = read_pair(directory, service)
    bundle = bundle_path(directory, service)
    if not bundle.exists() or bundle.read_bytes() != pair.cert_pem + pair.key_pem:
        _write_atomic(bundle, pair.cert_pem + pair.key_pem, 0o600)
    base = directory.resolve()
    name = json.dumps(str(base / bundle.name))
    text = (
        "# Envoy file-based SDS: this service's certificate; reloaded when a file in the directory is renamed.\n"
        "resources:\n"
        '- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n'
        f"  name: {json.dumps(service)}\n"
        "  tls_certificate:\n"
        f"    certificate_chain: {{filename: {name}}}\n"
        f"    private_key: {{filename: {name}}}\n"
        f"    watched_directory: {{path: {json.dumps(str(base))}}}\n"
    )
    path = sds_path(directory, service)
    if not path.exists() or path.read_text() != text:
        _write_atomic(path, text.encode(), 0o644)
    return path


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
    pair = issue(ca, service, trust_domain=trust_domain, namespace=namespace, ttl=ttl)
    write_sds(directory, service, pair)
    cert_path, _ = write_pair(directory, service, pair)
    return cert_path


def renewal_due(cert_pem: bytes, lifetime: dt.timedelta, now: dt.datetime | None = None) -> bool:
    """True once less than a third of `lifetime` is left before the certificate expires."""
    now = now or dt.datetime.now(dt.UTC)
    return not_valid_after(cert_pem) - now <= lifetime / 3


def renew_due(directory: Path, services: tuple[str, ...] | list[str], lifetime: dt.timedelta, *,
              trust_domain: str = DEFAULT_TRUST_DOMAIN, namespace: str = DEFAULT_NAMESPACE,
              now: dt.datetime | None = None) -> list[str]:
    """Issue a new certificate (and key) for every service whose certificate is missing or due; returns them."""
    renewed = []
    for service in services:
        pem = directory / f"{service}.pem"
        if not pem.exists() or renewal_due(pem.read_bytes(), lifetime, now):
            issue_to(directory, service, trust_domain=trust_domain, namespace=namespace, ttl=lifetime)
            renewed.append(service)
    return renewed


def next_renewal(directory: Path, services: tuple[str, ...] | list[str], lifetime: dt.timedelta) -> dt.datetime:
    """When the first of `services`' certificates becomes due (now when one is missing)."""
    due = []
    for service in services:
        pem = directory / f"{service}.pem"
        if not pem.exists():
            return dt.datetime.now(dt.UTC)
        due.append(not_valid_after(pem.read_bytes()) - lifetime / 3)
    return min(due)


def pair_matches(pair: KeyPair) -> bool:
    """Does the private key belong to the certificate?"""
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki))


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
        if not pair_matches(pair):
            if self.version == 0:
                raise ValueError(f"{self._paths[2]} is not the key of {self._paths[1]}; reissue it with "
                                 f"`autoglm certs issue {self.service}`")
            return False  # caught between the renames of a renewal: the next check loads the pair
        self._stamp, self.ca_pem, self.pair = stamp, ca_pem, pair
        self.version += 1
        return True

    @property
    def identity(self) -> str:
        sans = uri_sans(self.pair.cert_pem)
        return sans[0] if sans else ""
