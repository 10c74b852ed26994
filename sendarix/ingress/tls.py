"""TLS material: the development self-signed certificate, server context options
(TLS 1.2 or newer, forward-secret AEAD cipher suites only), and
:obj:`ReloadableServerTLS`, whose certificate is replaced on SIGHUP without dropping
sessions."""

from __future__ import annotations

import datetime
import fcntl
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from zope.interface import implementer

_MIN_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}

#: TLS 1.2 cipher suites offered by our listeners: forward secrecy (ECDHE/DHE) and
#: AEAD (AES-GCM, ChaCha20-Poly1305) only; no CBC, RSA key exchange, RC4 or 3DES.
#: (TLS 1.3 suites are all AEAD and are not affected by this list.)
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def make_self_signed(hostname: str, cert_path: str, key_path: str) -> None:
    """Write a self-signed certificate for ``hostname`` (and 127.0.0.1) and its key.

    Files are written atomically; the key is readable by its owner only.
    """
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=397))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(os.path.abspath(cert_path)), exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_certificate(
    cert_path: str | None, key_path: str | None, var_dir: str, hostname: str
) -> tuple[str, str]:
    """The certificate and key paths to use, generating a self-signed pair under
    ``var_dir`` on first start when the configuration names none."""
    if cert_path and key_path:
        return cert_path, key_path
    folder = os.path.join(var_dir, "tls")
    cert = os.path.join(folder, "selfsigned.crt")
    key = os.path.join(folder, "selfsigned.key")
    if os.path.exists(cert) and os.path.exists(key):
        return cert, key
    os.makedirs(folder, exist_ok=True)
    # Worker processes start together: one makes the pair while the others wait,
    # then find it (two writing at once could leave one's key beside the other's
    # certificate).
    lock = os.open(os.path.join(folder, ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.exists(cert) and os.path.exists(key)):
            make_self_signed(hostname, cert, key)
    finally:
        os.close(lock)
    return cert, key


def server_tls_options(
    cert_path: str, key_path: str, min_version: str = "1.2"
) -> CertificateOptions:
    """Server-side TLS options: the certificate chain, TLS ``min_version`` or newer."""
    with open(cert_path, "rb") as f:
        pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    certs = [
        crypto.load_certificate(crypto.FILETYPE_PEM, block)
        for block in _pem_blocks(pem, b"CERTIFICATE")
    ]
    if not certs:
        raise ValueError(f"{cert_path}: no certificate found")
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    return CertificateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=_MIN_VERSIONS[min_version],
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS),
    )


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ReloadableServerTLS:
    """Server TLS options read from certificate and key files, re-read by ``reload()``.

    Each new handshake (STARTTLS or implicit TLS) uses the options current at that
    moment; sessions already established keep the certificate they started with.  A
    reload that fails (missing or mismatched files) raises and keeps the old options.
    """

    def __init__(self, cert_path: str, key_path: str, min_version: str = "1.2") -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.min_version = min_version
        self._options = server_tls_options(cert_path, key_path, min_version)

    @property
    def options(self) -> CertificateOptions:
        """The current options."""
        return self._options

    def reload(self) -> None:
        """Read the certificate and key files again."""
        options = server_tls_options(self.cert_path, self.key_path, self.min_version)
        options.getContext()  # a key that does not match the certificate fails here
        self._options = options

    def getContext(self) -> Any:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self._options.serverConnectionForTLS(tlsProtocol)


def _pem_blocks(data: bytes, kind: bytes) -> list[bytes]:
    begin = b"-----BEGIN " + kind + b"-----"
    end = b"-----END " + kind + b"-----"
    out: list[bytes] = []
    pos = 0
    while True:
        start = data.find(begin, pos)
        if start < 0:
            return out
        stop = data.find(end, start)
        if stop < 0:
            return out
        out.append(data[start : stop + len(end)] + b"\n")
        pos = stop + len(end)


def connection_tls_info(transport: object) -> tuple[str, str] | None:
    """(protocol version, cipher name) of a TLS transport, or None when not TLS."""
    handle = getattr(transport, "getHandle", None)
    conn = None
    if handle is not None:
        try:
            conn = handle()
        except Exception:  # noqa: BLE001 - not every transport has a handle
            conn = None
    # Twisted wraps the socket; the OpenSSL Connection is reachable either directly
    # or through the TLS protocol wrapper.
    for candidate in (conn, getattr(transport, "_tlsConnection", None)):
        if candidate is not None and hasattr(candidate, "get_cipher_name"):
            version = candidate.get_protocol_version_name()
            cipher = candidate.get_cipher_name()
            if version and cipher:
                return str(version), str(cipher)
    return None
