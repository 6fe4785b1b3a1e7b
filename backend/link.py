"""The link between a front end (`com4d-backend front`) and its workers (`serve --connect`).

A worker is today's backend with its socket swapped: a DEALER that connects to the front end's
worker ROUTER instead of a ROUTER that binds. Every message on the link is `[peer, header, blobs…]`:

- `peer` = a client's identity on the front end's client socket: a client request forwarded as it
  came, or the worker's reply or job event for that client. The worker's socket loop reads this
  exactly as it reads a ROUTER's frames (`frames[0]` = whom to answer), so one code path serves both.
- `peer` = `CONTROL` (empty): a message of the link itself (the types below), or a request the
  front end asks on its own behalf (`hello`, `ping`, `list_jobs` fanned out to every worker) and
  the worker's reply to it. A ROUTER never gives a client an empty identity, so the two cannot mix.

Job ids start with the worker's name (`gpu1-20261126-101500-3fa2c1`): the front end routes
`status`, `cancel`, `fetch` and `resubmit` by that prefix alone, so it keeps no table that a
restart could lose. docs/protocol.md §9 is the full text.
"""

from __future__ import annotations

import re
from typing import Any

from backend import protocol

CONTROL = b""  # the peer frame of the link's own messages

# A worker name: a letter, then letters, digits or "_" (no "-": it ends the name in a job id).
WORKER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")

# A worker is declared gone after this many of its heartbeat intervals without a message.
HEARTBEAT_LIVENESS = 4

_ANNOUNCE = {
    "name": "str",
    "instance": "str",
    "protocol": "int",
    "heartbeat_s": "number",
    "device": "str",
    "max_queue": "int",
    "length": "int",
    "queued": "int",
}

# Worker -> front end. `worker_ready` until the front end welcomes it, then `worker_heartbeat`
# every `heartbeat_s` and whenever its queue length changes; `worker_bye` when it stops.
WORKER_MESSAGES: dict[str, dict[str, str]] = {
    "worker_ready": _ANNOUNCE,
    "worker_heartbeat": _ANNOUNCE,
    "worker_bye": {"name": "str", "instance": "str"},
}

# Front end -> worker.
FRONT_MESSAGES: dict[str, dict[str, str]] = {
    "worker_welcome": {"paths_allowed": "bool", "front": "str"},
    "worker_refused": {"code": "str", "message": "str"},
    "client_gone": {"client": "bytes"},
}

_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "number": (int, float),
    "bool": (bool,),
    "bytes": (bytes,),
}


def check_worker_name(name: Any) -> str:
    """`name` if it can start job ids; ValueError saying what a name may hold otherwise."""
    if not isinstance(name, str) or not WORKER_NAME.match(name):
        raise ValueError(
            f"worker name {name!r:.40} is not allowed: use a letter, then up to 31 letters, digits or '_' (e.g. gpu0)"
        )
    return name


def job_prefix(name: str) -> str:
    """What the ids of worker `name`'s jobs start with."""
    return check_worker_name(name) + "-"


def owner_of(job: Any) -> str | None:
    """The worker name a job id starts with; None if the id does not start with one."""
    if not isinstance(job, str) or "-" not in job:
        return None
    name = job.split("-", 1)[0]
    return name if WORKER_NAME.match(name) else None


def check_link_address(address: str, role: str) -> None:
    """The link carries uploads and paths unencrypted: it must stay on this machine (loopback, ipc)."""
    if not protocol.is_loopback_address(address):
        raise ValueError(
            f"{role} {address} is not on this machine: workers and their front end talk over "
            "tcp://127.0.0.1:PORT or ipc://PATH (clients from afar reach the front end's own --bind)"
        )


def message(type_: str, id_: Any = None, **fields: Any) -> list[Any]:
    """The frames of one link message (after the ROUTER's identity frame, if any)."""
    return [CONTROL, *protocol.encode(protocol.make(type_, id_, **fields))]


def check(msg: protocol.Message, schemas: dict[str, dict[str, str]]) -> None:
    """ProtocolError unless `msg` has every field of its link type, each of the right kind."""
    schema = schemas.get(msg.type)
    if schema is None:
        raise protocol.ProtocolError("unknown_type", f"{msg.type!r:.64} is not a link message here")
    for name, kind in schema.items():
        value = msg.fields.get(name)
        if not isinstance(value, _KINDS[kind]) or (kind != "bool" and isinstance(value, bool)):
            raise protocol.ProtocolError("bad_field", f"link message {msg.type!r} needs a {kind} {name!r}")
