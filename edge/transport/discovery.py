"""Finding workers on the LAN by mDNS / DNS-SD (zeroconf), and what they announce.

A worker announces ``<name>._edge._tcp.local.`` with its address, port and a TXT record
(:class:`Announcement`); ``edge discover`` browses for them (:func:`browse`). Both halves
agree on the TXT keys here. An announcement is a hint for people and for writing a
cluster.yaml, not a credential: anyone on the LAN can announce anything, and mutual TLS
under the cluster CA is what decides whom a coordinator talks to.

The cluster id lets one LAN hold several clusters: a short hash of the cluster CA's
certificate (:func:`cluster_id`), the same on every machine that holds a bundle of that
CA, so ``edge discover --certs BUNDLE`` lists that cluster's workers only. Without
certificates it is ``--cluster-id`` or ``default``.

zeroconf is imported inside the functions that use it: importing this module costs
nothing, and the rest of edge runs without it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import ssl
import threading
import time
from dataclasses import dataclass, field

from edge.errors import ConfigError
from edge.transport.codec import PROTOCOL_VERSION
from edge.transport.security import Security

__all__ = ["SERVICE_TYPE", "DEFAULT_CLUSTER", "Announcement", "cluster_id", "check_cluster_id",
           "check_name", "browse", "local_networks"]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_edge._tcp.local."
DEFAULT_CLUSTER = "default"
# A DNS-SD instance name is one label (at most 63 bytes); a dot would start another.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class Announcement:
    """What one worker says about itself.

    Attributes:
        name: the device's name (default the host name), the DNS-SD instance name and the
            ``name`` a written cluster.yaml gives it.
        addresses: IP addresses it serves on.
        port: its gRPC port.
        profile: its device profile (``unknown`` when started without ``--device``).
        budget_mb: MiB it may use (0: unknown).
        proto: the wire protocol version it speaks (``codec.PROTOCOL_VERSION``).
        cluster: its cluster id (see :func:`cluster_id`).
        tls: whether it serves mutual TLS.
        version: the edge version it runs.
    """

    name: str
    addresses: tuple[str, ...]
    port: int
    profile: str = "unknown"
    budget_mb: int = 0
    proto: int = PROTOCOL_VERSION
    cluster: str = DEFAULT_CLUSTER
    tls: bool = False
    version: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def txt(self) -> dict[str, str]:
        """The TXT record's keys and values."""
        return {"name": self.name, "profile": self.profile, "budget_mb": str(self.budget_mb),
                "proto": str(self.proto), "cluster": self.cluster, "tls": "1" if self.tls else "0",
                "version": self.version}

    @classmethod
    def from_txt(cls, txt: dict[str, str | None], addresses: tuple[str, ...], port: int,
                 instance: str) -> "Announcement":
        """Read a TXT record; a missing or malformed number reads as 0 (a worker of
        another version, or something else on ``_edge._tcp``), never an exception."""
        def number(key: str) -> int:
            try:
                return int(float(txt.get(key) or 0))
            except (ValueError, OverflowError):  # "lots", "inf"
                return 0
        known = {"name", "profile", "budget_mb", "proto", "cluster", "tls", "version"}
        return cls(name=txt.get("name") or instance, addresses=addresses, port=port,
                   profile=txt.get("profile") or "unknown", budget_mb=number("budget_mb"),
                   proto=number("proto"), cluster=txt.get("cluster") or DEFAULT_CLUSTER,
                   tls=txt.get("tls") == "1", version=txt.get("version") or "",
                   extra={k: v for k, v in txt.items() if k not in known})

    def best_address(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
                     | None = None) -> str:
        """The ``host:port`` to reach it at: an address on one of ``networks`` (this
        machine's), else the first that is not loopback, else the first."""
        ips = [ipaddress.ip_address(a) for a in self.addresses]
        on_link = [ip for ip in ips for net in networks or () if ip in net and not ip.is_loopback]
        others = [ip for ip in ips if not ip.is_loopback]
        ip = (on_link or others or ips)[0]
        return f"[{ip}]:{self.port}" if ip.version == 6 else f"{ip}:{self.port}"


def check_name(name: str, what: str = "--name") -> str:
    """A device name fit for a DNS-SD instance and a cluster.yaml: letters, digits, ``-``
    and ``_``, at most 63 characters.

    Raises:
        ConfigError: naming what was expected and what came.
    """
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{what}: expected a name of letters, digits, '-' and '_' (at most "
                          f"63, no dots), got {name!r}")
    return name


