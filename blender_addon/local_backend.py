"""Starting and stopping a backend on this machine, for artists who do not run one themselves.

The backend is a separate Python (its own environment with torch and the weights); the add-on only
launches `<python> -m backend.cli serve ...` and stops it again. Output goes to a log file, whose
tail is shown when the process exits early.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from . import protocol


class LocalBackendError(RuntimeError):
    """The local backend cannot be started as configured; the message says what to fix."""


def serve_command(
    python: str, weights: str, bind: str, store: str, device: str = "cuda", sam_checkpoint: str = ""
) -> list[str]:
    """The command line that serves the backend on `bind` (a loopback address)."""
    if not python:
        raise LocalBackendError("set the backend's Python executable in the add-on preferences")
    if not Path(python).exists():
        raise LocalBackendError(f"the backend's Python executable {python} does not exist")
    if not weights or not Path(weights).is_dir():
        raise LocalBackendError(f"the weights folder {weights or '(not set)'} does not exist")
    if not protocol.is_loopback_address(bind):
        raise LocalBackendError(
            "a local backend listens on this machine only; set the address to "
            f"tcp://127.0.0.1:<port>, not {bind}"
        )
    command = [
        python,
        "-m",
        "backend.cli",
        "serve",
        "--weights",
        weights,
        "--bind",
        bind,
        "--store",
        store,
        "--device",
        device or "cuda",
    ]
    if sam_checkpoint:
        if not Path(sam_checkpoint).is_file():
            raise LocalBackendError(f"the SAM checkpoint {sam_checkpoint} does not exist")
        command += ["--sam", sam_checkpoint]
    return command


class LocalBackend:
    """One backend process started by the add-on."""

    def __init__(
        self,
        command: list[str],
        log_path: str | Path,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ):
        self.command = list(command)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalBackend:
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        flags = subprocess.CREATE_NEW_PROCESS_GROUP if sys.platform == "win32" else 0
        try:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=self.env,
                creationflags=flags,
            )
        except OSError as err:
            raise LocalBackendError(f"cannot start the backend ({self.command[0]}): {err}") from err
        finally:
            log.close()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the backend to stop (SIGTERM), then kill it after `timeout` seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until_serving(
        self, address: str, timeout: float, context=None, stop: threading.Event | None = None
    ) -> dict:
        """Say hello until the backend answers (returns its facts), it exits, the time runs out or `stop`."""
        from .client import BackendTimeout, Client

        deadline = time.monotonic() + timeout
        with Client(address, timeout=1.0, context=context, name="com4d-blender") as client:
            while True:
                if not self.running:
                    raise LocalBackendError(
                        f"the backend exited with code {self.returncode}; "
                        f"its log ends with:\n{self.log_tail()}"
                    )
                try:
                    return client.hello(timeout=min(0.5, max(deadline - time.monotonic(), 0.05)))
                except BackendTimeout:
                    if stop is not None and stop.is_set():
                        raise LocalBackendError("stopped waiting for the local backend") from None
                    if time.monotonic() > deadline:
                        raise LocalBackendError(
                            f"the backend did not answer within {timeout:g} s; see {self.log_path}"
                        ) from None
                    client.reconnect()


# -- the one local backend of this Blender session (thread-safe: a job's worker may start it) --------
_lock = threading.Lock()
_current: LocalBackend | None = None


def current() -> LocalBackend | None:
    """The backend this session started, if it is still running."""
    with _lock:
        return _current if _current is not None and _current.running else None


def ensure_started(
    command: list[str], log_path: str | Path, env: dict[str, str] | None = None
) -> LocalBackend:
    """Start the local backend unless this session's one is already running."""
    global _current
    with _lock:
        if _current is not None and _current.running:
            return _current
        _current = LocalBackend(command, log_path, env=env).start()
        return _current


def stop_current(timeout: float = 10.0) -> bool:
    """Stop the backend this session started; False if there was none running."""
    global _current
    with _lock:
        backend, _current = _current, None
    if backend is None or not backend.running:
        return False
    backend.stop(timeout)
    return True
