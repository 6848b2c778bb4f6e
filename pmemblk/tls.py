"""TLS on the stream transport: modes, contexts from a certificates folder, and certificates.

The conventions are nbdkit's. A target serves ``--tls off|on|require`` with
``--tls-certificates DIR`` holding ``server-cert.pem``, ``server-key.pem`` and, for
``--tls-verify-peer``, the ``ca-cert.pem`` its clients' certificates are checked against. A
client (plugin keys ``tls=``, ``tls-certificates=``) checks the target's certificate against
``DIR/ca-cert.pem`` (the system's trust store without a folder) and, when the folder holds
``client-cert.pem`` and ``client-key.pem``, presents that certificate. TLS 1.3 only.

On the wire (docs/protocol.md, "TLS"): a TLS client speaks first with a ClientHello, whose first
byte is 0x16 (a TLS handshake record); a pmemblk HELLO starts with ``PMBK``. A target with
``--tls on`` looks at that first byte without taking it (MSG_PEEK) and speaks TLS or not, as the
client does; ``require`` refuses a plaintext HELLO with a REJECT saying why; ``off`` refuses a
ClientHello (with a plaintext REJECT the client's TLS cannot read: it reports that the target
answered in plaintext). The pmemblk handshake (HELLO, CHALLENGE, AUTH, WELCOME) then runs inside
TLS, unchanged: the shared secret and the certificates are two factors.

``make_certificates`` (``pmemblk tls-certificates DIR --server NAME | --client NAME``) makes a CA
the first time and a certificate signed by it, with the ``cryptography`` library; every file
owner-only, nothing that exists overwritten.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import logging
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from . import files
from .errors import ConfigError, PmemblkError, RemoteError, TransportError

log = logging.getLogger(__name__)

MODES = ("off", "on", "require")
#: The first byte of every TLS connection: a handshake record (the ClientHello).
TLS_HANDSHAKE_BYTE = 0x16
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
#: Validity of what make_certificates makes.
CA_DAYS = 3650
CERT_DAYS = 825
#: Certificate and key files are at most this big (a key or a chain of a few certificates).
MAX_PEM = 1 << 20


def parse_mode(value: str, what: str) -> str:
    if value not in MODES:
        raise ConfigError(f"{what}{value!r}: use off, on or require")
    return value


def _pem(folder: str, name: str, what: str, key: bool = False) -> str:
    """The path of ``name`` in ``folder``: a regular file, and a key readable by its owner
    only (like a secret file)."""
    path = os.path.join(folder, name)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{what} {folder}: {name}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {folder}: {name} is not a regular file")
    if st.st_size > MAX_PEM:
        raise ConfigError(f"{what} {folder}: {name} is larger than {MAX_PEM} bytes")
    if key and st.st_mode & 0o077:
        raise ConfigError(f"{what} {folder}: {name} is accessible by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}): run chmod 600 {path}")
    return path


def _check_folder(folder: str, what: str) -> None:
    if not os.path.isdir(folder):
        raise ConfigError(f"{what} {folder}: not a directory (make one with pmemblk "
                          f"tls-certificates {folder} --server NAME)")


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _load_chain(ctx: ssl.SSLContext, folder: str, cert: str, key: str, what: str) -> None:
    cert_path = _pem(folder, cert, what)
    key_path = _pem(folder, key, what, key=True)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{what} {folder}: {cert} and {key} cannot be used: "
                          f"{_reason(exc)}") from None


def _load_ca(ctx: ssl.SSLContext, folder: str, what: str) -> None:
    try:
        ctx.load_verify_locations(_pem(folder, CA_CERT, what))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{what} {folder}: {CA_CERT} cannot be used: {_reason(exc)}") from None


def server_context(folder: str, verify_peer: bool) -> ssl.SSLContext:
    """The target's context: its certificate and key; with ``verify_peer`` clients must
    present a certificate the folder's CA signed."""
    what = "--tls-certificates"
    _check_folder(folder, what)
    ctx = _base(ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, folder, SERVER_CERT, SERVER_KEY, what)
    if verify_peer:
        _load_ca(ctx, folder, what)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no session resumption: nothing to send after the handshake
    return ctx


def client_context(folder: str | None, check_hostname: bool) -> ssl.SSLContext:
    """The client's context: the target's certificate is checked against ``folder``'s CA
    (the system's trust store without a folder), and its name against the target's host
    (``check_hostname``; not over a Unix socket, which has none); the folder's client
    certificate is presented when it has one."""
    what = "tls-certificates="
    ctx = _base(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if folder is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return ctx
    _check_folder(folder, what)
    _load_ca(ctx, folder, what)
    has_cert = os.path.lexists(os.path.join(folder, CLIENT_CERT))
    has_key = os.path.lexists(os.path.join(folder, CLIENT_KEY))
    if has_cert != has_key:
        raise ConfigError(f"{what} {folder}: has {CLIENT_CERT if has_cert else CLIENT_KEY} "
                          f"but not {CLIENT_KEY if has_cert else CLIENT_CERT}: a client "
                          "certificate needs both")
    if has_cert:
        _load_chain(ctx, folder, CLIENT_CERT, CLIENT_KEY, what)
    return ctx


@dataclass(frozen=True)
class ClientTls:
    """How a client uses TLS: ``mode`` on or require, and its context."""

    mode: str
    context: ssl.SSLContext


def _reason(exc: BaseException) -> str:
    """An ssl error in a few words: OpenSSL's reason (``verify_message`` for a certificate)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def answered_in_plaintext(exc: BaseException) -> bool:
    """Whether a failed client handshake means the target does not speak TLS (it answered
    with something that is not a TLS record, or closed): the case tls=on falls back on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError):
        return True
    return isinstance(exc, ssl.SSLError) and exc.reason in (
        "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
        "UNKNOWN_PROTOCOL", "HTTP_REQUEST")


