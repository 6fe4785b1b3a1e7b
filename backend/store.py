"""The job store: every job's inputs, parameters, event log and results, on disk.

One folder per job, so a client that disconnects loses nothing and a restarted server still
serves finished results:

    <store>/jobs/<job>/job.json         state, timestamps, label, request, error (written atomically)
    <store>/jobs/<job>/inputs/          uploaded video / frames / masks, prompts.json
    <store>/jobs/<job>/out/             the pipeline's output folder (docs/contracts.md)
    <store>/jobs/<job>/events.jsonl     one JSON line per event sent for the job (with a sequence number)
    <store>/jobs/<job>/stream/          the arrays of mesh events as .npy (loaded without pickle)

Everything written for a job goes through `job_path`, which refuses names that would leave the
job's folder. The store is shared by the server thread and the worker thread; one lock orders it.

A write that fails (disk full, read-only) leaves the in-memory record as it was and raises
`StoreWriteError`, except for a job's end (`fail`, `finish`): a job always reaches its final state
in memory, so clients see it, even when the disk refuses to record it.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backend import protocol

log = logging.getLogger("com4d.backend.store")

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def plain(value: Any) -> Any:
    """`value` with numpy scalars/arrays and tuples turned into JSON- and msgpack-safe values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class JobRecord:
    """What job.json holds. `request` describes the inputs (paths inside the job or given paths)."""

    job: str
    state: str = "queued"
    label: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    request: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    scene: str | None = None
    progress: dict[str, Any] | None = None
    owner: str | None = None  # who may see, cancel and fetch the job (backend/server.py `_owner`)

    def status_fields(self) -> dict[str, Any]:
        """The fields of a `job_status` message (and of each entry of `jobs`)."""
        return {
            "job": self.job,
            "state": self.state,
            "label": self.label,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": self.progress,
            "error": self.error,
            "scene": self.scene,
        }


class StoreError(Exception):
    """A job id or file name the store refuses (unsafe, or no such job)."""


class StoreWriteError(OSError):
    """The disk refused a write of the store (full, read-only, no permission). Its text names no
    server path, so it can go to a client as it is."""

    def __str__(self) -> str:
        return self.strerror or ""


# The errors of a disk that refuses writes (as opposed to a bug or a missing input).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO})


def is_disk_failure(exc: BaseException) -> bool:
    """True for an OSError that means "the disk refuses writes"."""
    return isinstance(exc, StoreWriteError) or (isinstance(exc, OSError) and exc.errno in DISK_ERRNOS)


def _write_failure(exc: OSError, what: str) -> StoreWriteError:
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return StoreWriteError(exc.errno, f"the job store could not write {what} ({reason})")


