"""CurveZMQ key pairs for a backend that listens beyond this machine.

`com4d-backend keys DIR` writes:

    DIR/server.key                 the server's public key: give it to every client
    DIR/server.key_secret          the server's secret key: stays on the server (`serve --keys DIR`)
    DIR/clients/<name>.key         a client's public key: the server admits it (`serve --clients DIR/clients`)
    DIR/clients/<name>.key_secret  that client's secret key: copy it to the client machine

The files are ZeroMQ's own certificate format (zmq.auth), readable by any CurveZMQ tool.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth


def _write_pair(folder: Path, name: str, force: bool) -> tuple[Path, Path]:
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise FileExistsError(f"{public} already exists; pass --force to replace the keys")
    folder.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def make_keys(folder: str | os.PathLike, client: str | None = "client", force: bool = False) -> list[Path]:
    """Write the server's key pair (unless present) and, if `client` is given, one client's pair."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CurveZMQ support")
    folder = Path(folder).expanduser()
    written: list[Path] = []
    if force or not (folder / "server.key_secret").exists():
        written += _write_pair(folder, "server", force)
    if client is not None:
        written += _write_pair(folder / "clients", client, force)
    return written


def load_server_keys(folder: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) of the server from `folder/server.key_secret`, with a clear error if missing."""
    path = Path(folder).expanduser() / "server.key_secret"
    if not path.is_file():
        raise FileNotFoundError(f"no server key at {path}; make one with `com4d-backend keys {folder}`")
    public, secret = zmq.auth.load_certificate(str(path))
    if not public or not secret:
        raise ValueError(f"{path} does not hold a CurveZMQ key pair")
    return public, secret


def count_client_keys(folder: str | os.PathLike) -> int:
    """How many client public keys (`*.key`) a `--clients` folder holds."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no client key folder at {path}")
    return len(zmq.auth.load_certificates(str(path)))
