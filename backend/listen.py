"""The socket clients reach: where it binds, what it admits, how large a request may be.

The backend (`com4d-backend serve`) faces clients with one ROUTER and these rules (docs/deploy.md):
loopback binds only unless CurveZMQ keys are given, and then only admitted clients; frames above
the largest allowed file are refused by libzmq before it allocates them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from backend import protocol


class SecurityError(Exception):
    """The service refuses to start with this configuration (e.g. a public bind without keys)."""


@dataclass
class ListenConfig:
    """How the client socket listens and what it accepts. Sizes in bytes."""

    bind: str = "tcp://127.0.0.1:5555"
    server_keys: tuple[bytes, bytes] | None = None  # (public, secret) z85: switches CurveZMQ on
    authorized_clients: Path | None = None  # folder of client public keys (*.key) admitted
    allow_any_client: bool = False  # with keys: admit any client that knows the server's key
    max_header_bytes: int = 1 << 20
    max_video_bytes: int = 2 << 30
    max_upload_bytes: int = 4 << 30  # all blobs of one submit
    max_files: int = 4096

    @property
    def limits(self) -> protocol.Limits:
        """The decoder's limits for requests (clients send no arrays of their own, only files)."""
        return protocol.Limits(
            max_header_bytes=self.max_header_bytes,
            max_blobs=self.max_files,
            max_array_bytes=16 << 20,
            max_file_bytes=self.max_video_bytes,
            max_message_bytes=self.max_upload_bytes,
        )

    @property
    def loopback(self) -> bool:
        return protocol.is_loopback_address(self.bind)


def check_security(cfg: ListenConfig) -> None:
    """Refuse what is not safe: a non-loopback bind needs keys and a policy for clients."""
    if cfg.loopback:
        return
    if cfg.server_keys is None:
        raise SecurityError(
            f"refusing to bind {cfg.bind}: a non-loopback address needs CurveZMQ keys. Make them with "
            "`com4d-backend keys DIR` and start with `--keys DIR`, or bind tcp://127.0.0.1:PORT."
        )
    if cfg.authorized_clients is None and not cfg.allow_any_client:
        raise SecurityError(
            f"refusing to bind {cfg.bind}: say which clients may connect, with `--clients DIR` (their "
            "public keys; `com4d-backend keys` makes one) or `--allow-any-client`."
        )


def open_listener(context: zmq.Context, cfg: ListenConfig) -> tuple[zmq.Socket, Any]:
    """The bound client ROUTER and its CurveZMQ authenticator (None without keys).

    Checks `cfg` first (SecurityError); a bind that fails raises OSError, with nothing left open."""
    check_security(cfg)
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 100_000)
    router.setsockopt(zmq.MAXMSGSIZE, max(cfg.max_video_bytes, cfg.max_header_bytes))
    router.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    auth = None
    if cfg.server_keys is not None:
        auth = _start_authenticator(context, cfg)
        router.curve_server = True
        router.curve_publickey, router.curve_secretkey = cfg.server_keys
    try:
        router.bind(cfg.bind)
    except zmq.ZMQError as exc:
        router.close(0)
        if auth is not None:
            auth.stop()
        raise OSError(f"cannot bind {cfg.bind}: {exc}") from exc
    return router, auth


def _start_authenticator(context: zmq.Context, cfg: ListenConfig) -> Any:
    from zmq.auth import CURVE_ALLOW_ANY
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context, log=logging.getLogger("com4d.backend.auth"))
    auth.start()
    if cfg.authorized_clients is not None:
        auth.configure_curve(domain="*", location=str(cfg.authorized_clients))
    else:
        auth.configure_curve(domain="*", location=CURVE_ALLOW_ANY)
    return auth


def bound_address(sock: zmq.Socket) -> str:
    """The endpoint a socket is bound to, with a `:*` port resolved."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
