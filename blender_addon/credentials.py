"""The CurveZMQ keys for a backend on another machine, read from the preferences.

A backend that listens beyond loopback encrypts with CurveZMQ: the client needs the server's
public key (40 characters, or the `server.key` file `com4d-backend keys` wrote) and, when the
server admits listed clients only, its own key pair (a `clients/<name>.key_secret` file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .client import read_key_pair, read_public_key


class CredentialsError(ValueError):
    """A key in the preferences cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Credentials:
    server_key: bytes | None = None
    client_keys: tuple[bytes, bytes] | None = None


def load_credentials(server_key: str = "", client_key_file: str = "") -> Credentials:
    """Keys from the preference values (empty values: no encryption, for a loopback backend)."""
    text = server_key.strip()
    server = None
    if text and Path(text).expanduser().is_file():
        try:
            server = read_public_key(Path(text).expanduser())
        except (OSError, ValueError) as err:
            raise CredentialsError(f"the server key file {text} cannot be read: {err}") from err
    elif text:
        if len(text) != 40:
            raise CredentialsError(
                "the server public key must be 40 characters (z85) or the path of the server.key file"
            )
        server = text.encode("ascii")
    client = None
    if client_key_file.strip():
        path = Path(client_key_file.strip()).expanduser()
        try:
            client = read_key_pair(path)
        except (OSError, ValueError) as err:
            raise CredentialsError(f"the client key file {path} cannot be used: {err}") from err
        if server is None:
            raise CredentialsError("a client key needs the server's public key too")
    return Credentials(server, client)
