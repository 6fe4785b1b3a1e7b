"""One reconstruction on a backend, run from a worker thread so Blender's UI never waits.

The worker owns the ZeroMQ client (a socket belongs to the thread that uses it): it says hello,
submits, follows the job's events and sends `cancel` when asked. It never touches bpy; everything
it learns goes into `events`, a thread-safe queue that the main thread drains (job_session.py).
Each queue item is a `JobEvent(kind, data)` with kind:

- "connected"  data: the server's hello fields
- "accepted"   data: {"job": id}
- "message"    data: a protocol.Message of the job (progress, mesh, tracked_mesh, warning, done, error)
- "connection" data: {"state": "starting" | "connected" | "no_reply", "text": ...}
- "failed"     data: {"code", "message"} when the client itself failed (no backend, lost connection)
- "cancelled"  data: None; cancelled before the job was submitted
- "finished"   data: None; always the last item
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import protocol
from .client import BackendError, BackendTimeout, Client
from .credentials import Credentials
from .local_backend import LocalBackendError

CLIENT_NAME = "com4d-blender"
STOP_CHECK_S = 0.1  # the longest the worker waits without checking whether it should stop


@dataclass(frozen=True)
class Timeouts:
    """How long to wait for the backend, in seconds (the add-on preferences set them)."""

    connect: float = 5.0  # the first hello
    submit: float = 120.0  # the submit reply (includes uploading the video)
    quiet: float = 5.0  # a job with no event for this long gets a ping
    lost: float = 30.0  # pings unanswered for this long: the connection is lost
    start: float = 120.0  # a local backend started for this job may take this long to answer


@dataclass(frozen=True)
class JobEvent:
    kind: str
    data: Any = None


@dataclass
class JobRequest:
    """What to reconstruct; `upload` None means: send the path on loopback, the bytes otherwise."""

    video: str
    prompts: dict
    params: dict = field(default_factory=dict)
    label: str = ""
    upload: bool | None = None


def open_client(address: str, credentials: Credentials | None, timeout: float, context=None) -> Client:
    """A client for `address`, encrypted when the credentials hold the server's key."""
    credentials = credentials or Credentials()
    return Client(
        address,
        credentials.server_key,
        credentials.client_keys,
        timeout=timeout,
        context=context,
        name=CLIENT_NAME,
    )


def check_connection(
    address: str, credentials: Credentials | None = None, timeout: float = 5.0, context=None
) -> dict:
    """Say hello once and return the server's facts; raises BackendError (BackendTimeout) if none."""
    with open_client(address, credentials, timeout, context) as client:
        return client.hello(timeout=timeout)


