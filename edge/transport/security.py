"""How edge's connections are secured: mutual TLS under a private cluster CA, plus a
cluster token checked on every call.

Trust model
-----------
A cluster has one private certificate authority, made by ``edge certs init`` on the
operator's machine (its key never leaves that machine). ``edge certs issue NAME`` signs a
key for one machine and writes a bundle: ``ca.crt``, ``node.crt``, ``node.key`` and the
cluster ``token``. Every process of the cluster (coordinator, workers, clients) runs with
its own bundle, and every connection is mutual TLS:

* the server presents its certificate and requires one from the client (workers forward
  activations to the next worker, so workers are clients too: every certificate carries
  both serverAuth and clientAuth);
* identity is "signed by this cluster's CA". Workers are addressed by LAN IPs that change
  with DHCP, so edge does not tie a certificate to an address: every certificate carries
  the DNS name :data:`CLUSTER_NAME` and clients verify the server against that name
  (``grpc.ssl_target_name_override``). The ``--host`` names of ``edge certs issue`` are
  added too, for tools that verify addresses;
* on top, each call carries ``authorization: Bearer TOKEN``, compared in constant time by a
  server interceptor on every service but health (``grpc.health.v1.Health`` tells only
  SERVING or not, and Kubernetes' probes cannot send a token; with mutual TLS they still
  need a client certificate); a missing or wrong token is UNAUTHENTICATED, and the
  refused request is not read. The token is a second factor that also works where TLS is off
  (``--insecure --token-file``), and rotating it locks out old bundles without a new CA.

Roles: every certificate says what its holder is, ``node`` (the coordinator and workers)
or ``client`` (people and programs that send requests: ``edge infer``, ``edge profile
--coordinator``, ``InferClient``), as the URI ``edge:role:ROLE`` in its subject alternative
names (and ``OU=ROLE`` in its subject, for people). Servers read it from the peer's
verified certificate (gRPC's ``peer_uri``) on every call: a client may call only the
coordinator's client-facing RPCs (:data:`CLIENT_METHODS`) and, as a direct client, a
worker's Forward and Subscribe, which the worker narrows to sending requests to the first
stage and hearing its own results at the last (never the coordinator's event stream, which
carries every request's results); a node may call everything. Anything else a client calls
(Configure, uploads) is PERMISSION_DENIED, naming the role it needs. A certificate without
a role (issued before roles existed) counts as a node, as it was trusted before. Roles need
TLS: with ``--insecure --token-file`` there are no certificates, and the token alone grants
all.

There is no revocation list: a lost device's bundle is trusted until the CA is replaced
(``edge certs init --force``, then re-issue every bundle).

Plaintext is allowed on loopback only; elsewhere it needs an explicit ``insecure=True``
(``--insecure``), checked in one place, :meth:`Security.require_safe`.

This module must stay light: the worker imports it on a Pi, so it uses ``grpc`` and the
standard library only; making keys (``cryptography``) lives in ``edge.transport.certs``.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
import os
import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import grpc
import grpc.aio

from edge.errors import SecurityError
from edge.address import AddressError, parse_address

__all__ = ["Security", "CLUSTER_NAME", "TOKEN_HEADER", "BUNDLE_FILES", "OPEN_SERVICES",
           "ROLES", "ROLE_URI", "CLIENT_METHODS", "RoleCheck", "peer_role", "is_loopback",
           "default_certs_dir", "read_token", "TokenCheck", "token_entry", "token_interceptor",
           "add_arguments", "from_arguments", "AioInterceptor"]

log = logging.getLogger(__name__)

# The DNS name in every certificate of a cluster; clients verify servers against it.
CLUSTER_NAME = "edge-cluster"
TOKEN_HEADER = "authorization"
BUNDLE_FILES = ("ca.crt", "node.crt", "node.key", "token")
# What a certificate's holder may do (see the module docstring), written into it as the
# URI ROLE_URI.format(role) by `edge certs issue --role`.
ROLES = ("client", "node")
ROLE_URI = "edge:role:{}"
# All a client-role certificate may call: what `edge infer`, `edge profile --coordinator`
# and InferClient (infer, status, profile) use; and health, open to all. A direct client
# (DirectClient) also reads the route, sends to the first stage and hears its results at
# the last: the worker allows a client-role caller only that (worker/server.py).
CLIENT_METHODS = frozenset({"/edge.v1.Coordinator/Infer", "/edge.v1.Coordinator/Generate",
                            "/edge.v1.Coordinator/GetClusterStatus",
                            "/edge.v1.Coordinator/GetClusterProfile",
                            "/edge.v1.Coordinator/WatchRoute",
                            "/edge.v1.Worker/Forward", "/edge.v1.Worker/Subscribe"})
_TOKEN_RE = re.compile(r"[\x21-\x7e]{16,512}")  # printable ASCII, no spaces: a metadata value


def default_certs_dir() -> Path:
    """Where ``edge certs`` keeps the CA and bundles: ``$EDGE_CERTS`` or
    ``~/.config/edge/certs``."""
    return Path(os.environ.get("EDGE_CERTS") or Path.home() / ".config" / "edge" / "certs")


def is_loopback(address: str) -> bool:
    """True if ``host:port`` (or a ``unix:`` socket) names this machine only."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    try:
        host = parse_address(address, allow_port_zero=True)[0].strip("[]")
    except AddressError:
        host = address  # no port: a bare host name or IP address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace ignored).

    Raises:
        SecurityError: unreadable, or not 16-512 printable ASCII characters without spaces.
    """
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"cannot read the cluster token from {path}: {e}") from None
    if not _TOKEN_RE.fullmatch(token):
        raise SecurityError(f"{path}: expected a token of 16-512 printable ASCII characters "
                            f"without spaces, got {len(token)} characters that are not; "
                            "`edge certs init` makes one")
    return token


def _read_pem(path: Path, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read {path}: {e}") from None
    if f"-----BEGIN {kind}".encode() not in data:
        raise SecurityError(f"{path}: expected a PEM {kind.lower()}, found none")
    return data


@dataclass(frozen=True)
class Security:
    """How one process's servers and channels are secured.

    ``Security()`` is plaintext, allowed on loopback only (tests, ``edge demo``).

    Attributes:
        ca: the cluster CA certificate (PEM); with ``cert`` and ``key``, mutual TLS.
        cert: this machine's certificate (PEM), used as server and as client.
        key: its private key (PEM).
        token: the cluster token: required from callers by servers, sent by channels.
        insecure: allow plaintext on non-loopback addresses.
        source: where it came from, for messages (the bundle folder).
    """

    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    insecure: bool = False
    source: str = ""

    def __post_init__(self):
        given = [x is not None for x in (self.ca, self.cert, self.key)]
        if any(given) and not all(given):
            raise SecurityError("mutual TLS needs all of ca, cert and key")
        if self.tls and self.insecure:
            raise SecurityError("give a certificate bundle or insecure, not both")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def insecure_loopback(cls) -> "Security":
        """Plaintext on loopback only: what tests and ``edge demo`` use."""
        return cls()

    @classmethod
    def plaintext(cls, token: str | None = None) -> "Security":
        """Plaintext anywhere (``--insecure``), optionally still checking a token."""
        return cls(token=token, insecure=True, source="--insecure")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Security":
        """Mutual TLS and the token from a bundle written by ``edge certs issue NAME``.

        A bare ``NAME`` that is not a folder here means ``default_certs_dir() / NAME``,
        so that on the machine holding the CA ``--certs coordinator`` works.

        Raises:
            SecurityError: the folder or one of its files is missing or malformed.
        """
        path = Path(path).expanduser()
        if not path.is_dir() and len(path.parts) == 1 and (default_certs_dir() / path).is_dir():
            path = default_certs_dir() / path
        if not path.is_dir():
            raise SecurityError(f"certificate bundle {path}: no such folder; make one with "
                                f"`edge certs issue NAME` (it writes {default_certs_dir()}/NAME)")
        if (path / "ca.key").exists() and not (path / "node.crt").exists():
            raise SecurityError(f"{path} is the CA folder of `edge certs init`; pass a bundle "
                                f"made by `edge certs issue NAME`, i.e. {path}/NAME")
        missing = [f for f in BUNDLE_FILES if not (path / f).is_file()]
        if missing:
            raise SecurityError(f"certificate bundle {path}: expected {', '.join(BUNDLE_FILES)}"
                                f", missing {', '.join(missing)}; re-issue it with "
                                "`edge certs issue NAME --force`")
        key_path = path / "node.key"
        if key_path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; chmod 600 it", key_path)
        return cls(ca=_read_pem(path / "ca.crt", "CERTIFICATE"),
                   cert=_read_pem(path / "node.crt", "CERTIFICATE"),
                   key=_read_pem(key_path, "PRIVATE KEY"),  # "EC PRIVATE KEY" too
                   token=read_token(path / "token"), source=str(path))

    @classmethod
    def from_options(cls, certs: str | None = None, insecure: bool = False,
                     token_file: str | None = None) -> "Security":
        """What the command line's ``--certs DIR``, ``--insecure`` and ``--token-file``
        ask for."""
        if certs and insecure:
            raise SecurityError("--certs and --insecure contradict each other; give one")
        if certs and token_file:
            raise SecurityError("--token-file is for plaintext; with --certs the token comes "
                                "from the bundle's `token` file")
        if certs:
            return cls.from_dir(certs)
        token = read_token(token_file) if token_file else None
        return cls.plaintext(token) if insecure else cls(token=token)

    # ------------------------------------------------------------------ checks

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def describe(self) -> str:
        """One line for logs: what protects this process's connections."""
        if self.tls:
            return f"mutual TLS + cluster token (bundle {self.source})"
        how = "plaintext" if self.insecure else "plaintext, loopback only"
        return how + (", cluster token" if self.token else ", no token")

    def require_safe(self, address: str, action: str) -> None:
        """Refuse plaintext off loopback unless ``insecure``: the one place this is decided.

        Args:
            address: the ``host:port`` listened on or connected to.
            action: ``listen on`` or ``connect to``, for the message.

        Raises:
            SecurityError: saying how to secure it or opt out.
        """
        if self.tls or self.insecure or is_loopback(address):
            return
        raise SecurityError(
            f"refusing to {action} {address} in plaintext: it is not a loopback address, so "
            "anyone on that network could read the tensors and drive the workers. Pass "
            "--certs DIR (a bundle made by `edge certs issue NAME`), or --insecure to accept "
            "that (in Python: Security.from_dir(DIR) or Security.plaintext())")

    # ------------------------------------------------------------------ gRPC pieces

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS for a server that requires a client certificate signed by the cluster CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS for a client: trust the cluster CA only, present this machine's certificate."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def server_interceptors(self) -> list[grpc.ServerInterceptor]:
        """The token check (with a token), then the role check (with TLS)."""
        return ([TokenCheck(self.token)] if self.token else []) + \
            ([RoleCheck()] if self.tls else [])