def ended(exc: OSError) -> str | None:
    """What a TLS error after the handshake says (an alert from the peer), or None."""
    if not isinstance(exc, ssl.SSLError) or not exc.reason:
        return None
    hint = ""
    if exc.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        hint = (f": the target verifies peers (--tls-verify-peer); put {CLIENT_CERT} and "
                f"{CLIENT_KEY} signed by its CA in tls-certificates=")
    return f"{_reason(exc)}{hint}"


def handshake_error(peer: str, exc: BaseException) -> PmemblkError:
    """The error for a client's failed TLS handshake with ``peer``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return RemoteError(f"target {peer} is not the target you configured: its TLS "
                           f"{_reason(exc)} (checked against tls-certificates=)", errno.EACCES)
    if answered_in_plaintext(exc):
        # A TransportError, which a reconnecting client tries again: a target that refuses a
        # connection before reading it (too many handshakes: EBUSY) answers in plaintext too.
        return TransportError(f"target {peer} answered in plaintext, not TLS: it serves with "
                              "--tls off, or refused the connection before reading it (busy) "
                              "(tls=require refuses a target without TLS; serve with --tls "
                              "on or --tls require)")
    if isinstance(exc, ssl.SSLError):
        return RemoteError(f"the TLS handshake with target {peer} failed: {_reason(exc)}",
                           errno.EACCES)
    return TransportError(f"the TLS handshake with target {peer} failed: {_reason(exc)}")


# -- certificates ------------------------------------------------------------------------

def make_certificates(folder: str, server: list[str] | None = None,
                      client: str | None = None, days: int = CERT_DAYS,
                      not_before: datetime.datetime | None = None) -> list[str]:
    """Make ``folder``'s CA if it has none, and a server certificate for the names
    ``server`` (hosts or IP addresses the clients connect to) or a client certificate for
    ``client``, signed by it; the files written. ``not_before``: for tests (an expired
    certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if (server is None) == (client is None):
        raise ConfigError("give --server NAME or --client NAME")
    names = server or [client or ""]
    for name in names:
        if not name or len(name) > 253 or any(c.isspace() or c in "/,\\" for c in name):
            raise ConfigError(f"{name!r} is not a host name, IP address or client name")
    if not 1 <= days <= CA_DAYS:
        raise ConfigError(f"--days {days}: must be from 1 to {CA_DAYS} (the CA's own)")
    kind = "server" if server is not None else "client"
    cert_name, key_name = (SERVER_CERT, SERVER_KEY) if server else (CLIENT_CERT, CLIENT_KEY)
    path = Path(folder)
    if not path.exists():
        try:
            path.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ConfigError(f"cannot make {folder}: {exc.strerror}") from None
    files.check_folder(folder, "certificates folder")
    for name in (cert_name, key_name):
        if os.path.lexists(path / name):
            raise ConfigError(f"{path / name} already exists: not overwriting a {kind} "
                              "certificate (remove it first to make a new one)")
    pem = serialization.Encoding.PEM
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(
        minutes=5)
    written: list[str] = []
    ca_cert_path, ca_key_path = path / CA_CERT, path / CA_KEY
    if ca_cert_path.exists() != ca_key_path.exists():
        raise ConfigError(f"{folder} has {CA_CERT if ca_cert_path.exists() else CA_KEY} but "
                          f"not {CA_KEY if ca_cert_path.exists() else CA_CERT}: cannot sign "
                          "with its CA")
    if ca_cert_path.exists():
        try:
            ca_cert = x509.load_pem_x509_certificate(
                files.read_regular(ca_cert_path, MAX_PEM))
            ca_key = serialization.load_pem_private_key(
                files.read_regular(ca_key_path, MAX_PEM), None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{folder}: its CA cannot be read: {exc}") from None
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{ca_key_path}: not a key made by pmemblk tls-certificates")
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                f"pmemblk CA {os.uname().nodename}"[:64])])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start)
                   .not_valid_after(start + datetime.timedelta(days=CA_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), "CA key")
        _write(ca_cert_path, ca_cert.public_bytes(pem), "CA certificate")
        written += [str(ca_key_path), str(ca_cert_path)]
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(path / key_name, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), f"{kind} key")
    _write(path / cert_name, cert.public_bytes(pem), f"{kind} certificate")
    return [*written, str(path / key_name), str(path / cert_name)]


def _write(path: Path, data: bytes, what: str) -> None:
    files.create_exclusive(str(path), data, 0o600, what)