class BackendJob:
    """A reconstruction followed from a daemon thread; `cancel()` and `close()` are thread-safe."""

    def __init__(
        self,
        address: str,
        request: JobRequest,
        credentials: Credentials | None = None,
        timeouts: Timeouts | None = None,
        context=None,
        ensure_backend: Callable | None = None,
    ):
        """`ensure_backend`, when given, is called (in the worker) if nobody answers at `address`; it
        starts a local backend and returns its `LocalBackend`, which the job then waits for."""
        self.ensure_backend = ensure_backend
        self.address = address
        self.request = request
        self.credentials = credentials or Credentials()
        self.timeouts = timeouts or Timeouts()
        self.context = context
        self.events: queue.Queue[JobEvent] = queue.Queue()
        self.job_id: str | None = None
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="com4d-job", daemon=True)

    def start(self) -> BackendJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the backend to stop the job (the job then ends with an `error` of code `cancelled`)."""
        self._cancel.set()

    def close(self, wait: float = 2.0) -> None:
        """Stop following the job (the backend keeps it) and end the thread."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(wait)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    # -- the worker thread ----------------------------------------------------------------------
    def _put(self, kind: str, data: Any = None) -> None:
        self.events.put(JobEvent(kind, data))

    def _run(self) -> None:
        client = None
        try:
            client = open_client(self.address, self.credentials, self.timeouts.connect, self.context)
            self._put("connected", self._hello(client))
            if self._cancel.is_set():
                self._put("cancelled")  # before anything was submitted
                return
            if self._stop.is_set():
                return
            self.job_id = self._submit(client)
            self._put("accepted", {"job": self.job_id})
            self._follow(client)
        except BackendTimeout as err:
            self._put("failed", {"code": "no_backend", "message": str(err)})
        except LocalBackendError as err:
            self._put("failed", {"code": "local_backend", "message": str(err)})
        except BackendError as err:
            self._put("failed", {"code": err.code, "message": str(err)})
        except OSError as err:
            self._put("failed", {"code": "bad_input", "message": f"cannot read the video: {err}"})
        except Exception as err:  # the thread must always end with "finished"
            self._put("failed", {"code": "internal", "message": f"{type(err).__name__}: {err}"})
        finally:
            if client is not None:
                client.close()
            self._put("finished")

    def _hello(self, client: Client) -> dict:
        try:
            return self._hello_until(client, self.timeouts.connect)
        except BackendTimeout:
            if self.ensure_backend is None:
                raise
        self._put("connection", {"state": "starting", "text": "starting the local backend"})
        backend = self.ensure_backend()
        backend.wait_until_serving(self.address, self.timeouts.start, self.context, stop=self._stop)
        client.reconnect()
        return self._hello_until(client, self.timeouts.connect)

    def _hello_until(self, client: Client, timeout: float) -> dict:
        """Say hello in short tries (so closing the job is never held up) until `timeout` runs out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return client.hello(timeout=min(STOP_CHECK_S * 5, max(deadline - time.monotonic(), 0.01)))
            except BackendTimeout:
                if time.monotonic() >= deadline or self._stop.is_set():
                    raise BackendTimeout(
                        f"no reply from {self.address} within {timeout:g} s; is the backend running, and are "
                        "the address and keys right?"
                    ) from None

    def _submit(self, client: Client) -> str:
        """Submit, then wait for `accepted` in short slices (an upload can take long; closing must not)."""
        request = self.request
        same_machine = (
            protocol.is_loopback_address(self.address) if request.upload is None else not request.upload
        )
        video: Any = request.video
        if not same_machine and Path(video).is_file():
            video = Path(video).read_bytes()
        try:
            return client.submit(
                video=video,
                prompts=request.prompts,
                params=request.params,
                label=request.label or None,
                video_filename=Path(request.video).name,
                same_machine=same_machine,
                timeout=STOP_CHECK_S * 5,
            )
        except BackendTimeout:
            pass
        deadline = time.monotonic() + self.timeouts.submit
        while not self._stop.is_set() and time.monotonic() < deadline:
            message = client.poll(STOP_CHECK_S)
            if message is None:
                continue
            if message.type == "accepted":
                return message["job"]
            if (
                message.type == "error"
                and message.get("request") in (None, "submit")
                and not message.get("job")
            ):
                raise BackendError.from_message(message)
        raise BackendTimeout(
            f"the backend at {self.address} did not accept the job within {self.timeouts.submit:g} s"
        )

    def _follow(self, client: Client) -> None:
        job = self.job_id
        cancel_sent = False
        last_event = time.monotonic()
        unanswered_since: float | None = None
        while not self._stop.is_set():
            if self._cancel.is_set() and not cancel_sent:
                cancel_sent = True
                client.send("cancel", {"job": job})
            message = client.poll(STOP_CHECK_S)
            now = time.monotonic()
            if message is None:
                if now - last_event < self.timeouts.quiet:
                    continue
                unanswered_since = self._check_alive(client, job, unanswered_since)
                last_event = time.monotonic()
                continue
            last_event = now
            if message.get("job") != job:
                continue  # replies to our pings and cancels, other jobs' events
            self._put("message", message)
            if message.type in protocol.FINAL_TYPES:
                return

    def _check_alive(self, client: Client, job: str, unanswered_since: float | None) -> float | None:
        """Ping a quiet backend; after `lost` seconds without an answer give up with "failed"."""
        try:
            client.ping(timeout=min(self.timeouts.quiet, STOP_CHECK_S * 10))
        except BackendTimeout:
            started = unanswered_since or time.monotonic()
            waited = time.monotonic() - started
            if waited >= self.timeouts.lost:
                raise BackendTimeout(
                    f"the backend at {self.address} stopped answering for {waited:.0f} s; job {job} may "
                    "still be running there"
                ) from None
            self._put("connection", {"state": "no_reply", "text": f"no reply for {waited:.0f} s"})
            client.reconnect()
            return started
        if unanswered_since is not None:  # back after a gap: ask for everything again
            client.fetch(job)
        self._put("connection", {"state": "connected", "text": "connected"})
        return None