# ---------------------------------------------------------------------- the token


# Served without the token: the standard health service says SERVING or NOT_SERVING and
# nothing else, and Kubernetes' gRPC probes and grpc_health_probe cannot send a token.
# With mutual TLS a probe still needs a client certificate of the cluster.
OPEN_SERVICES = ("grpc.health.v1.Health",)


class TokenCheck(grpc.ServerInterceptor):
    """Aborts every call without the cluster token (UNAUTHENTICATED), of every service but
    :data:`OPEN_SERVICES`.

    A refused request is neither buffered nor deserialized (see ``_deny``).
    """

    def __init__(self, token: str):
        self._expected = token_entry(token)[1].encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if _service(handler_call_details.method) in OPEN_SERVICES:
            return handler
        given = [v for k, v in handler_call_details.invocation_metadata or ()
                 if k == TOKEN_HEADER]
        if len(given) == 1:
            value = given[0].encode() if isinstance(given[0], str) else given[0]
            if hmac.compare_digest(value, self._expected):
                return handler
            reason = ("the cluster token sent does not match this server's; the caller's "
                      "bundle or --token-file is from another cluster or an old token")
        elif not given:
            reason = (f"this server expects the cluster token (metadata '{TOKEN_HEADER}: "
                      "Bearer ...') and none was sent; pass --certs DIR (a bundle of "
                      "`edge certs issue`) or --token-file")
        else:
            reason = f"expected one '{TOKEN_HEADER}' metadata entry, got {len(given)}"
        return _deny(handler, handler_call_details.method, reason)


