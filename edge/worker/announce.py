"""A worker announcing itself on the LAN by mDNS (``_edge._tcp.local.``), so that
``edge discover`` finds it.

Announcing never stops a worker from serving: without zeroconf, without a multicast
route, or when the name is taken, it logs a warning and the worker serves as before. It
registers on a thread of its own (mDNS probes for about 1.7 s before it claims a name)
and says goodbye on shutdown, so browsers drop it at once rather than after the TTL.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading

import edge
from edge.transport.discovery import SERVICE_TYPE, Announcement

__all__ = ["Announcer", "announce", "advertised_addresses", "default_name"]

log = logging.getLogger(__name__)


def default_name() -> str:
    """This machine's host name, its first label only (``pi-1`` of ``pi-1.lan``), in the
    characters a device name may have."""
    host = socket.gethostname().split(".")[0]
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in host).strip("-_")
    return name[:63] or "worker"


def advertised_addresses(host: str) -> tuple[str, ...]:
    """The addresses a worker listening on ``host`` can be reached at.

    A specific address is itself; a wildcard (``0.0.0.0``, ``::``, empty) is every IPv4
    address of this machine's interfaces but loopback (loopback alone when there is
    nothing else), since a browser on another machine cannot use ``0.0.0.0``.
    """
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        import ifaddr

        found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                 if isinstance(ip.ip, str)]
        outside = [a for a in found if not ipaddress.ip_address(a).is_loopback]
        return tuple(outside or ["127.0.0.1"])
    if host == "localhost":
        return ("127.0.0.1",)
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:  # a host name: what it resolves to here
        return tuple(sorted({ai[4][0] for ai in socket.getaddrinfo(host, None, socket.AF_INET)}))


class Announcer:
    """Registers one worker's announcement and withdraws it.

    Args:
        announcement: what to announce.
        listen_host: the host the worker listens on: a specific address announces on
            that interface only, a wildcard on all.
    """

    def __init__(self, announcement: Announcement, listen_host: str):
        self.announcement = announcement
        self.listen_host = listen_host.strip("[]")
        self._zc = None
        self._info = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()  # set once the name is claimed (tests wait on it)

    def start(self) -> None:
        """Register in the background; returns at once."""
        self._thread = threading.Thread(target=self._register, name="mdns-announce",
                                        daemon=True)
        self._thread.start()

    def _register(self) -> None:
        a = self.announcement
        try:
            from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

            wildcard = self.listen_host in ("", "0.0.0.0", "::")
            interfaces = InterfaceChoice.All if wildcard else list(a.addresses)
            v6 = any(ipaddress.ip_address(x).version == 6 for x in a.addresses)
            zc = Zeroconf(interfaces=interfaces,
                          ip_version=IPVersion.All if v6 else IPVersion.V4Only)
            with self._lock:  # now: whatever fails below, _close() closes its sockets
                self._zc = zc
            info = ServiceInfo(SERVICE_TYPE, f"{a.name}.{SERVICE_TYPE}",
                               addresses=[socket.inet_pton(socket.AF_INET6 if ":" in x
                                                           else socket.AF_INET, x)
                                          for x in a.addresses],
                               port=a.port, properties=a.txt(), server=f"{a.name}.local.")
            # Two workers with one name (two on one host, both defaulting to its name):
            # the second becomes "NAME (2)"; its TXT keeps the name it was given.
            zc.register_service(info, allow_name_change=True)
            with self._lock:
                self._info = info
            if info.name != f"{a.name}.{SERVICE_TYPE}":
                log.warning("mDNS: the name %r is taken on this network; announced as %r "
                            "(give each worker its own --name)", a.name,
                            info.name[: -len(SERVICE_TYPE) - 1])
            log.info("mDNS: announced %s at %s port %d (cluster %s)", a.name,
                     ", ".join(a.addresses), a.port, a.cluster)
            self.registered.set()
        except Exception as e:  # noqa: BLE001 - announcing must never stop the worker
            log.warning("mDNS: could not announce this worker (%s: %s); it serves anyway, "
                        "list it in cluster.yaml by hand", type(e).__name__, e)
            self._close()

    def stop(self, timeout: float = 3.0) -> None:
        """Withdraw the announcement (a goodbye packet) and close the sockets."""
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            zc, info = self._zc, self._info
            self._info = None
        if zc is not None and info is not None:
            try:
                zc.unregister_service(info)
            except Exception as e:  # noqa: BLE001 - shutting down: log and go on
                log.warning("mDNS: goodbye failed: %s", e)
        self._close()

    def _close(self) -> None:
        with self._lock:
            zc, self._zc = self._zc, None
        if zc is not None:
            try:
                zc.close()
            except Exception:  # noqa: BLE001
                pass


def announce(listen_host: str, port: int, name: str, profile: str, budget_mb: float,
             cluster: str, tls: bool) -> Announcer | None:
    """Start announcing a worker that serves on ``listen_host:port``; None (and a
    warning) when it cannot be, never an exception.

    Args:
        listen_host: the host of its ``--listen``.
        port: the port it bound.
        name: its device name (``--name``, default :func:`default_name`).
        profile: its device profile.
        budget_mb: its memory budget in MiB (0: unknown).
        cluster: its cluster id (``edge.transport.discovery.cluster_id``).
        tls: whether it serves mutual TLS.
    """
    try:
        a = Announcement(name=name or default_name(), addresses=advertised_addresses(listen_host),
                         port=port, profile=profile, budget_mb=int(budget_mb), cluster=cluster,
                         tls=tls, version=edge.__version__)
    except Exception as e:  # noqa: BLE001 - no ifaddr, a host name that does not resolve
        log.warning("mDNS: could not announce this worker (%s: %s); it serves anyway",
                    type(e).__name__, e)
        return None
    announcer = Announcer(a, listen_host)
    announcer.start()
    return announcer
