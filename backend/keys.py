"""CurveZMQ key pairs for a backend that listens beyond this machine.

`com4d-backend keys DIR` writes:

    DIR/server.key                 the server's public key: give it to every client
    DIR/server.key_secret          the server's secret key: stays on the server (`serve --keys DIR`)
    DIR/clients/<name>.key         a client's public key: the server admits it (`serve --clients DIR/clients`)
    DIR/clients/<name>.key_secret  that client's secret key: copy it to the client machine

The files are ZeroMQ's own certificate format (zmq.auth), readable by any CurveZMQ tool. A secret
key file is created with mode 0600 (never readable by others, not even for a moment).
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth


def _certificate(kind: str, public: bytes, secret: bytes | None = None) -> str:
    """A key file in zmq.auth's certificate format."""
    lines = [f"#   ZeroMQ CURVE {kind} Certificate (com4d-backend keys)", "", "metadata", "curve"]
    lines.append(f'    public-key = "{public.decode("ascii")}"')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write `path` created with `mode` from the start (replacing an old file only after it exists)."""
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_pair(folder: Path, name: str, force: bool) -> tuple[Path, Path]:
    public_path, secret_path = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not force and (public_path.exists() or secret_path.exists()):
        raise FileExistsError(f"{public_path} already exists; pass --force to replace the keys")
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    _write_new(secret_path, _certificate("**Secret**", public, secret), 0o600)
    _write_new(public_path, _certificate("Public", public), 0o644)
    return public_path, secret_path


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


def load_public_keys(folder: str | os.PathLike) -> frozenset[str]:
    """The z85 public keys of the `*.key` files in `folder` (e.g. the admins' keys)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no key folder at {path}")
    keys = frozenset(k.decode("ascii") for k in zmq.auth.load_certificates(str(path)))
    if not keys:
        raise ValueError(f"{path} holds no public keys (*.key)")
    return keys


def count_client_keys(folder: str | os.PathLike) -> int:
    """How many client public keys (`*.key`) a `--clients` folder holds."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no client key folder at {path}")
    return len(zmq.auth.load_certificates(str(path)))