def _service(method: str) -> str:
    """``pkg.Service`` of a method path ``/pkg.Service/Method``."""
    return method.lstrip("/").split("/", 1)[0]


def _deny(handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
    def abort(_requests, context):
        log.warning("refused %s from %s: %s", method, context.peer(), reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    # A stream-request handler whatever the method's kind, and one that never iterates its
    # requests: gRPC reads a unary request whole before calling a unary handler, but a
    # streaming one reads messages only as it asks for them, so a refused caller's message
    # is neither buffered (up to the server's receive limit) nor parsed.
    behaviour = handler.stream_stream or handler.stream_unary
    if inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour):
        # On an asyncio server (a synchronous abort of a stream did not end the call).
        async def abort_async(_requests, context):
            log.warning("refused %s from %s: %s", method, context.peer(), reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        if handler.response_streaming:
            async def abort_stream(_requests, context):
                await abort_async(_requests, context)
                yield  # pragma: no cover (abort raises)
            return grpc.stream_stream_rpc_method_handler(abort_stream)
        return grpc.stream_unary_rpc_method_handler(abort_async)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    return grpc.stream_unary_rpc_method_handler(abort)


# ---------------------------------------------------------------------- roles


def peer_role(context: grpc.ServicerContext) -> str | None:
    """The role in the caller's verified certificate: ``client`` or ``node`` (``node``
    for a certificate without one); None when the call came without a certificate
    (plaintext)."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"] or not auth.get("x509_pem_cert"):
        return None
    uris = {u.decode(errors="replace") for u in auth.get("peer_uri", ())}
    roles = {r for r in ROLES if ROLE_URI.format(r) in uris}
    # One role per certificate is what `edge certs` issues; of several, the least.
    return next((r for r in ROLES if r in roles), "node")


class RoleCheck(grpc.ServerInterceptor):
    """Refuses a client-role certificate everything but :data:`CLIENT_METHODS` (and
    :data:`OPEN_SERVICES`): PERMISSION_DENIED, saying which role is needed.

    The role is known only from the call's context, so the check runs first thing in
    the handler, before the servicer's method; the request has been read by then only
    for a unary handler (edge's services take theirs as a stream: not read yet).
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in CLIENT_METHODS or _service(method) in OPEN_SERVICES:
            return handler
        return _require_node(handler, method)


def _role_refusal(context: grpc.ServicerContext, method: str) -> str:
    """Why the caller may not call ``method`` ("" if it may)."""
    role = peer_role(context)
    if role in (None, "node"):  # None: plaintext, no certificates, no roles
        return ""
    auth = context.auth_context()
    name = b",".join(auth.get("x509_common_name", ())).decode(errors="replace")
    reason = (f"{method} needs a certificate of role node (the coordinator and workers); "
              f"the caller's ({name or 'no name'}) has role {role}, which may call only "
              f"{', '.join(sorted(CLIENT_METHODS))}. A machine of the cluster needs a bundle "
              "from `edge certs issue NAME --role node`")
    log.warning("refused %s from %s: %s", method, context.peer(), reason)
    return reason


def _require_node(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    def check(behaviour):
        if inspect.iscoroutinefunction(behaviour):  # on an asyncio server
            async def checked_async(request, context):
                reason = _role_refusal(context, method)
                if reason:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
                return await behaviour(request, context)
            return checked_async
        if inspect.isasyncgenfunction(behaviour):
            async def checked_stream(request, context):
                reason = _role_refusal(context, method)
                if reason:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
                async for item in behaviour(request, context):
                    yield item
            return checked_stream

        def checked(request, context):
            reason = _role_refusal(context, method)
            if reason:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
            return behaviour(request, context)
        return checked

    kind = (("stream" if handler.request_streaming else "unary") + "_"
            + ("stream" if handler.response_streaming else "unary"))
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(check(getattr(handler, kind)), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class AioInterceptor(grpc.aio.ServerInterceptor):
    """One of the interceptors above on an asyncio server (``grpc.aio.server``): the same
    checks; a refusal's handler is synchronous, run in the server's thread pool."""

    def __init__(self, interceptor: grpc.ServerInterceptor):
        self._interceptor = interceptor

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return self._interceptor.intercept_service(lambda _details: handler,
                                                   handler_call_details)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every call of a channel.

    An interceptor rather than call credentials: gRPC sends call credentials over TLS only,
    and ``--insecure --token-file`` needs the token in plaintext too.
    """

    def __init__(self, token: str):
        self._entry = token_entry(token)

    def _details(self, d) -> _CallDetails:
        metadata = tuple(d.metadata or ()) + (self._entry,)
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Callable, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def token_entry(token: str) -> tuple[str, str]:
    """The metadata entry that carries ``token`` on a call."""
    return (TOKEN_HEADER, f"Bearer {token}")


def token_interceptor(token: str) -> grpc.UnaryUnaryClientInterceptor:
    """A client interceptor that sends ``token`` on every call (``grpc.intercept_channel``)."""
    return _BearerToken(token)


# ---------------------------------------------------------------------- the command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--certs``, ``--insecure`` and ``--token-file``, the same for every command that
    listens or connects."""
    g = parser.add_argument_group("security")
    g.add_argument("--certs", metavar="DIR",
                   help="this machine's bundle from `edge certs issue NAME` (ca.crt, node.crt, "
                        "node.key, token): mutual TLS and the cluster token; a bare NAME means "
                        "$EDGE_CERTS/NAME (default ~/.config/edge/certs/NAME)")
    g.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback address (anyone on the network "
                        "can read and send tensors); loopback is plaintext without it")
    g.add_argument("--token-file", metavar="FILE",
                   help="without --certs: a cluster token to require (servers) or send "
                        "(clients)")


def from_arguments(args: argparse.Namespace) -> Security:
    """The :class:`Security` that :func:`add_arguments`' options ask for."""
    return Security.from_options(args.certs, args.insecure, args.token_file)