def check_cluster_id(text: str, what: str = "--cluster-id") -> str:
    """A cluster id: letters, digits, ``-``, ``_`` and ``.``, at most 63 characters."""
    if not _CLUSTER_RE.fullmatch(text):
        raise ConfigError(f"{what}: expected letters, digits, '-', '_' or '.' (at most 63), "
                          f"got {text!r}")
    return text


def cluster_id(security: Security | None = None, explicit: str | None = None) -> str:
    """The cluster id a worker announces and ``edge discover`` filters on.

    ``explicit`` (``--cluster-id``) if given; else, with certificates, the first 12 hex
    digits of the sha256 of the CA certificate (DER): every bundle of one CA gives the same
    id, and it changes when the CA is replaced; else ``default``.

    Args:
        security: the process's security (its CA, when it has one).
        explicit: an id given on the command line.
    """
    if explicit:
        return check_cluster_id(explicit)
    if security is not None and security.ca:
        pem = security.ca.decode("ascii", "replace")
        try:
            der = ssl.PEM_cert_to_DER_cert(pem)
        except ValueError:
            der = security.ca  # not PEM: grpc will refuse it anyway; the id stays stable
        return hashlib.sha256(der).hexdigest()[:12]
    return DEFAULT_CLUSTER


def local_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks this machine has an address on (through ifaddr, zeroconf's own
    dependency); empty when it cannot tell."""
    try:
        import ifaddr
    except ImportError:
        return []
    nets = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            host = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                nets.append(ipaddress.ip_network(f"{host}/{ip.network_prefix}", strict=False))
            except ValueError:
                continue
    return nets


def browse(timeout: float = 3.0, cluster: str | None = None) -> list[Announcement]:
    """The workers that answer on the LAN within ``timeout`` seconds, sorted by name.

    Browses ``_edge._tcp.local.`` on every interface (IPv4), then resolves each instance.
    Workers that said goodbye meanwhile are left out.

    Args:
        timeout: seconds to listen; mDNS answers come within about a second, late ones
            from busy boards or Wi-Fi later.
        cluster: keep only workers of this cluster id (None: all).

    Raises:
        ConfigError: zeroconf is not installed, or no socket for mDNS could be opened.
    """
    zc, IPVersion, ServiceBrowser = _zeroconf()
    try:
        conf = zc(ip_version=IPVersion.V4Only)
    except OSError as e:
        raise ConfigError(f"cannot open an mDNS socket (UDP 5353, multicast 224.0.0.251): {e}")
    names: dict[str, bool] = {}
    lock = threading.Lock()

    class _Listener:
        def add_service(self, _zc, _type, name):
            with lock:
                names[name] = True

        update_service = add_service

        def remove_service(self, _zc, _type, name):
            with lock:
                names[name] = False

    found: list[Announcement] = []
    try:
        browser = ServiceBrowser(conf, SERVICE_TYPE, _Listener())
        time.sleep(timeout)
        browser.cancel()
        with lock:
            live = [n for n, alive in names.items() if alive]
        for name in live:
            info = conf.get_service_info(SERVICE_TYPE, name, timeout=1500)
            # No address: nothing to reach it at (and best_address needs one).
            if info is None or not info.port or not info.parsed_addresses():
                log.info("mDNS: %s did not resolve; left out", name)
                continue
            txt = {k.decode("utf-8", "replace"): (v.decode("utf-8", "replace") if v is not None
                                                   else None)
                   for k, v in (info.properties or {}).items()}
            instance = name[: -len(SERVICE_TYPE) - 1] if name.endswith(SERVICE_TYPE) else name
            found.append(Announcement.from_txt(txt, tuple(info.parsed_addresses()), info.port,
                                               instance))
    finally:
        conf.close()
    if cluster is not None:
        found = [a for a in found if a.cluster == cluster]
    return sorted(found, key=lambda a: (_natural(a.name), a.addresses, a.port))


def _natural(name: str) -> list:
    """Sort key: ``pi-2`` before ``pi-10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _zeroconf():
    try:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf
    except ImportError:
        raise ConfigError("discovery needs the zeroconf package: pip install zeroconf") from None
    return Zeroconf, IPVersion, ServiceBrowser
