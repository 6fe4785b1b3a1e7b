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
"""

from __future__ import annotations

import json
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

    def new_job(self, label: str | None = None) -> JobRecord:
        """Make a folder and record for a new job (state `queued`)."""
        with self._lock:
            while True:
                job = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
                if job not in self._records:
                    break
            (self.jobs_dir / job / "inputs").mkdir(parents=True)
            (self.jobs_dir / job / "out").mkdir()
            (self.jobs_dir / job / "stream").mkdir()
            record = JobRecord(job=job, label=label)
            self._records[job] = record
            self._write_record(record)
            return record

    def forget(self, job: str) -> None:
        """Drop a job that was never accepted (its folder is removed by the caller)."""
        with self._lock:
            self._records.pop(job, None)
            self._seq.pop(job, None)

    def get(self, job: str) -> JobRecord | None:
        if not isinstance(job, str) or not JOB_ID.match(job):
            return None
        with self._lock:
            return self._records.get(job)

    def update(self, job: str, **changes: Any) -> JobRecord:
        """Change fields of a job's record and write job.json atomically."""
        with self._lock:
            record = self._records[job]
            for key, value in changes.items():
                if key not in JobRecord.__dataclass_fields__:
                    raise KeyError(f"job records have no field {key!r}")
                setattr(record, key, plain(value))
            self._write_record(record)
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
        tmp.write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
        os.replace(tmp, target)

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

        Returns the sequence number and the message (for the server to send to subscribers)."""
        with self._lock:
            record = self._records[job]
            error = {"code": code, "message": message, "advice": advice}
            self.update(job, state=state, finished=time.time(), error=error, progress=record.progress)
            msg = protocol.error(code, message, job=job, advice=advice)
            return self.append_event(job, msg), msg

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
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(data)
        return target

    def copy_inputs(self, source_job: str, job: str) -> None:
        """Copy a stored job's inputs to another job (for `resubmit`)."""
        src = self.inputs_dir(source_job)
        dst = self.inputs_dir(job)
        shutil.rmtree(dst)
        shutil.copytree(src, dst, symlinks=True)

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
            seq = self._seq.get(job)
            if seq is None:
                seq = self._count_events(job)
            seq += 1
            arrays = {}
            for name, array in message.arrays.items():
                relative = f"stream/{seq:06d}_{name}.npy"
                np.save(self.job_path(job, relative), protocol.wire_array(array, name), allow_pickle=False)
                arrays[name] = relative
            line = {
                "seq": seq,
                "t": time.time(),
                "type": message.type,
                "fields": plain(message.fields),
                "arrays": arrays,
            }
            with open(self.job_dir(job) / "events.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
            self._seq[job] = seq
            return seq

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
