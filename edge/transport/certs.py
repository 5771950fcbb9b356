"""Making a cluster's CA, token and per-machine bundles (``edge certs init | issue``).

Runs on the operator's machine (or in the device lab), never in a worker: it imports
``cryptography``, which a Pi's worker does not need (it reads the PEM files with grpc).
See ``edge.transport.security`` for the trust model.

Layout of the CA folder (default ``~/.config/edge/certs``, env ``EDGE_CERTS``)::

    ca.crt  ca.key (0600)  token (0600)       # edge certs init
    NAME/ca.crt NAME/node.crt NAME/node.key (0600) NAME/token (0600)   # edge certs issue NAME

Keys are ECDSA P-256 (fast to sign on a Pi's Cortex-A53, small handshakes).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.errors import SecurityError
from edge.transport.security import CLUSTER_NAME, ROLE_URI, ROLES, read_token

__all__ = ["init_ca", "issue", "CA_DAYS", "NODE_DAYS"]

CA_DAYS = 3650
NODE_DAYS = 1825
# Boards without a real-time clock (every Raspberry Pi) boot with the time they were shut
# down until NTP answers; a certificate "not yet valid" there would stop the cluster.
BACKDATE = datetime.timedelta(days=30)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DNS_RE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` so that it is never readable by others, not even for a moment."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _private_dir(path: Path) -> None:
    """Make ``path`` readable by its owner only; an existing folder keeps its mode (it may
    be one the user chose, like their home)."""
    if not path.is_dir():
        path.mkdir(parents=True)
        os.chmod(path, 0o700)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_ca(directory: str | Path, *, force: bool = False, days: int = CA_DAYS) -> Path:
    """Make the cluster's CA (``ca.crt``, ``ca.key``) and token in ``directory``.

    Args:
        directory: the CA folder.
        force: replace an existing CA; every bundle issued by the old one stops working.
        days: the CA's validity.

    Returns:
        The folder.

    Raises:
        SecurityError: a CA is there already and ``force`` is not set.
    """
    directory = Path(directory).expanduser()
    if (directory / "ca.key").exists() and not force:
        raise SecurityError(f"{directory} has a CA already; issue bundles from it with "
                            "`edge certs issue NAME`, or pass --force to replace it (every "
                            "bundle it issued then stops working)")
    _private_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge"),
                      x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"{CLUSTER_NAME} CA {secrets.token_hex(4)}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(directory / "ca.key", _pem_key(key))
    _write_private(directory / "ca.crt", _pem_cert(cert), 0o644)
    _write_private(directory / "token", (secrets.token_urlsafe(32) + "\n").encode())
    return directory


def _san(host: str):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.fullmatch(host):
        raise SecurityError(f"--host expects an IP address or a DNS name, got {host!r}")
    return x509.DNSName(host.rstrip("."))


def issue(directory: str | Path, name: str, *, hosts: Iterable[str] = (),
          out: str | Path | None = None, force: bool = False, days: int = NODE_DAYS,
          role: str = "node") -> Path:
    """Sign a key for machine ``name`` and write its bundle (``ca.crt``, ``node.crt``,
    ``node.key``, ``token``) to copy onto it.

    The certificate is valid as server and client, for the DNS names ``name`` and
    :data:`CLUSTER_NAME` (what edge verifies) plus ``hosts``, and carries ``role`` as the
    URI ``edge:role:ROLE`` and as ``OU=ROLE`` in its subject (see
    ``edge.transport.security``).

    Args:
        directory: the CA folder of :func:`init_ca`.
        name: the machine, e.g. ``pi-0`` or ``coordinator``.
        hosts: its IP addresses or DNS names, for tools that check them.
        out: the bundle folder (default ``directory / name``).
        force: replace an existing bundle.
        days: the certificate's validity.
        role: ``node`` (coordinator and workers: may call everything) or ``client`` (may
            call only the coordinator's Infer, status and profile).

    Returns:
        The bundle folder.

    Raises:
        SecurityError: no CA in ``directory``, a bad name, host or role, or the bundle
            exists.
    """
    directory = Path(directory).expanduser()
    bundle = _bundle_folder(directory, name, role, out, force)
    sans = [x509.DNSName(name), x509.DNSName(CLUSTER_NAME)] if name != CLUSTER_NAME \
        else [x509.DNSName(CLUSTER_NAME)]
    sans += [_san(h) for h in hosts] + [x509.UniformResourceIdentifier(ROLE_URI.format(role))]
    sans = list(dict.fromkeys(sans))  # --host NAME repeated
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read the CA in {directory}: {e}") from None
    token = read_token(directory / "token")

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _node_cert(name, role, sans, key, ca_key, ca_cert, days)

    # Written to a fresh folder and swapped in, so a bundle is never half old, half new.
    tmp = bundle.with_name(f".{bundle.name}.new")
    shutil.rmtree(tmp, ignore_errors=True)
    _private_dir(tmp)
    _write_private(tmp / "ca.crt", (directory / "ca.crt").read_bytes(), 0o644)
    _write_private(tmp / "node.crt", _pem_cert(cert), 0o644)
    _write_private(tmp / "node.key", _pem_key(key))
    _write_private(tmp / "token", (token + "\n").encode())
    if bundle.exists():
        shutil.rmtree(bundle)
    os.replace(tmp, bundle)
    return bundle


def _bundle_folder(directory: Path, name: str, role: str, out: str | Path | None,
                   force: bool) -> Path:
    """Where :func:`issue` writes ``name``'s bundle, once the arguments are checked."""
    if role not in ROLES:
        raise SecurityError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    if not _NAME_RE.fullmatch(name):
        raise SecurityError(f"certificate name {name!r}: expected 1-63 of letters, digits, "
                            "'.', '_' and '-', starting with a letter or digit")
    if not (directory / "ca.key").is_file():
        raise SecurityError(f"no CA in {directory}: run `edge certs init --dir {directory}` "
                            "first")
    bundle = Path(out) if out else directory / name
    if bundle.exists() and not bundle.is_dir():
        raise SecurityError(f"{bundle} exists and is not a bundle folder; choose another name")
    if (bundle / "node.crt").exists() and not force:
        raise SecurityError(f"bundle {bundle} exists; pass --force to issue a new key for "
                            f"{name} (the old bundle keeps working until the CA changes)")
    return bundle


def _node_cert(name: str, role: str, sans: list, key, ca_key, ca_cert, days: int):
    """A machine's certificate, signed by the CA: server and client, ``role`` in its
    subject, valid no longer than the CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge"),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + datetime.timedelta(days=days),
                                 ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