class JobStore:
    """Jobs on disk under `root`; safe to use from the server and worker threads together."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._records: dict[str, JobRecord] = {}
        self._seq: dict[str, int] = {}
        self._load_all()

    # -- jobs ----------------------------------------------------------------------------------

    def _load_all(self) -> None:
        for folder in sorted(self.jobs_dir.iterdir()):
            record = self._read_record(folder)
            if record is not None:
                self._records[record.job] = record

    @staticmethod
    def _read_record(folder: Path) -> JobRecord | None:
        try:
            data = json.loads((folder / "job.json").read_text(encoding="utf-8"))
            known = {k: v for k, v in data.items() if k in JobRecord.__dataclass_fields__}
            return JobRecord(**known)
        except (OSError, ValueError, TypeError):
            return None  # not a job folder (or a job.json cut short by a crash while first written)

    def new_job(self, label: str | None = None, owner: str | None = None) -> JobRecord:
        """Make a folder and record for a new job (state `queued`); StoreWriteError if the disk refuses."""
        with self._lock:
            while True:
                job = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
                if job not in self._records:
                    break
            record = JobRecord(job=job, label=label, owner=owner)
            try:
                for part in ("inputs", "out", "stream"):
                    (self.jobs_dir / job / part).mkdir(parents=True)
                self._write_record(record)
            except OSError as exc:
                shutil.rmtree(self.jobs_dir / job, ignore_errors=True)
                raise exc if isinstance(exc, StoreWriteError) else _write_failure(exc, "a new job") from None
            self._records[job] = record
            return record

    def delete(self, job: str) -> None:
        """Remove a job and its folder (retention, or a submit that was refused after all)."""
        with self._lock:
            self._records.pop(job, None)
            self._seq.pop(job, None)
        shutil.rmtree(self.job_dir(job), ignore_errors=True)

    def enforce_retention(self, keep_days: float, max_bytes: int) -> int:
        """Delete finished jobs older than `keep_days`, then the oldest finished ones while the
        store holds more than `max_bytes` (queued and running jobs are never deleted). Returns the
        bytes the store holds afterwards. Walks every file: call it off the socket thread."""
        cutoff = time.time() - keep_days * 86400
        finished = sorted(
            (r for r in self.list() if r.state in protocol.FINAL_STATES), key=lambda r: r.finished or r.created
        )
        for record in finished:
            if (record.finished or record.created) < cutoff:
                log.info("retention: deleting job %s (finished over %g days ago)", record.job, keep_days)
                self.delete(record.job)
        used, sizes = self.usage()
        for record in finished:
            if used <= max_bytes:
                break
            if record.job in sizes and self.get(record.job) is not None:
                log.info("quota: deleting job %s to bring the store under %d bytes", record.job, max_bytes)
                self.delete(record.job)
                used -= sizes[record.job]
        return used

    def usage(self) -> tuple[int, dict[str, int]]:
        """(bytes of the whole store, bytes of each job) as on disk now. Walks every file: call it
        off the socket thread."""
        sizes: dict[str, int] = {}
        for folder in self.jobs_dir.iterdir():
            total = 0
            for dirpath, _, names in os.walk(folder):
                for name in names:
                    try:
                        total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                    except OSError:
                        pass
            sizes[folder.name] = total
        return sum(sizes.values()), sizes

    def get(self, job: str) -> JobRecord | None:
        if not isinstance(job, str) or not JOB_ID.match(job):
            return None
        with self._lock:
            return self._records.get(job)

    def update(self, job: str, **changes: Any) -> JobRecord:
        """Change fields of a job's record and write job.json atomically."""
        with self._lock:
            record = copy.deepcopy(self._records[job])
            for key, value in changes.items():
                if key not in JobRecord.__dataclass_fields__:
                    raise KeyError(f"job records have no field {key!r}")
                setattr(record, key, plain(value))
            self._write_record(record)  # StoreWriteError: the record in memory stays as it was
            self._records[job] = record
            return record

    def note_progress(self, job: str, progress: dict[str, Any]) -> None:
        """Keep the latest progress in memory (job.json gets it with the next state change)."""
        with self._lock:
            record = self._records.get(job)
            if record is not None:
                record.progress = plain(progress)

    def _write_record(self, record: JobRecord) -> None:
        target = self.job_dir(record.job) / "job.json"
        tmp = target.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            raise _write_failure(exc, f"the record of job {record.job}") from None

    def list(self, limit: int | None = None) -> list[JobRecord]:
        """Jobs, newest first."""
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: (r.created, r.job), reverse=True)
        return records if limit is None else records[: max(limit, 0)]

    def recover(self) -> list[str]:
        """After a restart: jobs left queued or running are marked `interrupted` (they can be
        resubmitted) and their event log ends with an `interrupted` error. Returns their ids."""
        interrupted = []
        with self._lock:
            for record in list(self._records.values()):
                if record.state in ("queued", "running"):
                    self.fail(
                        record.job,
                        "interrupted",
                        "interrupted",
                        "the server stopped before this job finished; resubmit it",
                    )
                    interrupted.append(record.job)
        return interrupted

    def fail(
        self, job: str, state: str, code: str, message: str, advice: str | None = None
    ) -> tuple[int, protocol.Message]:
        """Put a job in a final state other than `done` and log its last event, an `error`.

        Returns the sequence number and the message (for the server to send to subscribers).
        Never fails for the disk: see `finish`."""
        error = {"code": code, "message": message, "advice": advice}
        msg = protocol.error(code, message, job=job, advice=advice)
        return self.finish(job, msg, state=state, error=error)

    def finish(self, job: str, final: protocol.Message, **changes: Any) -> tuple[int, protocol.Message]:
        """Put a job in its final state (`changes`, with `state`) and log its final event `final`.

        The record in memory always changes, so `status`, `fetch` and the queue see the end of the
        job; if the disk refuses, the write is logged and skipped (a restart then finds the job
        unfinished on disk and marks it `interrupted`). Returns (sequence number, `final`)."""
        with self._lock:
            record = self._records[job]
            changes.setdefault("finished", time.time())
            changes.setdefault("progress", record.progress)
            for key, value in changes.items():
                setattr(record, key, plain(value))
            try:
                self._write_record(record)
            except StoreWriteError as exc:
                log.error("job %s ends as %s, but %s", job, record.state, exc)
            try:
                return self.append_event(job, final), final
            except StoreWriteError as exc:
                log.error("job %s: its final event is not logged: %s", job, exc)
                seq = self._next_seq(job)
                self._seq[job] = seq
                return seq, final

    # -- paths -------------------------------------------------------------------------------------

    def job_dir(self, job: str) -> Path:
        if not isinstance(job, str) or not JOB_ID.match(job):
            raise StoreError(f"{job!r:.80} is not a job id")
        return self.jobs_dir / job

    def inputs_dir(self, job: str) -> Path:
        return self.job_dir(job) / "inputs"

    def out_dir(self, job: str) -> Path:
        return self.job_dir(job) / "out"

    def job_path(self, job: str, relative: str) -> Path:
        """`relative` inside the job's folder; StoreError if it would point outside it."""
        base = self.job_dir(job).resolve()
        parts = relative.split("/")
        if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"{relative!r:.80} is not a safe path inside a job folder")
        target = (base / relative).resolve()
        if base not in target.parents:
            raise StoreError(f"{relative!r:.80} leads outside the job folder")
        return target

    def write_input(self, job: str, relative: str, data: Any) -> Path:
        """Write an uploaded file under inputs/ (no symlinks followed out of the job's folder)."""
        target = self.job_path(job, "inputs/" + relative)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(data)
        except OSError as exc:
            raise _write_failure(exc, f"the inputs of job {job}") from None
        return target

    def result_files(self, job: str) -> list[dict[str, Any]]:
        """Every file under the job's out/ folder: `{"path": relative, "size": bytes}`, sorted."""
        out = self.out_dir(job)
        files = []
        for dirpath, _, names in os.walk(out):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    files.append({"path": path.relative_to(out).as_posix(), "size": path.stat().st_size})
        return sorted(files, key=lambda f: f["path"])

    def read_result(self, job: str, relative: str, offset: int, max_bytes: int) -> tuple[bytes, int]:
        """Up to `max_bytes` of the result file `relative` (under out/) from `offset`; and its size.
        StoreError if there is no such file."""
        try:
            path = self.job_path(job, "out/" + relative)
        except StoreError:
            raise StoreError(f"{relative!r:.80} is not a result file of job {job}") from None
        if not path.is_file() or (self.out_dir(job).resolve() not in path.parents):
            raise StoreError(f"job {job} has no result file {relative!r:.80}")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(min(offset, size))
            return fh.read(max_bytes), size

    def copy_inputs(self, source_job: str, job: str) -> None:
        """Give another job the inputs of a stored one (for `resubmit`): hard links, so a resubmit
        costs no disk space (inputs are never written after the submit); copies where the
        filesystem has no links."""

        def link_or_copy(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        src = self.inputs_dir(source_job)
        dst = self.inputs_dir(job)
        try:
            shutil.rmtree(dst)
            shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
        except OSError as exc:
            raise _write_failure(exc, f"the inputs of job {job}") from None

    # -- events ------------------------------------------------------------------------------------

    def _count_events(self, job: str) -> int:
        path = self.job_dir(job) / "events.jsonl"
        if not path.exists():
            return 0
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)

    def append_event(self, job: str, message: protocol.Message) -> int:
        """Log one outgoing event (its arrays as .npy files); returns its sequence number (1, 2, ...)."""
        with self._lock:
            seq = self._next_seq(job)
            arrays = {}
            line = {"seq": seq, "t": time.time(), "type": message.type, "fields": plain(message.fields)}
            try:
                for name, array in message.arrays.items():
                    relative = f"stream/{seq:06d}_{name}.npy"
                    np.save(self.job_path(job, relative), protocol.wire_array(array, name), allow_pickle=False)
                    arrays[name] = relative
                with open(self.job_dir(job) / "events.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({**line, "arrays": arrays}) + "\n")
            except OSError as exc:
                raise _write_failure(exc, f"an event of job {job}") from None
            self._seq[job] = seq
            return seq

    def _next_seq(self, job: str) -> int:
        seq = self._seq.get(job)
        return (self._count_events(job) if seq is None else seq) + 1

    def log_marker(self, job: str, kind: str, **fields: Any) -> int:
        """Log an internal note (e.g. `cancel_requested`); `read_events` skips these unless asked."""
        return self.append_event(job, protocol.Message("_" + kind, None, dict(fields)))

    def read_events(self, job: str, markers: bool = False) -> list[tuple[int, protocol.Message]]:
        """The job's logged events in order, with arrays memory-mapped from the .npy files.

        A line cut short by a crash is skipped; so is an event whose arrays are missing."""
        path = self.job_dir(job) / "events.jsonl"
        with self._lock:
            try:
                lines = path.read_bytes().splitlines()
            except FileNotFoundError:
                return []
        out = []
        for raw in lines:
            try:
                entry = json.loads(raw)
                seq, type_, fields = int(entry["seq"]), str(entry["type"]), dict(entry["fields"])
                arrays = {
                    name: np.load(self.job_path(job, rel), mmap_mode="r", allow_pickle=False)
                    for name, rel in dict(entry.get("arrays", {})).items()
                }
            except (ValueError, KeyError, TypeError, OSError, StoreError):
                continue
            if type_.startswith("_") and not markers:
                continue
            out.append((seq, protocol.Message(type_, None, fields, arrays)))
        return out
