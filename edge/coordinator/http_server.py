"""Serving the HTTP app (:mod:`edge.coordinator.http_api`) with uvicorn, on a thread of
the coordinator's process, secured as its gRPC side is.

- TLS: with a certificate bundle (``--certs``) the server speaks HTTPS with the
  coordinator's certificate (clients trust the cluster's ``ca.crt``; none needs a client
  certificate: the API key stands for it). Without one, plain HTTP is allowed on loopback
  only, or anywhere with ``--insecure`` (``Security.require_safe``, the gRPC side's rule).
- The API key: ``Authorization: Bearer KEY`` is required whenever the server listens off
  loopback; KEY is ``--api-key-file``'s, else the cluster token. Off loopback without
  either the server refuses to start. On loopback a key is required only when
  ``--api-key-file`` names one.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edge.address import parse_address
from edge.errors import EdgeError, SecurityError
from edge.transport.security import Security, is_loopback, read_token

__all__ = ["HttpServer", "api_key_for", "start_http"]

log = logging.getLogger(__name__)


def api_key_for(address: str, security: Security, api_key_file: str | None = None) -> str | None:
    """The key HTTP clients must send, or None when none is required (module docstring).

    Args:
        address: the ``host:port`` the HTTP server listens on.
        security: the coordinator's security (its token is the default key).
        api_key_file: a file holding the key (``--api-key-file``).

    Raises:
        SecurityError: off loopback with no key to require.
    """
    if api_key_file:
        return read_token(api_key_file)
    if is_loopback(address):
        return None
    if security.token:
        return security.token
    raise SecurityError(
        f"refusing to serve HTTP on {address} without an API key: it is not a loopback "
        f"address, so anyone on that network could use the model. Pass --api-key-file FILE, "
        f"or a cluster token (--certs DIR or --token-file FILE)")


def _ssl_context(security: Security) -> ssl.SSLContext:
    """A server context with the coordinator's certificate and key (PEM in memory)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: a private folder, removed at once.
    with tempfile.TemporaryDirectory(prefix="edge-http-") as tmp:
        cert, key = Path(tmp) / "node.crt", Path(tmp) / "node.key"
        cert.write_bytes(security.cert)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(security.key)
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class HttpServer:
    """A uvicorn server on its own thread.

    Attributes:
        port: the bound port.
        app: the ASGI app served.
        url: ``http(s)://host:port``.
    """

    def __init__(self, app: Any, address: str, ssl_context: ssl.SSLContext | None = None):
        import uvicorn

        host, port = parse_address(address, allow_port_zero=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:  # a port taken, an address not on this machine
            self._sock.close()
            raise EdgeError(f"cannot serve HTTP on {address}: {e.strerror or e}") from None
        self.app = app
        self.port = self._sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if ssl_context else 'http'}://{shown}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        config.load()
        config.ssl = ssl_context  # uvicorn takes files; ours come from the bundle in memory
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True, name="http")

    def start(self, timeout: float = 10.0) -> "HttpServer":
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                self.stop()  # the socket too, not left bound
                raise RuntimeError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop taking requests, give those in flight up to 5 s, close the socket (again:
        a no-op)."""
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


def start_http(pipeline: Any, address: str, security: Security, *,
               api_key_file: str | None = None, model_name: str | None = None,
               max_body: int | None = None, generator: Any = None) -> HttpServer:
    """Serve the OpenAI-compatible API of a started pipeline on ``address``.

    Args:
        pipeline: the pipeline.
        address: ``host:port`` (port 0: any free one).
        security: the coordinator's: TLS with its certificate, the rule for plaintext,
            the default API key.
        api_key_file: a file with the API key (default: the cluster token off loopback).
        model_name: the model id (default the plan's model name).
        max_body: the largest request body, in bytes.
        generator: the :class:`~edge.coordinator.generate.Generator` the gRPC face uses
            too (its sequences and queue are then shared); default a new one.

    Raises:
        SecurityError: plaintext off loopback without ``insecure``, or no API key off it.
    """
    from edge.coordinator.http_api import MAX_BODY_BYTES, create_app

    if not security.tls:
        security.require_safe(address, "serve HTTP on")
    key = api_key_for(address, security, api_key_file)
    app = create_app(pipeline, model_name, key, max_body or MAX_BODY_BYTES, generator)
    server = HttpServer(app, address, _ssl_context(security) if security.tls else None)
    server.start()
    log.info("OpenAI-compatible API on %s (%s, %s)", server.url,
             "TLS" if security.tls else "plaintext",
             "API key required" if key else "no API key: loopback only")
    return server
