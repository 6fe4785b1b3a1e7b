"""The add-on's own ZeroMQ context, so unregistering can close every socket it made.

Blender hangs on quit if a context with open sockets is terminated (or never closed); sockets here
use LINGER=0 and the context is terminated in `unregister()`.
"""

from __future__ import annotations

import threading

import zmq

_lock = threading.Lock()
_context: zmq.Context | None = None


def context() -> zmq.Context:
    global _context
    with _lock:
        if _context is None or _context.closed:
            _context = zmq.Context()
        return _context


def close() -> None:
    """Close every socket of the context and terminate it."""
    global _context
    with _lock:
        ctx, _context = _context, None
    if ctx is not None and not ctx.closed:
        ctx.destroy(linger=0)
